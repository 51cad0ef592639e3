"""CIFAR-10 as numpy arrays, from either source, and one epoch's batches.

Two sources give the same images and labels (in another order):
    tfds (the default)    the stock tensorflow-datasets 'cifar10' in --data_dir (`tfds_data.py`,
                          the only module that imports TensorFlow)
    --archive PATH        the official cifar-10-binary.tar.gz or its folder, read with numpy
                          (`archive.py`): no TensorFlow needed

`python -m vit_jax.data prepare --archive PATH` builds the tfds dataset offline (`prepare.py`).
"""


import numpy as np

from vit_jax import archive as archive_source, files
from vit_jax.errors import UserError

CLASS_NAMES = archive_source.CLASS_NAMES


def load_split(split: str, data_dir: str | None = None, limit: int | None = None,
               archive: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split 'train' or 'test': images uint8 (N, 32, 32, 3), labels int32 (N,), the same order on every call.

    archive: read this archive (or folder) with numpy; else tfds's 'cifar10' in data_dir (default:
    $TFDS_DATA_DIR or ~/tensorflow_datasets). limit: only the first `limit` examples.
    """
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; CIFAR-10 has 'train' and 'test'")
    if limit is not None and limit <= 0:
        raise UserError(f"--{split}_limit must be positive, got {limit}")
    if archive is not None:
        return archive_source.load_split(archive, split, limit)
    files.check_data_dir(data_dir)
    from vit_jax import tfds_data  # TensorFlow: only on this path

    return tfds_data.load_split(split, data_dir, limit)


def add_source_arguments(parser):
    """--data_dir and --archive, for the commands that read a run's test images (default: the run's source)."""
    parser.add_argument("--data_dir", default=None, help="tfds data directory (default: the run's)")
    parser.add_argument("--archive", default=None,
                        help="read this cifar-10-binary.tar.gz (or its folder) instead (default: the run's source)")


def source(args, cfg) -> dict:
    """The data_dir and archive for load_split: those given on the command line, else those of the run `cfg`."""
    given = args.data_dir is not None or args.archive is not None
    return {"data_dir": args.data_dir, "archive": args.archive} if given else \
        {"data_dir": cfg.data_dir, "archive": cfg.archive}


def num_batches(num_examples: int, batch_size: int) -> int:
    """Batches in one epoch; the last, partial one counts (782 for 50000 examples in batches of 64)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return -(-num_examples // batch_size)


def epoch_batches(images, labels, batch_size, *, seed=None, epoch=0, start=0):
    """Yields one epoch as (images, labels int32, mask float32) numpy batches of exactly batch_size.

    Shuffled when seed is given, in an order that depends on (seed, epoch) alone, so a resumed run
    sees the same batches. The last batch is padded with zeros and mask 0, so every batch has one
    shape (one compilation) and no example is dropped. start: skip the first `start` batches.
    """
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    if start < 0:
        raise ValueError(f"start must be non-negative, got {start}")
    order = np.arange(n) if seed is None else np.random.default_rng([seed, epoch]).permutation(n)
    for b in range(start, num_batches(n, batch_size)):
        idx = order[b * batch_size:(b + 1) * batch_size]
        x, y = images[idx], np.asarray(labels[idx], np.int32)
        mask = np.ones(batch_size, np.float32)
        if len(idx) < batch_size:
            pad = batch_size - len(idx)
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros(pad, np.int32)])
            mask[len(idx):] = 0.0
        yield x, y, mask


def main(argv=None):
    """`python -m vit_jax.data prepare ...`: see prepare.py."""
    from vit_jax import prepare  # TensorFlow: only on this path

    prepare.main(argv)


if __name__ == "__main__":
    main()
