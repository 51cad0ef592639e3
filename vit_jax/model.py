"""The Vision Transformer in Flax (linen), written to mirror timm's `VisionTransformer`.

`parity/model.py` is the same model in PyTorch: the same classes in the same order, with the same
attribute names, so that the weight port is a table and the two can be compared stage by stage.
Framework defaults that differ are pinned where they are used: LayerNorm epsilon 1e-6 (timm's and
Flax's default, not PyTorch's 1e-5), exact erf GELU (not Flax's tanh approximation), images NHWC
here and NCHW in PyTorch.
"""

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

from vit_jax.config import ModelConfig

LN_EPS = 1e-6  # timm's ViT; so timm users loading our weights get the same logits.
trunc_init = nn.initializers.truncated_normal(stddev=0.02)  # timm's init of weights and embeddings


def gelu(x):
    """The exact (erf) GELU, written as PyTorch computes it: 0.5 x (1 + erf(x / sqrt 2)).

    Flax's nn.gelu defaults to the tanh form; its exact form goes through erfc, which XLA:CPU
    expands into a polynomial twice as slow as erf's."""
    return 0.5 * x * (1.0 + lax.erf(x * jnp.asarray(2 ** -0.5, x.dtype)))


class PatchProjection(nn.Module):
    """nn.Conv(features, (p, p), strides p, padding VALID) as one matmul: NHWC images -> (B, N, D).

    The same parameters as the convolution (kernel (p, p, C, D), bias), used as a (p * p * C, D)
    matrix on the patches flattened in (row, column, channel) order. The strided convolution's weight
    gradient would be a dilated convolution, slow on a CPU; this one's is a matmul."""

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
        patches = patches.reshape(B, (H // p) * (W // p), p * p * C)  # (B, N, p*p*C), row-major
        dtype = self.dtype or x.dtype
        return patches.astype(dtype) @ kernel.reshape(-1, self.features).astype(dtype) + bias.astype(dtype)


class StridedConv3x3(nn.Module):
    """nn.Conv(features, (3, 3), strides 2, padding 1) as one matmul: (B, H, W, C) -> (B, H/2, W/2, F).

    Each output pixel's 3x3 neighbourhood of the zero-padded input, gathered by nine strided slices
    in (row, column, channel) order, times the kernel (3, 3, C, F) as a (9C, F) matrix, as
    PatchProjection does; its gradients are a matmul and the slices' scatter. (Not timed against
    lax.conv; the fast recipe's step with this stem took what the patch projection's did.)"""

    features: int
    dtype: str | None = None

    @nn.compact
    def __call__(self, x):
        B, H, W, C = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, C, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        taps = [padded[:, dy:dy + H:2, dx:dx + W:2] for dy in range(3) for dx in range(3)]  # each (B, H/2, W/2, C)
        dtype = self.dtype or x.dtype
        return (jnp.concatenate(taps, axis=-1).astype(dtype) @ kernel.reshape(9 * C, -1).astype(dtype)
                + bias.astype(dtype))


class PatchEmbed(nn.Module):
    """The image as tokens: (B, H, W, 3) -> (B, N, D), N = (H / patch_size)^2 in row-major order.

    stem 'patch': each patch projected linearly (timm's PatchEmbed). stem 'conv': a backbone of 3x3
    stride-2 convolutions with GELU, then each of its output pixels projected linearly (timm's
    HybridEmbed with patch_size 1)."""

    config: ModelConfig

    def setup(self):
        c = self.config
        if c.stem == "conv":
            self.backbone = [StridedConv3x3(w, dtype=c.dtype) for w in c.stem_widths]  # backbone_0, ...
        self.proj = PatchProjection(c.embed_dim, 1 if c.stem == "conv" else c.patch_size, dtype=c.dtype)

    def __call__(self, x):
        if self.config.stem == "conv":
            for conv in self.backbone:
                x = gelu(conv(x))
        return self.proj(x)


def attention_implementation(config: ModelConfig, tokens: int | None = None) -> str:
    """With config.attention 'auto': 'cudnn' (the fused kernel) on an NVIDIA GPU in bfloat16 for an even
    number of tokens (default: the model's), else 'xla'. cuDNN refused the tutorial's 197 tokens in
    training (jax 0.11.2 on an H200, 2026-12-04: "Unsupported sequence length Q 197, KV 197")."""
    if config.attention != "auto":
        return config.attention
    tokens = config.num_tokens if tokens is None else tokens
    return "cudnn" if jax.default_backend() == "gpu" and config.dtype == "bfloat16" and tokens % 2 == 0 else "xla"


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, as timm has it."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.qkv = nn.Dense(3 * c.embed_dim, dtype=c.dtype, kernel_init=trunc_init)
        self.proj = nn.Dense(c.embed_dim, dtype=c.dtype, kernel_init=trunc_init)
        self.proj_drop = nn.Dropout(c.drop_rate)

    def __call__(self, x, deterministic: bool):
        B, N, D = x.shape
        H = self.config.num_heads
        qkv = self.qkv(x).reshape(B, N, 3, H, D // H)  # timm's channel order: (q|k|v) x heads x head_dim
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, N, H, hd)
        q = q * (D // H) ** -0.5  # scaled before the product, as timm and the twin do
        if self.is_mutable_collection("intermediates"):
            # Asked for the weights (visualization): the same attention, its softmax spelled out and kept.
            attn = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32), axis=-1)  # (B, H, N, N)
            self.sow("intermediates", "attn", attn)
            x = jnp.einsum("bhqk,bkhd->bqhd", attn.astype(v.dtype), v)
        else:
            kernel = attention_implementation(self.config, N)
            x = jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation=kernel)
        return self.proj_drop(self.proj(x.reshape(B, N, D)), deterministic=deterministic)


