"""The workdir: its files, configs across versions, the best checkpoint read while a run replaces it,
damage, and the evaluate command's bad input."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vit_jax import checkpoint, config as config_lib, errors, files, workdir
from vit_jax.config import MODELS, TrainConfig
from vit_jax.errors import UserError
from vit_jax.model import init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = MODELS["test"]


def _params(seed: int):
    shapes = jax.eval_shape(lambda: init_params(CFG, jax.random.key(0)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)


def _run_with_best(path, epochs=(1,)) -> str:
    cfg = TrainConfig(recipe="test", workdir=str(path))
    os.makedirs(path, exist_ok=True)
    workdir.write_config(str(path), cfg, CFG)
    ckpts = workdir.Checkpoints(str(path))
    for e in epochs:
        ckpts.save_best(_params(e), {"epoch": e, "test_acc": 10.0 * e})
    ckpts.close()
    return str(path)


def test_config_fields_carry_their_help_and_resumability():
    for cls in (config_lib.ModelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata["help"], f.name
    assert {f.name for f in dataclasses.fields(TrainConfig) if config_lib.resumable(f)} == {
        "recipe", "cpu_devices", "workdir", "data_dir", "archive", "patience", "log_every", "save_every", "fresh",
        "tensorboard", "coordinator_address", "num_processes", "process_id", "heartbeat_timeout"}
    assert {f.name for f in dataclasses.fields(config_lib.ModelConfig) if config_lib.resumable(f)} == {"attention"}
    text = config_lib.build_parser("x").format_help()
    assert "--epochs INT" in text and "passes over the training split (default: 20)" in text
    assert "--train_limit INT" in text and "--no-decay_all" in text and "--embed_dim INT" in text


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    path = str(tmp_path / "f.json")
    workdir.write_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with files.atomic_open(path) as f:
            f.write("half of the new")
            raise RuntimeError("killed")
    assert pathlib.Path(path).read_text() == "old"
    workdir.write_atomic(path, "new")
    assert pathlib.Path(path).read_text() == "new" and os.listdir(tmp_path) == ["f.json"]


def test_metrics_damaged_from_outside_are_one_line_naming_the_file_and_line(tmp_path):
    """Training rewrites metrics.jsonl whole after each epoch; a torn or edited file is refused, not a
    traceback in the resumed run, the plot and the summary alike."""
    rows = [{"epoch": 1, "test_acc": 10.0}, {"epoch": 2, "test_acc": 20.0}]
    workdir.write_metrics(str(tmp_path), rows)
    assert workdir.read_metrics(str(tmp_path)) == rows and workdir.read_metrics(str(tmp_path), upto=1) == rows[:1]
    path = tmp_path / workdir.METRICS
    for damage, why in (('{"epoch": 3, "lr"', "line 3: Expecting ':' delimiter"), ('{"lr": 0.1}', "line 3: no epoch"),
                        ("[3]", "line 3: list indices must be integers")):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + damage + "\n")
        with pytest.raises(UserError, match=f"{path} cannot be read \\({why}.*\\): restore it, or move it aside"):
            workdir.read_metrics(str(tmp_path))


def test_a_config_written_by_another_version_still_loads(tmp_path):
    saved = config_lib.to_dict(TrainConfig(recipe="test", epochs=3), CFG)
    del saved["train"]["archive"]  # a field this version added
    saved["train"]["retired_flag"] = 1  # one a later version dropped
    (tmp_path / "config.json").write_text(json.dumps(saved))
    cfg, model_cfg = workdir.read_config(str(tmp_path))
    assert cfg.epochs == 3 and cfg.archive is None and model_cfg == CFG
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json cannot be read"):
        workdir.read_config(str(tmp_path))
    # Edited by hand: checked as the command line is, not left to fail inside the model.
    for section, field, value, why in (("model", "num_heads", 5, "embed_dim 32 is not divisible by num_heads 5"),
                                       ("model", "embed_dim", "abc", "'<=' not supported"),
                                       ("train", "lr", float("nan"), "lr must be a finite number, got nan")):
        edited = json.loads(json.dumps(saved))
        edited[section][field] = value
        (tmp_path / "config.json").write_text(json.dumps(edited))
        with pytest.raises(UserError, match=f"config.json cannot be read \\({why}"):
            workdir.read_config(str(tmp_path))


def test_fresh_moves_every_file_of_a_run_aside(tmp_path):
    run_files = ("latest", "best", "metrics.jsonl", "tensorboard", "summary.md", "curves.png", "analysis")
    for name in run_files:
        (tmp_path / name).mkdir()
    (tmp_path / workdir.CONFIG).write_text("{}")
    aside = workdir.discard(str(tmp_path))
    assert sorted(os.listdir(aside)) == sorted(run_files)
    assert sorted(os.listdir(tmp_path)) == sorted([workdir.CONFIG, os.path.basename(aside)])
    assert workdir.discard(str(tmp_path)) is None


def test_a_checkpoint_restores_to_the_arrays_it_is_given_bit_for_bit(tmp_path):
    """One process saves host copies of its arrays (faster in orbax); a restore like the training
    state gives back jax.Arrays with that state's shardings, dtypes and values."""
    state = {"params": jax.tree.map(jax.numpy.asarray, _params(3)), "step": jax.numpy.int32(7),
             "key": jax.random.key_data(jax.random.key(5))}
    folder = checkpoint.Folder(str(tmp_path / "latest"), "state")
    folder.save(7, state, {"epoch": 1})
    restored, meta = folder.restore(7, like=state)
    folder.close()
    assert meta == {"epoch": 1}
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert isinstance(got, jax.Array) and got.sharding == want.sharding and got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_the_best_checkpoint_is_read_even_when_a_run_replaces_it_meanwhile(tmp_path, monkeypatch):
    """evaluate lists best/1, then the training run saves best/2 and deletes best/1 (it keeps one)
    before evaluate reads it: the read lists again and takes best/2."""
    path = _run_with_best(tmp_path / "run", epochs=(1,))
    real_restore = checkpoint.Folder.restore
    calls = []

    def restore_after_a_new_best(self, step, like):
        if not calls:
            trainer = workdir.Checkpoints(path)  # the running training, saving its next best
            trainer.save_best(_params(2), {"epoch": 2, "test_acc": 20.0})
            trainer.close()
        calls.append(step)
        return real_restore(self, step, like)

    monkeypatch.setattr(checkpoint.Folder, "restore", restore_after_a_new_best)
    best = workdir.load_best(path)
    assert calls == [1, 2] and best.meta["epoch"] == 2
    jax.tree.map(np.testing.assert_array_equal, best.params, _params(2))


