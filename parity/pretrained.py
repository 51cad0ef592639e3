"""Pretrained ViT checkpoints as people have them, read into Flax params and the architecture they hold.

  * timm's: `model.safetensors` (or a `.pth`/`.bin` state_dict), alone or in a folder with timm's
    `config.json` (the hub's layout), or fetched by timm itself (`--timm NAME`);
  * this project's: `parity.export`'s `.pth` (its config inside) and the `.npz` of Flax params;
  * Google's: the `.npz` of google-research/vision_transformer (`parity/google.py`'s table).

The architecture comes from the checkpoint: this project's saved config or timm's `config.json` where
there is one, else the shapes (width, depth, patch, resolution from the position grid, class token,
MLP ratio, classes). Only the head count is not in a timm state_dict's shapes: it comes from
`--num_heads`, the config, or the model's name (vit_tiny 3, small 6, base 12, large 16 heads). A
checkpoint with parts this model has no place for (layer scale, register tokens, qk_norm, ...) is
refused in one line naming them; everything else goes through the strict port of `parity/port.py`.
"""

import dataclasses
import json
import math
import os
import re

import numpy as np
import torch

from parity import google
from parity.port import read_torch_checkpoint, torch_to_flax
from vit_jax import weights
from vit_jax.config import ModelConfig
from vit_jax.errors import UserError, reason

# How each kind of file's position embedding is resized, as timm resizes it when it loads that kind:
# its state_dicts through checkpoint_filter_fn (resample_abs_pos_embed's defaults: bicubic,
# antialias=True), Google's .npz through _load_weights (bilinear, antialias=False). The same file
# then gives the same model here and in timm, at any resolution.
TIMM_RESAMPLE = ("bicubic", True)
GOOGLE_RESAMPLE = ("bilinear", False)

# Heads by timm's size names (vit_tiny_patch16_224, ...): 64 channels per head in every one.
HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16, "giant": 16}
# A folder's weights, by preference: the hub's, then parity.export's in a training run's workdir.
HUB_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "best_model.pth")

# Parts of timm's ViTs that this model has no place for: (key pattern, what the checkpoint has).
CANNOT_HOLD = [
    (r"\.ls[12]\.gamma$|\.gamma_[12]$", "layer scale (ls1.gamma, timm's init_values)"),
    (r"^reg_token$", "register tokens (reg_token)"),
    (r"^dist_token$|^head_dist\.", "a distillation token (DeiT's dist_token)"),
    (r"\.attn\.[qk]_norm\.", "qk_norm (attn.q_norm)"),
    (r"\.attn\.norm\.|\.mlp\.norm\.", "norms inside attention or the MLP (scale_attn_norm, scale_mlp_norm)"),
    (r"^norm_pre\.", "a norm before the blocks (norm_pre, as CLIP's)"),
    (r"^patch_embed\.norm\.", "a norm after the patch embedding"),
    (r"^attn_pool\.", "an attention-pooling head (attn_pool)"),
    (r"\.attn\.(q|kv|q_proj|k_proj|v_proj)\.", "separate query and key/value projections"),
    (r"\.mlp\.(fc1_g|fc1_x|w12)\.", "a gated MLP (SwiGLU)"),
]


@dataclasses.dataclass
class Pretrained:
    """A checkpoint read: Flax params of `config`, its own architecture."""

    params: dict
    config: ModelConfig
    resample: tuple  # (interpolation, antialias) of its position embedding, as timm does for this kind
    head: bool = True  # False: no head to keep (none in the file, or one that read the dropped pre-logits)
    dropped: tuple = ()  # keys left out (pre-logits)


def read(path: str, num_heads: int | None = None, expect: ModelConfig | None = None) -> Pretrained:
    """Any checkpoint above. `expect`: the architecture the file must have (as `--recipe`'s model), checked strictly."""
    if os.path.isdir(path):
        found = [os.path.join(path, f) for f in HUB_FILES if os.path.isfile(os.path.join(path, f))]
        if not found and os.path.isdir(os.path.join(path, "best")):  # a workdir (vit_jax.workdir's best/)
            raise UserError(f"{path!r} is a training run's workdir: export its best model first with python -m "
                            f"parity.export --workdir {path}, then convert the folder again")
        if not found:
            raise UserError(f"folder {path!r} holds none of {', '.join(HUB_FILES)}: give the weights file, or the "
                            f"folder timm's hub layout puts it in")
        path = found[0]
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path!r}: give a .safetensors, .pth, .bin or .npz file, or its folder")
    if path.endswith(".npz"):
        return _read_npz(path, expect)
    if path.endswith(".safetensors"):
        state_dict, rest = _read_safetensors(path), {}
    else:
        state_dict, rest = read_torch_checkpoint(path)
    hints = _timm_config(os.path.join(os.path.dirname(os.path.abspath(path)), "config.json"))
    return from_state_dict(state_dict, path, num_heads=num_heads, saved=rest.get("config"), hints=hints,
                           expect=expect)


