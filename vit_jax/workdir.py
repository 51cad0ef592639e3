"""The workdir: one training run's folder, and the only module that knows what is in it.

    WORKDIR/config.json     the resolved TrainConfig and ModelConfig
    WORKDIR/metrics.jsonl   one row per finished epoch
    WORKDIR/latest/<step>/  the full train state, the running sums of an unfinished epoch and `meta`
                            (epochs done, best accuracy so far, ...); the newest two are kept
    WORKDIR/best/<epoch>/   the parameters with the best test accuracy, with their epoch and accuracy
    WORKDIR/lock            held by the run that trains in the folder
    WORKDIR/...             what other commands write there (summary.md, curves.png, analysis/, ...)

Every file appears whole or not at all: plain files are written beside their target and renamed,
checkpoints by orbax the same way, and each checkpoint is then sealed with a manifest of its files'
sizes and sha256, so damage that comes later (a full disk, a torn copy) is found before orbax reads
the files, and the previous checkpoint is used instead. `--fresh` moves a run aside, never deletes it.
"""

import collections
import dataclasses
import json
import os
import shutil
import sys
import time

import jax

from vit_jax import files
from vit_jax.checkpoint import Folder
from vit_jax.config import ModelConfig, TrainConfig, resumable, to_dict
from vit_jax.errors import UserError, reason
from vit_jax.files import atomic_open, write_atomic
from vit_jax.model import init_params

CONFIG = "config.json"
METRICS = "metrics.jsonl"
LOCK = "lock"
LATEST = "latest"
BEST = "best"
MANIFEST = "vit_jax_manifest.json"
DISCARDED = "discarded-"


# --------------------------------------------------------------------------------------------------
# Plain files


def make(folder: str, flag: str = "--workdir"):
    """Creates a folder the command writes in (the workdir, or the one given as `flag`), and checks
    that it can be written before any work is done."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        why = "a file, not a folder" if isinstance(e, FileExistsError) else e.strerror
        raise UserError(f"cannot write to {folder!r} ({why}): choose another {flag}") from None


def check_output(path: str, flag: str = "--out"):
    """A command's output file: creates its folder and checks that it can be written, before the work
    that the file is for."""
    if os.path.isdir(path):  # else the work runs, and only writing its result fails
        raise UserError(f"cannot write to {path!r} (a folder, not a file): choose another {flag}")
    make(os.path.dirname(os.path.abspath(path)), flag)


def lock(workdir: str):
    """One run per workdir."""
    return files.lock(os.path.join(workdir, LOCK), f"workdir {workdir!r} is in use by {{owner}}: wait for that run to "
                                                   f"end or stop it, or pass another --workdir")


def _from_dict(cls, values: dict):
    """A config from its saved fields; a field saved by another version of vit_jax is left out, and
    one added since takes its default, so an older run still loads (and resumes)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def read_config(workdir: str) -> tuple[TrainConfig, ModelConfig]:
    """The configs a workdir was trained with (its config.json)."""
    path = os.path.join(workdir, CONFIG)
    if not os.path.exists(path):
        raise UserError(f"{workdir!r} has no {CONFIG}: is it the --workdir of a training run?")
    try:
        with open(path) as f:
            saved = json.load(f)
        # validated as the command line is: a file edited by hand fails here, not inside the model
        return (_from_dict(TrainConfig, saved["train"]).validate(),
                _from_dict(ModelConfig, saved["model"]).validate())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError) as e:
        raise UserError(f"{path} cannot be read ({reason(e)}): is it the --workdir of a training run?") from None


def has_checkpoints(workdir: str) -> bool:
    latest = os.path.join(workdir, LATEST)
    return os.path.isdir(latest) and any(name.isdigit() for name in os.listdir(latest))


def has_run(workdir: str) -> bool:
    """Whether a run has saved a checkpoint here (to resume), with the config it was trained with."""
    return os.path.exists(os.path.join(workdir, CONFIG)) and os.path.isdir(os.path.join(workdir, LATEST))


def check_same_run(workdir: str, cfg: TrainConfig, model_cfg: ModelConfig):
    """Refuses, naming each differing field, a run whose settings differ from those of the run
    already in the workdir, but for the fields that may change on resume."""
    saved_cfg, saved_model = read_config(workdir)
    diff = [f"{section}.{f.name}: {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}"
            for section, old, new in (("model", saved_model, model_cfg), ("train", saved_cfg, cfg))
            for f in dataclasses.fields(new) if not resumable(f) and getattr(old, f.name) != getattr(new, f.name)]
    if diff:
        raise UserError(f"workdir {workdir!r} holds a run with other settings ({'; '.join(diff)}): "
                        f"rerun with the same settings to resume it, or pass another --workdir")


