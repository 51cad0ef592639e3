"""Training scalars as TensorBoard event files (`--tensorboard`), through Flax's maintained writer.

`tensorboard --logdir WORKDIR/tensorboard` shows them. The writer is flax.metrics.tensorboard's,
which writes with TensorFlow's tf.summary; its implementation comes with the `tensorboard` package.
A disabled Writer does nothing and imports nothing, so the training loop calls it unconditionally.
(Not named tensorboard.py: run as a script from inside vit_jax/, that would hide the real package.)
"""

FOLDER = "tensorboard"  # in the workdir


class Writer:
    """scalar(name, value, step), flush() and close(); every call is a no-op when not enabled."""

    def __init__(self, logdir: str, enabled: bool = True):
        self.logdir = logdir
        self._writer = None
        if enabled:
            # TensorFlow, imported with its C++ start-up notices silenced and kept off the GPU, which
            # belongs to JAX; the Flax writer would otherwise import it bare.
            from vit_jax import tfds_data  # noqa: F401
            from flax.metrics import tensorboard

            # No flush per scalar: one per epoch (and at close) keeps file writes off the step loop.
            self._writer = tensorboard.SummaryWriter(self.logdir, auto_flush=False)

    def scalar(self, name: str, value, step: int):
        if self._writer is not None:
            self._writer.scalar(name, float(value), int(step))

    def scalars(self, values: dict, step: int, prefix: str = ""):
        """Every number in `values` as `prefix + key`; other entries (strings, None) are skipped."""
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.scalar(prefix + key, value, step)

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