def from_state_dict(state_dict: dict, what: str, num_heads=None, saved=None, hints=None, name=None,
                    expect: ModelConfig | None = None) -> Pretrained:
    """A state_dict with timm's ViT keys. `saved`: this project's config (parity.export's); `hints`:
    timm's config.json; `name`: the timm model's name; `expect`: the architecture it must have."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    refuse_what_cannot_be_held(shapes, what)
    dropped = tuple(k for k in shapes if k.startswith("pre_logits."))
    state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
    if expect is not None:
        config = expect
    elif isinstance(saved, dict):
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        config = ModelConfig(**{k: v for k, v in saved.items() if k in names}).validate()
    else:
        config = timm_architecture(shapes, what, num_heads, hints or {}, name)
    head = "head.weight" in state_dict and not dropped
    if not head:  # a placeholder the strict port can fill, replaced when adapted
        state_dict = {**{k: v for k, v in state_dict.items() if not k.startswith("head.")},
                      "head.weight": torch.zeros(config.num_classes, config.embed_dim),
                      "head.bias": torch.zeros(config.num_classes)}
    try:
        params = torch_to_flax(state_dict, config)
    except UserError as e:
        hint = "the --recipe given" if expect is not None else "the architecture read off its shapes"
        raise UserError(f"{what!r} does not fit {hint}: {e}") from None
    return Pretrained(params, config, TIMM_RESAMPLE, head, dropped)


def refuse_what_cannot_be_held(shapes: dict, what: str):
    """One line naming the parts of a checkpoint this ViT has no place for, or that it is no ViT at all."""
    if "patch_embed.proj.weight" not in shapes:
        first = ", ".join(list(shapes)[:3])
        raise UserError(f"{what!r} is not a ViT with timm's keys: it has no patch_embed.proj.weight (its first keys: "
                        f"{first}); give a timm ViT (vit_*), this project's checkpoint or a Google ViT .npz")
    has = [name for pattern, name in CANNOT_HOLD if any(re.search(pattern, k) for k in shapes)]
    if has:
        raise UserError(f"{what!r} is a ViT with {', '.join(has)}, which this model cannot hold: give a plain ViT "
                        f"(timm's vit_tiny/small/base/large_patch*, augreg or original weights)")


def timm_architecture(shapes: dict, what: str, num_heads=None, hints: dict | None = None, name=None) -> ModelConfig:
    """The architecture of a timm ViT state_dict from its shapes, the head count from the flag, the
    config.json's model_args, or a model name (the config's architecture, `name`, or the path's)."""
    hints = hints or {}
    # The weights do not say which activation their MLP used; timm's config does (CLIP's quick_gelu).
    act = (hints.get("model_args") or {}).get("act_layer")
    if act not in (None, "gelu"):
        raise UserError(f"{what!r} is a ViT with the activation {act!r}, which this model cannot hold (exact GELU)")
    dim, channels, p, p2 = shapes["patch_embed.proj.weight"]
    convs = len([k for k in shapes if re.fullmatch(r"patch_embed\.backbone\.\d+\.weight", k)])
    if convs:  # our conv stem (timm's HybridEmbed over it): 3x3 stride-2 convolutions, then a 1x1 proj
        channels, p, p2 = shapes["patch_embed.backbone.0.weight"][1], 2 ** convs, 2 ** convs
    class_token = "cls_token" in shapes
    if "pos_embed" not in shapes:
        raise UserError(f"{what!r} has no position embedding (pos_embed), which this model needs")
    tokens = shapes["pos_embed"][1]
    grid = math.isqrt(tokens - class_token)
    if class_token and math.isqrt(tokens) ** 2 == tokens:
        raise UserError(f"{what!r} has a position embedding without the class token's (timm's no_embed_class, as "
                        f"DeiT III), which this model cannot hold")
    if p != p2 or channels != 3 or grid * grid != tokens - class_token:
        raise UserError(f"{what!r} has patches {p}x{p2} of {channels} channels and {tokens} positions: this model "
                        f"needs square RGB patches on a square grid")
    pool = (hints.get("model_args") or {}).get("global_pool", hints.get("global_pool"))
    if "fc_norm.weight" in shapes:
        global_pool = "avg"
    elif class_token and pool in (None, "token"):
        global_pool = "token"
    else:
        raise UserError(f"{what!r} pools the tokens after the final norm (global_pool {pool or 'avg'!r} without "
                        f"fc_norm), which this model cannot hold")
    depth = len([k for k in shapes if re.fullmatch(r"blocks\.\d+\.norm1\.weight", k)])
    hidden = shapes.get("blocks.0.mlp.fc1.weight", (4 * dim,))[0]
    heads = num_heads or (hints.get("model_args") or {}).get("num_heads")
    if heads is None:
        for text in (hints.get("architecture"), name, what):
            size = re.search(r"vit_(" + "|".join(HEADS) + r")_", str(text or ""))
            if size:
                heads = HEADS[size.group(1)]
                break
    if heads is None:
        raise UserError(f"the head count of {what!r} is not in its weights: pass --num_heads (timm's vit_tiny "
                        f"has 3, vit_small 6, vit_base 12, vit_large 16: 64 channels per head)")
    config = ModelConfig(img_size=grid * p, patch_size=p, stem="conv" if convs else "patch", embed_dim=dim, depth=depth, num_heads=int(heads),
                         num_classes=shapes["head.weight"][0] if "head.weight" in shapes else 1,
                         mlp_ratio=hidden / dim, class_token=class_token, global_pool=global_pool)
    return config.validate()


