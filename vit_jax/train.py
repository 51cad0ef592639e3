"""Training: `python -m vit_jax.train [flags]`, the loop around the jitted steps.

`train_and_evaluate` settles the run first (the workdir and what it holds, the data, the compiled
steps, the state to start or resume from), then runs one loop: train an epoch, evaluate, record,
save. Rerunning the same command resumes from the workdir's latest checkpoint and ends with the
metrics an uninterrupted run would have: batches, augmentation and dropout are pure functions of
(seed, step), and the running sums of an unfinished epoch are checkpointed with the state.

Ctrl+C or SIGTERM stops the loop after the steps under way (at most `step.IN_FLIGHT`), saves, and exits
with status 130; a second one quits at once, keeping the previous checkpoint (`errors.stoppable`).
A loss that stops being finite ends the run before anything is saved, so the last good checkpoint
stays the latest.
"""

import collections
import contextlib
import dataclasses
import os
import sys
import time

if __name__ == "__main__":
    # Before jax's import: the flags are checked at once, and with many processes the process that was
    # started only supervises the one that trains, and needs no JAX (processes.py).
    from vit_jax import processes
    processes.supervise_unless_child(sys.argv[1:])

import jax
from tqdm import tqdm

from vit_jax import config as config_lib, data, distributed, processes, step, summary, tensorboard_log, weights
from vit_jax import budget as budget_lib, workdir
from vit_jax.budget import REVISE_AFTER, Budget
from vit_jax.config import ModelConfig, TrainConfig
from vit_jax.devices import DataParallel, describe_devices, split_cpu
from vit_jax.errors import EXIT_INTERRUPTED, UserError, cli, stoppable
from vit_jax.model import count_params

STOP_CHECK_EVERY = 10  # with many processes, they agree on a stop every this many steps


@dataclasses.dataclass
class Run:
    """What the loop works on, settled before it starts."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    parallel: DataParallel
    train: tuple  # (images, labels) on the host
    test: tuple
    steps_per_epoch: int
    train_fn: step.TrainFn
    eval_fn: object
    checkpoints: workdir.Checkpoints
    tb: tensorboard_log.Writer
    budget: Budget | None  # with --time_budget, in the command that planned the run
    early: bool = False  # train_fn drops --early_patch_drop_rate's tokens (the token schedule's early part)


def train_and_evaluate(cfg: TrainConfig, model_cfg: ModelConfig) -> list[dict]:
    """Trains (or resumes) in cfg.workdir; returns one metrics row per epoch done.

    With many processes, every one runs this; process 0 alone prints, takes the lock and writes the
    workdir's files."""
    started = budget_lib.process_start()
    primary = distributed.is_primary()
    if primary:
        workdir.make(cfg.workdir)
    else:  # process 0 speaks for all (the runtime's C++ too); errors still reach stderr
        sys.stdout.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    with workdir.lock(cfg.workdir) if primary else contextlib.nullcontext():
        if primary:
            open_workdir(cfg, model_cfg)
        distributed.barrier("vit_jax: workdir open")
        budget = Budget(cfg.time_budget, started) if cfg.time_budget else None
        if budget:
            budget.check_time_left()
        run, state, metrics, meta = create_run(cfg, model_cfg, budget)
        try:
            return train_loop(run, state, metrics, meta)
        except (Exception, KeyboardInterrupt) as e:
            if isinstance(e, (UserError, KeyboardInterrupt)) or jax.process_count() == 1:
                raise
            distributed.fail_fast(e, jax.process_index())  # one line, and out before the others hang
        finally:
            run.checkpoints.close()  # orbax's background threads must stop before the interpreter does
            run.tb.close()


def open_workdir(cfg: TrainConfig, model_cfg: ModelConfig):
    """Checks that the run already in the workdir has this run's settings (or, with --fresh, moves it
    aside), then writes config.json."""
    if cfg.fresh:
        aside = workdir.discard(cfg.workdir)
        if aside:
            print(f"--fresh: moved the previous run's checkpoints and metrics to {aside}")
    elif workdir.has_run(cfg.workdir):
        workdir.check_same_run(cfg.workdir, cfg, model_cfg)
    elif workdir.has_checkpoints(cfg.workdir):  # a config.json lost: the settings to resume with are unknown
        raise UserError(f"workdir {cfg.workdir!r} holds checkpoints but no {workdir.CONFIG}, so the settings they "
                        f"were trained with are unknown: restore {workdir.CONFIG}, or pass --fresh to move them "
                        f"aside and start over (or another --workdir)")
    workdir.write_config(cfg.workdir, cfg, model_cfg)


