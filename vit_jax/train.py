"""Training: `python -m vit_jax.train [flags]`, the loop around the jitted steps.

Rerunning the same command resumes from the workdir's latest checkpoint and ends with the metrics an
uninterrupted run would have: batches, augmentation and dropout are pure functions of (seed, step),
and the running sums of an unfinished epoch are checkpointed with the state. Ctrl+C or SIGTERM
finishes the current step, saves, and exits with status 130. A loss that stops being finite ends the
run before anything is saved, so the last good checkpoint stays the latest.
"""

import contextlib
import fcntl
import json
import os
import signal
import sys
import time

import jax
from tqdm import tqdm

from vit_jax import config as config_lib
from vit_jax import data, step, summary, tensorboard_log
from vit_jax.checkpoint import Checkpoints, discard
from vit_jax.config import ModelConfig, TrainConfig
from vit_jax.errors import UserError, cli
from vit_jax.model import count_params

EXIT_INTERRUPTED = 130
# Settings that may change between runs of one training; all others shape its results.
RESUMABLE_CHANGES = {"workdir", "data_dir", "log_every", "patience", "init_from", "save_every", "fresh", "tensorboard"}


class Interrupted(Exception):
    """Raised after a SIGINT/SIGTERM once the state is saved."""


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


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """One run per workdir. The kernel drops the lock when its process dies, however it dies."""
    path = os.path.join(workdir, "lock")
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            raise UserError(f"workdir {workdir!r} is in use by {owner}: wait for that run to end or stop it, "
                            f"or pass another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {os.uname().nodename}")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)


def describe_devices() -> str:
    devices = jax.local_devices()
    d = devices[0]
    if d.platform == "cpu":
        return f"{len(devices)} x cpu ({os.cpu_count()} cores, no accelerator)"
    memory = (d.memory_stats() or {}).get("bytes_limit", 0) / 2**30
    return f"{len(devices)} x {d.device_kind}" + (f" ({memory:.1f} GiB)" if memory else "")


