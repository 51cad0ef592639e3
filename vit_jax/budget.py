"""`--time_budget MINUTES`: a run that ends within that many minutes of the command's start.

The run's length is a number of updates (its last epoch may be partial) that the run revises as it
goes, from what it measures of itself on this machine: its steps once compiled, its evaluations and
saves. It revises once early (`REVISE_AFTER` steps into its first epoch) and after every epoch, so
that a machine that speeds up or slows down during the run still has the budget used to its end.
The schedule's numbers are arguments of the compiled step: a revision compiles nothing. Each
revision is printed and kept in the checkpoint, so that a resumed run keeps the last one (it has no
budget of its own left to plan by). Should the steps still run slower than measured, the epoch
under way stops early.
"""

import os
import time

from vit_jax.errors import UserError

SAFETY = 0.97  # of the time left, the part planned: steps vary a little, and a plan must not overrun
END_SECONDS = 10.0  # for what follows the last evaluation: the summary, closing the checkpoints
REVISE_AFTER = 20  # steps into the run's first epoch (of this process) at which it first revises


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


class Budget:
    """The deadline of a run with --time_budget, and the length that fits before it."""

    def __init__(self, minutes: float, started: float):
        self.minutes, self.started = minutes, started
        self.deadline = started + minutes * 60

    def seconds_left(self) -> float:
        """Seconds left for training and evaluating (after the time kept for the end)."""
        return self.deadline - END_SECONDS - time.time()

    def check_time_left(self):
        if self.seconds_left() <= 0:
            raise UserError(f"--time_budget {self.minutes:g} min leaves 0 s after start-up (which took "
                            f"{time.time() - self.started:.0f} s): give more minutes")

    def total_steps(self, done: int, steps_per_epoch: int, step_s: float, epoch_end_s: float) -> int:
        """The run's length: the `done` steps and as many more as fit, each epoch end on the way (and
        the run's end) costing `epoch_end_s` (an evaluation and a save); `done` when none fits."""
        usable = self.seconds_left() * SAFETY

        def cost(more):  # seconds for `more` steps after `done`, with the epoch ends they cross
            ends = -(-(done + more) // steps_per_epoch) - done // steps_per_epoch
            return more * step_s + max(ends, 1) * epoch_end_s if more else 0.0

        low, high = 0, max(0, int(usable / step_s))
        while low < high:  # the most steps whose cost fits (cost grows with the steps)
            mid = (low + high + 1) // 2
            low, high = (mid, high) if cost(mid) <= usable else (low, mid - 1)
        return done + low

    def training_deadline(self, epoch_end_s: float) -> float:
        """The time after which the last epoch stops training early, to leave room for its end."""
        return self.deadline - END_SECONDS - epoch_end_s

    def describe(self, total: int, steps_per_epoch: int, step_s: float, epoch_end_s: float) -> str:
        return (f"{time.time() - self.started:.0f} s of {self.minutes:g} min gone; a step takes {step_s:.3f} s, an "
                f"evaluation and save {epoch_end_s:.1f} s: {total:,} steps in all "
                f"({total / steps_per_epoch:.2f} epochs of {steps_per_epoch})")
