"""The model's linear layers, with a backward pass that XLA:CPU runs on its fast matmul kernels.

`Dense` has nn.Dense's parameters ('kernel' (in, out), 'bias'), initialization and dtype, and
`PatchProjection` nn.Conv's for a patch-sized, patch-strided, unpadded convolution ('kernel' (p, p,
3, D), 'bias'), computed as one matmul on the flattened patches. Same parameters, same numbers; what
differs is speed on the CPU:

- XLA:CPU's fast matmul library (YNNPACK) takes a dot only when its left operand contracts its last
  dimension and its right one is row-major. Autodiff states the weight gradient as x^T g and the
  input gradient as g W^T, neither of which is, so they fell to slower kernels after a transposed
  copy. The backward below spells them as plain matmuls on operands transposed explicitly, and
  `optimization_barrier` keeps XLA from folding the transposes back into the dots.
- A strided convolution's weight gradient is a dilated convolution, slow on the CPU; the patch
  projection's is one matmul.

Elsewhere (GPU, TPU) the custom backward is left out: their compilers fuse the plain dot best.
"""

import jax
import flax.linen as nn
from jax import lax

_barrier = lax.optimization_barrier


def _matmul(x, w):
    """x (..., in) @ w (in, out)."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def _linear_cpu(x, w, b):
    return _matmul(x, w) + b


def _linear_cpu_fwd(x, w, b):
    return _matmul(x, w) + b, (x, w)


def _linear_cpu_bwd(residuals, g):
    x, w = residuals
    fan_in, fan_out = w.shape
    x2d, g2d = x.reshape(-1, fan_in), g.reshape(-1, fan_out)  # (M, in), (M, out): M = batch x tokens
    # dW = x^T g: transpose the smaller of the two (M, .) operands, so the copy is the cheaper one.
    dw = (_barrier(g2d.T) @ x2d).T if fan_out < fan_in else _barrier(x2d.T) @ g2d
    dx = _matmul(g, _barrier(w.T))
    return dx, dw, g2d.sum(axis=0)


_linear_cpu.defvjp(_linear_cpu_fwd, _linear_cpu_bwd)


def linear(x, w, b):
    """x @ w + b over the last axis (the gradients are autodiff's, to float32 rounding)."""
    if jax.default_backend() == "cpu":
        return _linear_cpu(x, w, b)
    return _matmul(x, w) + b


class Dense(nn.Module):
    """nn.Dense: the same parameters, initialization and dtype; computed by `linear`."""

    features: int
    dtype: str | None = None
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        dtype = self.dtype or x.dtype
        return linear(x.astype(dtype), kernel.astype(dtype), bias.astype(dtype))


class PatchProjection(nn.Module):
    """nn.Conv(features, (p, p), strides p, padding VALID) as one matmul: NHWC images -> (B, N, D).

    Patches are taken in row-major order and flattened in (row, column, channel) order, the layout of
    the convolution's kernel (p, p, C, D), which is used reshaped to (p * p * C, D)."""

    features: int
    patch_size: int
    dtype: str | None = None

    @nn.compact
    def __call__(self, x):
        B, H, W, C = x.shape
        p = self.patch_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, C, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        patches = x.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)  # (B, H/p, W/p, p, p, C)
        patches = patches.reshape(B, (H // p) * (W // p), p * p * C)  # (B, N, p*p*C)
        dtype = self.dtype or x.dtype
        return linear(patches.astype(dtype), kernel.reshape(-1, self.features).astype(dtype), bias.astype(dtype))
