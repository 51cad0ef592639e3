"""The PyTorch twin and the weight port: key by key, bit-exact round trips, strictness, and agreement
of logits, stages, gradients and AdamW steps with the Flax model."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util

from parity import compare, port
from parity.model import DropPath, VisionTransformer as TorchViT, gelu
from vit_jax import step
from vit_jax.config import MODELS, TrainConfig
from vit_jax.devices import DataParallel
from vit_jax.errors import UserError
from vit_jax.model import VisionTransformer as FlaxViT, count_params, init_params

# Tiny models gain nothing from more threads, and on a busy CPU torch's threads wait on each other.
torch.set_num_threads(1)

CFG = MODELS["test"]
TOL = 1e-5  # the `test` recipe's tolerance in parity.compare


@pytest.fixture(scope="module")
def random_params():
    return jax.device_get(jax.jit(lambda key: init_params(CFG, key))(jax.random.key(0)))


@pytest.fixture(scope="module")
def trained_params(random_params):
    """`test` weights after 40 AdamW steps at a high rate, far from their initialization."""
    cfg = TrainConfig(recipe="test", lr=3e-3)
    mesh = DataParallel.create(32)
    state = mesh.replicate(step.create_train_state(CFG, cfg, params=random_params))
    train_fn = step.jit_train_step(mesh, step.Settings(CFG.img_size), step.Schedule.of(cfg, 100))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 32).astype(np.int32)
    images = np.clip(labels[:, None, None, None] * 25 + rng.integers(0, 30, (32, 32, 32, 3)), 0, 255)
    batch = mesh.put_batch(images.astype(np.uint8), labels, np.ones(32, np.float32))
    for _ in range(40):
        state, _ = train_fn(state, mesh.replicate(step.zero_metrics()), *batch, jax.random.key(0))
    return jax.device_get(state.params)


def _images(n=8, seed=0, size=32):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)  # NHWC


def _both(params, x, cfg=CFG):
    """(Flax stages, PyTorch stages) of the same NHWC images, as numpy."""
    _, stages_j = FlaxViT(cfg).apply({"params": params}, x, return_stages=True)
    model = compare.torch_twin(cfg, params)
    with torch.no_grad():
        _, stages_t = model(compare.nchw(x), return_stages=True)
    return jax.device_get(stages_j), {k: v.numpy() for k, v in stages_t.items()}


# The twin ----------------------------------------------------------------------------------------


def test_state_dict_keys_are_timms_and_the_table_covers_each_once():
    model = TorchViT.from_config(CFG)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    rows = port.table(CFG)
    assert sorted(r.torch for r in rows) == sorted(shapes)  # every key, exactly once
    flax = port.flax_shapes(CFG)
    assert sorted(r.flax for r in rows) == sorted(flax)
    for r in rows:  # the transform maps each Flax shape onto the PyTorch shape
        assert port._permute(flax[r.flax], r.transform.to_torch) == shapes[r.torch], r
    assert {k.split(".", 2)[-1] for k in shapes if k.startswith("blocks.1.")} == {
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
        "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias"}
    assert {k for k in shapes if not k.startswith("blocks.")} == {
        "patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed",
        "norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert {r.transform.name for r in rows} == {"conv", "dense", "identity"}


def test_constructor_as_users_call_it_builds_the_tutorial_model():
    with torch.device("meta"):  # shapes only
        model = TorchViT(img_size=224, patch_size=16, num_classes=10, embed_dim=384, depth=6, num_heads=6)
    assert model.config == MODELS["tutorial"]
    assert sum(p.numel() for p in model.parameters()) == 11_022_730
    assert TorchViT.from_config(CFG).config == CFG
    with pytest.raises(UserError, match="not divisible by num_heads"):
        TorchViT(embed_dim=100, num_heads=6)


def test_pinned_defaults_and_mirrored_attribute_names():
    model = TorchViT.from_config(dataclasses.replace(CFG, drop_path_rate=0.2))
    block = model.blocks[1]
    assert block.norm1.eps == 1e-6 and model.norm.eps == 1e-6
    assert block.drop_path1.rate == pytest.approx(0.2) and model.blocks[0].drop_path1.rate == 0.0
    for name in ("norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2"):
        assert hasattr(block, name)
    for name in ("fc1", "drop1", "fc2", "drop2"):
        assert hasattr(block.mlp, name)
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(gelu(x), 0.5 * x * (1 + torch.erf(x / 2**0.5)))  # erf, not tanh


def test_stage_names_and_shapes_match_the_flax_model(random_params):
    stages_j, stages_t = _both(random_params, _images(3))
    assert list(stages_t) == ["embed", "block00", "block01", "norm", "logits"]
    assert sorted(stages_j) == sorted(stages_t)
    for name in stages_t:
        assert stages_t[name].shape == stages_j[name].shape


def test_drop_path_drops_whole_samples_and_rescales():
    drop = DropPath(0.5).train()
    torch.manual_seed(0)
    y = drop(torch.ones(64, 5, 3))
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert bool((per_sample == per_sample[:, :1]).all())  # one decision per sample
    assert torch.equal(drop.eval()(torch.ones(4, 5, 3)), torch.ones(4, 5, 3))


# The port -----------------------------------------------------------------------------------------


def test_flax_torch_flax_round_trip_is_bit_exact(trained_params):
    state_dict = port.flax_to_torch(trained_params, CFG)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in state_dict.values())
    back = port.torch_to_flax(state_dict, CFG)
    assert jax.tree.structure(back) == jax.tree.structure(trained_params)
    jax.tree.map(np.testing.assert_array_equal, back, trained_params)


def test_torch_flax_torch_round_trip_is_bit_exact():
    torch.manual_seed(0)
    state_dict = TorchViT.from_config(CFG).state_dict()
    back = port.flax_to_torch(port.torch_to_flax(state_dict, CFG), CFG)
    assert list(back) == [r.torch for r in port.table(CFG)]
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key].numpy(), value.numpy(), err_msg=key)


def test_each_key_lands_where_the_table_says(random_params):
    state_dict = port.flax_to_torch(random_params, CFG)
    p = random_params
    np.testing.assert_array_equal(state_dict["blocks.1.attn.qkv.weight"], p["blocks_1"]["attn"]["qkv"]["kernel"].T)
    np.testing.assert_array_equal(state_dict["blocks.0.norm2.weight"], p["blocks_0"]["norm2"]["scale"])
    np.testing.assert_array_equal(state_dict["patch_embed.proj.weight"],
                                  p["patch_embed"]["proj"]["kernel"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(state_dict["pos_embed"], p["pos_embed"])
    assert sum(t.numel() for t in state_dict.values()) == count_params(p) == 24_234


@pytest.mark.parametrize("edit, named", [
    (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), ["missing 'blocks.1.mlp.fc2.bias'"]),
    (lambda sd: sd.update({"blocks.0.attn.q_norm.weight": torch.ones(16)}), ["unexpected 'blocks.0.attn.q_norm.weight'"]),
    (lambda sd: sd.update({"head.weight": torch.zeros(11, 32)}), ["'head.weight' has shape (11, 32), the model needs (10, 32)"]),
    (lambda sd: (sd.pop("norm.weight"), sd.pop("cls_token")), ["missing 'norm.weight'", "missing 'cls_token'"]),
])
def test_torch_to_flax_refuses_what_does_not_fit_and_names_every_key(edit, named):
    state_dict = dict(TorchViT.from_config(CFG).state_dict())
    edit(state_dict)
    with pytest.raises(UserError) as e:
        port.torch_to_flax(state_dict, CFG)
    for text in named:
        assert text in str(e.value)


def test_flax_to_torch_refuses_what_does_not_fit(random_params):
    flat = traverse_util.flatten_dict(random_params, sep="/")
    del flat["blocks_0/mlp/fc1/bias"]
    flat["blocks_0/attn/qkv/kernel"] = np.zeros((32, 95), np.float32)
    with pytest.raises(UserError, match=r"2 differences: 'blocks_0/attn/qkv/kernel' has shape .*; missing 'blocks_0/mlp/fc1/bias'"):
        port.flax_to_torch(traverse_util.unflatten_dict(flat, sep="/"), CFG)
    with pytest.raises(UserError, match="unexpected 'blocks_2/norm1/scale'"):
        port.flax_to_torch({**random_params, "blocks_2": {"norm1": {"scale": np.ones(32)}}}, CFG)


def test_integer_weights_are_refused():
    state_dict = dict(TorchViT.from_config(CFG).state_dict())
    state_dict["head.bias"] = torch.zeros(10, dtype=torch.int64)
    with pytest.raises(UserError, match="'head.bias' has dtype torch.int64"):
        port.torch_to_flax(state_dict, CFG)


# Agreement ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["random_params", "trained_params"])
def test_logits_and_every_stage_agree(weights, request):
    params = request.getfixturevalue(weights)
    stages_j, stages_t = _both(params, _images(8))
    for name in stages_t:
        np.testing.assert_allclose(stages_t[name], stages_j[name], rtol=0, atol=TOL, err_msg=name)
    assert (stages_t["logits"].argmax(-1) == stages_j["logits"].argmax(-1)).all()


def test_tutorial_model_agrees_within_its_tolerance():
    cfg = MODELS["tutorial"]
    rng = np.random.default_rng(1)  # random weights of init's scale, without tracing an init
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(1)))
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape, np.float32) * 0.05).astype(np.float32), shapes)
    stages_j, stages_t = _both(params, _images(2, size=224), cfg)
    np.testing.assert_allclose(stages_t["logits"], stages_j["logits"], rtol=0, atol=compare.TOLERANCE["tutorial"])


def _train_batches(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)


def test_one_batch_gradients_agree(trained_params):
    images, labels = _train_batches()
    cfg = TrainConfig(recipe="test", lr=1e-3)
    r = compare.train_parity(trained_params, compare.torch_twin(CFG, trained_params), CFG, cfg, images, labels,
                             steps=1, batch_size=32, steps_per_epoch=1)
    assert r["grad_rel_diff"] <= 1e-5


@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
def test_optimizer_steps_agree_given_the_same_gradients(trained_params, optimizer):
    """optax's AdamW (vit_jax.step.make_optimizer) and torch.optim.AdamW, or optax.lion and parity.lion,
    fed identical gradients for six steps over three epochs of the stepped cosine, with and without decay_all."""
    rng = np.random.default_rng(0)
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 1e-2, trained_params)
             for _ in range(6)]
    for decay_all in (True, False):
        cfg = TrainConfig(recipe="test", optimizer=optimizer, lr=1e-3, weight_decay=0.1, epochs=3, decay_all=decay_all)
        tx, schedule = step.make_optimizer(cfg), step.Schedule.of(cfg, steps_per_epoch=2)
        params, opt_state = trained_params, tx.init(trained_params)
        model = compare.torch_twin(CFG, trained_params)
        optimizer = compare._torch_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
        weights = dict(model.named_parameters())
        for i, g in enumerate(grads):
            params, opt_state = step.adamw_update(tx, params, opt_state, g, schedule(i))
            for key, value in port.flax_to_torch(g, CFG).items():
                weights[key].grad = value
            optimizer.step()
            if (i + 1) % 2 == 0:
                scheduler.step()
        for key, value in port.flax_to_torch(params, CFG).items():
            np.testing.assert_allclose(weights[key].detach().numpy(), value.numpy(), rtol=0, atol=1e-3 * cfg.lr,
                                       err_msg=f"{key}, decay_all={decay_all}")
        moved = max(float(np.abs(a - b).max())
                    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trained_params)))
        assert moved > cfg.lr  # the check is not vacuous: far beyond its tolerance


def test_twenty_training_steps_stay_within_the_tolerance(trained_params):
    images, labels = _train_batches(n=64, seed=1)
    cfg = TrainConfig(recipe="test", decay_all=False)
    r = compare.train_parity(trained_params, compare.torch_twin(CFG, trained_params), CFG, cfg, images, labels,
                             steps=20, batch_size=16, steps_per_epoch=5)
    lrs = [row["lr_torch"] for row in r["losses"]]
    assert lrs[0] == lrs[4] > lrs[5] == lrs[9] > lrs[10]  # the cosine, stepped per epoch, on both sides
    assert r["max_lr_diff_over_peak"] <= compare.LR_TOLERANCE
    np.testing.assert_allclose([row["torch_loss"] for row in r["losses"]], [row["jax_loss"] for row in r["losses"]],
                               atol=1e-4)
    assert r["param_drift"] <= compare.TRAIN_TOLERANCE and r["passed"], r

    # With --grad_clip (the fast recipe's): both sides clip, and the paths are still the same path.
    clipped = compare.train_parity(trained_params, compare.torch_twin(CFG, trained_params), CFG,
                                   dataclasses.replace(cfg, grad_clip=0.05), images, labels, steps=20, batch_size=16,
                                   steps_per_epoch=5)
    assert clipped["param_drift"] <= compare.TRAIN_TOLERANCE and clipped["passed"], clipped
    assert abs(clipped["losses"][-1]["jax_loss"] - r["losses"][-1]["jax_loss"]) > 1e-3  # the clip did act


def test_lions_training_check_judges_the_gradients_not_the_paths(trained_params, monkeypatch):
    """Lion's paths part through the sign of float32 noise (on a trained CIFAR model 0.9% of the first
    gradients differ in sign and the parameters part by ~1e-1 in 20 steps), so parity.compare judges
    its gradients and schedule and reports the drift; Lion's update is the test above's. A mismatched
    loss still fails the check."""
    images, labels = _train_batches(n=64, seed=1)
    cfg = TrainConfig(recipe="test", optimizer="lion", lr=1e-4, weight_decay=0.5, decay_all=False, grad_clip=1.0)
    r = compare.train_parity(trained_params, compare.torch_twin(CFG, trained_params), CFG, cfg, images, labels,
                             steps=20, batch_size=16, steps_per_epoch=5)
    assert r["passed"] and not r["drift_judged"] and 0 <= r["first_grad_signs_apart"] < 0.1, r
    assert r["losses"][-1]["jax_loss"] != r["losses"][0]["jax_loss"]
    monkeypatch.setattr(compare.F, "cross_entropy", lambda logits, y: compare.F.mse_loss(
        logits, compare.F.one_hot(y, logits.shape[-1]).float()))
    r = compare.train_parity(trained_params, compare.torch_twin(CFG, trained_params), CFG, cfg, images, labels,
                             steps=2, batch_size=16, steps_per_epoch=5)
    assert not r["passed"]


def test_the_attention_key_bias_has_no_gradient(trained_params):
    """Why parity.compare does not judge the key bias: softmax ignores what it adds, so its exact
    gradient is 0 and both frameworks compute float32 noise that Adam then amplifies."""
    x = _images(16)
    y = np.arange(16) % 10
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        FlaxViT(CFG).apply({"params": p}, x), y).mean()
    grads = jax.jit(jax.grad(loss))(trained_params)
    for i in range(CFG.depth):
        bias = np.abs(grads[f"blocks_{i}"]["attn"]["qkv"]["bias"])  # (3 D,): q | k | v
        D = CFG.embed_dim
        assert bias[D:2 * D].max() < 1e-6 * bias.max()


def test_a_mismatched_optimizer_is_caught(random_params, monkeypatch):
    """The training check has teeth: PyTorch's Adam (L2 decay) in place of AdamW fails it."""
    images, labels = _train_batches(n=16)
    monkeypatch.setattr(compare, "_torch_optimizer", lambda model, cfg: torch.optim.Adam(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay))
    r = compare.train_parity(random_params, compare.torch_twin(CFG, random_params), CFG, TrainConfig(recipe="test"),
                             images, labels, steps=4, batch_size=16, steps_per_epoch=2)
    assert r["grad_rel_diff"] <= 1e-5 and not r["passed"]