def write_config(workdir: str, cfg: TrainConfig, model_cfg: ModelConfig):
    write_atomic(os.path.join(workdir, CONFIG), json.dumps(to_dict(cfg, model_cfg), indent=2) + "\n")


def read_metrics(workdir: str, upto: int | None = None) -> list[dict]:
    """The rows of metrics.jsonl, one per finished epoch (with `upto`: of epochs 1 to upto only, since
    a row can outlive a crash before its checkpoint was saved). [] when there are none."""
    path = os.path.join(workdir, METRICS)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                int(row["epoch"])
            except (ValueError, TypeError, KeyError) as e:
                # Training rewrites the file whole after each epoch (write_metrics): the damage came from elsewhere.
                why = e.msg if isinstance(e, json.JSONDecodeError) else "no epoch" if isinstance(e, KeyError) else reason(e)
                raise UserError(f"{path} cannot be read (line {number}: {why}): restore it, or move it aside to go "
                                f"on without the rows of the epochs before") from None
            rows.append(row)
    return [r for r in rows if upto is None or r["epoch"] <= upto]


def finished_epochs(workdir: str) -> list[dict]:
    """read_metrics for the commands that need at least one epoch: an empty run is a UserError."""
    rows = read_metrics(workdir)
    if not rows:
        if not os.path.exists(os.path.join(workdir, CONFIG)):
            raise UserError(f"{workdir!r} has no {METRICS}: is it the --workdir of a training run?")
        raise UserError(f"no epoch of the run in {workdir!r} has finished yet: try again after the first")
    return rows


def write_metrics(workdir: str, rows: list[dict]):
    write_atomic(os.path.join(workdir, METRICS), "".join(json.dumps(r) + "\n" for r in rows))


def discard(workdir: str) -> str | None:
    """Moves everything in the workdir but its config (rewritten) and lock (held), and the runs moved
    aside before, into WORKDIR/discarded-<time>/ (for --fresh): a new start never deletes a run.
    Returns that folder, or None when there was nothing to move."""
    names = [n for n in os.listdir(workdir) if n not in (CONFIG, LOCK) and not n.startswith(DISCARDED)]
    if not names:
        return None
    aside = os.path.join(workdir, time.strftime(f"{DISCARDED}%Y%m%d-%H%M%S"))
    os.makedirs(aside, exist_ok=True)
    for n in names:
        os.replace(os.path.join(workdir, n), os.path.join(aside, n))
    return aside


# --------------------------------------------------------------------------------------------------
# Checkpoints, sealed


def _files(step_dir: str) -> dict[str, tuple[int, str]]:
    out = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            if not name.startswith(MANIFEST):
                out[os.path.relpath(path, step_dir)] = files.sha256(path)
    return out


def _seal(step_dir: str):
    with atomic_open(os.path.join(step_dir, MANIFEST)) as f:
        json.dump(_files(step_dir), f)


def _damage(step_dir: str) -> str | None:
    """What is wrong with a sealed checkpoint's files, or None. (Unsealed: a kill came between
    orbax's commit and the seal; orbax's commit is atomic, so it is read as it is.)"""
    try:
        with open(os.path.join(step_dir, MANIFEST)) as f:
            expected = {k: tuple(v) for k, v in json.load(f).items()}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "its manifest is unreadable"
    found = _files(step_dir)
    bad = sorted(k for k in expected if found.get(k) != expected[k])
    return f"{len(bad)} of its files differ from when it was saved ({bad[0]}...)" if bad else None


def tree_bytes(tree) -> int:
    """What a checkpoint of `tree` takes on disk, about: its arrays, and a little for orbax's metadata."""
    return sum(x.nbytes for x in jax.tree.leaves(tree)) + (1 << 20)


def free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def _mb(n: int) -> str:
    """Megabytes, with a decimal below 10 (so that a small model's "needs 1.3 MB, has 1.0 MB free" does
    not read "needs 1 MB, has 1 MB free")."""
    mb = n / 2**20
    return f"{mb:.1f} MB" if mb < 10 else f"{mb:,.0f} MB"


def check_space(workdir: str, state, metrics) -> None:
    """Warns, at the start of a run, when the workdir's disk cannot hold what the run will keep there:
    two latest checkpoints, the best parameters, and the one being written."""
    need = 3 * tree_bytes({"state": state, "metrics": metrics}) + tree_bytes(state.params)
    free = free_bytes(workdir)
    if free < need:
        print(f"warning: the disk of workdir {workdir!r} has {_mb(free)} free, and the run's checkpoints will take "
              f"about {_mb(need)} (each one {_mb(tree_bytes({'state': state, 'metrics': metrics}))}): a save will "
              f"fail when it runs out; free some space or choose another --workdir", file=sys.stderr, flush=True)


