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

export I2L_TEST_WORKER_PYTHON="$WORKER"
export I2L_GRADIO3_PYTHON="$(pwd)/.venv-gradio3/bin/python"
export I2L_GRADIO4_PYTHON="$(pwd)/.venv-gradio4/bin/python"
export I2L_CHROMIUM="$(command -v chromium)"
export I2L_TEST_CACHE="${I2L_TEST_CACHE:-$(pwd)/.cache/i2l-test}"

# Tests of the worker's own code (torch, diffsynth) run in the worker's interpreter. pytest for it
# goes to a folder of its own, so the worker environment stays exactly as install.py made it.
WORKER_TESTS="tests/test_engine.py tests/test_weights_streaming.py tests/test_lora_file.py tests/test_importcache.py
  tests/test_rank_cap.py tests/test_generators.py"
step "worker-side tests (in the worker's interpreter)"
PYTEST_DIR=.cache/worker-pytest
[ -d "$PYTEST_DIR/pytest" ] || "$WORKER" -m pip install -q --disable-pip-version-check --target "$PYTEST_DIR" pytest==9.2.0
# diffusers (for test_generators.py), without dependencies: the worker has the rest; only what it lacks
[ -d "$PYTEST_DIR/diffusers" ] || "$WORKER" -m pip install -q --disable-pip-version-check --no-deps --target "$PYTEST_DIR" \
  diffusers==0.42.1 importlib_metadata==10.2.0 zipp==4.1.2 lazy-importer==0.1.0
rc=0
PYTHONPATH="$(pwd)/$PYTEST_DIR" "$WORKER" -m pytest $WORKER_TESTS "$@" || rc=$?

step "host-side tests (a WebUI-like Python without torch; real worker processes, real browsers)"
ignores=""
for t in $WORKER_TESTS; do ignores="$ignores --ignore=$t"; done
.venv-test/bin/python -m pytest tests $ignores "$@" || rc=$?
exit $rc