def create_run(cfg: TrainConfig, model_cfg: ModelConfig, budget: Budget | None):
    """(run, state, running sums, meta): the data, the compiled steps, and the state to start from,
    the workdir's latest checkpoint when there is one."""
    parallel = DataParallel.create(cfg.batch_size)
    train = data.load_split("train", cfg.data_dir, cfg.train_limit, cfg.archive)
    test = data.load_split("test", cfg.data_dir, cfg.test_limit, cfg.archive)
    spe = data.num_batches(len(train[0]), cfg.batch_size)
    params = None if cfg.init_from is None else weights.load(cfg.init_from, model_cfg)
    state = parallel.replicate(step.create_train_state(model_cfg, cfg, params))
    metrics = parallel.replicate(step.zero_metrics())
    checkpoints = workdir.Checkpoints(cfg.workdir, seal=distributed.is_primary())
    try:
        restored = checkpoints.restore_latest(state, metrics)
    except BaseException:
        checkpoints.close()
        raise
    if restored is None:
        meta = {"epochs_done": 0, "best_acc": -1.0, "best_epoch": 0, "seconds_in_epoch": 0.0,
                "processes": jax.process_count(), "total_steps": cfg.epochs * spe}
    else:
        state, metrics, meta = restored
        meta.setdefault("total_steps", cfg.epochs * spe)  # a checkpoint from before the budget's revisions
        saved_by = meta.get("processes", 1)
        if saved_by != jax.process_count():
            checkpoints.close()
            raise UserError(f"the run in {cfg.workdir} was trained by {saved_by} process{'es' * (saved_by > 1)}; "
                            f"resume it with {saved_by} (this run has {jax.process_count()}), or pass another "
                            f"--workdir")
        budget = None  # the budget was the first command's: a resumed run keeps the length it planned
    if distributed.is_primary():
        workdir.check_space(cfg.workdir, state, metrics)
    run = Run(cfg, model_cfg, parallel, train, test, spe, train_fn=None,
              eval_fn=step.jit_eval_step(parallel, model_cfg, cfg.tta_flip),
              checkpoints=checkpoints, budget=budget,
              tb=tensorboard_log.Writer(os.path.join(cfg.workdir, tensorboard_log.FOLDER),
                                        enabled=cfg.tensorboard and distributed.is_primary()))
    compile_step(run, meta["total_steps"], early=early_epoch(cfg, meta, meta["epochs_done"] * spe))
    describe(run, state, meta, resumed=restored is not None)
    return run, state, metrics, meta


def describe(run: Run, state, meta: dict, resumed: bool):
    cfg, m, k = run.cfg, run.model_cfg, step.micro_batches(run.model_cfg, run.cfg)
    print(f"Device: {describe_devices()}")
    micro = f", each in {k} micro-batches of {cfg.batch_size // k}" if k > 1 else ""
    print(f"Data: {len(run.train[0]):,} train / {len(run.test[0]):,} test images, batch size {cfg.batch_size} "
          f"({run.steps_per_epoch} batches per epoch{micro})")
    print(f"Model: ViT {cfg.recipe} img {m.img_size} patch {m.patch_size} embed {m.embed_dim} depth {m.depth} "
          f"heads {m.num_heads} mlp {m.mlp_ratio:g} {m.dtype} | {count_params(state.params):,} parameters")
    if run.early:
        print(f"Token schedule: {tokens_kept(run, early=True)} tokens until {cfg.early_fraction:g} of the steps, "
              f"then {tokens_kept(run)}")
    if resumed:
        print(f"Resuming from {cfg.workdir} at epoch {meta['epochs_done'] + 1}, step {int(state.step)}")


