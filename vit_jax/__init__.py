"""vit_jax: a Vision Transformer trained from scratch on CIFAR-10 in JAX."""
