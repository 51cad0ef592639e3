"""Parameters as one plain `.npz` file: what `--init_from` reads and `python -m parity.convert` writes.

Each array is stored under its Flax path ('blocks_0/attn/qkv/kernel'); '__config__' holds the
ModelConfig they were made for, as JSON. numpy alone reads and writes it: no PyTorch, no orbax.
"""

import dataclasses
import json
import os
import zipfile

import jax
import numpy as np
from flax import traverse_util

from vit_jax.config import ModelConfig
from vit_jax.errors import UserError, reason
from vit_jax.model import init_params

CONFIG_KEY = "__config__"
# Fields that change what the weights mean; dropout rates and the compute dtype do not.
ARCHITECTURE = ("img_size", "stem", "patch_size", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio",
                "class_token", "global_pool")


def shapes(config: ModelConfig) -> dict[str, tuple]:
    """The model's parameter shapes by Flax path (traced, nothing computed)."""
    tree = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def listing(problems: list[str], most: int = 5) -> str:
    """'N differences: a; b; ...' naming the first `most`, so a message stays one readable line."""
    shown = "; ".join(problems[:most]) + (f"; and {len(problems) - most} more" if len(problems) > most else "")
    return f"{len(problems)} difference{'s' * (len(problems) != 1)}: {shown}"


def check_fits(found: dict[str, tuple], expected: dict[str, tuple], what: str):
    """Raises a UserError naming the first differences unless `found` has exactly the expected keys and shapes."""
    problems = [f"{k!r} has shape {found[k]}, the model needs {shape}"
                for k, shape in expected.items() if k in found and found[k] != shape]
    problems += [f"missing {k!r} {shape}" for k, shape in expected.items() if k not in found]
    problems += [f"unexpected {k!r} {shape}" for k, shape in found.items() if k not in expected]
    if problems:
        raise UserError(f"{what} do not fit the model ({listing(problems)})")


def save(path: str, params, config: ModelConfig):
    """Writes `params` (as init_params makes them) and their config; whole or not at all."""
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    arrays = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    arrays[CONFIG_KEY] = np.asarray(json.dumps(dataclasses.asdict(config)))
    tmp = path + ".tmp.npz"  # np.savez adds .npz to names without it
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load(path: str, config: ModelConfig) -> dict:
    """Flax params for `config` from a .npz written by `save`; every key and shape must fit."""
    if not os.path.isfile(path):
        raise UserError(f"no parameters file at {path!r}: give a .npz written by python -m parity.convert")
    if path.endswith((".pth", ".pt", ".bin", ".safetensors")):
        raise UserError(f"{path!r} is a PyTorch checkpoint: convert it first with python -m parity.convert {path} "
                        f"(it writes {os.path.splitext(path)[0]}.npz), then pass that to --init_from")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # np.load reads a .npy whatever its name
            raise ValueError("it holds one array (.npy), not named arrays (.npz)")
        with loaded as f:
            arrays = {k: f[k] for k in f.files}
        saved = json.loads(str(arrays.pop(CONFIG_KEY))) if CONFIG_KEY in arrays else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # EOFError: an empty file
        raise UserError(f"{path!r} is not a parameters file ({reason(e)}): give a .npz written by "
                        f"python -m parity.convert") from None
    if saved is None and any(k.endswith("embedding/kernel") for k in arrays):
        raise UserError(f"{path!r} is a Google ViT checkpoint: convert it first with python -m parity.convert {path} "
                        f"--img_size S --num_classes N, then pass the .npz it writes to --init_from")
    if isinstance(saved, dict):
        saved = {k: saved.get(k, getattr(ModelConfig, k)) for k in ARCHITECTURE}  # a field added since: its default
        differ = [f"{k} {saved[k]} -> {getattr(config, k)}" for k in ARCHITECTURE if saved[k] != getattr(config, k)]
        if differ:
            raise UserError(f"{path!r} holds parameters of another model ({'; '.join(differ)}): choose the --recipe "
                            f"and model flags it was made for")
    check_fits({k: v.shape for k, v in arrays.items()}, shapes(config), f"the parameters in {path!r}")
    return traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in arrays.items()}, sep="/")
