"""Checkpoints in the workdir, with orbax: the latest state (to resume) and the best parameters.

    WORKDIR/latest/<step>/  the full train state, the running metrics of an unfinished epoch, and
                           `meta` (epochs done, best accuracy so far, ...); the last two are kept.
    WORKDIR/best/<epoch>/   the parameters with the best test accuracy, and their epoch and accuracy.

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a run killed
mid-save never leaves a checkpoint that looks whole.
"""

import os

import jax
import orbax.checkpoint as ocp

from vit_jax.errors import UserError


def _manager(path: str, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.abspath(path), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
    """The latest and best checkpoints of one workdir."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.latest = _manager(os.path.join(workdir, "latest"), keep=2)
        self.best = _manager(os.path.join(workdir, "best"), keep=1)

    def save_latest(self, state, metrics, meta: dict):
        """Saves in the background; a state already saved at this step is not written again."""
        step = int(state.step)
        if step in self.latest.all_steps():
            return
        self.latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"state": state, "metrics": metrics}),
            meta=ocp.args.JsonSave(meta)))

    def restore_latest(self, state, metrics):
        """(state, metrics, meta) of the newest checkpoint, shaped and sharded like the arguments;
        None when there is none."""
        step = self.latest.latest_step()
        if step is None:
            return None
        target = _abstract({"state": state, "metrics": metrics})
        out = self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return out.state["state"], out.state["metrics"], out.meta

    def save_best(self, params, meta: dict):
        self.best.save(meta["epoch"], args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))

    def restore_best(self, params=None):
        """(params, meta) of the best checkpoint. With `params`, restores into their shape and sharding."""
        epoch = self.best.latest_step()
        if epoch is None:
            raise UserError(f"no best checkpoint in {self.best.directory}: train first "
                            f"(python -m vit_jax.train --workdir {self.workdir})")
        restore = ocp.args.StandardRestore(_abstract(params) if params is not None else None)
        out = self.best.restore(epoch, args=ocp.args.Composite(params=restore, meta=ocp.args.JsonRestore()))
        return out.params, out.meta

    def wait(self):
        """Blocks until background saves are on disk."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self):
        self.latest.close()
        self.best.close()
