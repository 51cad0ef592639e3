"""Weights between the Flax ViT and its PyTorch twin, both ways, from one table of correspondences.

Each row of `table(config)` pairs a Flax parameter path with a PyTorch state_dict key and a named
transform, an axis permutation, so values move bit for bit. One short strict loop reads the table in
either direction: every key must be filled exactly once and have the expected shape, and every
difference (missing, unexpected or misshapen keys) is listed in one UserError.
"""

import collections
import dataclasses
import os

import jax
import numpy as np
import torch
from flax import traverse_util

from vit_jax.config import ModelConfig
from vit_jax.errors import UserError, reason
from vit_jax.weights import check_fits, shapes as flax_shapes


@dataclasses.dataclass(frozen=True)
class Transform:
    """Flax array -> PyTorch tensor as an axis permutation; the reverse is its inverse."""

    name: str
    to_torch: tuple | None  # None: the same array

    @property
    def to_flax(self):
        return None if self.to_torch is None else tuple(np.argsort(self.to_torch))


SAME = Transform("identity", None)  # biases, LayerNorm scale <-> weight, cls_token, pos_embed
DENSE = Transform("dense", (1, 0))  # kernel (in, out) <-> weight (out, in)
CONV = Transform("conv", (3, 2, 0, 1))  # kernel (kh, kw, cin, cout) <-> weight (cout, cin, kh, kw)


@dataclasses.dataclass(frozen=True)
class Row:
    flax: str  # path in the Flax params, '/'-separated
    torch: str  # key in the PyTorch state_dict
    transform: Transform


# (Flax path, PyTorch key, transform), in the models' order.
STEM = [
    ("patch_embed/proj/kernel", "patch_embed.proj.weight", CONV),
    ("patch_embed/proj/bias", "patch_embed.proj.bias", SAME),
]
CONV_STEM = [  # with stem conv, once per backbone layer: Sequential(conv, GELU, conv, GELU, ...)
    ("patch_embed/backbone_{i}/kernel", "patch_embed.backbone.{j}.weight", CONV),
    ("patch_embed/backbone_{i}/bias", "patch_embed.backbone.{j}.bias", SAME),
]
CLASS_TOKEN = [("cls_token", "cls_token", SAME)]  # with class_token only
POSITIONS = [("pos_embed", "pos_embed", SAME)]
BLOCK = [  # once per block; {i} is its index
    ("blocks_{i}/norm1/scale", "blocks.{i}.norm1.weight", SAME),
    ("blocks_{i}/norm1/bias", "blocks.{i}.norm1.bias", SAME),
    ("blocks_{i}/attn/qkv/kernel", "blocks.{i}.attn.qkv.weight", DENSE),
    ("blocks_{i}/attn/qkv/bias", "blocks.{i}.attn.qkv.bias", SAME),
    ("blocks_{i}/attn/proj/kernel", "blocks.{i}.attn.proj.weight", DENSE),
    ("blocks_{i}/attn/proj/bias", "blocks.{i}.attn.proj.bias", SAME),
    ("blocks_{i}/norm2/scale", "blocks.{i}.norm2.weight", SAME),
    ("blocks_{i}/norm2/bias", "blocks.{i}.norm2.bias", SAME),
    ("blocks_{i}/mlp/fc1/kernel", "blocks.{i}.mlp.fc1.weight", DENSE),
    ("blocks_{i}/mlp/fc1/bias", "blocks.{i}.mlp.fc1.bias", SAME),
    ("blocks_{i}/mlp/fc2/kernel", "blocks.{i}.mlp.fc2.weight", DENSE),
    ("blocks_{i}/mlp/fc2/bias", "blocks.{i}.mlp.fc2.bias", SAME),
]
NORM = {  # by global_pool: the final norm of the tokens, or the norm of their mean
    "token": [("norm/scale", "norm.weight", SAME), ("norm/bias", "norm.bias", SAME)],
    "avg": [("fc_norm/scale", "fc_norm.weight", SAME), ("fc_norm/bias", "fc_norm.bias", SAME)],
}
HEAD = [
    ("head/kernel", "head.weight", DENSE),
    ("head/bias", "head.bias", SAME),
]


