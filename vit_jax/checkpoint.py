"""Checkpoints in the workdir, with orbax: the latest state (to resume) and the best parameters.

    WORKDIR/latest/<step>/  the full train state, the running metrics of an unfinished epoch, and
                           `meta` (epochs done, best accuracy so far, ...); the last two are kept.
    WORKDIR/best/<epoch>/   the parameters with the best test accuracy, and their epoch and accuracy.

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a run killed
mid-save never leaves a checkpoint that looks whole. Saves are synchronous and then sealed with
MANIFEST (the size and sha256 of every file), so damage that comes later (a full disk, a torn copy)
is found before orbax reads the files, and the previous checkpoint is used instead.
"""

import hashlib
import json
import os
import sys
import time

import jax
import orbax.checkpoint as ocp

from vit_jax.errors import UserError


MANIFEST = "vit_jax_manifest.json"


def _manager(path: str, keep: int) -> ocp.CheckpointManager:
    # Synchronous: a save is sealed by its manifest right away, before the run goes on.
    return ocp.CheckpointManager(os.path.abspath(path), options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False))


def _files(step_dir: str) -> dict[str, tuple[int, str]]:
    out = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            if not name.startswith(MANIFEST):
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):  # hashlib.file_digest needs Python 3.11
                        digest.update(block)
                out[os.path.relpath(path, step_dir)] = (os.path.getsize(path), digest.hexdigest())
    return out


def _seal(manager: ocp.CheckpointManager, step: int):
    step_dir = os.path.join(manager.directory, str(step))
    files = _files(step_dir)
    with open(os.path.join(step_dir, MANIFEST + ".tmp"), "w") as f:
        json.dump(files, f)
    os.replace(os.path.join(step_dir, MANIFEST + ".tmp"), os.path.join(step_dir, MANIFEST))


def _damage(manager: ocp.CheckpointManager, step: int) -> str | None:
    """What is wrong with a sealed checkpoint's files, or None. (Unsealed: a kill came between
    orbax's commit and the seal; orbax's commit is atomic, so it is read as it is.)"""
    step_dir = os.path.join(manager.directory, str(step))
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


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def discard(workdir: str) -> str | None:
    """Moves a workdir's checkpoints, metrics and pictures into WORKDIR/discarded-<time>/ (for --fresh): a new
    start never deletes a run. Returns that folder, or None when there was nothing to move."""
    run_files = ("latest", "best", "metrics.jsonl", "tensorboard", "summary.md", "curves.png", "attention.png",
                 "analysis")
    names = [n for n in run_files if os.path.exists(os.path.join(workdir, n))]
    if not names:
        return None
    aside = os.path.join(workdir, time.strftime("discarded-%Y%m%d-%H%M%S"))
    os.makedirs(aside, exist_ok=True)
    for n in names:
        os.replace(os.path.join(workdir, n), os.path.join(aside, n))
    return aside


class Checkpoints:
    """The latest and best checkpoints of one workdir."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.latest = _manager(os.path.join(workdir, "latest"), keep=2)
        self.best = _manager(os.path.join(workdir, "best"), keep=1)

    def save_latest(self, state, metrics, meta: dict):
        """Saves and seals; a state already saved at this step is not written again."""
        step = int(state.step)
        if step in self.latest.all_steps():
            return
        self.latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"state": state, "metrics": metrics}),
            meta=ocp.args.JsonSave(meta)))
        _seal(self.latest, step)

    def restore_latest(self, state, metrics):
        """(state, metrics, meta) of the newest checkpoint that reads back whole, shaped and sharded
        like the arguments; None when there is none. A damaged one is skipped with a warning."""
        steps = sorted(self.latest.all_steps(), reverse=True)
        target = _abstract({"state": state, "metrics": metrics})
        for step in steps:
            damage = _damage(self.latest, step)
            if damage:
                print(f"warning: skipping damaged checkpoint {self.latest.directory / str(step)} ({damage})",
                      file=sys.stderr)
                continue
            try:
                out = self.latest.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
            except Exception as e:  # orbax and tensorstore raise many kinds for one cause: unreadable
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                print(f"warning: skipping damaged checkpoint {self.latest.directory / str(step)} ({reason})",
                      file=sys.stderr)
                continue
            return out.state["state"], out.state["metrics"], out.meta
        if steps:
            raise UserError(
                f"no checkpoint in {self.latest.directory} could be read (steps {steps} are damaged). "
                f"Rerun with --fresh to move them aside (to {self.workdir}/discarded-*) and start over")
        return None

    def save_best(self, params, meta: dict):
        if meta["epoch"] in self.best.all_steps():  # written before a crash; the rerun computed the same
            return
        self.best.save(meta["epoch"], args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
        _seal(self.best, meta["epoch"])

    def restore_best(self, params=None):
        """(params, meta) of the best checkpoint. With `params`, restores into their shape and sharding."""
        epoch = self.best.latest_step()
        if epoch is None:
            raise UserError(f"no best checkpoint in {self.best.directory}: train first "
                            f"(python -m vit_jax.train --workdir {self.workdir})")
        damage = _damage(self.best, epoch)
        if damage:
            raise UserError(f"the best checkpoint {self.best.directory / str(epoch)} is damaged ({damage}): "
                            f"resume training to write a new one, or restore the folder from a copy")
        restore = ocp.args.StandardRestore(_abstract(params) if params is not None else None)
        out = self.best.restore(epoch, args=ocp.args.Composite(params=restore, meta=ocp.args.JsonRestore()))
        return out.params, out.meta

    def close(self):
        self.latest.close()
        self.best.close()