class Mlp(nn.Module):
    config: ModelConfig

    def setup(self):
        c = self.config
        self.fc1 = nn.Dense(int(c.embed_dim * c.mlp_ratio), dtype=c.dtype, kernel_init=trunc_init)
        self.drop1 = nn.Dropout(c.drop_rate)
        self.fc2 = nn.Dense(c.embed_dim, dtype=c.dtype, kernel_init=trunc_init)
        self.drop2 = nn.Dropout(c.drop_rate)

    def __call__(self, x, deterministic: bool):
        x = self.drop1(gelu(self.fc1(x)), deterministic=deterministic)
        return self.drop2(self.fc2(x), deterministic=deterministic)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    config: ModelConfig
    drop_path: float = 0.0

    def setup(self):
        c = self.config
        self.norm1 = nn.LayerNorm(epsilon=LN_EPS, dtype=c.dtype)
        self.attn = Attention(c)
        # Stochastic depth: dropout broadcast over tokens and channels drops whole samples' residual
        # branches and rescales the rest by 1/keep, which is exactly timm's DropPath.
        self.drop_path1 = nn.Dropout(self.drop_path, broadcast_dims=(1, 2))
        self.norm2 = nn.LayerNorm(epsilon=LN_EPS, dtype=c.dtype)
        self.mlp = Mlp(c)
        self.drop_path2 = nn.Dropout(self.drop_path, broadcast_dims=(1, 2))

    def __call__(self, x, deterministic: bool):
        x = x + self.drop_path1(self.attn(self.norm1(x), deterministic), deterministic=deterministic)
        return x + self.drop_path2(self.mlp(self.norm2(x), deterministic), deterministic=deterministic)