# Pooling without the class token (timm's global_pool='avg', class_token=False) --------------------

POOLED = [dataclasses.replace(CFG, class_token=False, global_pool="avg"),
          dataclasses.replace(CFG, global_pool="avg")]


@pytest.mark.parametrize("cfg", POOLED, ids=["avg", "avg+cls"])
def test_pooled_models_agree_and_port_with_timms_keys(cfg):
    model = TorchViT(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                     class_token=cfg.class_token, global_pool="avg")  # timm's constructor arguments
    assert model.config == cfg
    keys = {k for k in model.state_dict() if not k.startswith("blocks.")}
    assert keys == {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "fc_norm.weight",
                    "fc_norm.bias", "head.weight", "head.bias"} | ({"cls_token"} if cfg.class_token else set())
    assert model.state_dict()["pos_embed"].shape == (1, 16 + cfg.class_token, 32)
    params = port.torch_to_flax(model.state_dict(), cfg)
    assert count_params(params) == sum(t.numel() for t in model.state_dict().values())
    jax.tree.map(np.testing.assert_array_equal, port.torch_to_flax(port.flax_to_torch(params, cfg), cfg), params)
    stages_j, stages_t = _both(params, _images(8), cfg)
    assert list(stages_t) == ["embed", "block00", "block01", "pool", "logits"]
    for name in stages_t:
        np.testing.assert_allclose(stages_t[name], stages_j[name], rtol=0, atol=TOL, err_msg=name)


