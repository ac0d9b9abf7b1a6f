#!/usr/bin/env bash
# Install shardmesh as a system service: a virtual environment in PREFIX (default
# /opt/shardmesh), /etc/shardmesh/config.toml from the commented example (never overwritten),
# the systemd unit, /usr/local/bin/shardmesh, and where systemd runs: enabled and started.
# Idempotent: a second run changes nothing it does not have to. One line a step.
#
#   sudo scripts/install.sh [--prefix DIR] [--no-start]
#   sudo scripts/install.sh --uninstall      # everything but the state dir /var/lib/shardmesh
#
# --root DIR installs into a tree under DIR instead of / (tests, image builds): systemctl is
# not called there, and the venv's scripts name DIR in their '#!' lines.
# --source PATH installs the package from PATH (a checkout or a wheel; default: this
# checkout); --no-deps installs only shardmesh itself, not torch and the other dependencies.
set -euo pipefail

SRC_DIR=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/shardmesh
ROOT=/
SOURCE=$SRC_DIR
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
UNINSTALL=0
START=1
DEPS=1
UNIT_NAME=shardmesh.service
MARKER=.shardmesh-install

say() { echo "install: $*"; }
die() { echo "install: error: $*" >&2; exit 1; }
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit "${1:-0}"
}

while [ $# -gt 0 ]; do
  case $1 in
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
    --source) SOURCE=${2:?--source needs a path}; shift 2 ;;
    --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
    --uninstall) UNINSTALL=1; shift ;;
    --no-start) START=0; shift ;;
    --no-deps) DEPS=0; shift ;;
    -h|--help) usage 0 ;;
    *) echo "install: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# The unit names PREFIX in ExecStart=: keep it a plain absolute path.
[[ $PREFIX =~ ^/[A-Za-z0-9._/+-]*$ ]] || die "--prefix must be an absolute path without spaces, got '$PREFIX'"
[ "$PREFIX" != / ] || die "--prefix must not be /"
[ -d "$ROOT" ] || die "--root $ROOT is not a directory"
ROOT=$(cd "$ROOT" && pwd)
R=${ROOT%/}  # prefix for paths inside the root ('' for /)

DEST=$R$PREFIX
VENV=$DEST/venv
ETC=$R/etc/shardmesh
CONFIG=$ETC/config.toml
EXAMPLE=$SRC_DIR/systemd/config.example.toml
UNIT_SRC=$SRC_DIR/systemd/$UNIT_NAME
UNIT=$R/etc/systemd/system/$UNIT_NAME
LINK=$R/usr/local/bin/shardmesh
STATE=$R/var/lib/shardmesh

if [ "$ROOT" = / ] && [ "$(id -u)" != 0 ]; then
  die "run as root (sudo), or use --root DIR to install into a staging tree"
fi
# Only a live systemd (sd_booted(3): /run/systemd/system exists) is told; never inside --root.
SYSTEMD=0
if [ "$ROOT" = / ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  SYSTEMD=1
fi

uninstall() {
  if [ $SYSTEMD = 1 ] && systemctl cat "$UNIT_NAME" >/dev/null 2>&1; then
    systemctl disable --now "$UNIT_NAME" >/dev/null 2>&1 || true
    say "stopped and disabled $UNIT_NAME"
  fi
  if [ -e "$UNIT" ]; then
    rm -f "$UNIT"
    say "removed $UNIT"
    if [ $SYSTEMD = 1 ]; then systemctl daemon-reload; say "reloaded systemd"; fi
  fi
  if [ -L "$LINK" ] && [ "$(readlink "$LINK")" = "$PREFIX/venv/bin/shardmesh" ]; then
    rm -f "$LINK"
    say "removed $LINK"
  fi
  if [ -e "$DEST/$MARKER" ]; then
    rm -rf "$DEST"
    say "removed $DEST"
  elif [ -e "$DEST" ]; then
    say "left $DEST: no $MARKER in it, so this installer did not make it"
  fi
  if [ -f "$CONFIG" ]; then
    # An edited config is the admin's work: keep it for a later install.
    if cmp -s "$CONFIG" "$EXAMPLE"; then
      rm -f "$CONFIG"
      say "removed $CONFIG (unchanged from the example)"
    else
      say "kept $CONFIG: it has local changes"
    fi
  fi
  if [ -d "$ETC" ] && rmdir "$ETC" 2>/dev/null; then say "removed $ETC"; fi
  for cache in "$R/var/cache/shardmesh" "$R/var/cache/private/shardmesh"; do
    if [ -e "$cache" ] || [ -L "$cache" ]; then rm -rf "$cache"; say "removed $cache"; fi
  done
  if [ -e "$STATE" ]; then
    say "kept state dir $STATE (this node's identity key); delete it to forget the node"
  fi
  say "uninstalled"
}

install_venv() {
  if [ -x "$VENV/bin/python" ]; then
    say "kept venv $VENV"
  else
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
      || die "$PYTHON is not Python 3.11 or newer (use --python)"
    mkdir -p "$DEST"
    "$PYTHON" -m venv "$VENV" \
      || die "cannot create a venv with $PYTHON (Debian/Ubuntu: apt-get install python3-venv)"
    say "created venv $VENV"
  fi
  touch "$DEST/$MARKER"
  local pip=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
  if [ $DEPS = 1 ]; then
    # torch first and pinned, as scripts/setup.sh does: a bare 'torch' could pull a build
    # other than the one these machines (or the GPU's driver) are meant to run.
    if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
      say "kept torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
    else
      "${pip[@]}" install "$TORCH_SPEC" || die "pip could not install $TORCH_SPEC"
      say "installed $TORCH_SPEC"
    fi
    "${pip[@]}" install "$SOURCE" \
      || die "pip could not install shardmesh's dependencies (libp2p builds with gcc and libgmp-dev)"
  fi
  # Always the given source's code, even where the version number did not change.
  "${pip[@]}" install --no-deps --force-reinstall "$SOURCE" \
    || die "pip could not install shardmesh from $SOURCE"
  local version
  version=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("shardmesh"))')
  say "installed shardmesh $version from $SOURCE into $VENV"
}

