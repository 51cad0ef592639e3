"""The Vision Transformer in PyTorch: the twin of `vit_jax/model.py`.

The same classes in the same order with the same attribute names, so the two files read side by side
and the weight port (`parity/port.py`) is a table. Its `state_dict` keys are timm's
`VisionTransformer` keys, and with the same weights it computes what timm's model computes. The
framework defaults that differ are pinned here as on the Flax side: LayerNorm epsilon 1e-6, exact
erf GELU, and images NCHW (the Flax model takes NHWC).
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from vit_jax.config import ModelConfig

LN_EPS = 1e-6  # as vit_jax.model.LN_EPS (PyTorch's default is 1e-5)
FLAX_ONLY = ("dtype", "attention")  # how the Flax side computes; the twin computes in float32, its own way


def gelu(x):
    return F.gelu(x, approximate="none")  # exact erf form, as vit_jax.model.gelu


def trunc_normal_(tensor, std: float):
    # Cut at 2 standard deviations, as Flax's truncated_normal (timm's a=-2, b=2 are absolute).
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


class DropPath(nn.Module):
    """Stochastic depth: drops a sample's whole residual branch, rescaling the kept ones by 1/keep."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep


def lecun_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """Flax's default conv init, so a random twin starts from the same distribution: LeCun normal
    truncated at 2 std, rescaled by 0.8796 (the std of a standard normal cut at +-2); zero bias."""
    fan_in = conv.weight[0].numel()
    trunc_normal_(conv.weight, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978)
    nn.init.zeros_(conv.bias)
    return conv


def conv_stem(config: ModelConfig) -> nn.Sequential:
    """The conv stem's backbone: Conv2d(3x3, stride 2, padding 1) and GELU, log2(patch_size) times,
    widths doubling up to embed_dim. timm takes it as `embed_layer=partial(HybridEmbed, backbone=...)`."""
    layers, width = [], 3
    for w in config.stem_widths:
        layers += [lecun_conv(nn.Conv2d(width, w, kernel_size=3, stride=2, padding=1)), nn.GELU()]
        width = w
    return nn.Sequential(*layers)