def test_avg_pooling_is_the_mean_of_the_patch_tokens_through_fc_norm():
    cfg = POOLED[1]  # with a class token, which the mean leaves out
    params = init_params(cfg, jax.random.key(0))
    x = _images(2)
    logits, stages = FlaxViT(cfg).apply({"params": params}, x, return_stages=True)
    tokens = np.asarray(stages["block01"])[:, 1:]  # (B, 16, D), the class token left out
    mean = tokens.mean(axis=1)
    normed = (mean - mean.mean(-1, keepdims=True)) / np.sqrt(mean.var(-1, keepdims=True) + 1e-6)
    pooled = normed * np.asarray(params["fc_norm"]["scale"]) + np.asarray(params["fc_norm"]["bias"])
    np.testing.assert_allclose(stages["pool"], pooled, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, pooled @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"]),
                               rtol=1e-5, atol=1e-5)


def test_the_class_token_is_needed_for_token_pooling():
    with pytest.raises(UserError, match="global_pool token reads the class token"):
        dataclasses.replace(CFG, class_token=False).validate()


# The convolutional stem (stem conv; timm's HybridEmbed over a Conv2d/GELU backbone) ---------------

CONV = dataclasses.replace(CFG, stem="conv", class_token=False, global_pool="avg")


def test_conv_stem_twin_has_hybrid_embeds_keys_and_agrees_stage_by_stage():
    model = TorchViT(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                     class_token=False, global_pool="avg", stem="conv")
    assert model.config == CONV
    stem = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("patch_embed.")}
    assert stem == {"patch_embed.backbone.0.weight": (8, 3, 3, 3), "patch_embed.backbone.0.bias": (8,),
                    "patch_embed.backbone.2.weight": (16, 8, 3, 3), "patch_embed.backbone.2.bias": (16,),
                    "patch_embed.backbone.4.weight": (32, 16, 3, 3), "patch_embed.backbone.4.bias": (32,),
                    "patch_embed.proj.weight": (32, 32, 1, 1), "patch_embed.proj.bias": (32,)}
    params = port.torch_to_flax(model.state_dict(), CONV)
    assert count_params(params) == sum(t.numel() for t in model.state_dict().values())
    jax.tree.map(np.testing.assert_array_equal, port.torch_to_flax(port.flax_to_torch(params, CONV), CONV), params)
    stages_j, stages_t = _both(params, _images(8), CONV)
    for name in stages_t:
        np.testing.assert_allclose(stages_t[name], stages_j[name], rtol=0, atol=TOL, err_msg=name)


