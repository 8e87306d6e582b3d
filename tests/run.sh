#!/usr/bin/env bash
# Sets up everything the tests need, then runs the whole suite. Steps already done are skipped,
# so running it again is quick. Extra arguments go to pytest (e.g. -k style).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { printf '\n== %s\n' "$*"; }

step "worker environment (install.py, as a user's install makes it)"
"$PY" install.py
WORKER="$(pwd)/.venv-worker/bin/python"

step "test runner environment (.venv-test: a host-like Python without torch)"
[ -x .venv-test/bin/python ] || "$PY" -m venv .venv-test
.venv-test/bin/python -m pip install -q --disable-pip-version-check -r tests/requirements.txt

step "gradio 3.41.2 and 4.40.0 environments for the browser tests"
for v in 3 4; do
  [ -x ".venv-gradio$v/bin/python" ] || "$PY" -m venv ".venv-gradio$v"
  ".venv-gradio$v/bin/python" -m pip install -q --disable-pip-version-check -r "tests/ui/requirements-gradio$v.txt"
done

step "Chromium for the browser tests"
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

step "tests"
export I2L_WORKER_PYTHON="$WORKER"
export I2L_GRADIO3_PYTHON="$(pwd)/.venv-gradio3/bin/python"
export I2L_GRADIO4_PYTHON="$(pwd)/.venv-gradio4/bin/python"
export I2L_CHROMIUM="$(command -v chromium)"
exec .venv-test/bin/python -m pytest tests "$@"
