"""`python -m parity.convert MODEL.pth [--out MODEL.npz]`: PyTorch weights into what `--init_from` reads.

Takes this project's `best_model.pth` (parity.export), the PyTorch tutorial's checkpoint
({'model_state_dict': ...}) or a bare state_dict with timm's ViT keys, ports it through the table in
port.py, and writes the Flax parameters as a .npz (vit_jax.weights). Then fine-tune in JAX:

    python -m parity.convert best_model.pth
    python -m vit_jax.train --init_from best_model.npz [--recipe ...] [flags]

The model is the config saved in the .pth (parity.export writes one), else --recipe and the model flags.
"""

import dataclasses
import os

from parity.port import load_torch_checkpoint, read_torch_checkpoint
from vit_jax import config as config_lib, weights
from vit_jax.config import RECIPES, ModelConfig, recipe_of
from vit_jax.errors import CommandParser, UserError, cli, reason
from vit_jax.model import count_params


def model_of(path: str, recipe: str | None, overrides: dict) -> ModelConfig:
    """The architecture of a checkpoint: the config saved in it, else the recipe with the flags applied."""
    _, rest = read_torch_checkpoint(path)
    saved = rest.get("config")
    if isinstance(saved, dict) and recipe is None and not any(v is not None for v in overrides.values()):
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in saved.items() if k in names}).validate()
    return config_lib.model_config(config_lib.TrainConfig(recipe=recipe or "tutorial"), **overrides)


def convert(path: str, model_cfg: ModelConfig, out: str | None = None) -> str:
    """Writes the checkpoint's weights as Flax parameters (.npz); returns the file's path."""
    params = load_torch_checkpoint(path, model_cfg)
    out = out or os.path.splitext(path)[0] + ".npz"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        weights.save(out, params, model_cfg)
    except OSError as e:
        raise UserError(f"cannot write {out!r} ({reason(e)}): choose another --out") from None
    return out


@cli
def main(argv=None) -> str:
    parser = CommandParser(prog="python -m parity.convert", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("checkpoint", help="a .pth: this project's, the PyTorch tutorial's, or a bare state_dict")
    parser.add_argument("--out", default=None, help="the .npz to write (default: the checkpoint's name, .npz)")
    parser.add_argument("--recipe", choices=list(RECIPES), default=None,
                        help="the architecture, when the checkpoint has no saved config (default: seed)")
    config_lib.add_model_arguments(parser)
    a = vars(parser.parse_args(argv))
    overrides = {f.name: a[f.name] for f in dataclasses.fields(ModelConfig)}
    model_cfg = model_of(a["checkpoint"], a["recipe"], overrides)
    out = convert(a["checkpoint"], model_cfg, a["out"])
    n = count_params(weights.load(out, model_cfg))
    recipe = recipe_of(model_cfg)
    flags = f"--recipe {recipe}" if recipe else "--recipe ... and the model flags it was trained with"
    print(f"Wrote {out}: {n:,} parameters of a ViT img {model_cfg.img_size} patch {model_cfg.patch_size} "
          f"embed {model_cfg.embed_dim} depth {model_cfg.depth} heads {model_cfg.num_heads}. Fine-tune it with: "
          f"python -m vit_jax.train --init_from {out} {flags}")
    return out


if __name__ == "__main__":
    main()
