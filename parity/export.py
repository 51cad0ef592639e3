"""`python -m parity.export --workdir DIR [--out PATH]`: a run's best model as a PyTorch checkpoint.

Writes DIR/best_model.pth by default, in the PyTorch tutorial's format plus the model config:
{'model_state_dict', 'epoch', 'test_acc', 'config'}. It holds only tensors and plain Python values,
so `torch.load(path, weights_only=True)` reads it, and so do the tutorial's lines:

    model = VisionTransformer(img_size=224, patch_size=16, num_classes=10, embed_dim=384, depth=6, num_heads=6)
    model.load_state_dict(torch.load('checkpoints/best_model.pth')['model_state_dict'])

with `VisionTransformer` from `parity.model` or timm (the keys are timm's).
"""

import dataclasses
import os

import torch

from parity.port import flax_to_torch
from vit_jax.errors import CommandParser, UserError, cli
from vit_jax.files import atomic_open
from vit_jax.workdir import load_best

EXPORT = "best_model.pth"  # in the workdir, by default


def export(workdir: str, out: str | None = None) -> str:
    """Writes the workdir's best parameters as a .pth; returns its path."""
    run = load_best(workdir)
    out = out or os.path.join(workdir, EXPORT)
    ckpt = {
        "model_state_dict": flax_to_torch(run.params, run.model_cfg),
        "epoch": int(run.meta["epoch"]),
        "test_acc": float(run.meta["test_acc"]),
        "config": dataclasses.asdict(run.model_cfg),  # plain types: weights_only loading accepts them
    }
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with atomic_open(out, "wb") as f:  # a killed export never leaves half a file there
            torch.save(ckpt, f)
    except OSError as e:
        raise UserError(f"cannot write {out!r} ({e.strerror}): choose another --out")
    return out


@cli
def main(argv=None):
    parser = CommandParser(prog="python -m parity.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="checkpoints", help="the --workdir of a training run")
    parser.add_argument("--out", default=None, help="where to write (default: WORKDIR/best_model.pth)")
    a = parser.parse_args(argv)
    out = export(a.workdir, a.out)
    ckpt = torch.load(out, map_location="cpu", weights_only=True)  # proves it loads as users will
    n = sum(t.numel() for t in ckpt["model_state_dict"].values())
    print(f"Wrote {out}: epoch {ckpt['epoch']}, test acc {ckpt['test_acc']:.2f}%, "
          f"{len(ckpt['model_state_dict'])} tensors, {n:,} parameters")
    return out


if __name__ == "__main__":
    main()
