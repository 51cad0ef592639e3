"""`python -m parity.convert CHECKPOINT [--img_size S] [--num_classes N] [--out X.npz]`: a pretrained ViT, adapted, into what `--init_from` reads.

CHECKPOINT is timm's `model.safetensors` (or a `.pth`/`.bin` state_dict), alone or in its hub folder
with `config.json`; `--timm NAME` instead asks timm for its pretrained weights (online); this
project's `best_model.pth` (parity.export), the PyTorch tutorial's checkpoint or a bare state_dict
with timm's keys; or Google's ViT `.npz` (google-research/vision_transformer). The architecture is
read from the checkpoint (`parity/pretrained.py`); then `parity/adapt.py` fits it to the task: a new
--img_size resamples the position embedding as timm does, and a head of another size than
--num_classes (10, CIFAR-10's, by default) is replaced by zeros, as Google's fine-tuning code does (a
pre-logits layer is dropped with it). The Flax parameters are written as a .npz (vit_jax.weights),
and the exact training command is printed:

    python -m parity.convert vit_tiny_patch16_224.augreg_in21k_ft_in1k/ --img_size 224
    python -m vit_jax.train --init_from vit_tiny_patch16_224.augreg_in21k_ft_in1k.npz --recipe finetune --embed_dim 192 --depth 12 --num_heads 3
"""

import dataclasses
import os
import shlex

from parity import adapt, pretrained
from vit_jax import config as config_lib, weights
from vit_jax.config import MODELS, RECIPES, ModelConfig
from vit_jax.errors import CommandParser, UserError, cli, reason
from vit_jax.model import count_params

RECIPE = "finetune"


def default_out(path: str | None, timm_name: str | None) -> str:
    """Beside the checkpoint with its name and .npz (a folder's: beside the folder); `--timm`: NAME.npz here."""
    if timm_name:
        return timm_name.replace("/", "_") + ".npz"
    path = os.path.normpath(path)
    out = (path if os.path.isdir(path) else os.path.splitext(path)[0]) + ".npz"
    return os.path.splitext(out)[0] + ".flax.npz" if os.path.abspath(out) == os.path.abspath(path) else out


def adapted(path: str | None, model_cfg: ModelConfig | None = None, *, img_size: int | None = None,
            num_classes: int | None = None, num_heads: int | None = None, timm_name: str | None = None
            ) -> tuple[dict, ModelConfig, list[str]]:
    """(Flax params, their config, what changed in words) of a checkpoint adapted to the task.
    `model_cfg`: the architecture the file must have (as --recipe's), else it is read off the file."""
    if timm_name:
        then = "".join(f" --{k} {v}" for k, v in (("img_size", img_size), ("num_classes", num_classes)) if v)
        source = pretrained.from_timm(timm_name, num_heads, then=then)
    else:
        source = pretrained.read(path, num_heads, expect=model_cfg)
    return adapt.adapt(source, img_size, num_classes)


def write(out: str, params, cfg: ModelConfig) -> str:
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        weights.save(out, params, cfg)
    except OSError as e:
        raise UserError(f"cannot write {out!r} ({reason(e)}): choose another --out") from None
    return out


def convert(path: str, model_cfg: ModelConfig | None = None, out: str | None = None, **task) -> str:
    """Writes the checkpoint's weights, adapted (`adapted`'s keywords), as Flax parameters; returns the path."""
    return write(out or default_out(path, task.get("timm_name")), *adapted(path, model_cfg, **task)[:2])


def train_command(out: str, cfg: ModelConfig) -> str:
    """`python -m vit_jax.train` with --init_from OUT, --recipe finetune and a flag for each field of the
    architecture that differs from the recipe's model: the flags that build exactly `cfg`."""
    base, args = config_lib.MODELS[RECIPE], []
    for name in weights.ARCHITECTURE:
        value = getattr(cfg, name)
        if value != getattr(base, name):
            args += [f"--{'' if value else 'no-'}{name}"] if isinstance(value, bool) else [f"--{name}", str(value)]
    return "python -m vit_jax.train " + shlex.join(["--init_from", out, "--recipe", RECIPE, *args])


@cli
def main(argv=None) -> str:
    parser = CommandParser(prog="python -m parity.convert", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="timm's model.safetensors, .pth or .bin (or its hub folder with "
                        "config.json), this project's .pth, the tutorial's, or a Google ViT .npz")
    parser.add_argument("--timm", metavar="NAME", default=None, help="instead of a file: timm's pretrained weights "
                        "of NAME (e.g. vit_tiny_patch16_224.augreg_in21k_ft_in1k), downloaded by timm")
    parser.add_argument("--img_size", type=int, default=None, help="the resolution to fine-tune at; the position "
                        "embedding is resampled to it as timm does (default: the checkpoint's)")
    parser.add_argument("--num_classes", type=int, default=10, help="classes of the task; a head of another size is "
                        "replaced by zeros, as Google's fine-tuning code does, and any pre-logits layer is dropped "
                        "(default: %(default)s, CIFAR-10's)")
    parser.add_argument("--num_heads", type=int, default=None, help="attention heads, when neither the checkpoint "
                        "nor its name says (vit_tiny 3, small 6, base 12, large 16)")
    parser.add_argument("--recipe", choices=list(RECIPES), default=None,
                        help="the checkpoint must have this recipe's model (default: read off the checkpoint)")
    parser.add_argument("--out", default=None, help="the .npz to write (default: the checkpoint's name, .npz)")
    a = parser.parse_args(argv)
    if (a.checkpoint is None) == (a.timm is None):
        raise UserError("give a checkpoint's path or --timm NAME (one of them)")
    for name in ("img_size", "num_classes", "num_heads"):
        if getattr(a, name) is not None and getattr(a, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(a, name)}")
    expect = dataclasses.replace(MODELS[a.recipe], num_heads=a.num_heads or MODELS[a.recipe].num_heads) \
        if a.recipe else None
    params, cfg, notes = adapted(a.checkpoint, expect, img_size=a.img_size, num_classes=a.num_classes,
                                 num_heads=a.num_heads, timm_name=a.timm)
    out = write(a.out or default_out(a.checkpoint, a.timm), params, cfg)
    n = count_params(weights.load(out, cfg))
    print(f"Wrote {out}: {n:,} parameters of a ViT img {cfg.img_size} patch {cfg.patch_size} embed {cfg.embed_dim} "
          f"depth {cfg.depth} heads {cfg.num_heads} classes {cfg.num_classes}"
          + "".join(f"; {note}" for note in notes) + f". Fine-tune it with: {train_command(out, cfg)}")
    return out


if __name__ == "__main__":
    main()