def test_conv_stem_trains_alike_in_both_frameworks():
    params = jax.device_get(init_params(CONV, jax.random.key(3)))
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 32).astype(np.int32)
    r = compare.train_parity(params, compare.torch_twin(CONV, params), CONV, TrainConfig(recipe="test"),
                             images, labels, steps=4, batch_size=16, steps_per_epoch=2)
    assert r["passed"], r


def test_conv_stem_export_loads_strictly_into_timms_vision_transformer(timm):
    """The README's constructor: timm's VisionTransformer with embed_layer=partial(HybridEmbed, backbone=...)."""
    import functools
    from parity.model import conv_stem
    from parity.pretrained import timm_architecture

    params = jax.device_get(init_params(CONV, jax.random.key(4)))
    state = port.flax_to_torch(params, CONV)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.GELU(), torch.nn.Conv2d(8, 16, 3, 2, 1),
                                   torch.nn.GELU(), torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.GELU())
    assert str(backbone) == str(conv_stem(CONV))
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=1, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
        class_token=False, global_pool="avg",
        embed_layer=functools.partial(timm.layers.HybridEmbed, backbone=backbone)).eval()
    reference.load_state_dict(state, strict=True)
    x = _images(4)
    with torch.no_grad():
        theirs = reference(compare.nchw(x)).numpy()
    np.testing.assert_allclose(theirs, np.asarray(FlaxViT(CONV).apply({"params": params}, x)), rtol=0, atol=TOL)
    assert timm_architecture({k: tuple(v.shape) for k, v in state.items()}, "stem.pth", num_heads=2) == CONV


