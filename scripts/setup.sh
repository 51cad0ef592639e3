#!/usr/bin/env bash
# Creates .venv and installs the project into it, once per change of pyproject.toml.
# Usage: source scripts/setup.sh EXTRA[,EXTRA]   (e.g. "test", or "" for training only)
# On a machine with an NVIDIA GPU (nvidia-smi present) the cuda12 extra is added.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extras="${extras:+$extras,}cuda12"
fi
venv="${VENV:-$root/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
stamp="$venv/.vit_jax_installed"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16) [$extras]"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # --no-compile: modules are compiled to bytecode as they are first imported (below), not all ~100
  # packages' files at install: on a fresh 2-core machine, about a minute less.
  "$venv/bin/python" -m pip install --quiet --no-compile -e "$root${extras:+[$extras]}"
  echo "$want" >> "$stamp"
fi
export PATH="$venv/bin:$PATH"
unset PYTHONDONTWRITEBYTECODE  # the bytecode caches of a --no-compile install are written on first import
