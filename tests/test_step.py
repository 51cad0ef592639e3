"""Optimizer, schedule and the jitted train step."""

import math

import jax
import numpy as np
import optax
import pytest

from vit_jax import step
from vit_jax.config import MODELS, TrainConfig
from vit_jax.devices import DataParallel
from vit_jax.errors import UserError


def test_epoch_cosine_is_pytorchs_cosine_annealing_stepped_per_epoch():
    cfg = TrainConfig(lr=3e-4, epochs=20)
    schedule = step.Schedule.of(cfg, steps_per_epoch=782)
    for epoch in range(20):
        expected = 3e-4 * (1 + math.cos(math.pi * epoch / 20)) / 2  # CosineAnnealingLR, eta_min 0
        for s in (epoch * 782, epoch * 782 + 781):  # constant within the epoch
            assert float(schedule(s)) == pytest.approx(expected, rel=1e-5)
            assert step.learning_rate(schedule, s) == pytest.approx(expected, rel=1e-5)  # what the logs record
    assert float(schedule(0)) == pytest.approx(3e-4)  # epoch 1 runs at the full rate


def test_per_step_cosine_with_warmup():
    cfg = TrainConfig(lr=1e-3, epochs=10, schedule="cosine", warmup_epochs=1)
    schedule = step.Schedule.of(cfg, steps_per_epoch=100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(50)) == pytest.approx(5e-4)
    assert float(schedule(100)) == pytest.approx(1e-3)
    assert float(schedule(1000)) == pytest.approx(0.0, abs=1e-9)
    assert float(schedule(101)) < 1e-3
    assert [step.learning_rate(schedule, s) for s in (0, 50, 100)] == pytest.approx([0.0, 5e-4, 1e-3])


def test_the_update_is_optaxs_adamw_with_its_schedule_inside():
    """The rate scales AdamW's update from outside (so that it can be an argument of the compiled step):
    the parameters optax's own AdamW gives with its schedules inside, to float32 rounding of the rate."""
    params = step.init_params(MODELS["test"], jax.random.key(0))
    rng = np.random.default_rng(0)
    for cfg, inside in (
            (TrainConfig(lr=1e-3, epochs=3), lambda c: optax.cosine_decay_schedule(1e-3, 3)(c // 4)),
            (TrainConfig(lr=1e-3, epochs=3, schedule="cosine", warmup_epochs=1, decay_all=False),
             optax.warmup_cosine_decay_schedule(0.0, 1e-3, 4, 12, 0.0))):
        tx, schedule = step.make_optimizer(cfg), step.Schedule.of(cfg, steps_per_epoch=4)
        ref = optax.adamw(inside, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay,
                          mask=None if cfg.decay_all else step.decay_mask)
        ours, theirs = (params, tx.init(params)), (params, ref.init(params))
        for i in range(12):
            grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 1e-2, params)
            assert float(schedule(i)) == pytest.approx(float(inside(i)), rel=1e-6, abs=1e-12)
            ours = step.adamw_update(tx, *ours, grads, schedule(i))
            updates, state = ref.update(grads, theirs[1], theirs[0])
            theirs = (optax.apply_updates(theirs[0], updates), state)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-8), ours[0], theirs[0])
        assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ours[0]), jax.tree.leaves(params))) > 1e-3


def test_runs_that_differ_only_in_their_schedule_share_one_compiled_step():
    mesh = DataParallel.create(32)
    batch = _batch(mesh)
    starts, moved = [], []
    fns = [step.jit_train_step(mesh, step.Settings(32), step.Schedule.of(TrainConfig(lr=lr, epochs=e), spe))
           for lr, e, spe in ((1e-3, 2, 10), (2e-3, 7, 33))]
    assert fns[0].jitted is fns[1].jitted
    compiled = []  # how many programs the one jitted step holds after each run
    for fn in fns:
        state = mesh.replicate(step.create_train_state(MODELS["test"], TrainConfig(recipe="test", weight_decay=0.0)))
        starts.append(jax.device_get(state.params))
        state, _ = fn(state, mesh.replicate(step.zero_metrics()), *batch, jax.random.key(0))
        moved.append(jax.tree.map(np.subtract, jax.device_get(state.params), starts[-1]))
        compiled.append(fn.jitted._cache_size())
    assert compiled[1] == compiled[0]  # the second schedule did not compile again
    # The first AdamW step moves each parameter by about the rate: twice as far at twice the rate.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, 2 * a, rtol=1e-4, atol=1e-9), *moved)


def test_decay_mask_spares_biases_norms_and_embeddings():
    params = step.init_params(MODELS["test"], jax.random.key(0))
    mask = step.decay_mask(params)
    assert mask["blocks_0"]["attn"]["qkv"]["kernel"] and mask["patch_embed"]["proj"]["kernel"]
    assert not mask["blocks_0"]["attn"]["qkv"]["bias"]
    assert not mask["blocks_0"]["norm1"]["scale"] and not mask["norm"]["bias"]
    assert not mask["cls_token"] and not mask["pos_embed"]


