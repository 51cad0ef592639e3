"""`python -m vit_jax.evaluate --workdir DIR`: the best model's test loss and accuracy.

The test images come from the run's own source (tfds in its --data_dir, or its --archive) unless
--data_dir or --archive says otherwise.
"""

import argparse

from vit_jax import data, step
from vit_jax.devices import DataParallel
from vit_jax.errors import CommandParser, UserError, cli
from vit_jax.workdir import load_best


@cli
def main(argv=None):
    parser = CommandParser(prog="python -m vit_jax.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="checkpoints")
    data.add_source_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--test_limit", type=int, default=None, help="only the first N test images")
    parser.add_argument("--tta_flip", action=argparse.BooleanOptionalAction, default=None,
                        help="average each image's logits with its mirror image's (default: as the run evaluated)")
    a = parser.parse_args(argv)
    if a.batch_size <= 0:
        raise UserError(f"--batch_size must be positive, got {a.batch_size}")
    run = load_best(a.workdir)
    images, labels = data.load_split("test", limit=a.test_limit, **data.source(a, run.cfg))
    parallel = DataParallel.create(a.batch_size)
    tta_flip = run.cfg.tta_flip if a.tta_flip is None else a.tta_flip
    eval_fn = step.jit_eval_step(parallel, run.model_cfg, tta_flip)
    loss, acc = step.evaluate(eval_fn, parallel, parallel.replicate(run.params),
                              data.epoch_batches(images, labels, a.batch_size))
    print(f"Best model of {a.workdir} (epoch {run.meta['epoch']}, {run.cfg.recipe}): "
          f"Test Loss: {loss:.4f} | Test Acc: {acc:.2f}% on {'the first' if a.test_limit else 'all'} {len(images):,} "
          f"test images{' and their mirror images' if tta_flip else ''}{_run_limit(run.cfg.test_limit, a.test_limit)}")
    return loss, acc


def _run_limit(run_limit: int | None, limit: int | None) -> str:
    """Which test images the run evaluated while it trained, when it was not these: the accuracy of the
    best epoch was measured on those, and can differ from this one."""
    return f" (the run evaluated its first {run_limit:,}: --test_limit {run_limit})" if run_limit and run_limit != limit \
        else ""


if __name__ == "__main__":
    main()
