"""`--time_budget MINUTES`: as many epochs as fit between the command's start and the budget's end.

A run with a budget first measures itself on this machine: the train step and an evaluation batch,
each compiled and then timed on a throwaway copy of the state, so the run that follows is exactly
the run `--epochs N` would be. From those figures and the time already spent (start-up, data,
compiling), it chooses the epochs (or, if not even one fits, the part of the training split that
does), prints what it chose and why, and records the choice in config.json, where a resumed run
finds it.
"""

import dataclasses
import math
import os
import time

import jax

from vit_jax.config import TrainConfig
from vit_jax.errors import UserError

SAFETY = 0.95  # of the time left, the part planned: steps vary a little, and a plan must not overrun
END_SECONDS = 10.0  # for what follows the last epoch: the summary, its curves, closing the checkpoints
SAVE_SECONDS = 1.0  # per epoch, for the checkpoints (the best and the latest), measured as well below


def process_start() -> float:
    """The wall-clock time this process started at (from /proc on Linux; else the import of this module)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # starttime, field 22, after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED


_IMPORTED = time.time()


@dataclasses.dataclass(frozen=True)
class Speed:
    """What the run measured of itself, in seconds."""

    step: float  # one train step, compiled
    eval_batch: float  # one evaluation batch, compiled


def measure(train_fn, eval_fn, state, metrics, batches, put, key, eval_params, eval_metrics, steps: int = 8,
            min_seconds: float = 5.0) -> Speed:
    """Times train_fn and eval_fn on copies (both donate their inputs): nothing of the run is touched.

    Each timed step takes the next host batch from `batches` and puts it on the devices with `put`,
    as the training loop does (at small batches, that host side is a fair part of a step), for
    `steps` steps and at least `min_seconds`. The steps compiled here are the run's: its schedule's
    numbers are arguments, so the run that follows does not compile again."""
    copy = lambda tree: jax.tree.map(lambda x: x.copy(), tree)
    first = put(*next(batches))
    s, m = train_fn(copy(state), copy(metrics), *first, key)  # compiles
    jax.block_until_ready(m)
    s, m = train_fn(s, m, *put(*next(batches)), key)  # a step after compiling, not timed: caches warm up
    jax.block_until_ready(m)
    t, n = time.perf_counter(), 0
    while n < steps or time.perf_counter() - t < min_seconds:
        s, m = train_fn(s, m, *put(*next(batches)), key)
        n += 1
        if n % steps == 0:
            jax.block_until_ready(m)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t) / n
    em = eval_fn(eval_params, copy(eval_metrics), *first)
    jax.block_until_ready(em)
    t = time.perf_counter()
    for _ in range(3):
        em = eval_fn(eval_params, em, *first)
    jax.block_until_ready(em)
    return Speed(step=step_s, eval_batch=(time.perf_counter() - t) / 3)


def plan(cfg: TrainConfig, speed: Speed, started: float, train_batches: int, eval_batches: int) -> tuple[TrainConfig, str]:
    """The run's config with the epochs (and if need be train_limit) that fit, and why, in words.

    Either as many whole epochs as fit, or one more, each of them on the first part of the training
    split that then fits: whichever trains on more images (each epoch costs an evaluation too)."""
    left = cfg.time_budget * 60 - (time.time() - started) - END_SECONDS
    usable = max(left, 0.0) * SAFETY
    per_epoch = eval_batches * speed.eval_batch + SAVE_SECONDS  # besides the training steps
    epoch_s = train_batches * speed.step + per_epoch
    why = (f"time budget {cfg.time_budget:g} min: {time.time() - started:.0f} s gone (start-up, data, compiling, "
           f"measuring); a step takes {speed.step:.3f} s ({train_batches} per epoch: {train_batches * speed.step:.0f} s), "
           f"evaluation {per_epoch - SAVE_SECONDS:.1f} s, so an epoch {epoch_s:.0f} s; {usable:.0f} s are planned "
           f"({SAFETY:.0%} of what is left after {END_SECONDS:.0f} s for the end)")
    whole = int(usable // epoch_s)
    options = []  # (images trained on, fewer epochs first, epochs, steps per epoch)
    for epochs in {max(whole, 1), whole + 1}:
        steps = min(train_batches, int((usable / epochs - per_epoch) // speed.step))
        if steps >= 1:
            options.append((epochs * steps, -epochs, epochs, steps))
    if not options:
        raise UserError(f"--time_budget {cfg.time_budget:g} min leaves {max(left, 0):.0f} s after start-up and "
                        f"compiling, not enough for a step and an evaluation (an epoch takes {math.ceil(epoch_s)} s "
                        f"here): give more minutes")
    _, _, epochs, steps = max(options)
    limit = None if steps == train_batches else steps * cfg.batch_size  # the first images, in file order
    warmup = min(cfg.warmup_epochs, epochs / 2)
    chosen = dataclasses.replace(cfg, epochs=epochs, warmup_epochs=warmup,
                                 train_limit=cfg.train_limit if limit is None else limit)
    what = f"{epochs} epoch{'s' * (epochs != 1)}"
    if limit is not None:
        what += f" of the first {limit:,} training images ({steps} of {train_batches} batches)"
    if warmup != cfg.warmup_epochs:
        what += f", warm-up shortened to {warmup:g} epochs"
    return chosen, f"{why}: {what}"


def adopt_saved(cfg: TrainConfig, saved: TrainConfig) -> TrainConfig:
    """A rerun of a run with the same budget keeps the length that run chose (from its config.json)."""
    if cfg.time_budget is None or saved.time_budget != cfg.time_budget:
        return cfg
    return dataclasses.replace(cfg, epochs=saved.epochs, train_limit=saved.train_limit,
                               warmup_epochs=saved.warmup_epochs)


def train_deadline(cfg: TrainConfig, speed: Speed, started: float, eval_batches: int) -> float:
    """The wall-clock time after which the last epoch's training stops early, leaving time for its
    evaluation, the saves and the end: the plan's guard against steps slower than measured."""
    return started + cfg.time_budget * 60 - END_SECONDS - eval_batches * speed.eval_batch - SAVE_SECONDS
