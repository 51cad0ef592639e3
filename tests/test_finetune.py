"""Fine-tuning a pretrained ViT (issue 26): timm's and Google's checkpoints, read by parity.convert and
adapted to another resolution and class count, give the logits timm itself gives when it loads the same
file at that size; what cannot be held is refused in one line; a converted model fine-tunes, learns,
exports, and loads back into the twin and into timm. No network: the checkpoints are made here."""

import dataclasses
import json
import os
import shlex

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from parity import adapt, convert, export, google, pretrained
from parity.model import VisionTransformer as TwinViT
from vit_jax import config as config_lib, step, train, weights
from vit_jax.config import TrainConfig
from vit_jax.errors import UserError
from vit_jax.model import VisionTransformer as FlaxViT
from vit_jax.workdir import load_best, read_metrics

torch.set_num_threads(1)  # tiny models; on a busy CPU torch's threads wait on each other

TOL = 1e-5
ARCH = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)  # the small timm ViT, at img_size 32


def _randomize(model, seed=0):
    """Weights far from init (LayerNorm scales around 1), so that a misplaced one shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if "norm" in name and "weight" in name else 0.0))
    return model.eval()


@pytest.fixture(scope="module")
def timm_vit(timm):
    """timm's VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=7)."""
    return _randomize(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=7, **ARCH))


@pytest.fixture(scope="module")
def timm_files(timm, timm_vit, tmp_path_factory):
    """The same weights as timm and its hub save them: {format: path}."""
    tmp = tmp_path_factory.mktemp("timm_files")
    state_dict = timm_vit.state_dict()
    save_file(state_dict, str(tmp / "model.safetensors"))
    torch.save(state_dict, str(tmp / "model.pth"))
    torch.save(state_dict, str(tmp / "pytorch_model.bin"))
    timm.models.save_for_hf(timm_vit, str(tmp / "hub"), safe_serialization="both")  # config.json beside them
    return {"safetensors": str(tmp / "model.safetensors"), "pth": str(tmp / "model.pth"),
            "bin": str(tmp / "pytorch_model.bin"), "hub folder": str(tmp / "hub")}


def _images(size, n=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)  # NHWC


def _jax_stages(npz, size):
    cfg = _config_of(npz)
    _, stages = FlaxViT(cfg).apply({"params": weights.load(npz, cfg)}, _images(size), return_stages=True)
    return jax.device_get(stages)


def _config_of(npz) -> config_lib.ModelConfig:
    with np.load(npz) as f:
        return config_lib.ModelConfig(**json.loads(str(f[weights.CONFIG_KEY])))


def _timm_logits(model, size):
    with torch.no_grad():
        return model.eval()(torch.from_numpy(_images(size).transpose(0, 3, 1, 2))).numpy()


def _convert(args, capsys):
    out = convert.main(args)
    return out, capsys.readouterr().out