def _read_npz(path: str, expect: ModelConfig | None) -> Pretrained:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise UserError(f"{path!r} is not a .npz that numpy can read ({reason(e)})") from None
    if google.is_google(arrays):
        params, config, head, dropped = google.read(arrays)
        if expect is not None and config != expect:
            raise UserError(f"{path!r} holds a ViT other than the --recipe given's model: {config}")
        return Pretrained(params, config, GOOGLE_RESAMPLE, head, tuple(dropped))
    if weights.CONFIG_KEY in arrays:  # this project's own parameters (vit_jax.weights)
        saved = json.loads(str(arrays[weights.CONFIG_KEY]))
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        config = expect or ModelConfig(**{k: v for k, v in saved.items() if k in names}).validate()
        return Pretrained(weights.load(path, config), config, TIMM_RESAMPLE)
    raise UserError(f"{path!r} is neither a Google ViT checkpoint (no embedding/kernel) nor parameters written by "
                    f"python -m parity.convert")


def _read_safetensors(path: str) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise UserError("reading .safetensors needs the safetensors package: pip install safetensors") from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise UserError(f"{path!r} is not a safetensors file that can be read ({reason(e)})") from None


def _timm_config(path: str) -> dict:
    """timm's config.json beside the weights (the hub's layout), or {}. Another config.json there (a
    training run's workdir) says nothing about the weights and is left alone."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({reason(e)}): fix or remove it") from None
    return config if isinstance(config, dict) and "architecture" in config else {}


# --timm NAME --------------------------------------------------------------------------------------


def import_timm():
    try:
        import timm
    except Exception as e:  # ImportError; or a torchvision built for another torch fails as timm imports it
        raise UserError(f"--timm needs timm, which cannot be imported ({type(e).__name__}: {reason(e)}): pip install "
                        f"timm, or fetch the weights yourself and give their path") from None
    return timm


def from_timm(name: str, num_heads=None, then: str = "") -> Pretrained:
    """The pretrained weights timm has for `name` (e.g. vit_tiny_patch16_224.augreg_in21k_ft_in1k),
    downloaded by timm; offline, one line says which file to fetch, where to put it and what to run."""
    timm = import_timm()
    if not timm.list_models(name.split(".")[0]):
        raise UserError(f"timm has no model {name!r}: see timm.list_models('vit_*', pretrained=True)")
    if not timm.list_models(name.split(".")[0], module="vision_transformer"):
        raise UserError(f"timm's {name} is not one of its VisionTransformers, which this model mirrors: choose a "
                        f"vit_* model (timm.list_models('vit_*', pretrained=True))")
    cfg = timm.models.get_pretrained_cfg(name)
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:  # no network: requests', huggingface_hub's and urllib's errors alike
        repo, url, folder = getattr(cfg, "hf_hub_id", None), getattr(cfg, "url", None) or "", name.replace("/", "_")
        if repo:
            what, file = (f"model.safetensors and config.json from the Hugging Face hub repo {repo} "
                          f"(https://huggingface.co/{repo}/tree/main)"), "model.safetensors"
        else:
            what, file = url or "its weights", os.path.basename(url) or "model.safetensors"
        raise UserError(f"cannot download timm's {name} ({type(e).__name__}: {reason(e)}): on a machine with "
                        f"internet fetch {what} into a folder {folder}/, then run python -m parity.convert "
                        f"{folder}/{file}{then}") from None
    block = model.blocks[0]
    # What the weights do not show: the activation and the LayerNorm's epsilon must be ours.
    if not (isinstance(block.mlp.act, torch.nn.GELU) and block.mlp.act.approximate == "none"
            and getattr(block.norm1, "eps", None) == 1e-6):
        raise UserError(f"timm's {name} computes its blocks otherwise than this model ({block.mlp.act}, "
                        f"{block.norm1}): exact GELU and LayerNorm epsilon 1e-6 are needed")
    heads = num_heads or getattr(block.attn, "num_heads", None)
    return from_state_dict(model.state_dict(), f"timm's {name}", num_heads=heads, name=name)