class PatchDropout(nn.Module):
    """timm's PatchDropout: in training, each image keeps a random int(N (1 - rate)) of its N patch tokens
    (at least one, in random order); the class token, if any, stays first. (B, T, D) -> (B, T', D).
    A call's `rate`, if given, replaces the module's (a token schedule: `--early_patch_drop_rate`)."""

    rate: float
    prefix_tokens: int

    def __call__(self, x, deterministic: bool, rate: float | None = None):
        rate = self.rate if rate is None else rate
        if deterministic or rate == 0.0:
            return x
        prefix, x = x[:, :self.prefix_tokens], x[:, self.prefix_tokens:]
        B, N, _ = x.shape
        keep = max(1, int(N * (1.0 - rate)))
        order = jnp.argsort(jax.random.normal(self.make_rng("dropout"), (B, N)), axis=-1)[:, :keep]
        return jnp.concatenate([prefix, jnp.take_along_axis(x, order[:, :, None], axis=1)], axis=1)


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021). Input: float images (B, H, W, 3), normalized.

    As timm's: with a class token whose final-norm output the head reads (global_pool 'token'), or,
    with global_pool 'avg', the mean of the patch tokens through its own norm (fc_norm; no final
    norm), with or without a class token.
    """

    config: ModelConfig

    def setup(self):
        c = self.config
        self.patch_embed = PatchEmbed(c)
        if c.class_token:
            self.cls_token = self.param("cls_token", trunc_init, (1, 1, c.embed_dim))
        self.pos_embed = self.param("pos_embed", trunc_init, (1, c.num_tokens, c.embed_dim))
        self.pos_drop = nn.Dropout(c.drop_rate)
        self.patch_drop = PatchDropout(c.patch_drop_rate, int(c.class_token))
        rates = [c.drop_path_rate * i / max(c.depth - 1, 1) for i in range(c.depth)]  # linear, as timm
        self.blocks = [Block(c, drop_path=r) for r in rates]  # named blocks_0, blocks_1, ...
        if c.global_pool == "avg":
            self.fc_norm = nn.LayerNorm(epsilon=LN_EPS, dtype=c.dtype)
        else:
            self.norm = nn.LayerNorm(epsilon=LN_EPS, dtype=c.dtype)
        self.head = nn.Dense(c.num_classes, dtype=c.dtype, kernel_init=trunc_init)

    def forward_features(self, x, train: bool = False, patch_drop_rate: float | None = None):
        """Images -> tokens (B, T, D) after the blocks (and the final norm, with the class token's
        pooling), and the named stages along the way. patch_drop_rate: in training, instead of the config's."""
        stages = {}
        x = self.patch_embed(x.astype(self.config.dtype))  # (B, N, D)
        if self.config.class_token:
            cls = jnp.broadcast_to(self.cls_token, (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
            x = jnp.concatenate([cls, x], axis=1)  # (B, N+1, D)
        x = x + self.pos_embed.astype(x.dtype)
        x = stages["embed"] = self.pos_drop(x, deterministic=not train)
        x = self.patch_drop(x, deterministic=not train, rate=patch_drop_rate)
        for i, block in enumerate(self.blocks):
            x = stages[f"block{i:02d}"] = block(x, deterministic=not train)
        if self.config.global_pool == "token":
            x = stages["norm"] = self.norm(x)
        return x, stages

    def forward_head(self, x, stages: dict):
        """Tokens -> class logits (float32): from the class token, or the normed mean of the patch tokens."""
        if self.config.global_pool == "avg":
            x = stages["pool"] = self.fc_norm(x[:, int(self.config.class_token):].mean(axis=1))  # (B, D)
        else:
            x = x[:, 0]
        return self.head(x).astype(jnp.float32)

    def __call__(self, x, train: bool = False, return_stages: bool = False, patch_drop_rate: float | None = None):
        x, stages = self.forward_features(x, train, patch_drop_rate)
        logits = stages["logits"] = self.forward_head(x, stages)
        return (logits, stages) if return_stages else logits


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: ModelConfig, rng: jax.Array):
    """Random initial parameters for `config` (float32). Jitted: one compiled program instead of a
    compilation per initializer (the same bits, and seconds less at every start)."""
    dummy = jnp.zeros((1, config.img_size, config.img_size, 3), jnp.float32)
    return VisionTransformer(config).init(rng, dummy)["params"]


def count_params(params) -> int:
    return sum(p.size for p in jax.tree.leaves(params))
