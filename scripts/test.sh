#!/usr/bin/env bash
# Sets up .venv (first run only) and runs the test suite: bash scripts/test.sh [pytest args]
# The real-data test needs CIFAR10_NPZ (the JPEG copy) or CIFAR10_ARCHIVE (the official archive);
# without either it is skipped and says so.
set -euo pipefail
source "$(dirname "$0")/setup.sh" "test"
cd "$(dirname "$0")/.."
exec python -m pytest "$@"
