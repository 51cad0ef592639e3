"""The Flax ViT: exact parameter counts, output and stage shapes, dropout knobs."""

import dataclasses

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.config import MODELS
from vit_jax.errors import UserError
from vit_jax.model import VisionTransformer, count_params, init_params

EXPECTED_PARAMS = {
    "tutorial": 11_022_730,  # the tutorial's model (it prints 21.67M, the 12-layer count: vit_s16 below)
    "finetune": 11_022_730,  # the tutorial's model, for want of flags: a fine-tuned model's come from its checkpoint
    "cifar": 4_771_082,
    "test": 24_234,
    "fast": 908_234,
    "vit_ti16": 5_526_346,
    "vit_s16": 21_669_514,
    "vit_b16": 85_806_346,
}


@pytest.mark.parametrize("recipe", sorted(MODELS))
def test_parameter_count(recipe):
    shapes = jax.eval_shape(lambda: init_params(MODELS[recipe], jax.random.key(0)))
    assert count_params(shapes) == EXPECTED_PARAMS[recipe]


def test_seed_count_by_hand():
    D, N, L, C, p = 384, 196, 6, 10, 16
    block = 2 * 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D)
    total = (p * p * 3 * D + D) + D + (N + 1) * D + L * block + 2 * D + (D * C + C)
    assert total == EXPECTED_PARAMS["tutorial"]


def test_named_submodules():
    params = init_params(MODELS["test"], jax.random.key(0))
    assert set(params) == {"patch_embed", "cls_token", "pos_embed", "blocks_0", "blocks_1", "norm", "head"}
    assert set(params["blocks_0"]) == {"norm1", "attn", "norm2", "mlp"}
    assert set(params["blocks_0"]["attn"]) == {"qkv", "proj"}
    assert set(params["blocks_0"]["mlp"]) == {"fc1", "fc2"}


def test_output_and_stage_shapes():
    cfg = MODELS["test"]
    model = VisionTransformer(cfg)
    params = init_params(cfg, jax.random.key(0))
    x = jnp.ones((3, 32, 32, 3))
    logits, stages = model.apply({"params": params}, x, return_stages=True)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    assert list(stages) == ["embed", "block00", "block01", "norm", "logits"]
    for name in ("embed", "block00", "block01", "norm"):
        assert stages[name].shape == (3, 16 + 1, 32)
    np.testing.assert_array_equal(stages["logits"], logits)
    assert np.all(np.isfinite(logits))


def test_attention_weights_are_sown():
    cfg = MODELS["test"]
    params = init_params(cfg, jax.random.key(0))
    _, state = VisionTransformer(cfg).apply({"params": params}, jnp.ones((2, 32, 32, 3)),
                                            mutable=["intermediates"])
    attn = state["intermediates"]["blocks_1"]["attn"]["attn"][0]
    assert attn.shape == (2, 2, 17, 17)
    np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-5)


def test_dropout_and_drop_path_only_in_training():
    cfg = dataclasses.replace(MODELS["test"], drop_rate=0.3, drop_path_rate=0.3)
    model = VisionTransformer(cfg)
    params = init_params(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    eval_a = model.apply({"params": params}, x)
    eval_b = model.apply({"params": params}, x)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(2)})
    train_b = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_b)


def test_bfloat16_compute_keeps_float32_params():
    cfg = dataclasses.replace(MODELS["test"], dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    logits = VisionTransformer(cfg).apply({"params": params}, jnp.ones((2, 32, 32, 3)))
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))


@pytest.mark.parametrize("fields, message", [
    (dict(img_size=30), "not divisible by patch_size"),
    (dict(embed_dim=33), "not divisible by num_heads"),
    (dict(depth=0), "depth must be positive"),
    (dict(drop_rate=1.0), "drop_rate"),
    (dict(dtype="float16"), "dtype"),
    (dict(stem="resnet"), "stem must be patch or conv"),
    (dict(stem="conv", patch_size=4, img_size=24, embed_dim=32), None),  # fine: 4 = 2^2, 24 / 4 = 6
    (dict(stem="conv", patch_size=6, img_size=24), "power of 2"),
    (dict(stem="conv", patch_size=1), "power of 2"),
    (dict(stem="conv", embed_dim=34, num_heads=2), "divisible by 4"),
])
def test_impossible_shapes_are_refused(fields, message):
    if message is None:
        dataclasses.replace(MODELS["test"], **fields).validate()
        return
    with pytest.raises(UserError, match=message):
        dataclasses.replace(MODELS["test"], **fields).validate()


