#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint (ruff, import contracts, mypy) and run the whole test suite.
# Fails when any check fails or when no test ran.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || exit 1
.venv/bin/ruff check agent protocol tests scripts || exit 1
# The layering contracts and the type checker: both configured in pyproject.toml
# ([tool.importlinter], [tool.mypy]).
.venv/bin/lint-imports || exit 1
.venv/bin/mypy || exit 1
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" = 5 ]; then
  echo "test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
