#!/usr/bin/env bash
# Set up the environment, then run the whole test suite (unit tests + the slow end-to-end tests:
# notebooks under papermill, torchrun, the book build and a headless-Chromium check of the result page).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` for the fast unit tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo ">> installing Debian chromium for the rendered-page test"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || echo ">> could not install chromium: the browser test will be skipped"
    fi
fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
    echo "!! pytest collected no tests: the test setup is broken" >&2
    exit 1
fi
exit "$rc"
