"""End-to-end training: the command line on a small archive, resume, Ctrl+C, eight devices, bad input."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import write_cifar_archive
from vit_jax import config as config_lib, evaluate, step, train
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


def test_command_line_end_to_end_on_an_archive(tmp_path, capsys, cifar_archive):
    workdir = str(tmp_path / "run")
    args = ["--recipe", "test", "--epochs", "2", "--batch_size", "16", "--log_every", "2", "--train_limit", "40",
            "--archive", cifar_archive, "--workdir", workdir]
    train.main(args)
    out = capsys.readouterr().out
    for expected in ("Device: ", "Data: 40 train / 32 test images, batch size 16 (3 batches per epoch)",
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
    train.main(args)
    assert _rows(workdir) == rows

    # evaluate reports the best epoch's test accuracy, reading the run's own archive.
    loss, acc = evaluate.main(["--workdir", workdir])
    best = max(rows, key=lambda r: r["test_acc"])
    assert acc == pytest.approx(best["test_acc"]) and loss == pytest.approx(best["test_loss"], rel=1e-5)

    # Another recipe in the same workdir is refused, naming what differs.
    with pytest.raises(UserError, match="embed_dim: 32 -> 256"):
        train.train_and_evaluate(*config_lib.parse_args(args[:1] + ["cifar"] + args[2:]))


def _train_cmd(archive, workdir, *extra):
    return ("vit_jax.train", "--recipe", "test", "--epochs", "2", "--batch_size", "16",
            "--train_limit", "96", "--test_limit", "32", "--log_every", "1",
            "--archive", archive, "--workdir", workdir, *extra)


def _interrupt_in_epoch_2(cmd, workdir) -> str:
    """Runs cmd (2 epochs) and interrupts it as epoch 2 starts: it stops after one of its batches, saved.
    Epoch 2 takes tens of ms here: on a loaded machine the signal can come after its last batch (then
    the run stops at the epoch's end, which is not the case this is for), so up to three tries."""
    for attempt in range(3):
        shutil.rmtree(workdir, ignore_errors=True)
        proc = subprocess.Popen([sys.executable, "-u", "-m", *cmd], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            if line.startswith("Epoch 2/2"):  # printed after epoch 1 is recorded, before epoch 2's first batch
                proc.send_signal(signal.SIGINT)
                break
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == train.EXIT_INTERRUPTED, out
        assert "Run the same command again to resume" in out
        if len(_rows(workdir)) == 1:
            break
    assert len(_rows(workdir)) == 1 and "Saved at epoch 2, batch" in out, out  # inside epoch 2, its sums saved
    return out


def test_interrupt_and_resume_gives_the_metrics_of_an_uninterrupted_run(tmp_path, cifar_archive):
    """Batches of 32 (544 tokens), which the CPU's step takes in two micro-batches, as it does unasked."""
    cmd = lambda workdir: _train_cmd(cifar_archive, workdir, "--batch_size", "32")
    straight = str(tmp_path / "straight")
    first = _cli(*cmd(straight))
    assert first.returncode == 0 and "(3 batches per epoch, each in 2 micro-batches of 16)" in first.stdout

    resumed = str(tmp_path / "resumed")
    _interrupt_in_epoch_2(cmd(resumed), resumed)
    again = _cli(*cmd(resumed))
    assert again.returncode == 0, again.stderr
    assert "Resuming from" in again.stdout
    assert _without_timing(_rows(resumed)) == _without_timing(_rows(straight))


def test_a_token_schedule_switches_once_and_an_interrupted_run_resumes_in_its_part(tmp_path, cifar_archive):
    """--early_patch_drop_rate 0.5: epoch 1 (steps 0-5 of 12) keeps 8 of the 16 tokens, epoch 2 (from step
    6, half the run) all 16; stopped inside epoch 2 and rerun, the run ends as an uninterrupted one."""
    schedule = ("--early_patch_drop_rate", "0.5", "--early_fraction", "0.5")
    straight = str(tmp_path / "straight")
    first = _cli(*_train_cmd(cifar_archive, straight, *schedule))
    assert first.returncode == 0, first.stderr
    assert "Token schedule: 8 of 16 tokens until 0.5 of the steps, then 16 of 16" in first.stdout
    assert first.stdout.count("Token schedule: from epoch 2 on, 16 of 16 tokens\n\nEpoch 2/2") == 1

    resumed = str(tmp_path / "resumed")
    _interrupt_in_epoch_2(_train_cmd(cifar_archive, resumed, *schedule), resumed)
    again = _cli(*_train_cmd(cifar_archive, resumed, *schedule))
    assert again.returncode == 0, again.stderr
    assert "Resuming from" in again.stdout and "Token schedule" not in again.stdout  # in the late part already
    assert _without_timing(_rows(resumed)) == _without_timing(_rows(straight))

    plain = str(tmp_path / "plain")  # the early part did act: the first epoch trained otherwise
    assert _cli(*_train_cmd(cifar_archive, plain)).returncode == 0
    assert _rows(plain)[0]["train_loss"] != _rows(straight)[0]["train_loss"]


def test_the_token_schedule_switches_once_even_if_the_budget_lengthens_the_run():
    cfg = config_lib.TrainConfig(recipe="test", early_patch_drop_rate=0.5, early_fraction=0.5)
    meta = {"epochs_done": 0, "total_steps": 100}
    assert train.early_epoch(cfg, meta, 0) and train.early_epoch(cfg, meta, 40) and "late_from" not in meta
    meta["epochs_done"] = 5
    assert not train.early_epoch(cfg, meta, 50) and meta["late_from"] == 6
    meta["total_steps"] = 200  # a revision that lengthens the run: 60 < 0.5 x 200, but the switch stands
    assert not train.early_epoch(cfg, meta, 60)
    assert not train.early_epoch(config_lib.TrainConfig(recipe="test"), {"epochs_done": 0, "total_steps": 100}, 0)


def test_a_run_resumes_on_another_number_of_cpu_devices(tmp_path, cifar_archive):
    """A workdir moved to a machine with more cores: --cpu_devices (one per core by default) may change."""
    straight, moved = str(tmp_path / "straight"), str(tmp_path / "moved")
    assert _cli(*_train_cmd(cifar_archive, straight)).returncode == 0
    _interrupt_in_epoch_2(_train_cmd(cifar_archive, moved, "--cpu_devices", "1"), moved)
    again = _cli(*_train_cmd(cifar_archive, moved, "--cpu_devices", "2"))
    assert again.returncode == 0, again.stderr
    assert "Resuming from" in again.stdout and "Device: 2 x cpu" in again.stdout
    for row, want in zip(_rows(moved), _rows(straight), strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            assert row[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), (row["epoch"], key)


def test_eight_devices_give_the_losses_of_one(tmp_path, cifar_archive):
    results = {}
    for n in (1, 8):
        workdir = str(tmp_path / f"dev{n}")
        run = _cli(*_train_cmd(cifar_archive, workdir, "--epochs", "1", "--cpu_devices", str(n)),
                   env={"JAX_PLATFORMS": "cpu"})
        assert run.returncode == 0, run.stderr
        assert f"Device: {n} x cpu" in run.stdout
        results[n] = _rows(workdir)[0]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert results[8][key] == pytest.approx(results[1][key], rel=1e-5, abs=1e-5), key


def test_by_default_a_cpu_is_split_into_a_device_per_core_that_divides_the_batch(tmp_path, cifar_archive):
    """The commands' default (the suite's conftest sets one device for its own runs): one device per
    core, as many as divide the batch. Several epochs, each ending in an evaluation of every test
    batch, the switch where queued multi-device programs once waited on each other (step.IN_FLIGHT)."""
    cores = len(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    for batch in (16, 15):
        workdir = str(tmp_path / f"batch{batch}")
        run = subprocess.run([sys.executable, "-u", "-m", *_train_cmd(cifar_archive, workdir, "--epochs", "3",
                                                                      "--batch_size", str(batch))],
                             cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stderr
        want = max(d for d in range(1, cores + 1) if batch % d == 0)
        assert f"Device: {want} x cpu" in run.stdout, run.stdout
        assert [r["epoch"] for r in _rows(workdir)] == [1, 2, 3]


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "epochs must be positive"),
    (["--embed_dim", "100"], "not divisible by num_heads"),
    (["--img_size", "30"], "not divisible by patch_size"),
    (["--lr", "-1"], "lr must be positive"),
    (["--recipe", "fast", "--epochs", "1"],
     "warmup_epochs (1.0) must be less than epochs (1): pass --warmup_epochs 0.5, or more --epochs"),
    (["--recipe", "huge"], "invalid choice"),
    (["--epoch", "3"], "unrecognized arguments"),
    (["--batch_size", "ten"], "invalid int value"),
    # float() reads these, and every range check passes nan: caught before they reach the loss
    (["--lr", "nan"], "lr must be a finite number, got nan"),
    (["--time_budget", "inf"], "time_budget must be a finite number, got inf"),
    (["--mlp_ratio", "nan"], "mlp_ratio must be a finite number, got nan"),
    (["--translate", "-2"], "translate must be 0 (off) or a positive number of pixels, got -2"),
    (["--stem", "conv", "--patch_size", "6", "--img_size", "36"], "patch_size must be a power of 2"),
    (["--patch_drop_rate", "1"], "patch_drop_rate must be in [0, 1)"),
    (["--early_patch_drop_rate", "-0.5"], "early_patch_drop_rate must be in [0, 1), got -0.5"),
    (["--early_fraction", "1"], "early_fraction must be between 0 and 1, got 1.0"),
])
def test_bad_settings_fail_at_once_with_one_clear_message(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_the_learning_rate_suggested_after_divergence_is_a_tenth_and_never_above_the_recipes():
    assert config_lib.suggest_lr(1e6) == 1e-3  # not 1e5, which diverges again
    assert config_lib.suggest_lr(1e-2) == pytest.approx(1e-3)
    assert config_lib.suggest_lr(3e-4) == pytest.approx(3e-5)


def test_a_bad_setting_is_one_line_and_no_traceback_from_the_process():
    run = _cli("vit_jax.train", "--embed_dim", "100")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        "error: embed_dim 100 is not divisible by num_heads 6: each head takes embed_dim / num_heads channels"]


def test_init_from_on_a_run_that_resumes_is_refused_not_ignored(tmp_path, cifar_archive):
    """--init_from shapes a run from its first step; added to a rerun it would be ignored, so it is refused."""
    from vit_jax import weights
    from vit_jax.model import init_params
    import jax

    workdir = str(tmp_path / "run")
    args = ["--recipe", "test", "--epochs", "1", "--batch_size", "16", "--train_limit", "32", "--archive",
            cifar_archive, "--workdir", workdir]
    train.main(args)
    npz = str(tmp_path / "start.npz")
    weights.save(npz, init_params(config_lib.MODELS["test"], jax.random.key(1)), config_lib.MODELS["test"])
    with pytest.raises(UserError, match=f"holds a run with other settings \\(train.init_from: None -> '{npz}'\\)"):
        train.train_and_evaluate(*config_lib.parse_args(args + ["--init_from", npz]))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["init_from"] is None  # the record still names the run that happened


def test_a_second_ctrl_c_quits_at_once_in_one_line_and_loses_nothing(tmp_path, cifar_archive):
    workdir = str(tmp_path / "run")
    # The cifar model: its steps and saves take long enough for the second signal to come during them.
    cmd = [sys.executable, "-u", "-m", "vit_jax.train", "--recipe", "cifar", "--epochs", "1", "--batch_size", "32",
           "--train_limit", "96", "--log_every", "1", "--archive", cifar_archive, "--workdir", workdir]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("Batch [1/3]"):
            proc.send_signal(signal.SIGINT)
            break
    for line in proc.stderr:
        if line.startswith("Stopping after the steps under way"):  # the first was handled: a second is a second
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == train.EXIT_INTERRUPTED, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "Second signal: quitting without saving; the previous checkpoint stays the latest" in err
    again = _cli("vit_jax.train", *cmd[4:])
    assert again.returncode == 0, again.stderr
    assert [r["epoch"] for r in _rows(workdir)] == [1]


def test_ctrl_c_while_the_command_starts_is_one_line_and_ends_it(tmp_path, cifar_archive):
    """During the imports, before the run's own handler: Python's KeyboardInterrupt would show a
    traceback from inside jax, or be swallowed by one of jax's garbage-collection callbacks."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "vit_jax.train", "--recipe", "test", "--archive", cifar_archive,
                             "--workdir", str(workdir)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    maps = pathlib.Path(f"/proc/{proc.pid}/maps")
    while proc.poll() is None and "jaxlib" not in maps.read_text():  # importing jax: a second before the run
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == train.EXIT_INTERRUPTED and out == "", (out, err)
    assert err == "\nInterrupted.\n", err
    assert not workdir.exists()


def test_a_stop_is_acted_on_within_a_few_steps_not_after_the_queue_drains(tmp_path):
    """Steps of the cifar model (about a second here) that are not logged: nothing else makes the loop
    wait for the device, so without a bound it dispatches steps far ahead of it, and a stop would wait
    for all of them."""
    workdir = str(tmp_path / "run")
    archive = write_cifar_archive(str(tmp_path), 640, 32, seed=2)["archive"]  # 3,200 training images
    cmd = [sys.executable, "-u", "-m", "vit_jax.train", "--recipe", "cifar", "--epochs", "1", "--batch_size", "32",
           "--log_every", "1000", "--archive", archive, "--workdir", workdir]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the CPU warning, after the run's fourth step, with the time of one
        if line.startswith("warning: no accelerator found"):
            step_s = float(line.split("at ~")[1].split(" s/batch")[0])
            break
    time.sleep(3 * step_s)  # the loop is well into its steps
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    took = time.time() - sent
    assert proc.returncode == train.EXIT_INTERRUPTED, err
    # About 7 steps were done when the signal came (the warning's 4, then 3 steps' sleep); then the
    # steps under way (step.IN_FLIGHT) and the save. An unbounded queue ran 30 more here.
    batch = int(out.split("Saved at epoch 1, batch ")[1].split("/")[0])
    assert batch <= 7 + step.IN_FLIGHT + 4, out
    assert took < (step.IN_FLIGHT + 3) * step_s + 8, (took, step_s)


def test_a_workdir_with_checkpoints_but_no_config_is_refused_not_overwritten(tmp_path, cifar_archive):
    workdir = str(tmp_path / "run")
    args = ["--recipe", "test", "--epochs", "1", "--batch_size", "16", "--train_limit", "32", "--archive",
            cifar_archive, "--workdir", workdir]
    train.main(args)
    os.remove(os.path.join(workdir, "config.json"))
    with pytest.raises(UserError, match="holds checkpoints but no config.json.*--fresh"):
        train.train_and_evaluate(*config_lib.parse_args(args + ["--lr", "1e-3"]))
    assert not os.path.exists(os.path.join(workdir, "config.json"))  # nothing rewritten


def test_a_finished_run_whose_metrics_were_moved_aside_says_one_thing(tmp_path, cifar_archive, capsys):
    workdir = str(tmp_path / "run")
    args = ["--recipe", "test", "--epochs", "1", "--batch_size", "16", "--train_limit", "32", "--archive",
            cifar_archive, "--workdir", workdir]
    train.main(args)
    os.rename(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "metrics.torn"))
    capsys.readouterr()
    train.main(args)
    out, err = capsys.readouterr()
    assert "Done: best test accuracy" in out and "error" not in err
    assert "No summary: " in out and "holds none of the run's 1 epochs" in out