def test_patch_dropout_twin_keeps_timms_count_and_the_class_token():
    from parity.model import PatchDropout

    x = torch.randn(5, 1 + 16, 4)
    module = PatchDropout(0.3, 1)
    assert torch.equal(module.eval()(x), x)
    out = module.train()(x)
    assert out.shape == (5, 1 + 11, 4) and torch.equal(out[:, 0], x[:, 0])
    for image, tokens in zip(x[:, 1:], out[:, 1:]):
        where = [int(torch.nonzero((image == t).all(-1))[0]) for t in tokens]
        assert len(set(where)) == len(where)
    model = TorchViT(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                     patch_drop_rate=0.5)
    assert model.config == dataclasses.replace(CFG, patch_drop_rate=0.5)
    # A call's rate, as the Flax model's (the token schedule): 8 of the 16 tokens instead of the config's 12.
    quarter = TorchViT.from_config(dataclasses.replace(CFG, patch_drop_rate=0.25)).train()
    images = torch.randn(3, 3, 32, 32)
    assert quarter(images, return_stages=True)[1]["block00"].shape == (3, 1 + 12, 32)
    assert quarter(images, return_stages=True, patch_drop_rate=0.5)[1]["block00"].shape == (3, 1 + 8, 32)
    assert quarter.eval()(images, return_stages=True, patch_drop_rate=0.5)[1]["block00"].shape == (3, 1 + 16, 32)


def test_the_readmes_timm_constructor_takes_a_fast_export_strictly(timm):
    """The README's code block that builds timm's VisionTransformer for the fast recipe, run as written."""
    import os
    import re

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "HybridEmbed" in b]
    namespace = {}
    exec(block, namespace)
    cfg = MODELS["fast"]
    params = jax.device_get(init_params(cfg, jax.random.key(5)))
    reference = namespace["model"].eval()
    reference.load_state_dict(port.flax_to_torch(params, cfg), strict=True)
    twin = compare.torch_twin(cfg, params)
    assert twin.config == cfg
    x = _images(4)
    with torch.no_grad():
        np.testing.assert_allclose(reference(compare.nchw(x)).numpy(), twin(compare.nchw(x)).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(reference(compare.nchw(x)).detach().numpy(),
                               np.asarray(FlaxViT(cfg).apply({"params": params}, x)), rtol=0, atol=TOL)