def _timm_at(timm, path, img_size, num_classes=7):
    """timm's model built at img_size from the file, as a user builds it: create_model with the file as
    the pretrained weights (its checkpoint_filter_fn resamples the position embedding)."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=True, img_size=img_size, num_classes=num_classes,
                             pretrained_cfg_overlay=dict(file=path, custom_load=False, num_classes=7), **ARCH)


# timm's files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "bin", "hub folder"])
def test_timm_files_give_timms_logits(fmt, timm_files, timm_vit, tmp_path, capsys):
    flags = [] if fmt == "hub folder" else ["--num_heads", "2"]  # the hub's config.json has them
    out, printed = _convert([timm_files[fmt], "--num_classes", "7", "--out", str(tmp_path / "w.npz")] + flags, capsys)
    assert _config_of(out) == config_lib.ModelConfig(img_size=32, num_classes=7, **ARCH)
    np.testing.assert_allclose(_jax_stages(out, 32)["logits"], _timm_logits(timm_vit, 32), rtol=0, atol=TOL)
    assert "new zero head" not in printed and "resampled" not in printed


@pytest.mark.parametrize("img_size", [48, 64, 24])  # 4x4 -> 6x6, 8x8 and 3x3 patches
def test_a_new_resolution_gives_timms_logits_at_that_resolution(img_size, timm, timm_files, tmp_path, capsys):
    path = timm_files["safetensors"]
    out, printed = _convert([path, "--img_size", str(img_size), "--num_classes", "7", "--num_heads", "2",
                             "--out", str(tmp_path / "w.npz")], capsys)
    grid = img_size // 8
    assert f"position embedding resampled from 4x4 to {grid}x{grid} (bicubic, antialiased, as timm does)" in printed
    reference = _timm_at(timm, timm_files["bin"], img_size)
    assert reference.pos_embed.shape == (1, grid * grid + 1, 32)
    np.testing.assert_allclose(_jax_stages(out, img_size)["logits"], _timm_logits(reference, img_size),
                               rtol=0, atol=TOL)


def test_resampling_is_timms_own_function(timm):
    """The same numbers as timm.layers.resample_abs_pos_embed, called as checkpoint_filter_fn calls it."""
    pos = np.random.default_rng(0).normal(size=(1, 1 + 7 * 7, 16)).astype(np.float32)
    for new_grid in (3, 10):
        ours = adapt.resample_pos_embed(pos, new_grid, 1, *pretrained.TIMM_RESAMPLE)
        theirs = timm.layers.resample_abs_pos_embed(torch.from_numpy(pos), [new_grid, new_grid], num_prefix_tokens=1)
        np.testing.assert_array_equal(ours, theirs.numpy())
        np.testing.assert_array_equal(ours[:, 0], pos[:, 0])  # the class token's position, kept apart


def test_another_class_count_gets_a_zero_head_on_the_same_features(timm_files, timm_vit, tmp_path, capsys):
    out, printed = _convert([timm_files["hub folder"], "--out", str(tmp_path / "w.npz")], capsys)  # 10: default
    assert "a new zero head of 10 classes (the checkpoint's had 7)" in printed
    cfg = _config_of(out)
    params = weights.load(out, cfg)
    assert cfg.num_classes == 10 and params["head"]["kernel"].shape == (32, 10) and params["head"]["bias"].shape == (10,)
    assert not params["head"]["kernel"].any() and not params["head"]["bias"].any()
    stages = _jax_stages(out, 32)
    with torch.no_grad():
        x = torch.from_numpy(_images(32).transpose(0, 3, 1, 2))
        features = timm_vit.forward_head(timm_vit.forward_features(x), pre_logits=True).numpy()
    np.testing.assert_allclose(stages["norm"][:, 0], features, rtol=0, atol=TOL)
    assert not stages["logits"].any()


def test_the_printed_command_builds_the_converted_model(timm_files, tmp_path, capsys):
    out, printed = _convert([timm_files["hub folder"], "--img_size", "48", "--out", str(tmp_path / "w.npz")], capsys)
    command = printed.split("Fine-tune it with: ")[1].strip()
    assert command.startswith(f"python -m vit_jax.train --init_from {out} --recipe finetune")
    cfg, model = config_lib.parse_args(shlex.split(command)[3:])
    assert model == _config_of(out) and cfg.init_from == out and cfg.recipe == "finetune"
    weights.load(out, model)  # what --init_from reads, for the model the command builds


def test_init_from_still_refuses_a_file_made_for_another_model(timm_files, tmp_path, capsys):
    out, _ = _convert([timm_files["hub folder"], "--img_size", "48", "--out", str(tmp_path / "w.npz")], capsys)
    with pytest.raises(UserError, match=r"holds parameters of another model \(img_size 48 -> 32"):
        weights.load(out, dataclasses.replace(_config_of(out), img_size=32))


# Google's .npz -----------------------------------------------------------------------------------


def _google_npz(path, pre_logits=False, classes=7, prefix="", seed=1):
    """A google-research/vision_transformer checkpoint of the small ViT, written with numpy."""
    rng = np.random.default_rng(seed)
    D, H, hd, M, p, T = 32, 2, 16, 128, 8, 17
    shapes = {"embedding/kernel": (p, p, 3, D), "embedding/bias": (D,), "cls": (1, 1, D),
              "Transformer/posembed_input/pos_embedding": (1, T, D),
              "Transformer/encoder_norm/scale": (D,), "Transformer/encoder_norm/bias": (D,)}
    for i in range(2):
        b = f"Transformer/encoderblock_{i}"
        for n in ("LayerNorm_0", "LayerNorm_2"):
            shapes[f"{b}/{n}/scale"], shapes[f"{b}/{n}/bias"] = (D,), (D,)
        for n in ("query", "key", "value"):
            shapes[f"{b}/MultiHeadDotProductAttention_1/{n}/kernel"] = (D, H, hd)
            shapes[f"{b}/MultiHeadDotProductAttention_1/{n}/bias"] = (H, hd)
        shapes[f"{b}/MultiHeadDotProductAttention_1/out/kernel"] = (H, hd, D)
        shapes[f"{b}/MultiHeadDotProductAttention_1/out/bias"] = (D,)
        shapes[f"{b}/MlpBlock_3/Dense_0/kernel"], shapes[f"{b}/MlpBlock_3/Dense_0/bias"] = (D, M), (M,)
        shapes[f"{b}/MlpBlock_3/Dense_1/kernel"], shapes[f"{b}/MlpBlock_3/Dense_1/bias"] = (M, D), (D,)
    if pre_logits:
        shapes["pre_logits/kernel"], shapes["pre_logits/bias"] = (D, D), (D,)
    shapes["head/kernel"], shapes["head/bias"] = (D, classes), (classes,)
    arrays = {prefix + k: (rng.normal(size=s) * 0.2 + (1.0 if k.endswith("/scale") else 0.0)).astype(np.float32)
              for k, s in shapes.items()}
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("img_size", [32, 48])
def test_google_npz_gives_timms_logits(img_size, timm, tmp_path, capsys):
    """timm's own .npz loader (_load_weights) is the independent reading of the same file."""
    from timm.models.vision_transformer import _load_weights

    path = _google_npz(str(tmp_path / "ViT-Ti_8.npz"), prefix="opt/target/" if img_size == 48 else "")
    out, printed = _convert([path, "--img_size", str(img_size), "--num_classes", "7"], capsys)
    assert out == str(tmp_path / "ViT-Ti_8.flax.npz")  # never over the checkpoint
    assert _config_of(out) == config_lib.ModelConfig(img_size=img_size, num_classes=7, **ARCH)  # heads from shapes
    if img_size != 32:
        assert "position embedding resampled from 4x4 to 6x6 (bilinear, as timm does)" in printed
    reference = timm.models.vision_transformer.VisionTransformer(img_size=img_size, num_classes=7, **ARCH)
    _load_weights(reference, path)
    np.testing.assert_allclose(_jax_stages(out, img_size)["logits"], _timm_logits(reference, img_size),
                               rtol=0, atol=TOL)


