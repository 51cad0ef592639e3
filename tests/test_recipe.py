"""The fast recipe's ingredients, each against a direct computation, and --time_budget."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import augment, config as config_lib, step
from vit_jax.config import MODELS, TrainConfig
from vit_jax.devices import DataParallel
from vit_jax.model import VisionTransformer, init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = MODELS["test"]


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32),
            np.ones(n, np.float32))


def test_recipes_set_defaults_that_flags_override():
    fast, fast_model = config_lib.parse_args(["--recipe", "fast"])
    assert fast.recipe == "fast" and fast.lr == 1e-3 and fast.batch_size == 64 and fast.label_smoothing == 0.1
    assert fast.tta_flip and fast.augment and not fast.crop and fast.translate == 2
    assert fast_model == MODELS["fast"] and fast_model.global_pool == "avg" and not fast_model.class_token
    assert fast_model.stem == "conv" and fast_model.patch_drop_rate == 0.25
    cfg, model = config_lib.parse_args(["--recipe", "fast", "--lr", "1e-3", "--no-tta_flip", "--embed_dim", "96"])
    assert cfg.lr == 1e-3 and not cfg.tta_flip and model.embed_dim == 96 and model.global_pool == "avg"
    assert config_lib.parse_args([]) == config_lib.recipe_defaults("tutorial")  # the tutorial's, as before
    assert config_lib.parse_args([])[0] == dataclasses.replace(TrainConfig(), recipe="tutorial")
    help_text = config_lib.build_parser("x").format_help()
    for flag in ("--recipe {tutorial,cifar,fast,test,vit_ti16,vit_s16,vit_b16,finetune}", "--label_smoothing", "--grad_clip", "--ema_decay", "--tta_flip",
                 "--time_budget", "--global_pool", "--class_token"):
        assert flag in help_text, flag


def test_label_smoothing_is_cross_entropy_against_smoothed_targets():
    logits = jax.random.normal(jax.random.key(0), (5, 10))
    labels = jnp.array([0, 3, 9, 1, 1])
    s = 0.1
    targets = np.full((5, 10), s / 10)
    targets[np.arange(5), labels] += 1 - s
    log_p = np.asarray(jax.nn.log_softmax(logits))
    np.testing.assert_allclose(step.cross_entropy(logits, labels, s), -(targets * log_p).sum(-1), rtol=1e-6)
    np.testing.assert_allclose(step.cross_entropy(logits, labels), -log_p[np.arange(5), labels], rtol=1e-6)


def test_grad_clip_scales_the_gradients_to_the_norm_before_adamw():
    params = {"w": jnp.array([3.0, -4.0]), "b": jnp.array([12.0])}  # global norm 13
    grads = params
    clipped = step.make_optimizer(TrainConfig(grad_clip=1.0, weight_decay=0.0))
    plain = step.make_optimizer(TrainConfig(weight_decay=0.0))
    by_hand = jax.tree.map(lambda g: g / 13.0, grads)
    updates, _ = clipped.update(grads, clipped.init(params), params)
    expected, _ = plain.update(by_hand, plain.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates, expected)
    # Below the cap nothing changes.
    small = jax.tree.map(lambda g: g / 100.0, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 clipped.update(small, clipped.init(params), params)[0], plain.update(small, plain.init(params), params)[0])


def test_ema_follows_its_recurrence_and_is_what_evaluation_uses():
    cfg = TrainConfig(recipe="test", ema_decay=0.9, lr=1e-2)
    parallel = DataParallel.create(16)
    state = parallel.replicate(step.create_train_state(CFG, cfg))
    train_fn = step.jit_train_step(parallel, step.Settings.of(CFG, cfg), step.Schedule.of(cfg, 10))
    batch = parallel.put_batch(*_batch())
    ema = jax.device_get(state.params)
    for k in range(1, 5):
        state, _ = train_fn(state, parallel.replicate(step.zero_metrics()), *batch, jax.random.key(0))
        d = min(0.9, (1 + k) / (10 + k))
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, jax.device_get(state.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), state.ema_params, ema)
    assert step.eval_params(state) is state.ema_params
    plain = step.create_train_state(CFG, TrainConfig(recipe="test"))
    assert plain.ema_params is None and step.eval_params(plain) is plain.params


def test_test_time_flip_averages_the_logits_of_the_image_and_its_mirror():
    params = init_params(CFG, jax.random.key(0))
    images = _batch(4)[0]
    x = augment.preprocess(images, 32)
    apply = lambda inputs: VisionTransformer(CFG).apply({"params": params}, inputs)
    expected = (apply(x) + apply(x[:, :, ::-1])) / 2
    np.testing.assert_allclose(step.infer(CFG, params, images, tta_flip=True)["logits"], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected, apply(x), atol=1e-4)  # the mirror images do change the logits


BUDGET = 0.75  # minutes: after the start-up (11 s measured on an idle 2-core machine, more on a busy one
# with nothing compiled) and 10 s for the end, time remains for several epochs of the test recipe


def _budget_cmd(archive, workdir, minutes):
    return [sys.executable, "-u", "-m", "vit_jax.train", "--recipe", "test", "--batch_size", "16", "--log_every",
            "1000", "--archive", archive, "--workdir", workdir, "--time_budget", str(minutes)]


def _planned_steps(workdir):
    """The run's length as its latest checkpoint keeps it (the newest checkpoint's meta, plain JSON)."""
    latest = os.path.join(workdir, "latest")
    newest = max((name for name in os.listdir(latest) if name.isdigit()), key=int)
    return json.loads(pathlib.Path(latest, newest, "meta", "metadata").read_text())["total_steps"]


def test_a_time_budget_is_used_to_its_end_and_a_rerun_keeps_the_length(tmp_path, cifar_archive):
    from vit_jax import budget

    workdir = str(tmp_path / "run")
    started = time.time()
    run = subprocess.run(_budget_cmd(cifar_archive, workdir, BUDGET), cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    took = time.time() - started
    assert run.returncode == 0, run.stderr
    # Never after the budget (+ the start of the interpreter, before the process clock), and not long
    # before: within the time kept for the end, and a few seconds of a machine that slows or speeds up.
    assert BUDGET * 60 - budget.END_SECONDS - 6 <= took <= BUDGET * 60 + 1.0, (took, run.stdout)
    revisions = [line for line in run.stdout.splitlines() if line.startswith("Budget: ") and "steps in all" in line]
    assert len(revisions) >= 2, run.stdout  # early in the run, and after the epochs
    with open(os.path.join(workdir, "metrics.jsonl")) as f:  # 100 training images in batches of 16: 7 steps
        assert len(f.readlines()) == -(-_planned_steps(workdir) // 7) > 1

    again = subprocess.run(_budget_cmd(cifar_archive, workdir, BUDGET), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "Budget:" not in again.stdout and "Done: best test accuracy" in again.stdout


def test_an_interrupted_budgeted_run_resumes_with_the_length_it_chose(tmp_path, cifar_archive):
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen(_budget_cmd(cifar_archive, workdir, BUDGET), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("Epoch 2:"):
            proc.send_signal(signal.SIGINT)
            break
    proc.communicate(timeout=120)
    chosen = _planned_steps(workdir)
    resumed = subprocess.run(_budget_cmd(cifar_archive, workdir, BUDGET), cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout and "Budget:" not in resumed.stdout
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == list(range(1, -(-chosen // 7) + 1))


def test_steps_slower_than_measured_cut_the_epoch_short_and_the_run_ends_in_time(tmp_path, cifar_archive,
                                                                                 monkeypatch, capsys):
    """The guard: past the deadline, the epoch stops early and is evaluated; a rerun is done."""
    from vit_jax import budget, train

    monkeypatch.setattr(budget, "process_start", time.time)  # this test's start, not the suite's
    monkeypatch.setattr(budget.Budget, "training_deadline", lambda *a, **k: 0.0)  # long past
    args = ["--recipe", "test", "--batch_size", "16", "--log_every", "1000", "--archive", cifar_archive,
            "--workdir", str(tmp_path / "run"), "--time_budget", "1"]
    train.main(args)
    out = capsys.readouterr().out
    with open(os.path.join(tmp_path, "run", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert "Budget: epoch 1 stops after batch 1 of 7" in out and len(rows) == 1
    assert rows[0]["train_acc"] * 16 / 100 == pytest.approx(round(rows[0]["train_acc"] * 16 / 100))  # of 16 images
    train.main(args)  # a rerun: nothing is left to train
    again = capsys.readouterr().out
    assert "Done: best test accuracy" in again and "Epoch 1/" not in again and "Budget:" not in again


def test_a_budget_too_short_for_a_single_step_says_so(tmp_path, cifar_archive):
    run = subprocess.run(_budget_cmd(cifar_archive, str(tmp_path / "run"), 0.01), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--time_budget 0.01 min leaves 0 s" in run.stderr and "give more minutes" in run.stderr


def test_the_length_that_fits_counts_the_steps_and_an_evaluation_per_epoch_end(monkeypatch):
    from vit_jax import budget

    monkeypatch.setattr(budget.time, "time", lambda: 1000.0)
    b = budget.Budget(10.0, started=1000.0)  # 600 s, 590 s to plan after the end's 10
    usable = 590 * budget.SAFETY
    assert usable == pytest.approx(572.3)
    # Steps of 1 s, epochs of 100 steps, 2 s for each epoch end: 560 steps cross 6 epoch ends
    # (560 + 12 = 572 s); 561 would take 573 s.
    assert b.total_steps(0, 100, 1.0, 2.0) == 560
    # From step 250 (mid-epoch 3): 250 + 560 = 810, crossing the ends of epochs 3 to 9 (560 + 14 > 572.3)...
    more = b.total_steps(250, 100, 1.0, 2.0) - 250
    assert more + 2 * (-(-(250 + more) // 100) - 2) <= usable < more + 1 + 2 * (-(-(251 + more) // 100) - 2)
    # Nothing fits: the run ends where it is.
    assert b.total_steps(42, 100, 1000.0, 2.0) == 42
    monkeypatch.setattr(budget.time, "time", lambda: 1600.0)  # past the deadline
    assert b.total_steps(42, 100, 1.0, 2.0) == 42
    with pytest.raises(budget.UserError, match="leaves 0 s after start-up"):
        b.check_time_left()


def test_a_budget_that_shortens_the_run_shortens_its_warm_up():
    cfg = TrainConfig(epochs=10, schedule="cosine", warmup_epochs=1.0)
    assert int(step.Schedule.of(cfg, 100).warmup_steps) == 100
    assert int(step.Schedule.of(cfg, 100, total_steps=150).warmup_steps) == 75  # half the run at most
    assert int(step.Schedule.of(cfg, 100, total_steps=5000).warmup_steps) == 100
