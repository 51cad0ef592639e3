#!/usr/bin/env bash
# The GPU run in one script, for a machine with one NVIDIA GPU, JAX (CUDA) and PyTorch, and neither
# TensorFlow nor network (no install: the project is used from this checkout). At most 9 minutes:
#
#   bash scripts/gpu_check.sh [--smoke] DATA OUT
#
# DATA: cifar10_jpeg.npz with make_cifar10_archive.py beside it (turned into the official layout
# first, in the background), or the official cifar-10-binary.tar.gz or its folder. It prints the GPU
# and the versions; times vit_jax.bench for the fast, tutorial and cifar models at batch 64, 512 and
# 1024 in float32 and bfloat16 (images/s, ms/step, MFU); trains the fast recipe and the tutorial's,
# 20 epochs each at batch 64 on the real data; times parity.bench for the fast model (JAX vs PyTorch
# eager and torch.compile); runs parity.compare on the GPU at the highest matmul precision; and
# writes every figure to OUT/summary.json, the outputs to OUT/steps.log and OUT/train_RECIPE.log.
# Exit status 0 when every step succeeded, 1 when one failed (the others still ran: OUT/summary.json
# says which).
#
# --smoke runs the same steps tiny (the test recipe, a few batches), on whatever device there is:
# the test suite runs it on the CPU. Needs nothing beyond the project's own dependencies; dm-pix and
# tensorflow are not used (augmentation is plain jax.numpy, --archive reads the data with numpy).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