def test_google_table_reads_each_key_once_and_names_what_does_not_fit(tmp_path):
    arrays = dict(np.load(_google_npz(str(tmp_path / "g.npz"))))
    cfg, head = google.architecture({k: v.shape for k, v in arrays.items()})
    keys = [k for row in google.table(cfg) for k in row.sources]
    assert sorted(keys) == sorted(arrays) and len(keys) == len(set(keys))
    assert {row.transform.name for row in google.table(cfg)} >= {"identity", google.QKV_KERNEL.name}
    arrays["Transformer/encoderblock_1/extra/scale"] = np.ones(32, np.float32)
    arrays["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/bias"] = np.ones((2, 15), np.float32)
    with pytest.raises(UserError) as e:
        google.to_flax(arrays, cfg)
    assert "2 differences" in str(e.value) and "unexpected 'Transformer/encoderblock_1/extra/scale'" in str(e.value)
    assert "key/bias' has shape (2, 15), the model needs (2, 16)" in str(e.value)


@pytest.mark.parametrize("kind", ["google", "timm"])
def test_a_pre_logits_layer_is_dropped_and_its_head_replaced(kind, timm_vit, tmp_path, capsys):
    if kind == "google":
        path = _google_npz(str(tmp_path / "g.npz"), pre_logits=True)
    else:
        state_dict = {**timm_vit.state_dict(), "pre_logits.fc.weight": torch.ones(32, 32),
                      "pre_logits.fc.bias": torch.ones(32)}
        save_file(state_dict, path := str(tmp_path / "model.safetensors"))
    out, printed = _convert([path, "--num_classes", "7", "--num_heads", "2", "--out", str(tmp_path / "w.npz")], capsys)
    assert "pre-logits layer dropped" in printed and "a new zero head of 7 classes" in printed
    params = weights.load(out, _config_of(out))
    assert "pre_logits" not in params and not params["head"]["kernel"].any()


