"""`python scripts/eval_npz.py PARAMS.npz ARCHIVE`: the test accuracy of parity.convert's output as it is,
before any training (e.g. a model converted to another resolution). The model is the config in the file."""

import json
import sys

import numpy as np

from vit_jax import data, step, weights
from vit_jax.config import ModelConfig
from vit_jax.devices import DataParallel


def main(path: str, archive: str, batch_size: int = 250) -> float:
    with np.load(path) as f:
        cfg = ModelConfig(**json.loads(str(f[weights.CONFIG_KEY])))
    images, labels = data.load_split("test", archive=archive)
    parallel = DataParallel.create(batch_size)
    eval_fn = step.jit_eval_step(parallel, cfg, tta_flip=False)
    loss, acc = step.evaluate(eval_fn, parallel, parallel.replicate(weights.load(path, cfg)),
                              data.epoch_batches(images, labels, batch_size))
    print(f"{path}: img {cfg.img_size}, test loss {loss:.4f}, test acc {acc:.2f}% on {len(images):,} images")
    return acc


if __name__ == "__main__":
    main(*sys.argv[1:3])
