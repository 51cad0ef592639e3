"""Training: `python -m vit_jax.train [flags]`, the loop around the jitted steps.

Rerunning the same command resumes from the workdir's latest checkpoint and ends with the metrics an
uninterrupted run would have: batches, augmentation and dropout are pure functions of (seed, step),
and the running sums of an unfinished epoch are checkpointed with the state. Ctrl+C or SIGTERM
finishes the current step, saves, and exits with status 130; a second one quits at once, keeping the
previous checkpoint. A loss that stops being finite ends the run before anything is saved, so the
last good checkpoint stays the latest.
"""

import contextlib
import itertools
import os
import signal
import sys
import time

from vit_jax.errors import EXIT_INTERRUPTED


def _stopped_between_steps(signum, frame):
    """Ctrl+C outside the run's own handler (`_StopFlag`): before it, while the imports below take
    their second or two and the workdir is opened, nothing has begun that a rerun would not redo, so
    the process ends at once, as a kill would (why not with Python's KeyboardInterrupt:
    `errors.quit_on_ctrl_c_while_starting`, which the other commands use until their main() begins)."""
    print("\nStopped; no training step was running, so nothing needed saving. Run the same command again "
          "to go on.", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _stopped_between_steps)
    # Before the imports below: the flags are checked at once, and with many processes the process that
    # was started only supervises the one that trains, and needs none of them (processes.py).
    from vit_jax import processes
    processes.supervise_unless_child(sys.argv[1:])

# The other imports come after the handler (flake8 would say E402): jax's alone takes a second.
import jax
from tqdm import tqdm

from vit_jax import budget, config as config_lib
from vit_jax import data, distributed, processes, step, summary, tensorboard_log, weights, workdir
from vit_jax.config import ModelConfig, TrainConfig
from vit_jax.devices import DataParallel, describe_devices
from vit_jax.errors import UserError, cli
from vit_jax.model import count_params

STOP_CHECK_EVERY = 10  # with many processes, they agree on a stop signal every this many steps


class Interrupted(Exception):
    """Raised after a SIGINT/SIGTERM once the state is saved."""


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between steps, so no step is cut in half.

    A second signal means the user will not wait for the save: the process ends at once, status 130.
    Nothing is lost that a kill would not lose: checkpoints appear whole or not at all.
    """

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._set) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _set(self, signum, frame):
        if self.signum is not None:
            print("\nSecond signal: quitting without saving; the previous checkpoint stays the latest. "
                  "Run the same command again to resume from it.", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        self.signum = signum
        print("\nStopping after this step; saving a checkpoint (a second Ctrl+C quits at once without "
              "saving)...", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def __bool__(self):
        return self.signum is not None


def open_workdir(cfg: TrainConfig, model_cfg: ModelConfig) -> TrainConfig:
    """Checks that the run already in the workdir has this run's settings (or, with --fresh, moves it
    aside), then writes config.json. Returns the config to run: a rerun with the same --time_budget
    keeps the length its first run chose."""
    if cfg.fresh:
        aside = workdir.discard(cfg.workdir)
        if aside:
            print(f"--fresh: moved the previous run's checkpoints and metrics to {aside}")
    elif workdir.has_run(cfg.workdir):
        cfg = budget.adopt_saved(cfg, workdir.read_config(cfg.workdir)[0])
        workdir.check_same_run(cfg.workdir, cfg, model_cfg)
    workdir.write_config(cfg.workdir, cfg, model_cfg)
    return cfg


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
    """Trains (or resumes) in cfg.workdir; returns one metrics row per epoch done.

    With many processes, every one runs this; process 0 alone prints, takes the lock and writes the
    workdir's files, and the others read its config.json once it is written."""
    started = budget.process_start()
    primary = distributed.is_primary()
    if primary:
        workdir.make(cfg.workdir)
    else:  # process 0 speaks for all (the runtime's C++ too); errors still reach stderr
        sys.stdout.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    with workdir.lock(cfg.workdir) if primary else contextlib.nullcontext(), _StopFlag() as stop:
        if primary:
            cfg = open_workdir(cfg, model_cfg)
        distributed.barrier("vit_jax: workdir open")
        if not primary and workdir.has_run(cfg.workdir):
            cfg = budget.adopt_saved(cfg, workdir.read_config(cfg.workdir)[0])
        try:
            return _Run(cfg, model_cfg, stop, started).train()
        except (Exception, Interrupted) as e:
            if isinstance(e, (UserError, Interrupted)) or jax.process_count() == 1:
                raise
            distributed.fail_fast(e, jax.process_index())  # one line, and out before the others hang


