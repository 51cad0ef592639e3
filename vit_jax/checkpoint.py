"""Orbax, in one place: a folder of numbered checkpoints, each a pytree and a small JSON `meta`.

Saves are synchronous: when `save` returns, the checkpoint is whole on disk. Orbax writes each one
to a temporary folder and renames it when complete, so a run killed mid-save never leaves a
checkpoint that looks whole. Which folders a run has, and how they are sealed against later damage,
is `workdir.py`'s business.
"""

import contextlib
import logging
import os

import jax
import orbax.checkpoint as ocp


@contextlib.contextmanager
def _absl_warnings_off():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class Folder:
    """DIR/<step>/{<item>, meta}: the newest `keep` checkpoints of one kind (read_only: never writes)."""

    def __init__(self, path: str, item: str, keep: int = 1, read_only: bool = False):
        self.path, self.item = os.path.abspath(path), item
        # Read-only, orbax warns that the folder is read-only and that it turned off saving and
        # deleting: what was asked for, four lines on stderr of every evaluate, analyze or export.
        with _absl_warnings_off() if read_only else contextlib.nullcontext():
            self._manager = ocp.CheckpointManager(self.path, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=not read_only, read_only=read_only, enable_async_checkpointing=False))

    def steps(self) -> list[int]:
        """The whole checkpoints on disk now, oldest first."""
        self._manager.reload()  # another process (a run still training) may have saved or deleted some
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.path, str(step))

    def save(self, step: int, tree, meta: dict):
        if jax.process_count() == 1:
            # Host (numpy) arrays: orbax writes them in half the time of jax.Arrays, whose per-array
            # work on shardings matters only when several processes each write their share. The
            # values are stored alike, and a restore (given `like`) gives jax.Arrays either way.
            tree = jax.device_get(tree)
        self._manager.save(step, args=ocp.args.Composite(
            **{self.item: ocp.args.StandardSave(tree), "meta": ocp.args.JsonSave(meta)}))

    def restore(self, step: int, like):
        """(tree, meta) of one checkpoint. `like`: a tree of arrays (or shape-dtype structs) whose
        shapes, dtypes and shardings the restored tree takes."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self._manager.restore(step, args=ocp.args.Composite(
            **{self.item: ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}))
        return out[self.item], out["meta"]

    def close(self):
        self._manager.close()
