"""Google's ViT checkpoints (the .npz of google-research/vision_transformer) as Flax params, by a table.

Each row names the checkpoint keys it reads, the Flax path it fills and a named transform. Most rows
read one key as it is; the attention's query, key and value, kept apart per head there ((D, H, hd)
kernels), become our one fused qkv projection by a transform that takes three keys. One strict loop
reads the table: every key of the file is used exactly once with the shape the table expects, and any
difference (a missing key, a leftover, a shape) is named in one UserError. The architecture is read
off the shapes, the head count included (the kernels keep H apart).
"""

import dataclasses
import math
import re
from typing import Callable

import numpy as np
from flax import traverse_util

from vit_jax.config import ModelConfig
from vit_jax.errors import UserError
from vit_jax.weights import check_fits, shapes as flax_shapes


@dataclasses.dataclass(frozen=True)
class Transform:
    """The checkpoint's arrays -> our array; `sources(shape, heads)`: the shapes it reads to make `shape`."""

    name: str
    apply: Callable
    sources: Callable


SAME = Transform("identity", lambda a: a, lambda shape, h: [shape])
# Our qkv channels are (q|k|v) x heads x head_dim, as timm's: each (D, H, hd) kernel flattened to
# (D, H hd), then side by side. The biases (H, hd) likewise.
QKV_KERNEL = Transform("q|k|v (D, H, hd) -> qkv (D, 3 H hd)",
                       lambda *qkv: np.concatenate([a.reshape(a.shape[0], -1) for a in qkv], axis=1),
                       lambda shape, h: [(shape[0], h, shape[1] // 3 // h)] * 3)
QKV_BIAS = Transform("q|k|v (H, hd) -> qkv (3 H hd)", lambda *qkv: np.concatenate([a.reshape(-1) for a in qkv]),
                     lambda shape, h: [(h, shape[0] // 3 // h)] * 3)
OUT_KERNEL = Transform("out (H, hd, D) -> proj (H hd, D)", lambda a: a.reshape(-1, a.shape[-1]),
                       lambda shape, h: [(h, shape[0] // h, shape[1])])


@dataclasses.dataclass(frozen=True)
class Row:
    sources: tuple  # keys in the checkpoint
    flax: str  # path in the Flax params
    transform: Transform


MHA = "{b}/MultiHeadDotProductAttention_1"
# (checkpoint keys, Flax path, transform), in the model's order. {b}: Transformer/encoderblock_{i}.
STEM = [
    (("embedding/kernel",), "patch_embed/proj/kernel", SAME),  # (p, p, 3, D), our kernel's layout
    (("embedding/bias",), "patch_embed/proj/bias", SAME),
    (("cls",), "cls_token", SAME),
    (("Transformer/posembed_input/pos_embedding",), "pos_embed", SAME),
]
BLOCK = [
    (("{b}/LayerNorm_0/scale",), "blocks_{i}/norm1/scale", SAME),
    (("{b}/LayerNorm_0/bias",), "blocks_{i}/norm1/bias", SAME),
    (tuple(f"{MHA}/{n}/kernel" for n in ("query", "key", "value")), "blocks_{i}/attn/qkv/kernel", QKV_KERNEL),
    (tuple(f"{MHA}/{n}/bias" for n in ("query", "key", "value")), "blocks_{i}/attn/qkv/bias", QKV_BIAS),
    ((f"{MHA}/out/kernel",), "blocks_{i}/attn/proj/kernel", OUT_KERNEL),
    ((f"{MHA}/out/bias",), "blocks_{i}/attn/proj/bias", SAME),
    (("{b}/LayerNorm_2/scale",), "blocks_{i}/norm2/scale", SAME),
    (("{b}/LayerNorm_2/bias",), "blocks_{i}/norm2/bias", SAME),
    (("{b}/MlpBlock_3/Dense_0/kernel",), "blocks_{i}/mlp/fc1/kernel", SAME),
    (("{b}/MlpBlock_3/Dense_0/bias",), "blocks_{i}/mlp/fc1/bias", SAME),
    (("{b}/MlpBlock_3/Dense_1/kernel",), "blocks_{i}/mlp/fc2/kernel", SAME),
    (("{b}/MlpBlock_3/Dense_1/bias",), "blocks_{i}/mlp/fc2/bias", SAME),
]
NORM = [
    (("Transformer/encoder_norm/scale",), "norm/scale", SAME),
    (("Transformer/encoder_norm/bias",), "norm/bias", SAME),
]
HEAD = [
    (("head/kernel",), "head/kernel", SAME),
    (("head/bias",), "head/bias", SAME),
]
# The representation layer of the older checkpoints (tanh(pre_logits(x)) before the head). Our model
# has none: it is left out, and the head that read it is replaced (timm drops it too).
PRE_LOGITS = ("pre_logits/kernel", "pre_logits/bias")
# Prefixes of the same layout in the files that kept the optimizer's wrapping.
PREFIXES = ("opt/target/", "params/")


def table(config: ModelConfig, head: bool = True) -> list[Row]:
    """Every parameter of the model, once: checkpoint keys, Flax path, transform."""
    blocks = [(tuple(s.format(b=f"Transformer/encoderblock_{i}") for s in src), f.format(i=i), t)
              for i in range(config.depth) for src, f, t in BLOCK]
    return [Row(*row) for row in STEM + blocks + NORM + (HEAD if head else [])]


def is_google(keys) -> bool:
    return any(k.endswith("embedding/kernel") for k in keys)


def read(arrays: dict) -> tuple[dict, ModelConfig, bool, list[str]]:
    """(Flax params, the checkpoint's architecture, whether its head can be kept, what was left out) of
    a Google ViT .npz's arrays. Without a head to keep, a placeholder of one class (replaced: `adapt`)."""
    prefix = next((p for p in PREFIXES if f"{p}embedding/kernel" in arrays), "")
    arrays = {k[len(prefix):]: np.asarray(v) for k, v in arrays.items() if k.startswith(prefix)}
    dropped = [k for k in PRE_LOGITS if k in arrays]
    for k in dropped:
        del arrays[k]
    config, head = architecture({k: v.shape for k, v in arrays.items()})
    return to_flax(arrays, config, head), config, head and not dropped, dropped


def architecture(shapes: dict[str, tuple]) -> tuple[ModelConfig, bool]:
    """(the architecture, whether it has a head) from the shapes of a Google ViT's arrays."""
    if "pos_embedding" in shapes or "Transformer/encoderblock/LayerNorm_0/scale" in shapes:
        raise UserError("this .npz has big_vision's layout (pos_embedding at the top, or the blocks stacked in one "
                        "'encoderblock'), which parity.convert does not read: give a google-research/"
                        "vision_transformer checkpoint, or timm's model.safetensors of the same model")
    if "cls" not in shapes:
        raise UserError("this Google ViT has no class token ('gap': the mean of the tokens after the final norm), "
                        "which this model cannot hold: give a checkpoint with classifier 'token'")
    p, p2, channels, dim = shapes["embedding/kernel"]
    tokens = shapes["Transformer/posembed_input/pos_embedding"][1]
    grid = math.isqrt(tokens - 1)
    if p != p2 or channels != 3 or grid * grid != tokens - 1:
        raise UserError(f"the patch embedding {shapes['embedding/kernel']} and {tokens} positions are not square "
                        f"RGB patches on a square grid with a class token, which this model needs")
    depth = len([k for k in shapes if re.fullmatch(r"Transformer/encoderblock_\d+/LayerNorm_0/scale", k)])
    block = "Transformer/encoderblock_0"
    heads = shapes.get(f"{block}/MultiHeadDotProductAttention_1/query/kernel", (dim, 1))[1]
    hidden = shapes.get(f"{block}/MlpBlock_3/Dense_0/kernel", (dim, 4 * dim))[1]
    head = "head/kernel" in shapes
    config = ModelConfig(img_size=grid * p, patch_size=p, num_classes=shapes["head/kernel"][1] if head else 1,
                         embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=hidden / dim)
    return config.validate(), head


def to_flax(arrays: dict, config: ModelConfig, head: bool = True) -> dict:
    """The strict loop: `arrays` must hold exactly the table's keys with the shapes it expects."""
    rows, ours = table(config, head), flax_shapes(config)
    expected = {}
    for row in rows:
        for key, shape in zip(row.sources, row.transform.sources(ours[row.flax], config.num_heads)):
            if key in expected:  # only a broken table can get here
                raise UserError(f"{key!r} is read twice by the table")
            expected[key] = tuple(shape)
    check_fits({k: tuple(v.shape) for k, v in arrays.items()}, expected, "the Google ViT weights")
    flat = {row.flax: np.asarray(row.transform.apply(*(arrays[k] for k in row.sources)), np.float32)
            for row in rows}
    if not head:  # a placeholder, replaced when adapted
        flat["head/kernel"], flat["head/bias"] = np.zeros(ours["head/kernel"], np.float32), np.zeros(1, np.float32)
    assert {k: v.shape for k, v in flat.items()} == ours  # the transforms make our shapes
    return traverse_util.unflatten_dict(flat, sep="/")