class _Run:
    """One training run: the data, the compiled steps, the state, and the loop over epochs."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, stop: _StopFlag, started: float):
        self.model_cfg, self.stop = model_cfg, stop
        self.parallel = DataParallel.create(cfg.batch_size)
        self.train_x, self.train_y = data.load_split("train", cfg.data_dir, cfg.train_limit, cfg.archive)
        self.test_x, self.test_y = data.load_split("test", cfg.data_dir, cfg.test_limit, cfg.archive)
        self.settings = step.Settings.of(model_cfg, cfg)
        self.eval_fn = step.jit_eval_step(self.parallel, model_cfg, cfg.tta_flip)
        self.key = jax.random.key(cfg.seed)
        self.params = None if cfg.init_from is None else weights.load(cfg.init_from, model_cfg)
        self.deadline = None  # with a budget planned here: when the last epoch's training must stop
        if cfg.time_budget and not workdir.has_run(cfg.workdir):
            cfg = self._plan(cfg, started)
        self.cfg = cfg
        self.steps_per_epoch = data.num_batches(len(self.train_x), cfg.batch_size)
        self.schedule = step.Schedule.of(cfg, self.steps_per_epoch)
        self.train_fn = step.jit_train_step(self.parallel, self.settings, self.schedule)
        self.ckpts = workdir.Checkpoints(cfg.workdir, seal=distributed.is_primary())
        try:
            self.state, self.metrics, self.meta, self.resumed = self._start_or_resume(cfg)
        except BaseException:
            self.ckpts.close()  # orbax's background threads must stop before the interpreter does
            raise
        if distributed.is_primary():
            workdir.check_space(cfg.workdir, self.state, self.metrics)
        self.tb = tensorboard_log.Writer(os.path.join(cfg.workdir, workdir.TENSORBOARD),
                                         enabled=cfg.tensorboard and distributed.is_primary())
        self._cpu_clock = None  # for the one CPU warning: when the first step was done
        self._cpu_warned = False
        self.rows = workdir.read_metrics(cfg.workdir, upto=self.meta["epochs_done"])

    def _start_or_resume(self, cfg: TrainConfig):
        """(state, running sums, meta, whether resumed): the workdir's latest checkpoint, else a fresh start."""
        state = self._initial_state(cfg)
        metrics = self.parallel.replicate(step.zero_metrics())
        restored = self.ckpts.restore_latest(state, metrics)
        if restored is None:
            meta = {"epochs_done": 0, "best_acc": -1.0, "best_epoch": 0, "seconds_in_epoch": 0.0,
                    "processes": jax.process_count()}
            return state, metrics, meta, False
        saved_by = restored[2].get("processes", 1)
        if saved_by != jax.process_count():
            raise UserError(f"the run in {cfg.workdir} was trained by {saved_by} process{'es' * (saved_by > 1)}; "
                            f"resume it with {saved_by} (this run has {jax.process_count()}), or pass another "
                            f"--workdir")
        return (*restored, True)

    def _initial_state(self, cfg: TrainConfig):
        return self.parallel.replicate(step.create_train_state(self.model_cfg, cfg, self.params))

    def _plan(self, cfg: TrainConfig, started: float) -> TrainConfig:
        """--time_budget: measures a step and an evaluation batch here, chooses the epochs that fit,
        says so, and records them in config.json."""
        state = self._initial_state(cfg)
        spe = data.num_batches(len(self.train_x), cfg.batch_size)
        train_fn = step.jit_train_step(self.parallel, self.settings, step.Schedule.of(cfg, spe))
        epochs = (data.epoch_batches(self.train_x, self.train_y, cfg.batch_size, seed=cfg.seed, epoch=e)
                  for e in itertools.count())
        speed = budget.measure(train_fn, self.eval_fn, state, self.parallel.replicate(step.zero_metrics()),
                               itertools.chain.from_iterable(epochs), self.parallel.put_batch, self.key,
                               step.eval_params(state), self.parallel.replicate(step.zero_metrics()))
        eval_batches = data.num_batches(len(self.test_x), cfg.batch_size)
        chosen, why = budget.plan(cfg, speed, started, spe, eval_batches)
        chosen = distributed.same_everywhere(chosen)  # process 0's measurement decides for all
        self.deadline = budget.train_deadline(chosen, speed, started, eval_batches)
        print(f"Plan: {why}")
        if chosen.train_limit is not None:
            self.train_x, self.train_y = self.train_x[:chosen.train_limit], self.train_y[:chosen.train_limit]
        if distributed.is_primary():
            workdir.write_config(chosen.workdir, chosen, self.model_cfg)
        return chosen

    def train(self) -> list[dict]:
        cfg, m = self.cfg, self.model_cfg
        print(f"Device: {describe_devices()}")
        k = self.settings.grad_accum
        micro = f", each in {k} micro-batches of {cfg.batch_size // k}" if k > 1 else ""
        print(f"Data: {len(self.train_x):,} train / {len(self.test_x):,} test images, batch size "
              f"{cfg.batch_size} ({self.steps_per_epoch} batches per epoch{micro})")
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
        if distributed.is_primary():
            print(f"Summary: {summary.write_summary(cfg.workdir, describe_devices())}")
        return self.rows

    def _patience_exhausted(self) -> bool:
        return bool(self.cfg.patience) and self.meta["epochs_done"] - self.meta["best_epoch"] >= self.cfg.patience

    def _epoch(self):
        """One epoch (or what is left of it after a resume): train, evaluate, record, save."""
        epoch = self.meta["epochs_done"]
        lr = step.learning_rate(self.schedule, epoch * self.steps_per_epoch)
        print(f"\nEpoch {epoch + 1}/{self.cfg.epochs} | lr {lr:.2e}")
        t0 = time.time() - self.meta["seconds_in_epoch"]
        self._train_epoch(epoch, t0)
        _check_finite(self.metrics, self.cfg, self.steps_per_epoch)
        train_seconds = time.time() - t0
        row = self._evaluate(epoch, lr, t0, train_seconds)
        self._record(epoch, row)
        if distributed.any_process(bool(self.stop)):
            print(f"Saved after epoch {epoch + 1}. Run the same command again to resume.")
            raise Interrupted

    def _train_epoch(self, epoch: int, t0: float):
        """The epoch's remaining batches; saves mid-epoch every --save_every batches and when stopped."""
        cfg, spe = self.cfg, self.steps_per_epoch
        first = int(self.state.step) - epoch * spe  # > 0 when resuming mid-epoch
        batches = data.epoch_batches(self.train_x, self.train_y, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                     start=first)
        with tqdm(total=spe, initial=first, disable=not sys.stdout.isatty(), leave=False, unit="batch") as bar:
            for i, batch in enumerate(batches, start=first):
                self.state, self.metrics = self.train_fn(self.state, self.metrics, *self.parallel.put_batch(*batch),
                                                         self.key)
                bar.update()
                if jax.default_backend() == "cpu" and i in (first, first + 3):
                    self._warn_cpu()
                if (i + 1) % cfg.log_every == 0:
                    self._log(epoch * spe + i, bar)
                if epoch + 1 == cfg.epochs and i + 1 < spe and self._past_deadline(i):
                    bar.write(f"Budget: the last epoch stops after batch {i + 1} of {spe}, to end within "
                              f"--time_budget (the steps ran slower than measured)")
                    return
                stopping = self._stopping(i)
                if i + 1 < spe and (stopping or (cfg.save_every and (i + 1) % cfg.save_every == 0)):
                    self._save_latest(t0)
                    if stopping:
                        print(f"Saved at epoch {epoch + 1}, batch {i + 1}/{spe}. Run the same command again to resume.")
                        raise Interrupted

    def _past_deadline(self, i: int) -> bool:
        """Whether the budget's deadline has passed, after batch i (see `_together`)."""
        return self.deadline is not None and self._together(i, lambda: time.time() > self.deadline)

    def _stopping(self, i: int) -> bool:
        """Whether to stop after batch i: a signal reached this process (see `_together`)."""
        return self._together(i, lambda: bool(self.stop))

    @staticmethod
    def _together(i: int, flag) -> bool:
        """flag() here; with many processes, whether it holds in any of them, asked every
        STOP_CHECK_EVERY batches, so that all act after the same batch."""
        if jax.process_count() == 1:
            return flag()
        return (i + 1) % STOP_CHECK_EVERY == 0 and distributed.any_process(flag())

    def _log(self, global_batch: int, bar):
        """The running loss and accuracy of the epoch so far: printed, and to TensorBoard."""
        _check_finite(self.metrics, self.cfg, self.steps_per_epoch)
        loss, acc = step.means(self.metrics)
        lr = step.learning_rate(self.schedule, global_batch)
        self.tb.scalars({"loss": loss, "acc": acc, "lr": lr}, global_batch + 1, prefix="train/")
        bar.write(f"Batch [{global_batch % self.steps_per_epoch + 1}/{self.steps_per_epoch}] "
                  f"Loss: {loss:.4f} | Acc: {acc:.2f}%")

    def _evaluate(self, epoch: int, lr: float, t0: float, train_seconds: float) -> dict:
        """The epoch's metrics row: its training sums and the test split's loss and accuracy."""
        train_loss, train_acc = step.means(self.metrics)
        test_loss, test_acc = step.evaluate(self.eval_fn, self.parallel, step.eval_params(self.state),
                                            data.epoch_batches(self.test_x, self.test_y, self.cfg.batch_size))
        seconds = time.time() - t0
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
               "test_loss": test_loss, "test_acc": test_acc, "seconds": round(seconds, 2),
               "images_per_sec": round(float(jax.device_get(self.metrics["count"])) / train_seconds, 1)}
        print(f"Epoch {epoch + 1}: Train Loss: {train_loss:.4f} | Train Acc: {train_acc:.2f}% | "
              f"Test Loss: {test_loss:.4f} | Test Acc: {test_acc:.2f}% | {seconds:.1f}s "
              f"({row['images_per_sec']:.0f} img/s)")
        return row

    def _record(self, epoch: int, row: dict):
        """Saves the best model if this epoch is it, the metrics, then the latest state (in that order:
        a resume drops metrics rows that its checkpoint lacks)."""
        self.rows.append(row)
        if row["test_acc"] > self.meta["best_acc"]:
            self.meta.update(best_acc=row["test_acc"], best_epoch=epoch + 1)
            self.ckpts.save_best(step.eval_params(self.state), {"epoch": epoch + 1, "test_acc": row["test_acc"],
                                                     "config": config_lib.to_dict(self.cfg, self.model_cfg)})
            print(f"New best model saved (test acc {row['test_acc']:.2f}%)")
        if distributed.is_primary():
            workdir.write_metrics(self.cfg.workdir, self.rows)
        self.tb.scalars({k: v for k, v in row.items() if k != "epoch"}, (epoch + 1) * self.steps_per_epoch,
                        prefix="epoch/")
        self.tb.flush()
        self.metrics = self.parallel.replicate(step.zero_metrics())
        self.meta.update(epochs_done=epoch + 1, seconds_in_epoch=0.0)
        self.ckpts.save_latest(self.state, self.metrics, self.meta)

    def _save_latest(self, t0: float):
        _check_finite(self.metrics, self.cfg, self.steps_per_epoch)  # never save a diverged state
        self.meta["seconds_in_epoch"] = time.time() - t0
        self.ckpts.save_latest(self.state, self.metrics, self.meta)

    def _warn_cpu(self):
        """Once per run: notes the time after the first step and warns three steps later."""
        if self._cpu_warned:
            return
        jax.block_until_ready(self.state.params)
        if self._cpu_clock is None:
            self._cpu_clock = time.time()
            return
        per_step = (time.time() - self._cpu_clock) / 3
        hint = ("" if self.model_cfg.img_size <= 32 else
                "; --recipe fast (native 32x32 input, made for short budgets) gets further in minutes")
        epoch_s = per_step * self.steps_per_epoch
        eta = f"{epoch_s:.0f} s" if epoch_s < 120 else f"{epoch_s / 60:.0f} min"
        print(f"warning: no accelerator found, running on the CPU at ~{per_step:.2f} s/batch, "
              f"~{eta} per epoch{hint}", file=sys.stderr, flush=True)
        self._cpu_warned = True


@cli
def main(argv=None):
    cfg, model_cfg = config_lib.parse_args(argv)
    topology = processes.topology(cfg)
    if topology is not None:  # this process trains; started as a command, under its supervisor
        cfg = distributed.start(cfg, topology)
        distributed.agree(cfg, model_cfg)
    train_and_evaluate(cfg, model_cfg)


if __name__ == "__main__":
    main()