def table(config: ModelConfig) -> list[Row]:
    """Every parameter of the model, once: Flax path, PyTorch key, transform."""
    backbone = [(f.format(i=i), t.format(j=2 * i), tr) for i in range(len(config.stem_widths))
                for f, t, tr in CONV_STEM] if config.stem == "conv" else []
    blocks = [(f.format(i=i), t.format(i=i), tr) for i in range(config.depth) for f, t, tr in BLOCK]
    rows = backbone + STEM + (CLASS_TOKEN if config.class_token else []) + POSITIONS + blocks + NORM[config.global_pool] + HEAD
    return [Row(*row) for row in rows]


def _permute(shape: tuple, perm) -> tuple:
    return shape if perm is None else tuple(shape[i] for i in perm)


def _move(rows: list[Row], source: dict, expected: dict[str, tuple], to_torch: bool, what: str):
    """The strict loop. `source` must hold exactly the expected keys with the expected shapes; each
    destination key is filled once, in table order, with a fresh float32 array."""
    check_fits({k: tuple(np.shape(v)) for k, v in source.items()}, expected, what)
    out = collections.OrderedDict()
    for row in rows:
        src, dst = (row.flax, row.torch) if to_torch else (row.torch, row.flax)
        perm = row.transform.to_torch if to_torch else row.transform.to_flax
        if dst in out:  # only a broken table can get here
            raise UserError(f"{dst!r} is filled twice by the port table")
        value = np.asarray(source[src])
        out[dst] = np.array(value if perm is None else value.transpose(perm), np.float32, order="C")
    return out


def flax_to_torch(params, config: ModelConfig) -> "collections.OrderedDict[str, torch.Tensor]":
    """Flax params (as `init_params` makes them) -> the twin's state_dict, float32 on the CPU."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    out = _move(table(config), flat, flax_shapes(config), to_torch=True, what="Flax params")
    return collections.OrderedDict((k, torch.from_numpy(v)) for k, v in out.items())


def torch_to_flax(state_dict, config: ModelConfig) -> dict:
    """A state_dict with timm's ViT keys -> Flax params: nested dicts of float32 numpy arrays."""
    rows, shapes = table(config), flax_shapes(config)
    expected = {r.torch: _permute(shapes[r.flax], r.transform.to_torch) for r in rows}
    source = {k: _to_numpy(k, v) for k, v in state_dict.items()}
    flat = _move(rows, source, expected, to_torch=False, what="PyTorch weights")
    return traverse_util.unflatten_dict(flat, sep="/")


def _to_numpy(key: str, value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise UserError(f"weight {key!r} has dtype {value.dtype}; the model's weights are floats")
        # float16/bfloat16/float64 checkpoints become float32, the dtype the Flax params keep.
        return value.detach().cpu().to(torch.float32).numpy()
    return np.asarray(value)


def _strip_prefix(state_dict: dict) -> dict:
    # DataParallel saves 'module.<key>', a torch.compile'd model '_orig_mod.<key>'.
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def read_torch_checkpoint(path: str) -> tuple[dict, dict]:
    """(state_dict, the rest of the file) of a .pth: `parity.export`'s and the PyTorch tutorial's
    {'model_state_dict': ..., 'epoch': ..., ...}, or a bare state_dict."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path!r}: give the path of a .pth file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds (unpickling, zip, magic number) for one cause
        raise UserError(f"{path!r} is not a PyTorch checkpoint that can be loaded safely ({reason(e)}): "
                        f"give a .pth written by torch.save, holding only tensors and plain values")
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model_state_dict"), dict):
        state_dict, rest = ckpt["model_state_dict"], {k: v for k, v in ckpt.items() if k != "model_state_dict"}
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state_dict, rest = ckpt, {}
    else:
        raise UserError(f"{path!r} holds neither a state_dict nor a dict with 'model_state_dict': "
                        f"save one with torch.save(model.state_dict(), path)")
    return _strip_prefix(state_dict), rest


def load_torch_checkpoint(path: str, config: ModelConfig) -> dict:
    """Flax params for `config` from a PyTorch checkpoint; the `--init_from` of vit_jax.train."""
    state_dict, rest = read_torch_checkpoint(path)
    try:
        return torch_to_flax(state_dict, config)
    except UserError as e:
        saved = rest.get("config")
        hint = (f"it was saved with model config {saved}" if isinstance(saved, dict) else
                "choose the --recipe and model flags it was trained with")
        raise UserError(f"checkpoint {path!r} does not fit the chosen model: {e} ({hint})") from None