class Checkpoints:
    """The latest and best checkpoints of the run that trains in a workdir.

    With many processes, every one saves (orbax writes each one's share) and `seal` is true in
    process 0 alone, which then writes the manifest."""

    def __init__(self, workdir: str, seal: bool = True):
        self.workdir, self.seal = workdir, seal
        self.latest = Folder(os.path.join(workdir, LATEST), "state", keep=2)
        self.best = Folder(os.path.join(workdir, BEST), "params", keep=1)

    def save_latest(self, state, metrics, meta: dict):
        """Saves and seals; a state already saved at this step is not written again."""
        step = int(state.step)
        if step not in self.latest.steps():
            self._save(self.latest, step, {"state": state, "metrics": metrics}, meta)

    def _save(self, folder: Folder, step: int, tree, meta: dict):
        """Saves one checkpoint if the disk has room for it (else says so, and the previous one stays),
        then seals it."""
        need = tree_bytes(tree)
        if free_bytes(folder.path) < need:
            raise UserError(f"no room to save a checkpoint in workdir {self.workdir!r}: it needs about {_mb(need)} "
                            f"and the disk has {_mb(free_bytes(folder.path))} free. The previous checkpoint stays the "
                            f"latest: free some space and run the same command again to resume")
        folder.save(step, tree, meta)
        if self.seal:
            _seal(folder.step_dir(step))

    def restore_latest(self, state, metrics):
        """(state, metrics, meta) of the newest checkpoint that reads back whole, shaped and sharded
        like the arguments; None when there is none. A damaged one is skipped with a warning."""
        steps = self.latest.steps()[::-1]
        for step in steps:
            damage = _damage(self.latest.step_dir(step))
            if damage is None:
                try:
                    tree, meta = self.latest.restore(step, like={"state": state, "metrics": metrics})
                    return tree["state"], tree["metrics"], meta
                except Exception as e:  # orbax and tensorstore raise many kinds for one cause: unreadable
                    damage = reason(e)
            print(f"warning: skipping damaged checkpoint {self.latest.step_dir(step)} ({damage})", file=sys.stderr)
        if steps:
            raise UserError(
                f"no checkpoint in {self.latest.path} could be read (steps {steps} are damaged). "
                f"Rerun with --fresh to move them aside (to {self.workdir}/discarded-*) and start over")
        return None

    def save_best(self, params, meta: dict):
        if meta["epoch"] not in self.best.steps():  # else written before a crash; the rerun computed the same
            self._save(self.best, meta["epoch"], params, meta)

    def close(self):
        self.latest.close()
        self.best.close()


def _read_best(best: Folder, workdir: str, like, attempts: int = 3):
    """(params, meta) of the newest checkpoint in `best`.

    A run that is still training replaces its best checkpoint as it goes (only one is kept), so the
    one listed can be gone by the time it is read: then the newest is listed again.
    """
    for attempt in range(attempts):
        epochs = best.steps()
        if not epochs:
            raise UserError(f"no best checkpoint in {best.path}: train first (python -m vit_jax.train "
                            f"--workdir {workdir})")
        step_dir = best.step_dir(epochs[-1])
        damage = _damage(step_dir)
        if damage:
            raise UserError(f"the best checkpoint {step_dir} is damaged ({damage}): restore that folder from "
                            f"a copy, or train again (--fresh moves this run aside)")
        try:
            return best.restore(epochs[-1], like)
        except FileNotFoundError:
            if attempt + 1 == attempts or epochs[-1] in best.steps():
                raise


# --------------------------------------------------------------------------------------------------
# A finished (or running) run, for the inspection commands


Best = collections.namedtuple("Best", "cfg model_cfg params meta")


def load_best(workdir: str) -> Best:
    """The configs of a run and its best parameters (float32 numpy-backed arrays on the default device)."""
    cfg, model_cfg = read_config(workdir)
    if not os.path.isdir(os.path.join(workdir, BEST)):
        raise UserError(f"no best checkpoint in {os.path.join(workdir, BEST)}: train first "
                        f"(python -m vit_jax.train --workdir {workdir})")
    best = Folder(os.path.join(workdir, BEST), "params", read_only=True)
    try:
        params, meta = _read_best(best, workdir, jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0))))
    finally:
        best.close()
    return Best(cfg, model_cfg, params, meta)