install_config() {
  mkdir -p "$ETC"
  chmod 755 "$ETC"
  if [ -e "$CONFIG" ]; then
    say "kept existing $CONFIG"
  else
    install -m 644 "$EXAMPLE" "$CONFIG"
    say "wrote $CONFIG from the commented example"
  fi
}

install_unit() {
  mkdir -p "$(dirname "$UNIT")"
  local tmp
  tmp=$(mktemp)
  sed "s|/opt/shardmesh/venv/|$PREFIX/venv/|g" "$UNIT_SRC" > "$tmp"
  if [ -f "$UNIT" ] && cmp -s "$tmp" "$UNIT"; then
    rm -f "$tmp"
    say "kept $UNIT (up to date)"
  else
    install -m 644 "$tmp" "$UNIT"
    rm -f "$tmp"
    say "installed $UNIT"
  fi
}

install_link() {
  mkdir -p "$(dirname "$LINK")"
  local target=$PREFIX/venv/bin/shardmesh
  if [ -L "$LINK" ] && [ "$(readlink "$LINK")" = "$target" ]; then
    say "kept $LINK -> $target"
  elif [ -e "$LINK" ] && [ ! -L "$LINK" ]; then
    say "left $LINK alone: it is not a symlink (run $target directly)"
  else
    ln -sfn "$target" "$LINK"
    say "linked $LINK -> $target"
  fi
}

start_service() {
  if [ $SYSTEMD = 0 ]; then
    say "systemd does not run here: start it with 'systemctl enable --now $UNIT_NAME' where it does"
    return
  fi
  systemctl daemon-reload
  say "reloaded systemd"
  local was_active=0
  systemctl is-active --quiet "$UNIT_NAME" && was_active=1
  systemctl enable --quiet "$UNIT_NAME"
  say "enabled $UNIT_NAME"
  if [ $START = 0 ]; then
    say "not started (--no-start): 'systemctl start $UNIT_NAME' starts it"
  elif [ $was_active = 1 ]; then
    # The package was reinstalled: run the new code (SIGTERM drains sessions first).
    systemctl restart --no-block "$UNIT_NAME"
    say "restarting $UNIT_NAME to run the new code ('journalctl -fu shardmesh' follows it)"
  else
    # --no-block: READY comes only after the blocks load, which can take minutes.
    systemctl start --no-block "$UNIT_NAME"
    say "starting $UNIT_NAME ('systemctl status shardmesh' and 'sudo shardmesh status' follow it)"
  fi
}

if [ $UNINSTALL = 1 ]; then
  uninstall
  exit 0
fi
[ -f "$UNIT_SRC" ] && [ -f "$EXAMPLE" ] || die "$SRC_DIR is not a shardmesh checkout"
install_venv
install_config
install_unit
install_link
start_service
say "done"
