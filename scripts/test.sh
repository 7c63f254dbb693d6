#!/usr/bin/env bash
# Set up (idempotent) and run the test suite. Extra arguments go to pytest, e.g.
#   bash scripts/test.sh -m "not slow"     # skip the slowest cases
#   bash scripts/test.sh tests/test_dti.py
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export NIPYPE_NO_ET=1
exec .venv/bin/python -m pytest "$@"