def train_loop(run: Run, state, metrics, meta: dict) -> list[dict]:
    """The epochs left: train, evaluate, record, save; with a budget, revise the run's length as it goes."""
    cfg, spe = run.cfg, run.steps_per_epoch
    rows = workdir.read_metrics(cfg.workdir, upto=meta["epochs_done"])
    clock = Clock(warn=jax.default_backend() == "cpu" and distributed.is_primary())
    with stoppable() as stop:
        while not finished(meta, spe, cfg.patience):
            epoch, first = meta["epochs_done"], int(state.step)
            t0 = time.time() - meta["seconds_in_epoch"]
            state, metrics = train_epoch(run, state, metrics, meta, clock, stop, t0)
            train_seconds = time.time() - t0
            clock.trained(int(state.step) - first)
            row = evaluate(run, state, metrics, epoch, t0, train_seconds)
            meta.update(epochs_done=epoch + 1, seconds_in_epoch=0.0)
            if run.budget and not finished(meta, spe, cfg.patience):
                meta["total_steps"] = revise(run, clock, int(state.step), meta["total_steps"])
            state, metrics = record(run, state, metrics, meta, rows, row)
            clock.ended(time.time() - t0 - train_seconds)
            if distributed.any_process(bool(stop)):
                print(f"Saved after epoch {epoch + 1}. Run the same command again to resume.")
                sys.exit(EXIT_INTERRUPTED)
    if cfg.patience and meta["epochs_done"] - meta["best_epoch"] >= cfg.patience:
        print(f"Early stop: no better test accuracy for {cfg.patience} epochs")
    print(f"\nDone: best test accuracy {meta['best_acc']:.2f}% at epoch {meta['best_epoch']} "
          f"(checkpoints in {cfg.workdir})")
    if distributed.is_primary():
        if rows:
            print(f"Summary: {summary.write_summary(cfg.workdir, describe_devices())}")
        else:  # metrics.jsonl was moved aside: the checkpoints remember the run, but no summary can be written
            print(f"No summary: {cfg.workdir}/metrics.jsonl holds none of the run's {meta['epochs_done']} epochs")
    return rows


def tokens_kept(run: Run, early: bool = False) -> str:
    """'K of N': the patch tokens each image keeps in training, in the token schedule's early part or after."""
    m = run.model_cfg
    return f"{m.patches_kept(run.cfg.early_patch_drop_rate if early else None)} of {m.num_patches}"


def compile_step(run: Run, total_steps: int, early: bool):
    """run.train_fn for a run of total_steps, in the token schedule's early part or not. The schedule's
    numbers are the step's arguments: a new length compiles nothing, a new part once."""
    run.early = early
    run.train_fn = step.jit_train_step(run.parallel, step.Settings.of(run.model_cfg, run.cfg, early),
                                       step.Schedule.of(run.cfg, run.steps_per_epoch, total_steps))


def early_epoch(cfg: TrainConfig, meta: dict, first: int) -> bool:
    """Whether the epoch that starts at step `first` is in the token schedule's early part: until the
    first epoch that starts past --early_fraction of the planned steps. The switch, made once, is kept
    in meta ('late_from'), so that a budget revised later, or a resumed run, never switches back."""
    if cfg.early_patch_drop_rate is None or "late_from" in meta:
        return False
    if first < cfg.early_fraction * meta["total_steps"]:
        return True
    meta["late_from"] = meta["epochs_done"] + 1
    return False


def train_epoch(run: Run, state, metrics, meta: dict, clock: "Clock", stop, t0: float):
    """The epoch's steps left, at most step.IN_FLIGHT ahead of the device; a stop saves and exits here."""
    cfg, spe, epoch = run.cfg, run.steps_per_epoch, meta["epochs_done"]
    first, last = int(state.step), min((epoch + 1) * spe, meta["total_steps"])  # steps first..last-1
    if run.early and not early_epoch(cfg, meta, epoch * spe):
        compile_step(run, meta["total_steps"], early=False)
        print(f"Token schedule: from epoch {epoch + 1} on, {tokens_kept(run)} tokens")
    print(f"\nEpoch {epoch + 1}/{-(-meta['total_steps'] // spe)} | lr {lr_span(run, first, last)}")
    batches = data.epoch_batches(*run.train, cfg.batch_size, seed=cfg.seed, epoch=epoch, start=first - epoch * spe)
    key, in_flight = jax.random.key(cfg.seed), collections.deque()
    with tqdm(total=last - epoch * spe, initial=first - epoch * spe, disable=not sys.stdout.isatty(), leave=False,
              unit="batch") as bar:
        for done in range(first + 1, last + 1):  # `done` steps after this one
            state, metrics = run.train_fn(state, metrics, *run.parallel.put_batch(*next(batches)), key)
            in_flight.append(metrics)
            if len(in_flight) > step.IN_FLIGHT:  # the host waits for an earlier step: stays close to the device
                jax.block_until_ready(in_flight.popleft())
            bar.update()
            clock.stepped(done - first, metrics, run.steps_per_epoch)
            if run.budget and clock.end_s is None and done - first == REVISE_AFTER and done < last:  # early
                meta["total_steps"] = revise(run, clock, done, meta["total_steps"], metrics)
                last = min(last, meta["total_steps"])
            in_epoch = done - epoch * spe
            if in_epoch % cfg.log_every == 0:
                log(run, metrics, done - 1, bar)
            if done < last and run.budget and together(done, lambda: time.time() > clock.deadline(run.budget)):
                bar.write(f"Budget: epoch {epoch + 1} stops after batch {in_epoch} of {last - epoch * spe}, to end "
                          f"within --time_budget (the steps ran slower than measured)")
                meta["total_steps"] = last = done
            if done < last and together(done, lambda: bool(stop)):
                save_latest(run, state, metrics, meta, t0)
                bar.close()
                print(f"Saved at epoch {epoch + 1}, batch {in_epoch}/{spe}. Run the same command again to resume.")
                sys.exit(EXIT_INTERRUPTED)
            if done < last and cfg.save_every and in_epoch % cfg.save_every == 0:
                save_latest(run, state, metrics, meta, t0)
            if done == last:
                break
    check_finite(metrics, cfg, spe)
    return state, metrics


