#!/usr/bin/env bash
# Set up shardmesh on a fresh machine (Python 3.11+, no GPU needed): system build deps for
# libp2p's fastecdsa, a virtualenv in .venv, torch 2.13.0 (CPU build), the project and its
# test tools. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

need_pkgs=()
command -v gcc >/dev/null 2>&1 || need_pkgs+=(gcc)
[ -e /usr/include/gmp.h ] || [ -e /usr/include/x86_64-linux-gnu/gmp.h ] \
  || [ -e /usr/include/aarch64-linux-gnu/gmp.h ] || need_pkgs+=(libgmp-dev)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "setup: installing ${need_pkgs[*]} (needed to build libp2p's fastecdsa)"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" python3-dev >/dev/null
  else
    echo "setup: please install ${need_pkgs[*]} with your package manager and run again" >&2
    exit 1
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: the development and CI machines carry its CPU build on disk; a bare
# 'torch' (or a range admitting newer releases) could pull a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch 2.13.0 (CPU)"
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
echo "setup: installing shardmesh and its test tools"
"$VENV/bin/python" -m pip install -q -e '.[test]'
echo "setup: done ($("$VENV/bin/shardmesh" --help >/dev/null && echo "shardmesh CLI ready"))"
