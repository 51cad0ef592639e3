#!/usr/bin/env bash
# Sets up .venv (first run only) and runs the test suite: bash scripts/test.sh [pytest args]
# The real-data test needs VIT_JAX_CIFAR10_SOURCE: a folder with cifar-10-binary.tar.gz, or with the
# offline copy's make_cifar10_archive.py (.ci/run points it at ../shared/data); without it, it is
# skipped and says so.
set -euo pipefail
source "$(dirname "$0")/setup.sh" "test"
cd "$(dirname "$0")/.."
# A worker (pytest-xdist) per core, at most 4, a file each at a time (so a file's shared fixtures are
# built once), the longest files first (tests/conftest.py): most tests wait on a subprocess starting
# or compiling, single-threaded. PYTEST_WORKERS=N: N workers; 0: one process.
workers="$(nproc 2>/dev/null || echo 2)"
exec python -m pytest -n "${PYTEST_WORKERS:-$(( workers < 4 ? workers : 4 ))}" --dist loadfile --no-loadscope-reorder "$@"
