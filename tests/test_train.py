"""End-to-end training: the command line on mock data, resume, Ctrl+C, eight devices, bad input."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vit_jax import evaluate, train
from vit_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("seconds", "images_per_sec")


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _cli(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-u", "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600, **kwargs)


def test_command_line_end_to_end_on_mock_data(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    args = ["--preset", "test", "--epochs", "2", "--batch_size", "16", "--log_every", "2",
            "--workdir", workdir]
    with tfds.testing.mock_data(num_examples=40):
        train.main(args)
    out = capsys.readouterr().out
    for expected in ("Device: ", "Data: 40 train / 40 test images, batch size 16 (3 batches per epoch)",
                     "24,234 parameters", "Epoch 1/2 | lr 3.00e-04", "Batch [2/3] Loss: ",
                     "Epoch 2: Train Loss: ", "New best model saved", "Done: best test accuracy"):
        assert expected in out, expected
    rows = _rows(workdir)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r) >= {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds",
                          "images_per_sec"}
        assert np.isfinite(r["train_loss"]) and 0 <= r["test_acc"] <= 100
    assert rows[1]["lr"] == pytest.approx(1.5e-4)  # cosine over 2 epochs, stepped per epoch
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["embed_dim"] == 32
    assert os.listdir(os.path.join(workdir, "best")) and os.listdir(os.path.join(workdir, "latest"))

    # The same command again finds the run complete and changes nothing.
    with tfds.testing.mock_data(num_examples=40):
        train.main(args)
    assert _rows(workdir) == rows

    # evaluate reports the best epoch's test accuracy.
    with tfds.testing.mock_data(num_examples=40):
        loss, acc = evaluate.main(["--workdir", workdir])
    best = max(rows, key=lambda r: r["test_acc"])
    assert acc == pytest.approx(best["test_acc"]) and loss == pytest.approx(best["test_loss"], rel=1e-5)

    # Another preset in the same workdir is refused, naming what differs.
    with tfds.testing.mock_data(num_examples=40), pytest.raises(UserError, match="embed_dim: 32 -> 256"):
        train.train_and_evaluate(*train.config_lib.parse_args(args[:1] + ["cifar"] + args[2:]))


def _train_cmd(data_dir, workdir, *extra):
    return ("vit_jax.train", "--preset", "test", "--epochs", "3", "--batch_size", "16",
            "--train_limit", "96", "--test_limit", "32", "--log_every", "1",
            "--data_dir", data_dir, "--workdir", workdir, *extra)


def test_interrupt_and_resume_gives_the_metrics_of_an_uninterrupted_run(tmp_path, prepared_cifar):
    straight = str(tmp_path / "straight")
    assert _cli(*_train_cmd(prepared_cifar, straight)).returncode == 0

    resumed = str(tmp_path / "resumed")
    proc = subprocess.Popen([sys.executable, "-u", "-m", *_train_cmd(prepared_cifar, resumed)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # interrupt in the middle of epoch 2
        if line.startswith("Batch [3/6]") and os.path.exists(os.path.join(resumed, "metrics.jsonl")):
            proc.send_signal(signal.SIGINT)
            break
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == train.EXIT_INTERRUPTED, out
    assert "Run the same command again to resume" in out
    assert len(_rows(resumed)) == 1

    again = _cli(*_train_cmd(prepared_cifar, resumed))
    assert again.returncode == 0, again.stderr
    assert "Resuming from" in again.stdout
    assert _without_timing(_rows(resumed)) == _without_timing(_rows(straight))


def test_eight_devices_give_the_losses_of_one(tmp_path, prepared_cifar):
    results = {}
    for n in (1, 8):
        workdir = str(tmp_path / f"dev{n}")
        env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
        run = _cli(*_train_cmd(prepared_cifar, workdir, "--epochs", "1"), env=env)
        assert run.returncode == 0, run.stderr
        assert f"Device: {n} x cpu" in run.stdout
        results[n] = _rows(workdir)[0]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert results[8][key] == pytest.approx(results[1][key], rel=1e-5, abs=1e-5), key


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "epochs must be positive"),
    (["--embed_dim", "100"], "not divisible by num_heads"),
    (["--img_size", "30"], "not divisible by patch_size"),
    (["--lr", "-1"], "lr must be positive"),
    (["--preset", "huge"], "invalid choice"),
    (["--epoch", "3"], "unrecognized arguments"),
    (["--batch_size", "ten"], "invalid int value"),
])
def test_bad_settings_fail_at_once_with_one_clear_message(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_bad_setting_is_one_line_and_no_traceback_from_the_process():
    run = _cli("vit_jax.train", "--embed_dim", "100")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        "error: embed_dim 100 is not divisible by num_heads 6: each head takes embed_dim / num_heads channels"]