def test_a_damaged_best_checkpoint_says_what_works(tmp_path):
    path = _run_with_best(tmp_path / "run")
    data = [os.path.join(r, n) for r, _, names in os.walk(os.path.join(path, "best", "1"))
            for n in names if "/d/" in os.path.join(r, n)]
    assert data
    with open(data[0], "r+b") as f:
        f.truncate(1)
    with pytest.raises(UserError, match="is damaged .*restore that folder from a copy, or train again "
                                        "\\(--fresh moves this run aside\\)"):
        workdir.load_best(path)


def test_a_workdir_without_a_best_checkpoint(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        workdir.load_best(str(tmp_path))
    workdir.write_config(str(tmp_path), TrainConfig(recipe="test"), CFG)
    with pytest.raises(UserError, match="no best checkpoint .*train first"):
        workdir.load_best(str(tmp_path))
    assert not os.path.exists(tmp_path / "best")  # reading created nothing


@pytest.mark.parametrize("flag, value", [("--batch_size", "0"), ("--batch_size", "-3"), ("--test_limit", "0")])
def test_evaluate_refuses_a_size_that_is_not_positive(tmp_path, flag, value):
    path = _run_with_best(tmp_path / "run")
    run = subprocess.run([sys.executable, "-m", "vit_jax.evaluate", "--workdir", path, flag, value],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == f"error: {flag} must be positive, got {value}"


def test_inside_a_training_loop_a_signal_asks_it_to_stop_and_the_handlers_are_put_back():
    before = signal.getsignal(signal.SIGINT)
    with errors.stoppable() as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # Python runs the handler between bytecodes of the main thread
        assert stop
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_while_a_command_imports_jax_is_one_word_and_status_130(tmp_path):
    """Before main(), while jaxlib loads: Python's KeyboardInterrupt crashed the process there (SIGSEGV),
    or was swallowed by jax, and the command ran to its end as if Ctrl+C had not been pressed."""
    proc = subprocess.Popen([sys.executable, "-m", "vit_jax.evaluate", "--workdir", str(tmp_path / "none")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = pathlib.Path(f"/proc/{proc.pid}/maps")
    while proc.poll() is None and "jaxlib" not in maps.read_text():
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (130, "", "\nInterrupted.\n")


def test_only_this_projects_commands_take_ctrl_c_over_while_they_start():
    python = sys.executable
    for argv in ([python, "-m", "vit_jax.evaluate", "--workdir", "x"], [python, "-u", "-X", "importtime", "-m",
                                                                        "parity.compare"]):
        assert errors.started_as_command(argv), argv
    for argv in ([python, "-m", "pytest", "-m", "vit_jax.x"], [python, "script.py", "-m", "vit_jax.train"],
                 [python, "-c", "import vit_jax", "-m", "vit_jax.train"], [python, "-m", "vit_jaxx.train"], [python]):
        assert not errors.started_as_command(argv), argv