def finished(meta: dict, steps_per_epoch: int, patience: int) -> bool:
    """Whether every planned epoch is done, or --patience epochs went by without a better test accuracy."""
    planned = -(-meta["total_steps"] // steps_per_epoch)
    return meta["epochs_done"] >= planned or bool(patience) and meta["epochs_done"] - meta["best_epoch"] >= patience


def together(done: int, flag) -> bool:
    """flag() here; with many processes, whether it holds in any of them, asked every STOP_CHECK_EVERY
    steps, so that all act after the same step."""
    if jax.process_count() == 1:
        return flag()
    return done % STOP_CHECK_EVERY == 0 and distributed.any_process(flag())


class Clock:
    """The run's own speed, for the budget and the CPU warning: its steps (the first of each epoch,
    which can compile, untimed) and what follows an epoch's training (evaluation, records, saves)."""

    def __init__(self, warn: bool):
        self.warn = warn  # once, on a CPU, after the first few steps
        self.first_done = self.step_s = self.end_s = None

    def stepped(self, n: int, metrics, steps_per_epoch: int):
        """After the epoch's n-th step is dispatched."""
        if n == 1:
            jax.block_until_ready(metrics)
            self.first_done = time.time()
        if n == 4 and self.warn:
            self.measure(n, metrics)
            warn_cpu(self.step_s, steps_per_epoch)
            self.warn = False

    def measure(self, n: int, metrics):
        """Times the epoch's steps 2..n (waiting for step n)."""
        jax.block_until_ready(metrics)
        self.step_s = (time.time() - self.first_done) / (n - 1)

    def trained(self, steps: int):
        """At the epoch's end (the device done): times its steps 2..steps."""
        if steps > 1:
            self.step_s = (time.time() - self.first_done) / (steps - 1)

    def ended(self, seconds: float):
        self.end_s = seconds

    def epoch_end_s(self, run: Run) -> float:
        """Measured; before the first epoch's end, guessed from the step: an evaluation batch takes about
        as long as a training step (its forward pass, twice with --tta_flip, is a third of a step's work)."""
        if self.end_s is not None:
            return self.end_s
        return data.num_batches(len(run.test[0]), run.cfg.batch_size) * self.step_s + 1.0

    def deadline(self, budget: Budget) -> float:
        return budget.training_deadline(self.end_s or 0.0)


def revise(run: Run, clock: Clock, done: int, total: int, metrics=None) -> int:
    """The run's length from what it measured (mid-epoch, given the running sums, it times the steps so
    far first), the same in every process (process 0's); printed when it changes, and kept in the
    checkpoint's meta. The compiled step stays: the schedule's numbers are its arguments."""
    if metrics is not None:
        clock.measure(REVISE_AFTER, metrics)
    end_s = clock.epoch_end_s(run)
    revised = distributed.same_everywhere(run.budget.total_steps(done, run.steps_per_epoch, clock.step_s, end_s))
    if revised != total:
        print(f"Budget: {run.budget.describe(revised, run.steps_per_epoch, clock.step_s, end_s)}")
        compile_step(run, revised, run.early)
    return revised


def lr_span(run: Run, first: int, last: int) -> str:
    """The learning rate over steps first..last-1: one value for a schedule stepped per epoch, else the
    rates at both ends (the warm-up starts at 0)."""
    schedule = run.train_fn.schedule
    a, b = step.learning_rate(schedule, first), step.learning_rate(schedule, max(last - 1, first))
    return f"{a:.2e}" if a == b else f"{a:.2e} -> {b:.2e}"


def log(run: Run, metrics, i: int, bar):
    """The running loss and accuracy of the epoch so far: printed, and to TensorBoard."""
    check_finite(metrics, run.cfg, run.steps_per_epoch)
    loss, acc = step.means(metrics)
    run.tb.scalars({"loss": loss, "acc": acc, "lr": step.learning_rate(run.train_fn.schedule, i)}, i + 1,
                   prefix="train/")
    bar.write(f"Batch [{i % run.steps_per_epoch + 1}/{run.steps_per_epoch}] Loss: {loss:.4f} | Acc: {acc:.2f}%")


def check_finite(metrics, cfg: TrainConfig, steps_per_epoch: int):
    bad = int(jax.device_get(metrics["nonfinite_step"]))
    if bad >= 0:
        epoch, batch = divmod(bad, steps_per_epoch)
        raise UserError(
            f"the loss stopped being finite at epoch {epoch + 1}, batch {batch + 1} (step {bad}): training "
            f"diverged, most likely because the learning rate ({cfg.lr:g}) is too high. Nothing was saved "
            f"after the last good checkpoint; start again with a lower --lr (e.g. {config_lib.suggest_lr(cfg.lr):g}) "
            f"and another --workdir (or --fresh)")


def evaluate(run: Run, state, metrics, epoch: int, t0: float, train_seconds: float) -> dict:
    """The epoch's metrics row: its training sums and the test split's loss and accuracy."""
    train_loss, train_acc = step.means(metrics)
    test_loss, test_acc = step.evaluate(run.eval_fn, run.parallel, step.eval_params(state),
                                        data.epoch_batches(*run.test, run.cfg.batch_size))
    seconds = time.time() - t0
    row = {"epoch": epoch + 1, "lr": step.learning_rate(run.train_fn.schedule, epoch * run.steps_per_epoch),
           "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss, "test_acc": test_acc,
           "seconds": round(seconds, 2),
           "images_per_sec": round(float(jax.device_get(metrics["count"])) / train_seconds, 1)}
    print(f"Epoch {epoch + 1}: Train Loss: {train_loss:.4f} | Train Acc: {train_acc:.2f}% | "
          f"Test Loss: {test_loss:.4f} | Test Acc: {test_acc:.2f}% | {seconds:.1f}s "
          f"({row['images_per_sec']:.0f} img/s)")
    return row


def record(run: Run, state, metrics, meta: dict, rows: list, row: dict):
    """Saves the best model if this epoch is it, the metrics, then the latest state (in that order: a
    resume drops metrics rows that its checkpoint lacks). Returns the state and zeroed running sums."""
    rows.append(row)
    if row["test_acc"] > meta["best_acc"]:
        meta.update(best_acc=row["test_acc"], best_epoch=row["epoch"])
        run.checkpoints.save_best(step.eval_params(state), {"epoch": row["epoch"], "test_acc": row["test_acc"],
                                                            "config": config_lib.to_dict(run.cfg, run.model_cfg)})
        print(f"New best model saved (test acc {row['test_acc']:.2f}%)")
    if distributed.is_primary():
        workdir.write_metrics(run.cfg.workdir, rows)
    run.tb.scalars({k: v for k, v in row.items() if k != "epoch"}, int(state.step), prefix="epoch/")
    run.tb.flush()
    metrics = run.parallel.replicate(step.zero_metrics())
    run.checkpoints.save_latest(state, metrics, meta)
    return state, metrics


def save_latest(run: Run, state, metrics, meta: dict, t0: float):
    """Mid-epoch: the state and the epoch's running sums, never a diverged state."""
    check_finite(metrics, run.cfg, run.steps_per_epoch)
    run.checkpoints.save_latest(state, metrics, {**meta, "seconds_in_epoch": time.time() - t0})


def warn_cpu(step_s: float, steps_per_epoch: int):
    epoch_s = step_s * steps_per_epoch
    eta = f"{epoch_s:.0f} s" if epoch_s < 120 else f"{epoch_s / 60:.0f} min"
    hint = "; --recipe fast (32x32 input, made for short budgets) gets further in minutes" if epoch_s > 600 else ""
    print(f"warning: no accelerator found, running on the CPU at ~{step_s:.2f} s/batch, ~{eta} per epoch{hint}",
          file=sys.stderr, flush=True)


@cli
def main(argv=None):
    cfg, model_cfg = config_lib.parse_args(argv)
    topology = processes.topology(cfg)
    if topology is not None:  # this process trains; started as a command, under its supervisor
        cfg = distributed.start(cfg, topology)
        distributed.agree(cfg, model_cfg)
    else:
        split_cpu(cfg.cpu_devices, cfg.batch_size)
    train_and_evaluate(cfg, model_cfg)


if __name__ == "__main__":
    main()