# What is refused --------------------------------------------------------------------------------


def _resnet_state_dict():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 7), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 10))
    return {f"layer{k}": v for k, v in net.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("make, named", [
    (lambda timm: _resnet_state_dict(), "is not a ViT with timm's keys: it has no patch_embed.proj.weight"),
    (lambda timm: timm.create_model("vit_tiny_patch16_224", img_size=32, init_values=1e-5, **ARCH).state_dict(),
     "is a ViT with layer scale (ls1.gamma, timm's init_values), which this model cannot hold"),
    (lambda timm: timm.create_model("vit_tiny_patch16_224", img_size=32, reg_tokens=4, **ARCH).state_dict(),
     "is a ViT with register tokens (reg_token)"),
    (lambda timm: timm.create_model("vit_tiny_patch16_224", img_size=32, qk_norm=True, **ARCH).state_dict(),
     "is a ViT with qk_norm (attn.q_norm)"),
    (lambda timm: timm.create_model("vit_tiny_patch16_224", img_size=32, no_embed_class=True, **ARCH).state_dict(),
     "has a position embedding without the class token's (timm's no_embed_class"),
    (lambda timm: timm.create_model("vit_tiny_patch16_224", img_size=32, class_token=False, global_pool="avg",
                                    fc_norm=False, **ARCH).state_dict(), "pools the tokens after the final norm"),
])
def test_what_this_model_cannot_hold_is_one_line(make, named, timm, tmp_path, capsys):
    path = str(tmp_path / "model.safetensors")
    save_file(make(timm), path)
    with pytest.raises(SystemExit) as e:
        convert.main([path, "--num_heads", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and named in err, err


def test_what_the_weights_do_not_show_is_read_from_timms_config(timm, tmp_path, capsys):
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, act_layer="quick_gelu", **ARCH)
    timm.models.save_for_hf(model, str(tmp_path / "hub"), model_args={"act_layer": "quick_gelu"})
    with pytest.raises(SystemExit):
        convert.main([str(tmp_path / "hub")])
    assert "is a ViT with the activation 'quick_gelu', which this model cannot hold" in capsys.readouterr().err
    for name, message in (("resnet18", "timm's resnet18 is not one of its VisionTransformers"),
                          ("vit_nonexistent_patch3", "timm has no model 'vit_nonexistent_patch3'")):
        with pytest.raises(SystemExit):
            convert.main(["--timm", name])
        assert message in capsys.readouterr().err


def test_the_head_count_is_asked_for_when_nothing_says_it(timm_files, capsys):
    with pytest.raises(SystemExit) as e:
        convert.main([timm_files["safetensors"]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is not in its weights: pass --num_heads (timm's vit_tiny has 3" in err


def test_the_head_count_comes_from_the_model_name(timm, tmp_path):
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=1)
    save_file(model.state_dict(), path := str(tmp_path / "vit_small_patch16_224.augreg_in1k.safetensors"))
    assert pretrained.read(path).config.num_heads == 6


def test_timm_offline_says_which_file_to_fetch_and_what_to_run(timm, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    for name in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file", "load_custom_from_hf"):
        monkeypatch.setattr(timm.models._builder, name, offline)
    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    with pytest.raises(SystemExit) as e:
        convert.main(["--timm", name, "--img_size", "64"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert (f"error: cannot download timm's {name} (ConnectionError: Failed to resolve 'huggingface.co'): on a "
            f"machine with internet fetch model.safetensors and config.json from the Hugging Face hub repo timm/{name} "
            f"(https://huggingface.co/timm/{name}/tree/main) into a folder {name}/, then run python -m parity.convert "
            f"{name}/model.safetensors --img_size 64 --num_classes 10\n") == err


def test_timm_online_converts_what_timm_downloads(timm, monkeypatch, tmp_path, capsys):
    """The download itself replaced by the state_dict of a random vit_tiny (timm's loader reads it as it would
    read the hub's file), so the online path runs here without network."""
    weights_of = timm.create_model("vit_tiny_patch16_224", num_classes=1000).state_dict()
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", lambda *a, **k: weights_of)
    out, printed = _convert(["--timm", "vit_tiny_patch16_224.augreg_in21k_ft_in1k", "--img_size", "32",
                             "--out", str(tmp_path / "tiny.npz")], capsys)
    cfg = _config_of(out)
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.num_classes) == (32, 16, 192, 12, 3, 10)
    assert "resampled from 14x14 to 2x2" in printed and "the checkpoint's had 1000" in printed
    assert printed.endswith(f"--init_from {out} --recipe finetune --img_size 32 --embed_dim 192 --depth 12 "
                            f"--num_heads 3\n")


# Fine-tuning ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(timm_files, cifar_archive, tmp_path_factory):
    """A run of --recipe finetune (SGD, warm-up, cosine, clipping) at 48 px from timm's 32-px checkpoint,
    started with the command convert printed: (workdir, config)."""
    tmp = tmp_path_factory.mktemp("finetune")
    out = convert.convert(timm_files["hub folder"], out=str(tmp / "start.npz"), img_size=48, num_classes=10)
    command = convert.train_command(out, _config_of(out))
    workdir = str(tmp / "run")
    train.main(shlex.split(command)[3:] + ["--workdir", workdir, "--archive", cifar_archive, "--epochs", "6",
                                           "--batch_size", "20", "--lr", "0.03", "--no-augment", "--log_every", "1000"])
    return workdir, _config_of(out)


def test_a_converted_checkpoint_fine_tunes_and_learns(finetuned):
    workdir, cfg = finetuned
    saved_train, saved_model = config_lib.parse_args(["--recipe", "finetune"])[0], load_best(workdir).model_cfg
    assert saved_model == cfg and saved_train.optimizer == "sgd"
    rows = read_metrics(workdir)
    losses = [r["train_loss"] for r in rows]
    assert len(rows) == 6 and all(np.isfinite(losses))
    # 100 examples with random labels: nothing to generalize, but they are learned, epoch after epoch.
    assert all(a > b for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.2, losses
    assert rows[-1]["train_acc"] > 25.0, rows  # chance: 10%


def test_a_workdir_converts_once_exported(finetuned, tmp_path, capsys):
    workdir, cfg = finetuned
    with pytest.raises(UserError, match="is a training run's workdir: export its best model first with python -m "
                                        f"parity.export --workdir {workdir}"):
        convert.convert(workdir, out=str(tmp_path / "w.npz"))
    export.export(workdir)  # WORKDIR/best_model.pth
    out = convert.convert(workdir, out=str(tmp_path / "w.npz"))
    jax.tree.map(np.testing.assert_array_equal, weights.load(out, cfg), load_best(workdir).params)


def test_a_fine_tuned_model_loads_into_the_twin_and_into_timm(finetuned, timm, tmp_path):
    workdir, cfg = finetuned
    pth = export.export(workdir, str(tmp_path / "best.pth"))
    state_dict = torch.load(pth, weights_only=True)["model_state_dict"]
    reference = timm.models.vision_transformer.VisionTransformer(img_size=48, num_classes=10, **ARCH)
    reference.load_state_dict(state_dict)  # strict: every key, every shape
    twin = TwinViT.from_config(cfg)
    twin.load_state_dict(state_dict)
    jax_logits = FlaxViT(cfg).apply({"params": load_best(workdir).params}, _images(48))
    np.testing.assert_allclose(_timm_logits(reference, 48), jax_logits, rtol=0, atol=TOL)
    np.testing.assert_allclose(_timm_logits(twin, 48), jax_logits, rtol=0, atol=TOL)


# The optimizer ----------------------------------------------------------------------------------


def test_sgd_is_torchs_sgd_with_momentum_under_the_schedule():
    """optax's (vit_jax.step.make_optimizer with --optimizer sgd) against torch.optim.SGD(momentum=0.9),
    fed the same gradients through the warm-up and cosine, with and without weight decay."""
    rng = np.random.default_rng(0)
    start = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(8)]
    for wd in (0.0, 0.1):
        cfg = TrainConfig(optimizer="sgd", lr=0.03, weight_decay=wd, schedule="cosine", warmup_epochs=1.0, epochs=4)
        tx, schedule = step.make_optimizer(cfg), step.Schedule.of(cfg, steps_per_epoch=2)
        params, state = {"w": start}, tx.init({"w": start})
        w = torch.nn.Parameter(torch.from_numpy(start.copy()))
        sgd = torch.optim.SGD([w], lr=1.0, momentum=0.9, weight_decay=wd)
        for i, g in enumerate(grads):
            params, state = step.adamw_update(tx, params, state, {"w": g}, schedule(i))
            sgd.param_groups[0]["lr"] = float(schedule(i))
            w.grad = torch.from_numpy(g)
            sgd.step()
        np.testing.assert_allclose(params["w"], w.detach().numpy(), rtol=0, atol=1e-6)
        assert np.abs(params["w"] - start).max() > 0.05  # it moved


def test_sgd_trains_the_twin_and_the_flax_model_alike(monkeypatch):
    """Ten SGD steps of both models from the same weights (parity.compare's training check), with weight
    decay spared on biases, norms and embeddings as AdamW spares them, and clipping."""
    from parity import compare

    cfg_model = config_lib.MODELS["test"]
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: step.init_params(cfg_model, jax.random.key(0)))
    params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    images, labels = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 40).astype(np.int32)
    cfg = TrainConfig(recipe="test", optimizer="sgd", lr=0.05, weight_decay=1e-3, decay_all=False, grad_clip=1.0,
                      epochs=2)
    r = compare.train_parity(params, compare.torch_twin(cfg_model, params), cfg_model, cfg, images, labels,
                             steps=10, batch_size=8, steps_per_epoch=5)
    assert r["passed"] and r["param_drift"] <= compare.TRAIN_TOLERANCE, r
    assert r["losses"][-1]["jax_loss"] != r["losses"][0]["jax_loss"]
    # The check has teeth: PyTorch's SGD without momentum in its place fails it.
    monkeypatch.setattr(compare, "_torch_optimizer", lambda model, c: torch.optim.SGD(model.parameters(), lr=c.lr))
    r = compare.train_parity(params, compare.torch_twin(cfg_model, params), cfg_model, cfg, images, labels,
                             steps=10, batch_size=8, steps_per_epoch=5)
    assert not r["passed"]


def test_the_finetune_recipe_is_googles():
    cfg, _ = config_lib.parse_args(["--recipe", "finetune"])
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.schedule, cfg.grad_clip) == \
        ("sgd", 0.01, 0.0, 512, "cosine", 1.0)
    assert 0 < cfg.warmup_epochs < cfg.epochs and cfg.augment and not cfg.crop
    with pytest.raises(UserError, match="optimizer must be adamw, sgd or lion, got 'adam'"):
        config_lib.parse_args(["--optimizer", "adam"])


def test_init_from_a_file_not_yet_converted_says_to_convert_it(timm_files, tmp_path):
    cfg = config_lib.ModelConfig(img_size=32, num_classes=7, **ARCH)
    for path, kind in ((_google_npz(str(tmp_path / "g.npz")), "a Google ViT checkpoint"),
                       (timm_files["safetensors"], "a PyTorch checkpoint")):
        with pytest.raises(UserError, match=f"is {kind}: convert it first with python -m parity.convert {path}"):
            weights.load(path, cfg)


def test_eval_npz_script_reads_a_converted_file(timm_files, cifar_archive, tmp_path, capsys):
    import runpy

    out, _ = _convert([timm_files["hub folder"], "--out", str(tmp_path / "w.npz")], capsys)
    script = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "scripts", "eval_npz.py"))
    acc = script["main"](out, cifar_archive, batch_size=8)
    assert f"{out}: img 32, test loss 2.3026, test acc {acc:.2f}% on 32 images" in capsys.readouterr().out