class PatchEmbed(nn.Module):
    """Twin of vit_jax.model.PatchEmbed: (B, 3, H, W) -> (B, N, D). With the conv stem it is timm's
    HybridEmbed: `backbone` (keys patch_embed.backbone.0, .2, ...), then a 1x1 `proj`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        p = config.patch_size
        if config.stem == "conv":
            self.backbone = conv_stem(config)
            self.proj = lecun_conv(nn.Conv2d(config.embed_dim, config.embed_dim, kernel_size=1))
        else:
            self.proj = lecun_conv(nn.Conv2d(3, config.embed_dim, kernel_size=p, stride=p))

    def forward(self, x):
        if hasattr(self, "backbone"):
            x = self.backbone(x)  # (B, D, H/p, W/p)
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order


class Attention(nn.Module):
    """Twin of vit_jax.model.Attention: one fused qkv projection, channels ordered (q|k|v) x heads."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.num_heads = c.num_heads
        self.qkv = nn.Linear(c.embed_dim, 3 * c.embed_dim)
        self.proj = nn.Linear(c.embed_dim, c.embed_dim)
        self.proj_drop = nn.Dropout(c.drop_rate)

    def forward(self, x):
        B, N, D = x.shape
        H = self.num_heads
        qkv = self.qkv(x).reshape(B, N, 3, H, D // H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, hd)
        q = q * (D // H) ** -0.5  # scaled before the product, as the Flax side
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
        x = (attn @ v).transpose(1, 2).reshape(B, N, D)  # (B, N, H, hd) -> (B, N, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Twin of vit_jax.model.Mlp."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        hidden = int(c.embed_dim * c.mlp_ratio)
        self.fc1 = nn.Linear(c.embed_dim, hidden)
        self.drop1 = nn.Dropout(c.drop_rate)
        self.fc2 = nn.Linear(hidden, c.embed_dim)
        self.drop2 = nn.Dropout(c.drop_rate)

    def forward(self, x):
        x = self.drop1(gelu(self.fc1(x)))
        return self.drop2(self.fc2(x))


class Block(nn.Module):
    """Twin of vit_jax.model.Block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: ModelConfig, drop_path: float = 0.0):
        super().__init__()
        c = config
        self.norm1 = nn.LayerNorm(c.embed_dim, eps=LN_EPS)
        self.attn = Attention(c)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(c.embed_dim, eps=LN_EPS)
        self.mlp = Mlp(c)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchDropout(nn.Module):
    """Twin of vit_jax.model.PatchDropout (timm's): in training, a random int(N (1 - rate)) of the N patch
    tokens of each image, the class token kept first; a call's `rate`, if given, replaces the module's."""

    def __init__(self, rate: float, prefix_tokens: int):
        super().__init__()
        self.rate, self.prefix_tokens = rate, prefix_tokens

    def forward(self, x, rate: float | None = None):
        rate = self.rate if rate is None else rate
        if not self.training or rate == 0.0:
            return x
        prefix, x = x[:, :self.prefix_tokens], x[:, self.prefix_tokens:]
        B, N, D = x.shape
        keep = max(1, int(N * (1.0 - rate)))
        order = torch.argsort(torch.randn(B, N, device=x.device), dim=-1)[:, :keep]
        return torch.cat([prefix, x.gather(1, order.unsqueeze(-1).expand(-1, -1, D))], dim=1)


class VisionTransformer(nn.Module):
    """Twin of vit_jax.model.VisionTransformer. Input: float images (B, 3, H, W), normalized.

    Built as timm's is, `VisionTransformer(img_size=224, patch_size=16, num_classes=10, embed_dim=384,
    depth=6, num_heads=6)` (and `global_pool='avg', class_token=False` for the mean of the patch
    tokens through fc_norm), or from the same config object as the Flax model: `from_config(MODELS[p])`.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, num_classes: int = 10,
                 embed_dim: int = 384, depth: int = 6, num_heads: int = 6, mlp_ratio: float = 4.0,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, patch_drop_rate: float = 0.0,
                 class_token: bool = True, global_pool: str = "token", stem: str = "patch"):
        super().__init__()
        c = self.config = ModelConfig(
            img_size=img_size, patch_size=patch_size, num_classes=num_classes, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
            patch_drop_rate=patch_drop_rate,
            class_token=class_token, global_pool=global_pool, stem=stem).validate()
        self.patch_embed = PatchEmbed(c)
        if c.class_token:
            self.cls_token = nn.Parameter(trunc_normal_(torch.empty(1, 1, c.embed_dim), std=0.02))
        self.pos_embed = nn.Parameter(trunc_normal_(torch.empty(1, c.num_tokens, c.embed_dim), std=0.02))
        self.pos_drop = nn.Dropout(c.drop_rate)
        self.patch_drop = PatchDropout(c.patch_drop_rate, int(c.class_token))
        rates = [c.drop_path_rate * i / max(c.depth - 1, 1) for i in range(c.depth)]  # linear, as timm
        self.blocks = nn.ModuleList([Block(c, drop_path=r) for r in rates])
        if c.global_pool == "avg":
            self.fc_norm = nn.LayerNorm(c.embed_dim, eps=LN_EPS)
        else:
            self.norm = nn.LayerNorm(c.embed_dim, eps=LN_EPS)
        self.head = nn.Linear(c.embed_dim, c.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):  # timm's init, and the Flax side's trunc_init
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, config: ModelConfig) -> "VisionTransformer":
        """The twin of `vit_jax.model.VisionTransformer(config)`. It computes in float32 whatever
        `config.dtype` says: that field, like `attention`, sets how the Flax side computes."""
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in FLAX_ONLY}
        return cls(**fields)

    def forward_features(self, x, patch_drop_rate: float | None = None):
        """Images -> tokens (B, T, D) after the blocks (and the final norm, with the class token's
        pooling), and the named stages along the way. patch_drop_rate: in training, instead of the config's."""
        stages = {}
        x = self.patch_embed(x)  # (B, N, D)
        if self.config.class_token:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N+1, D)
        x = x + self.pos_embed
        x = stages["embed"] = self.pos_drop(x)
        x = self.patch_drop(x, patch_drop_rate)
        for i, block in enumerate(self.blocks):
            x = stages[f"block{i:02d}"] = block(x)
        if self.config.global_pool == "token":
            x = stages["norm"] = self.norm(x)
        return x, stages

    def forward_head(self, x, stages: dict):
        """Tokens -> class logits: from the class token, or the normed mean of the patch tokens."""
        if self.config.global_pool == "avg":
            x = stages["pool"] = self.fc_norm(x[:, int(self.config.class_token):].mean(dim=1))  # (B, D)
        else:
            x = x[:, 0]
        return self.head(x)

    def forward(self, x, return_stages: bool = False, patch_drop_rate: float | None = None):
        x, stages = self.forward_features(x, patch_drop_rate)
        logits = stages["logits"] = self.forward_head(x, stages)
        return (logits, stages) if return_stages else logits
