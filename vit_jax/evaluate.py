"""`python -m vit_jax.evaluate --workdir DIR [--data_dir DIR]`: the best model's test loss and accuracy."""

import argparse
import json
import os

import jax

from vit_jax import data, step
from vit_jax.checkpoint import Checkpoints
from vit_jax.config import ModelConfig, TrainConfig
from vit_jax.errors import UserError, cli
from vit_jax.model import init_params
from vit_jax.train import evaluate


def load_run(workdir: str) -> tuple[TrainConfig, ModelConfig]:
    """The configs a workdir was trained with (its config.json)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"{workdir!r} has no config.json: is it the --workdir of a training run?")
    with open(path) as f:
        saved = json.load(f)
    return TrainConfig(**saved["train"]), ModelConfig(**saved["model"])


def load_best(workdir: str):
    """(model config, best parameters, their meta) of a workdir."""
    cfg, model_cfg = load_run(workdir)
    ckpts = Checkpoints(workdir)
    template = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0)))
    params, meta = ckpts.restore_best(template)
    ckpts.close()
    return model_cfg, params, meta


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="checkpoints")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--test_limit", type=int, default=None, help="only the first N test images")
    a = parser.parse_args(argv)
    cfg, _ = load_run(a.workdir)
    model_cfg, params, meta = load_best(a.workdir)
    images, labels = data.load_split("test", a.data_dir or cfg.data_dir, a.test_limit)
    mesh = step.Mesh.create(a.batch_size)
    state = mesh.replicate(step.create_train_state(model_cfg, cfg, 1, params))
    _, eval_fn = step.jit_steps(mesh, step.Augment(model_cfg.img_size))
    loss, acc = evaluate(eval_fn, mesh, state, images, labels, a.batch_size)
    print(f"Best model of {a.workdir} (epoch {meta['epoch']}, {cfg.preset}): "
          f"Test Loss: {loss:.4f} | Test Acc: {acc:.2f}% on {len(images):,} images")
    return loss, acc


if __name__ == "__main__":
    main()