def _batch(mesh, n=32, seed=0):
    """Images whose brightness gives away the label, plus noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = np.clip(labels[:, None, None, None] * 25 + rng.integers(0, 30, (n, 32, 32, 3)), 0, 255)
    return mesh.put_batch(images.astype(np.uint8), labels, np.ones(n, np.float32))


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    cfg = TrainConfig(recipe="test", lr=3e-3, weight_decay=0.0)
    mesh = DataParallel.create(32)
    state = mesh.replicate(step.create_train_state(MODELS["test"], cfg))
    train_fn = step.jit_train_step(mesh, step.Settings(32), step.Schedule.of(cfg, 100))
    eval_fn = step.jit_eval_step(mesh, MODELS["test"])
    batch = _batch(mesh)

    def eval_loss(state):
        m = eval_fn(state.params, mesh.replicate(step.zero_metrics()), *batch)
        return float(m["loss"] / m["count"])

    before = eval_loss(state)
    for _ in range(60):
        state, metrics = train_fn(state, mesh.replicate(step.zero_metrics()), *batch, jax.random.key(0))
        assert np.isfinite(float(metrics["loss"]))
    after = eval_loss(state)
    assert int(state.step) == 60
    assert after < 0.8 * before, (before, after)


def test_padding_examples_carry_no_weight():
    """A batch padded with junk under mask 0 gives the update of the real examples alone."""
    cfg = TrainConfig(recipe="test")
    mesh = DataParallel.create(8)
    train_fn = step.jit_train_step(mesh, step.Settings(32), step.Schedule.of(cfg, 10))
    images, labels, mask = (np.asarray(a) for a in _batch(mesh, n=8))
    padded_mask = mask.copy()
    padded_mask[6:] = 0
    junk = images.copy()
    junk[6:] = 255 - junk[6:]
    results = []
    for imgs in (images, junk):
        state = mesh.replicate(step.create_train_state(MODELS["test"], cfg))
        state, m = train_fn(state, mesh.replicate(step.zero_metrics()),
                            *mesh.put_batch(imgs, labels, padded_mask), jax.random.key(0))
        results.append((state.params, m))
    assert float(results[0][1]["count"]) == 6.0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 results[0][0], results[1][0])


def test_batch_that_devices_cannot_split_is_refused(monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    with pytest.raises(UserError, match="multiple of 8"):
        DataParallel.create(60)


def test_gradient_accumulation_gives_the_updates_of_the_whole_batch():
    """--grad_accum 4: four micro-batches of 8 through the model, one update; the same parameters and
    running sums as one batch of 32, step after step, to float32 rounding. Likewise the CPU's default,
    two micro-batches of 16 (272 tokens each)."""
    results = {}
    for k in (1, 4, None):
        cfg = TrainConfig(recipe="test", lr=3e-3, grad_accum=k, batch_size=32)
        mesh = DataParallel.create(32)
        state = mesh.replicate(step.create_train_state(MODELS["test"], cfg))
        settings = step.Settings.of(MODELS["test"], cfg)
        assert settings.grad_accum == (k or 2)
        train_fn = step.jit_train_step(mesh, settings, step.Schedule.of(cfg, 100))
        metrics = mesh.replicate(step.zero_metrics())
        images, labels, mask = (np.array(a) for a in _batch(mesh))
        mask[-3:] = 0  # padding, which must weigh nothing in either
        for i in range(5):
            state, metrics = train_fn(state, metrics, *mesh.put_batch(images, labels, mask), jax.random.key(i))
        results[k] = jax.device_get((state.params, metrics))
    params_1, metrics_1 = results[1]
    for params_k, metrics_k in (results[4], results[None]):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params_k), jax.tree.leaves(params_1)):
            if len(path) > 1 and path[-2].key == "qkv" and path[-1].key == "bias":
                # The key biases' exact gradient is 0 (softmax ignores what they add to all of a query's
                # logits alike), so Adam turns rounding noise into steps of ~lr: compare q and v only.
                d = a.shape[0] // 3
                a, b = np.concatenate([a[:d], a[2 * d:]]), np.concatenate([b[:d], b[2 * d:]])
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
        for name in ("loss", "correct", "count"):
            np.testing.assert_allclose(metrics_k[name], metrics_1[name], rtol=1e-5)
        assert float(metrics_k["count"]) == 5 * 29


def test_the_cpu_takes_a_batch_in_micro_batches_of_at_most_512_tokens_per_device(monkeypatch):
    """The default micro-batches: the fewest whose share on each device has at most 512 tokens on the
    CPU, one batch elsewhere; --grad_accum, when given, is taken as it is."""
    k = lambda recipe, batch, accum=None: step.micro_batches(MODELS[recipe], TrainConfig(batch_size=batch,
                                                                                         grad_accum=accum))
    assert jax.default_backend() == "cpu" and jax.device_count() == 1
    assert k("cifar", 64) == 16  # 65 tokens: 4 images, 260 tokens (8 would be 520)
    assert k("tutorial", 64) == 32  # 197 tokens: 2 images, 394 tokens
    assert k("fast", 64) == 2  # 16 tokens: 32 images, 512 tokens
    assert k("test", 16) == 1 and k("test", 90) == 3  # 17 tokens: 16 images, 272; 30 images, 510
    assert k("tutorial", 3) == 3  # not even one image fits: one each
    assert k("cifar", 64, 1) == 1 and k("cifar", 64, 2) == 2
    monkeypatch.setattr(jax, "device_count", lambda: 4)  # 16 images per device
    assert k("cifar", 64) == 4
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert k("cifar", 64) == 1 and k("tutorial", 64) == 1 and k("cifar", 64, 2) == 2
