"""Training: `python -m vit_jax.train [flags]`, the loop around the jitted steps.

Rerunning the same command resumes from the workdir's latest checkpoint and ends with the metrics an
uninterrupted run would have: batches, augmentation and dropout are pure functions of (seed, step).
Ctrl+C (or SIGTERM) finishes the current step, saves, and exits with status 130.
"""

import dataclasses
import json
import os
import signal
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from vit_jax import config as config_lib
from vit_jax import data, step
from vit_jax.checkpoint import Checkpoints
from vit_jax.config import ModelConfig, TrainConfig
from vit_jax.errors import UserError, cli
from vit_jax.model import count_params

EXIT_INTERRUPTED = 130


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps, so no step is cut in half."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._set) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _set(self, signum, frame):
        if self.signum is not None:  # a second Ctrl+C while saving: the user insists
            raise KeyboardInterrupt
        self.signum = signum
        print("\nStopping after this step; saving a checkpoint...", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def __bool__(self):
        return self.signum is not None


def describe_devices() -> str:
    devices = jax.local_devices()
    d = devices[0]
    if d.platform == "cpu":
        return f"{len(devices)} x cpu ({os.cpu_count()} cores, no accelerator)"
    memory = (d.memory_stats() or {}).get("bytes_limit", 0) / 2**30
    return f"{len(devices)} x {d.device_kind} ({memory:.1f} GiB)" if memory else f"{len(devices)} x {d.device_kind}"


def _check_workdir(cfg: TrainConfig, model_cfg: ModelConfig) -> dict:
    """Creates the workdir, or checks that the run in it has the same settings as this one."""
    try:
        os.makedirs(cfg.workdir, exist_ok=True)
        probe = os.path.join(cfg.workdir, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to workdir {cfg.workdir!r} ({e.strerror}): choose another --workdir")
    resolved = config_lib.to_dict(cfg, model_cfg)
    path = os.path.join(cfg.workdir, "config.json")
    if os.path.exists(path) and os.path.isdir(os.path.join(cfg.workdir, "latest")):
        with open(path) as f:
            saved = json.load(f)
        # These may change between runs of the same training; everything else shapes its results.
        free = {"workdir", "data_dir", "log_every", "patience", "init_from"}
        diff = [f"{section}.{k}: {saved[section].get(k)!r} -> {v!r}"
                for section in ("model", "train") for k, v in resolved[section].items()
                if k not in free and saved[section].get(k) != v]
        if diff:
            raise UserError(f"workdir {cfg.workdir!r} holds a run with other settings ({'; '.join(diff)}): "
                            f"rerun with the same settings to resume it, or pass another --workdir")
    with open(path + ".tmp", "w") as f:
        json.dump(resolved, f, indent=2)
    os.replace(path + ".tmp", path)
    return resolved


def _write_metrics(workdir: str, rows: list[dict]):
    """Rewrites metrics.jsonl atomically with exactly the epochs the checkpoint has."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def _read_metrics(workdir: str, epochs_done: int) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["epoch"] <= epochs_done]


def _means(metrics) -> tuple[float, float]:
    m = jax.device_get(metrics)
    n = max(float(m["count"]), 1.0)
    return float(m["loss"]) / n, 100.0 * float(m["correct"]) / n


def evaluate(eval_fn, mesh, state, images, labels, batch_size) -> tuple[float, float]:
    """(loss, accuracy %) over a whole split."""
    metrics = mesh.replicate(step.zero_metrics())
    for batch in data.epoch_batches(images, labels, batch_size):
        metrics = eval_fn(state, metrics, *mesh.put_batch(*batch))
    return _means(metrics)


def initial_params(cfg: TrainConfig, model_cfg: ModelConfig):
    """Random parameters, or those of a PyTorch checkpoint (--init_from; imports torch only then)."""
    if cfg.init_from is None:
        return None
    from parity.port import load_torch_checkpoint  # torch is needed on this path alone
    return load_torch_checkpoint(cfg.init_from, model_cfg)


def train_and_evaluate(cfg: TrainConfig, model_cfg: ModelConfig) -> list[dict]:
    """Trains (or resumes) in cfg.workdir; returns one metrics row per epoch done."""
    _check_workdir(cfg, model_cfg)
    mesh = step.Mesh.create(cfg.batch_size)
    train_x, train_y = data.load_split("train", cfg.data_dir, cfg.train_limit)
    test_x, test_y = data.load_split("test", cfg.data_dir, cfg.test_limit)
    steps_per_epoch = data.num_batches(len(train_x), cfg.batch_size)

    state = step.create_train_state(model_cfg, cfg, steps_per_epoch, initial_params(cfg, model_cfg))
    state = mesh.replicate(state)
    metrics = mesh.replicate(step.zero_metrics())
    ckpts = Checkpoints(cfg.workdir)
    meta = {"epochs_done": 0, "best_acc": -1.0, "best_epoch": 0, "seconds_in_epoch": 0.0}
    restored = ckpts.restore_latest(state, metrics)
    if restored is not None:
        state, metrics, meta = restored
    rows = _read_metrics(cfg.workdir, meta["epochs_done"])
    schedule = step.make_schedule(cfg, steps_per_epoch)
    train_fn, eval_fn = step.jit_steps(mesh, step.Augment(model_cfg.img_size, cfg.rotation, cfg.color_jitter))
    key = jax.random.key(cfg.seed)

    print(f"Device: {describe_devices()}")
    print(f"Data: {len(train_x):,} train / {len(test_x):,} test images, batch size {cfg.batch_size} "
          f"({steps_per_epoch} batches per epoch)")
    print(f"Model: ViT {cfg.preset} img {model_cfg.img_size} patch {model_cfg.patch_size} "
          f"embed {model_cfg.embed_dim} depth {model_cfg.depth} heads {model_cfg.num_heads} "
          f"mlp {model_cfg.mlp_ratio:g} {model_cfg.dtype} | {count_params(state.params):,} parameters")
    if restored is not None:
        print(f"Resuming from {cfg.workdir} at epoch {meta['epochs_done'] + 1}, step {int(state.step)}")

    start = int(state.step)
    t_warm = None
    stop = _StopFlag()
    with stop:
        epoch = start // steps_per_epoch
        while epoch < cfg.epochs and not _early_stop(cfg, meta, epoch):
            first_batch = start - epoch * steps_per_epoch if epoch == start // steps_per_epoch else 0
            lr = float(schedule(epoch * steps_per_epoch))
            print(f"\nEpoch {epoch + 1}/{cfg.epochs} | lr {lr:.2e}")
            t0 = time.time() - meta["seconds_in_epoch"]
            batches = data.epoch_batches(train_x, train_y, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                         start=first_batch)
            bar = tqdm(total=steps_per_epoch, initial=first_batch, disable=not sys.stdout.isatty(),
                       leave=False, unit="batch")
            for i, batch in enumerate(batches, start=first_batch):
                state, metrics = train_fn(state, metrics, *mesh.put_batch(*batch), key)
                bar.update()
                if jax.default_backend() == "cpu" and epoch * steps_per_epoch + i - start in (0, 3):
                    t_warm = _warn_cpu(state, t_warm if i > first_batch else None, steps_per_epoch,
                                       model_cfg.img_size)
                if (i + 1) % cfg.log_every == 0:
                    loss, acc = _means(metrics)
                    bar.write(f"Batch [{i + 1}/{steps_per_epoch}] Loss: {loss:.4f} | Acc: {acc:.2f}%")
                if stop and i + 1 < steps_per_epoch:
                    bar.close()
                    meta["seconds_in_epoch"] = time.time() - t0
                    ckpts.save_latest(state, metrics, meta)
                    ckpts.wait()
                    print(f"Saved at epoch {epoch + 1}, batch {i + 1}/{steps_per_epoch}. "
                          f"Run the same command again to resume.")
                    ckpts.close()
                    sys.exit(EXIT_INTERRUPTED)
            bar.close()
            train_seconds = time.time() - t0
            train_loss, train_acc = _means(metrics)
            test_loss, test_acc = evaluate(eval_fn, mesh, state, test_x, test_y, cfg.batch_size)
            seconds = time.time() - t0
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
                   "test_loss": test_loss, "test_acc": test_acc, "seconds": round(seconds, 2),
                   "images_per_sec": round(len(train_x) / train_seconds, 1)}
            rows.append(row)
            print(f"Epoch {epoch + 1}: Train Loss: {train_loss:.4f} | Train Acc: {train_acc:.2f}% | "
                  f"Test Loss: {test_loss:.4f} | Test Acc: {test_acc:.2f}% | {seconds:.1f}s "
                  f"({row['images_per_sec']:.0f} img/s)")
            if test_acc > meta["best_acc"]:
                meta.update(best_acc=test_acc, best_epoch=epoch + 1)
                ckpts.save_best(state.params, {"epoch": epoch + 1, "test_acc": test_acc,
                                               "config": config_lib.to_dict(cfg, model_cfg)})
                print(f"New best model saved (test acc {test_acc:.2f}%)")
            # metrics.jsonl first, then the checkpoint: a resume drops rows the checkpoint lacks.
            _write_metrics(cfg.workdir, rows)
            metrics = mesh.replicate(step.zero_metrics())
            meta.update(epochs_done=epoch + 1, seconds_in_epoch=0.0)
            ckpts.save_latest(state, metrics, meta)
            epoch += 1
            if stop:
                ckpts.wait()
                print(f"Saved after epoch {epoch}. Run the same command again to resume.")
                ckpts.close()
                sys.exit(EXIT_INTERRUPTED)
    ckpts.wait()
    ckpts.close()
    if _early_stop(cfg, meta, meta["epochs_done"]):
        print(f"Early stop: no better test accuracy for {cfg.patience} epochs")
    print(f"\nDone: best test accuracy {meta['best_acc']:.2f}% at epoch {meta['best_epoch']} "
          f"(checkpoints in {cfg.workdir})")
    return rows


def _early_stop(cfg: TrainConfig, meta: dict, epoch: int) -> bool:
    """True when `patience` epochs have passed without a better test accuracy."""
    return bool(cfg.patience) and meta["epochs_done"] == epoch and epoch - meta["best_epoch"] >= cfg.patience


def _warn_cpu(state, t_warm, steps_per_epoch: int, img_size: int):
    """Called after the first step (returns the time it was done) and after three more (warns)."""
    jax.block_until_ready(state.params)
    if t_warm is None:
        return time.time()
    per_step = (time.time() - t_warm) / 3
    hint = "" if img_size <= 32 else "; --preset cifar (native 32x32 input) trains ~9x faster per image"
    print(f"warning: no accelerator found, running on the CPU at ~{per_step:.2f} s/batch, "
          f"~{per_step * steps_per_epoch / 60:.0f} min per epoch{hint}", file=sys.stderr, flush=True)
    return t_warm


@cli
def main(argv=None):
    cfg, model_cfg = config_lib.parse_args(argv)
    train_and_evaluate(cfg, model_cfg)


if __name__ == "__main__":
    main()