def test_attention_kernel_is_chosen_from_backend_and_dtype(monkeypatch):
    from vit_jax.model import attention_implementation

    cfg = MODELS["test"]
    assert attention_implementation(cfg) == "xla"  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention_implementation(cfg) == "xla"  # float32: cuDNN's fused kernel takes 16-bit inputs
    assert attention_implementation(dataclasses.replace(cfg, dtype="bfloat16"), tokens=16) == "cudnn"
    assert attention_implementation(dataclasses.replace(cfg, dtype="bfloat16", attention="xla"), tokens=16) == "xla"
    # An odd number of tokens (a class token and an even grid: the tutorial's 197), which cuDNN refused
    tutorial = dataclasses.replace(MODELS["tutorial"], dtype="bfloat16")
    assert tutorial.num_tokens == 197 and attention_implementation(tutorial) == "xla"
    assert attention_implementation(tutorial, tokens=196) == "cudnn"
    assert attention_implementation(dataclasses.replace(MODELS["fast"], dtype="bfloat16"), tokens=12) == "cudnn"


def test_fused_attention_and_the_spelled_out_softmax_agree():
    """The path that trains (jax.nn.dot_product_attention) and the one that keeps the weights for the
    pictures compute the same function."""
    cfg = MODELS["test"]
    params = init_params(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    fused = VisionTransformer(cfg).apply({"params": params}, x)
    spelled, _ = VisionTransformer(cfg).apply({"params": params}, x, mutable=["intermediates"])
    np.testing.assert_allclose(fused, spelled, rtol=1e-5, atol=1e-6)


def test_the_patch_projection_is_the_strided_convolution():
    """Same parameters, same output and gradients as nn.Conv(D, (p, p), strides p, VALID)."""
    from vit_jax.model import PatchProjection

    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    conv = nn.Conv(16, (8, 8), strides=(8, 8), padding="VALID")
    params = conv.init(jax.random.key(2), x)
    mine = PatchProjection(16, 8)
    assert jax.tree.map(jnp.shape, mine.init(jax.random.key(2), x)) == jax.tree.map(jnp.shape, params)
    np.testing.assert_array_equal(mine.init(jax.random.key(2), x)["params"]["kernel"], params["params"]["kernel"])

    def loss(module, p):
        out = module.apply(p, x).reshape(2, -1, 16)  # the conv's (B, 4, 4, D) as (B, N, D)
        return jnp.sum(out * jnp.arange(out.size).reshape(out.shape) / out.size)

    np.testing.assert_allclose(mine.apply(params, x), conv.apply(params, x).reshape(2, 16, 16), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 jax.grad(lambda p: loss(mine, p))(params), jax.grad(lambda p: loss(conv, p))(params))


def test_the_stem_convolution_is_the_padded_strided_3x3_convolution():
    """Same parameters, same output and gradients as nn.Conv(F, (3, 3), strides 2, padding 1)."""
    from vit_jax.model import StridedConv3x3

    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 5))
    conv = nn.Conv(7, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    params = conv.init(jax.random.key(2), x)
    mine = StridedConv3x3(7)
    np.testing.assert_array_equal(mine.init(jax.random.key(2), x)["params"]["kernel"], params["params"]["kernel"])

    def loss(module, p):
        out = module.apply(p, x)
        return jnp.sum(out * jnp.arange(out.size).reshape(out.shape) / out.size)

    assert mine.apply(params, x).shape == (2, 8, 8, 7)
    np.testing.assert_allclose(mine.apply(params, x), conv.apply(params, x), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 jax.grad(lambda p: loss(mine, p))(params), jax.grad(lambda p: loss(conv, p))(params))


def test_the_conv_stem_halves_the_image_log2_patch_times_then_projects_each_pixel():
    from vit_jax.model import PatchEmbed, gelu

    cfg = dataclasses.replace(MODELS["fast"], stem="conv")
    assert cfg.stem_widths == [32, 64, 128]
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    params = PatchEmbed(cfg).init(jax.random.key(1), x)["params"]
    assert {k: v["kernel"].shape for k, v in params.items()} == {
        "backbone_0": (3, 3, 3, 32), "backbone_1": (3, 3, 32, 64), "backbone_2": (3, 3, 64, 128),
        "proj": (1, 1, 128, 128)}
    h = x
    for i in range(3):  # by hand: lax's convolution, exact GELU, then the 1x1 projection
        p = params[f"backbone_{i}"]
        h = jax.lax.conv_general_dilated(h, p["kernel"], (2, 2), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
        h = gelu(h)
    tokens = h.reshape(2, 16, 128) @ params["proj"]["kernel"][0, 0] + params["proj"]["bias"]
    np.testing.assert_allclose(PatchEmbed(cfg).apply({"params": params}, x), tokens, rtol=1e-4, atol=1e-5)


def test_gelu_is_the_exact_erf_form():
    from vit_jax.model import gelu

    x = np.linspace(-6, 6, 101)
    from math import erf
    expected = [0.5 * v * (1 + erf(v / 2 ** 0.5)) for v in x]
    np.testing.assert_allclose(gelu(jnp.asarray(x, jnp.float32)), expected, rtol=1e-6, atol=1e-6)
    # Flax's erfc form is closer in the far negative tail, where 1 + erf cancels; both are within
    # float32 rounding of the float64 value above.
    np.testing.assert_allclose(gelu(jnp.asarray(x, jnp.float32)), nn.gelu(jnp.asarray(x, jnp.float32), approximate=False),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("class_token", [False, True])
def test_patch_dropout_keeps_a_random_subset_of_each_images_patch_tokens_in_training_only(class_token):
    from vit_jax.model import PatchDropout

    B, N, D, prefix = 6, 16, 4, int(class_token)
    x = jax.random.normal(jax.random.key(0), (B, prefix + N, D))
    module = PatchDropout(0.3, prefix)
    np.testing.assert_array_equal(module.apply({}, x, deterministic=True), x)
    out = np.asarray(module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)}))
    assert out.shape == (B, prefix + int(N * 0.7), D)  # 11 of 16, timm's int(N * (1 - rate))
    np.testing.assert_array_equal(out[:, :prefix], np.asarray(x)[:, :prefix])  # the class token stays first
    kept = []
    for image, tokens in zip(np.asarray(x)[:, prefix:], out[:, prefix:]):
        where = [int(np.flatnonzero((image == t).all(-1))[0]) for t in tokens]  # each kept token is one of its own
        assert len(set(where)) == len(where)
        kept.append(tuple(where))
    assert len(set(kept)) == B  # each image draws its own subset