def make_workdir(workdir: str):
    """Creates the workdir, and checks that it can be written before any work is done."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to workdir {workdir!r} ({e.strerror}): choose another --workdir")


def prepare_workdir(cfg: TrainConfig, model_cfg: ModelConfig):
    """Checks that the run already in the workdir has this run's settings (or, with --fresh, moves it
    aside), then writes config.json."""
    resolved = config_lib.to_dict(cfg, model_cfg)
    path = os.path.join(cfg.workdir, "config.json")
    if cfg.fresh:
        aside = discard(cfg.workdir)
        if aside:
            print(f"--fresh: moved the previous run's checkpoints and metrics to {aside}")
    elif os.path.exists(path) and os.path.isdir(os.path.join(cfg.workdir, "latest")):
        with open(path) as f:
            saved = json.load(f)
        diff = [f"{section}.{k}: {saved[section].get(k)!r} -> {v!r}"
                for section in ("model", "train") for k, v in resolved[section].items()
                if k not in RESUMABLE_CHANGES and saved[section].get(k) != v]
        if diff:
            raise UserError(f"workdir {cfg.workdir!r} holds a run with other settings ({'; '.join(diff)}): "
                            f"rerun with the same settings to resume it, or pass another --workdir")
    _write_atomic(path, json.dumps(resolved, indent=2) + "\n")


def _write_atomic(path: str, text: str):
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _read_metrics(workdir: str, epochs_done: int) -> list[dict]:
    """The metrics rows of the epochs the checkpoint has (a row can outlive a crash before its save)."""
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


def _check_finite(metrics, cfg: TrainConfig, steps_per_epoch: int):
    bad = int(jax.device_get(metrics["nonfinite_step"]))
    if bad >= 0:
        epoch, batch = divmod(bad, steps_per_epoch)
        raise UserError(
            f"the loss stopped being finite at epoch {epoch + 1}, batch {batch + 1} (step {bad}): training "
            f"diverged, most likely because the learning rate ({cfg.lr:g}) is too high. Nothing was saved "
            f"after the last good checkpoint; start again with a lower --lr (e.g. {cfg.lr / 10:g}) and "
            f"another --workdir (or --fresh)")


def train_and_evaluate(cfg: TrainConfig, model_cfg: ModelConfig) -> list[dict]:
    """Trains (or resumes) in cfg.workdir; returns one metrics row per epoch done."""
    make_workdir(cfg.workdir)
    with workdir_lock(cfg.workdir), _StopFlag() as stop:
        prepare_workdir(cfg, model_cfg)
        return _Run(cfg, model_cfg, stop).train()


class _Run:
    """One training run: the data, the compiled steps, the state, and the loop over epochs."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, stop: _StopFlag):
        self.cfg, self.model_cfg, self.stop = cfg, model_cfg, stop
        self.mesh = step.Mesh.create(cfg.batch_size)
        self.train_x, self.train_y = data.load_split("train", cfg.data_dir, cfg.train_limit)
        self.test_x, self.test_y = data.load_split("test", cfg.data_dir, cfg.test_limit)
        self.steps_per_epoch = data.num_batches(len(self.train_x), cfg.batch_size)
        self.schedule = step.make_schedule(cfg, self.steps_per_epoch)
        self.train_fn, self.eval_fn = step.jit_steps(
            self.mesh, step.Augment(model_cfg.img_size, cfg.rotation, cfg.color_jitter))
        self.key = jax.random.key(cfg.seed)

        state = step.create_train_state(model_cfg, cfg, self.steps_per_epoch, initial_params(cfg, model_cfg))
        self.state = self.mesh.replicate(state)
        self.metrics = self.mesh.replicate(step.zero_metrics())
        self.meta = {"epochs_done": 0, "best_acc": -1.0, "best_epoch": 0, "seconds_in_epoch": 0.0}
        self.ckpts = Checkpoints(cfg.workdir)
        try:
            restored = self.ckpts.restore_latest(self.state, self.metrics)
        except BaseException:
            self.ckpts.close()  # orbax's background threads must stop before the interpreter does
            raise
        self.resumed = restored is not None
        if self.resumed:
            self.state, self.metrics, self.meta = restored
        self.tb = tensorboard_log.Writer(cfg.workdir, enabled=cfg.tensorboard)
        self._cpu_clock = None  # for the one CPU warning: when the first step was done
        self._cpu_warned = False
        self.rows = _read_metrics(cfg.workdir, self.meta["epochs_done"])

    def train(self) -> list[dict]:
        cfg, m = self.cfg, self.model_cfg
        print(f"Device: {describe_devices()}")
        print(f"Data: {len(self.train_x):,} train / {len(self.test_x):,} test images, batch size "
              f"{cfg.batch_size} ({self.steps_per_epoch} batches per epoch)")
        print(f"Model: ViT {cfg.preset} img {m.img_size} patch {m.patch_size} embed {m.embed_dim} "
              f"depth {m.depth} heads {m.num_heads} mlp {m.mlp_ratio:g} {m.dtype} | "
              f"{count_params(self.state.params):,} parameters")
        if self.resumed:
            print(f"Resuming from {cfg.workdir} at epoch {self.meta['epochs_done'] + 1}, step {int(self.state.step)}")
        try:
            while self.meta["epochs_done"] < cfg.epochs and not self._patience_exhausted():
                self._epoch()
        except Interrupted:
            sys.exit(EXIT_INTERRUPTED)
        finally:
            self.ckpts.close()
            self.tb.close()
        if self._patience_exhausted():
            print(f"Early stop: no better test accuracy for {cfg.patience} epochs")
        print(f"\nDone: best test accuracy {self.meta['best_acc']:.2f}% at epoch {self.meta['best_epoch']} "
              f"(checkpoints in {cfg.workdir})")
        print(f"Summary: {summary.write_summary(cfg.workdir, describe_devices())}")
        return self.rows

    def _patience_exhausted(self) -> bool:
        return bool(self.cfg.patience) and self.meta["epochs_done"] - self.meta["best_epoch"] >= self.cfg.patience

    def _save_latest(self, t0: float):
        _check_finite(self.metrics, self.cfg, self.steps_per_epoch)  # never save a diverged state
        self.meta["seconds_in_epoch"] = time.time() - t0
        self.ckpts.save_latest(self.state, self.metrics, self.meta)

    def _epoch(self):
        cfg, spe, epoch = self.cfg, self.steps_per_epoch, self.meta["epochs_done"]
        first = int(self.state.step) - epoch * spe  # > 0 when resuming mid-epoch
        lr = float(self.schedule(epoch * spe))
        print(f"\nEpoch {epoch + 1}/{cfg.epochs} | lr {lr:.2e}")
        t0 = time.time() - self.meta["seconds_in_epoch"]
        batches = data.epoch_batches(self.train_x, self.train_y, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                     start=first)
        with tqdm(total=spe, initial=first, disable=not sys.stdout.isatty(), leave=False, unit="batch") as bar:
            for i, batch in enumerate(batches, start=first):
                self.state, self.metrics = self.train_fn(self.state, self.metrics, *self.mesh.put_batch(*batch),
                                                         self.key)
                bar.update()
                if jax.default_backend() == "cpu" and i in (first, first + 3):
                    self._warn_cpu()
                if (i + 1) % cfg.log_every == 0:
                    _check_finite(self.metrics, cfg, spe)
                    loss, acc = _means(self.metrics)
                    self.tb.scalars({"loss": loss, "acc": acc, "lr": float(self.schedule(epoch * spe + i))},
                                    epoch * spe + i + 1, prefix="train/")
                    bar.write(f"Batch [{i + 1}/{spe}] Loss: {loss:.4f} | Acc: {acc:.2f}%")
                if i + 1 < spe and (self.stop or (cfg.save_every and (i + 1) % cfg.save_every == 0)):
                    self._save_latest(t0)
                    if self.stop:
                        print(f"Saved at epoch {epoch + 1}, batch {i + 1}/{spe}. "
                              f"Run the same command again to resume.")
                        raise Interrupted
        _check_finite(self.metrics, cfg, spe)
        train_seconds = time.time() - t0
        train_loss, train_acc = _means(self.metrics)
        test_loss, test_acc = evaluate(self.eval_fn, self.mesh, self.state, self.test_x, self.test_y,
                                       cfg.batch_size)
        seconds = time.time() - t0
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
               "test_loss": test_loss, "test_acc": test_acc, "seconds": round(seconds, 2),
               "images_per_sec": round(len(self.train_x) / train_seconds, 1)}
        self.rows.append(row)
        print(f"Epoch {epoch + 1}: Train Loss: {train_loss:.4f} | Train Acc: {train_acc:.2f}% | "
              f"Test Loss: {test_loss:.4f} | Test Acc: {test_acc:.2f}% | {seconds:.1f}s "
              f"({row['images_per_sec']:.0f} img/s)")
        if test_acc > self.meta["best_acc"]:
            self.meta.update(best_acc=test_acc, best_epoch=epoch + 1)
            self.ckpts.save_best(self.state.params, {"epoch": epoch + 1, "test_acc": test_acc,
                                                     "config": config_lib.to_dict(cfg, self.model_cfg)})
            print(f"New best model saved (test acc {test_acc:.2f}%)")
        # metrics.jsonl first, then the checkpoint: a resume drops rows the checkpoint lacks.
        _write_atomic(os.path.join(cfg.workdir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in self.rows))
        self.tb.scalars({k: v for k, v in row.items() if k != "epoch"}, (epoch + 1) * spe, prefix="epoch/")
        self.tb.flush()
        self.metrics = self.mesh.replicate(step.zero_metrics())
        self.meta.update(epochs_done=epoch + 1, seconds_in_epoch=0.0)
        self.ckpts.save_latest(self.state, self.metrics, self.meta)
        if self.stop:
            print(f"Saved after epoch {epoch + 1}. Run the same command again to resume.")
            raise Interrupted

    def _warn_cpu(self):
        """Once per run: notes the time after the first step and warns three steps later."""
        if self._cpu_warned:
            return
        jax.block_until_ready(self.state.params)
        if self._cpu_clock is None:
            self._cpu_clock = time.time()
            return
        per_step = (time.time() - self._cpu_clock) / 3
        hint = "" if self.model_cfg.img_size <= 32 else "; --preset cifar (native 32x32 input) trains ~8x faster per image"
        epoch_s = per_step * self.steps_per_epoch
        eta = f"{epoch_s:.0f} s" if epoch_s < 120 else f"{epoch_s / 60:.0f} min"
        print(f"warning: no accelerator found, running on the CPU at ~{per_step:.2f} s/batch, "
              f"~{eta} per epoch{hint}", file=sys.stderr, flush=True)
        self._cpu_warned = True


@cli
def main(argv=None):
    cfg, model_cfg = config_lib.parse_args(argv)
    train_and_evaluate(cfg, model_cfg)


if __name__ == "__main__":
    main()
