"""vit_jax: a Vision Transformer trained from scratch on CIFAR-10 in JAX."""

import sys

from vit_jax import errors

if errors.started_as_command(sys.orig_argv):  # before the command's module imports jax
    errors.handle_signals()