def test_patch_dropout_model_trains_on_fewer_tokens_and_evaluates_on_all():
    cfg = dataclasses.replace(MODELS["test"], patch_drop_rate=0.5, class_token=False, global_pool="avg")
    params = init_params(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    _, train_stages = VisionTransformer(cfg).apply({"params": params}, x, train=True, return_stages=True,
                                                   rngs={"dropout": jax.random.key(2)})
    _, eval_stages = VisionTransformer(cfg).apply({"params": params}, x, return_stages=True)
    assert train_stages["block00"].shape == (2, 8, 32) and eval_stages["block00"].shape == (2, 16, 32)


def test_a_calls_patch_drop_rate_is_a_model_built_with_that_rate():
    """The token schedule's early part: the rate given to the call, not the config's, decides the tokens."""
    cfg = dataclasses.replace(MODELS["test"], patch_drop_rate=0.25)
    params = init_params(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    run = lambda c, **kw: VisionTransformer(c).apply({"params": params}, x, train=True, return_stages=True,
                                                     rngs={"dropout": jax.random.key(2)}, **kw)
    logits, stages = run(cfg, patch_drop_rate=0.5)
    want_logits, want_stages = run(dataclasses.replace(cfg, patch_drop_rate=0.5))
    assert stages["block00"].shape == want_stages["block00"].shape == (3, 1 + 8, 32)  # class token + 8 of 16
    np.testing.assert_array_equal(logits, want_logits)
    assert run(cfg)[1]["block00"].shape == (3, 1 + 12, 32)  # without it, the config's quarter
    assert run(cfg, patch_drop_rate=0.0)[1]["block00"].shape == (3, 1 + 16, 32)


def test_a_parameters_file_from_before_the_stem_field_still_loads(tmp_path):
    """A .npz whose saved config has no 'stem' (written before the field existed) is a patch-stem model."""
    import json

    from vit_jax import weights

    cfg = MODELS["test"]
    path = str(tmp_path / "old.npz")
    weights.save(path, init_params(cfg, jax.random.key(0)), cfg)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    saved = json.loads(str(arrays[weights.CONFIG_KEY]))
    del saved["stem"], saved["patch_drop_rate"]
    arrays[weights.CONFIG_KEY] = np.asarray(json.dumps(saved))
    np.savez(path, **arrays)
    assert count_params(weights.load(path, cfg)) == EXPECTED_PARAMS["test"]
    with pytest.raises(UserError, match="stem patch -> conv"):
        weights.load(path, dataclasses.replace(cfg, stem="conv"))
