#!/usr/bin/env bash
# Sets up .venv (first run only) and trains: bash scripts/train.sh [--flags of python -m vit_jax.train]
set -euo pipefail
source "$(dirname "$0")/setup.sh" ""
cd "$(dirname "$0")/.."
exec python -m vit_jax.train "$@"
