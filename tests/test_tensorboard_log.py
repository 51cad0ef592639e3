"""--tensorboard: scalars written as event files that TensorBoard reads back."""

import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray

from vit_jax.tensorboard_log import Writer


def test_scalars_read_back_with_tensorboard(tmp_path):
    writer = Writer(str(tmp_path / "tensorboard"))
    for step in (10, 20, 30):
        writer.scalar("train/loss", 3.0 - step / 10, step)
    writer.scalars({"lr": 3e-4, "test_acc": 41.5, "note": "skipped", "best": None}, 30, prefix="epoch/")
    writer.flush()
    writer.close()
    writer.close()  # a second close is harmless

    events = EventAccumulator(writer.logdir)
    events.Reload()
    assert set(events.Tags()["tensors"]) == {"train/loss", "epoch/lr", "epoch/test_acc"}
    loss = [(e.step, float(make_ndarray(e.tensor_proto))) for e in events.Tensors("train/loss")]
    assert loss == [(10, pytest.approx(2.0)), (20, pytest.approx(1.0)), (30, pytest.approx(0.0))]
    (acc,) = events.Tensors("epoch/test_acc")
    assert acc.step == 30 and float(make_ndarray(acc.tensor_proto)) == pytest.approx(41.5)


def test_a_disabled_writer_writes_nothing(tmp_path):
    writer = Writer(str(tmp_path / "tensorboard"), enabled=False)
    writer.scalar("train/loss", 1.0, 1)
    writer.flush()
    writer.close()
    assert not os.path.exists(writer.logdir)
