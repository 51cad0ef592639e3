"""The commands of parity: export (and the tutorial's loading lines), convert and --init_from,
compare's verdict and exit status, bench."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch

from parity import bench, compare, convert, export, port
from parity.model import VisionTransformer
from vit_jax import config as config_lib
from vit_jax import augment, train, weights
from vit_jax.config import MODELS, TrainConfig
from vit_jax.errors import UserError
from vit_jax.model import init_params
from vit_jax.workdir import Checkpoints, load_best

torch.set_num_threads(1)  # tiny models; on a busy CPU torch's threads wait on each other

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = MODELS["test"]


def _random_params(recipe: str, seed: int = 0):
    """Random weights of init's scale, without tracing an init (quick even for `seed`)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(MODELS[recipe], jax.random.key(0)))
    return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def _workdir(path: str, recipe: str, params, epoch: int = 3, test_acc: float = 41.5, archive=None) -> str:
    """A workdir as vit_jax.train leaves it: config.json and a best checkpoint."""
    cfg = TrainConfig(recipe=recipe, workdir=path, archive=archive)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_lib.to_dict(cfg, MODELS[recipe]), f)
    ckpts = Checkpoints(path)
    ckpts.save_best(params, {"epoch": epoch, "test_acc": test_acc, "config": config_lib.to_dict(cfg, MODELS[recipe])})
    ckpts.close()
    return path


@pytest.fixture(scope="module")
def test_workdir(tmp_path_factory, cifar_archive):
    """A `test` run's workdir (random weights) that trained on cifar_archive."""
    params = _random_params("test")
    return _workdir(str(tmp_path_factory.mktemp("run") / "w"), "test", params, archive=cifar_archive), params


# export ------------------------------------------------------------------------------------------


def test_export_loads_with_the_tutorials_own_lines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = _random_params("tutorial")
    _workdir("checkpoints", "tutorial", params, epoch=7, test_acc=63.25)
    export.main(["--workdir", "checkpoints"])
    assert "best_model.pth" in os.listdir("checkpoints")
    assert not [f for f in os.listdir("checkpoints") if f.endswith(".tmp")]

    # The PyTorch tutorial's lines, exactly as written (torch.load defaults to weights_only=True).
    model = VisionTransformer(img_size=224, patch_size=16, num_classes=10, embed_dim=384, depth=6, num_heads=6)
    model.load_state_dict(torch.load('checkpoints/best_model.pth')['model_state_dict'])

    np.testing.assert_array_equal(model.head.weight.detach().numpy(), params["head"]["kernel"].T)
    np.testing.assert_array_equal(model.blocks[5].mlp.fc2.bias.detach().numpy(),
                                  params["blocks_5"]["mlp"]["fc2"]["bias"])
    ckpt = torch.load("checkpoints/best_model.pth", weights_only=True)
    assert set(ckpt) == {"model_state_dict", "epoch", "test_acc", "config"}
    assert ckpt["epoch"] == 7 and ckpt["test_acc"] == 63.25
    assert config_lib.ModelConfig(**ckpt["config"]) == MODELS["tutorial"]


def test_export_to_another_path(test_workdir, tmp_path, capsys):
    workdir, params = test_workdir
    out = str(tmp_path / "sub" / "ViT.pth")
    export.main(["--workdir", workdir, "--out", out])
    assert f"Wrote {out}: epoch 3, test acc 41.50%, 32 tensors, 24,234 parameters" in capsys.readouterr().out
    back = port.torch_to_flax(torch.load(out, weights_only=True)["model_state_dict"], CFG)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_export_of_a_workdir_without_a_run_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export.main(["--workdir", str(tmp_path)])
    assert e.value.code == 2 and "has no config.json" in capsys.readouterr().err


# convert and --init_from -------------------------------------------------------------------------


def _torch_model(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return VisionTransformer.from_config(cfg)


def test_convert_a_bare_state_dict_and_the_tutorials_format(tmp_path, capsys):
    model = _torch_model()
    expected = port.torch_to_flax(model.state_dict(), CFG)
    bare = str(tmp_path / "bare.pth")
    torch.save(model.state_dict(), bare)
    out = convert.main([bare, "--recipe", "test"])
    assert out == str(tmp_path / "bare.npz")
    assert (f"Fine-tune it with: python -m vit_jax.train --init_from {out} --recipe finetune --img_size 32 --patch_size 8 "
            f"--embed_dim 32 --depth 2 --num_heads 2 --mlp_ratio 2.0") in capsys.readouterr().out
    jax.tree.map(np.testing.assert_array_equal, weights.load(out, CFG), expected)

    # The tutorial's save, from a DataParallel model ('module.' keys), with the optimizer's state.
    optimizer = torch.optim.AdamW(model.parameters())
    tutorial = str(tmp_path / "best_model.pth")
    torch.save({"epoch": 4, "model_state_dict": torch.nn.DataParallel(model).state_dict(),
                "optimizer_state_dict": optimizer.state_dict(), "test_acc": 55.0}, tutorial)
    out = convert.main([tutorial, "--recipe", "test", "--out", str(tmp_path / "sub" / "tutorial.npz")])
    jax.tree.map(np.testing.assert_array_equal, weights.load(out, CFG), expected)


def test_convert_reads_the_config_that_export_saved(test_workdir, tmp_path):
    workdir, params = test_workdir
    pth = export.export(workdir, str(tmp_path / "w.pth"))
    out = convert.main([pth])  # no --recipe: the config saved in the file
    jax.tree.map(np.testing.assert_array_equal, weights.load(out, CFG), params)


def test_training_starts_from_the_pytorch_weights(tmp_path, cifar_archive):
    model = _torch_model(seed=3)
    path = str(tmp_path / "start.pth")
    torch.save(model.state_dict(), path)
    npz = convert.convert(path, CFG)
    workdir = str(tmp_path / "run")
    train.main(["--recipe", "test", "--epochs", "1", "--batch_size", "16", "--train_limit", "32", "--workdir",
                workdir, "--archive", cifar_archive, "--init_from", npz])
    start = port.torch_to_flax(model.state_dict(), CFG)
    moved = max(float(np.abs(a - b).max())
                for a, b in zip(jax.tree.leaves(load_best(workdir).params), jax.tree.leaves(start)))
    assert 0 < moved <= 4 * 3e-4  # two AdamW steps from the checkpoint, not from a random init


def test_a_checkpoint_of_another_model_names_its_first_differences_in_one_short_line(tmp_path, capsys):
    path = str(tmp_path / "deeper.pth")
    torch.save({"model_state_dict": _torch_model(dataclasses.replace(CFG, depth=3, num_classes=100)).state_dict()},
               path)
    with pytest.raises(UserError) as e:
        port.load_torch_checkpoint(path, CFG)
    message = str(e.value)
    assert "does not fit the chosen model" in message and "choose the --recipe" in message
    assert "(14 differences: 'head.weight' has shape (100, 32), the model needs (10, 32)" in message
    assert "unexpected 'blocks.2.norm1.weight'" in message and "and 9 more" in message

    # Another recipe's checkpoint (the 8 KB message): a line, not a page.
    torch.save(_torch_model(MODELS["cifar"]).state_dict(), path)
    with pytest.raises(SystemExit) as exit_:
        convert.main([path, "--recipe", "test"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and len(err) < 800, err
    assert "differences: " in err and "more" in err


def test_init_from_refuses_what_is_not_for_this_model(tmp_path, cifar_archive, capsys):
    cifar = str(tmp_path / "cifar.npz")
    weights.save(cifar, _random_params("cifar"), MODELS["cifar"])
    pth = str(tmp_path / "model.pth")
    torch.save(_torch_model().state_dict(), pth)
    (tmp_path / "empty.npz").write_bytes(b"")
    np.save(tmp_path / "array.npy", np.zeros(3))
    os.rename(tmp_path / "array.npy", tmp_path / "array.npz")
    for init_from, message in ((cifar, "holds parameters of another model (patch_size 4 -> 8; embed_dim 256 -> 32"),
                               (pth, "is a PyTorch checkpoint: convert it first with python -m parity.convert"),
                               (str(tmp_path / "none.npz"), "no parameters file at"),
                               (str(tmp_path / "empty.npz"), "empty.npz' is not a parameters file (No data left"),
                               (str(tmp_path / "array.npz"), "array.npz' is not a parameters file (it holds one "
                                                             "array (.npy), not named arrays (.npz))")):
        with pytest.raises(SystemExit) as exit_:
            train.main(["--recipe", "test", "--epochs", "1", "--workdir", str(tmp_path / "run"), "--archive",
                        cifar_archive, "--init_from", init_from])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("content, message", [
    (b"epoch,loss\n1,2.3\n", "is not a PyTorch checkpoint"),
    (None, "no checkpoint at"),
    ("pickled object", "is not a PyTorch checkpoint that can be loaded safely"),
    ("tensor", "holds neither a state_dict nor a dict with 'model_state_dict'"),
])
def test_what_is_not_a_checkpoint_says_so(tmp_path, content, message):
    path = str(tmp_path / "x.pth")
    if content == "pickled object":
        torch.save({"model": TrainConfig()}, path)  # not loadable with weights_only=True
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content is not None:
        with open(path, "wb") as f:
            f.write(content)
    with pytest.raises(UserError, match=message):
        port.load_torch_checkpoint(path, CFG)


# compare -----------------------------------------------------------------------------------------


def _compare(args, tmp_path, num_examples=16):
    """compare.main's exit code and --json; the images come from the run or from a --archive in args."""
    out = str(tmp_path / "compare.json")
    code = compare.main(["--num_images", str(num_examples), "--batch_size", "8", "--json", out, *args])
    with open(out) as f:
        return code, json.load(f)


def test_compare_random_init_agrees(tmp_path, capsys, cifar_archive):
    code, r = _compare(["--archive", cifar_archive], tmp_path)
    out = capsys.readouterr().out
    assert code == 0 and r["passed"]
    assert "random init of recipe 'test'" in out and "no checkpoint given" in out and "PASS" in out
    assert set(r) >= {"max_abs_logits_diff", "argmax_agreement", "jax_accuracy", "torch_accuracy", "stages",
                      "tolerance", "passed"}
    assert list(r["stages"]) == ["embed", "block00", "block01", "norm", "logits"]
    assert r["tolerance"] == 1e-5 and r["max_abs_logits_diff"] <= 1e-5 and r["argmax_agreement"] == 100.0
    assert r["first_divergent_stage"] is None
    assert r["jax_accuracy"] == r["torch_accuracy"] and r["num_images"] == 16


@pytest.mark.parametrize("key, stage, before", [
    ("blocks.1.mlp.fc1.weight", "block01", "block00"),
    ("head.bias", "logits", "norm"),
])
def test_compare_fails_and_names_the_stage_when_one_weight_is_perturbed(key, stage, before, tmp_path, capsys,
                                                                       cifar_archive):
    code, r = _compare(["--perturb", key, "--archive", cifar_archive], tmp_path)
    out = capsys.readouterr().out
    assert code == 1 and not r["passed"]
    assert r["first_divergent_stage"] == stage and f"FAIL (first divergent stage: {stage})" in out
    assert r["stages"][before]["max_abs_diff"] <= 1e-5 < r["stages"][stage]["max_abs_diff"]


def test_compare_a_workdir_and_an_exported_checkpoint_with_training(test_workdir, tmp_path, capsys, cifar_archive):
    workdir, _ = test_workdir  # no --archive: compare reads the run's own source
    code, r = _compare(["--workdir", workdir, "--train_steps", "4", "--steps_per_epoch", "2"], tmp_path)
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"best checkpoint of {workdir} (epoch 3)" in out and "loss torch" in out
    t = r["train"]
    assert len(t["losses"]) == 4 and t["passed"] and t["grad_rel_diff"] <= 1e-5
    assert t["param_drift"] <= compare.TRAIN_TOLERANCE and t["max_abs_param_diff"] > 0

    pth = export.export(workdir, str(tmp_path / "w.pth"))
    code, r = _compare(["--checkpoint", pth, "--archive", cifar_archive], tmp_path)
    assert code == 0 and r["source"] == f"PyTorch checkpoint {pth}"


def test_compare_refuses_what_it_cannot_use_before_comparing(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for args, message in ((["--json", str(tmp_path / "file" / "c.json")],
                           f"cannot write to '{tmp_path / 'file'}' (a file, not a folder): choose another --json"),
                          (["--json", str(tmp_path)], f"cannot write to '{tmp_path}' (a folder, not a file): "
                                                      f"choose another --json"),
                          (["--tolerance", "nan"], "--tolerance must be a non-negative number, got nan")):
        with pytest.raises(SystemExit) as e:
            compare.main(args)
        assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


def test_compare_refuses_a_checkpoint_of_another_recipe(tmp_path, capsys):
    path = str(tmp_path / "bare.pth")
    torch.save(_torch_model().state_dict(), path)
    with pytest.raises(SystemExit):
        compare.main(["--checkpoint", path, "--recipe", "cifar"])
    err = capsys.readouterr().err
    assert "does not fit recipe cifar" in err and "pass the --recipe it was trained with" in err


# bench -------------------------------------------------------------------------------------------


def test_bench_prints_both_and_their_ratio(capsys, tmp_path):
    out_json = str(tmp_path / "bench.json")
    r = bench.main(["--recipe", "test", "--batch_size", "4", "--steps", "1", "--warmup", "0", "--no-compile",
                    "--json", out_json])
    out = capsys.readouterr().out
    assert r["jax"]["images_per_sec"] > 0 and r["torch_eager"]["images_per_sec"] > 0
    assert r["jax_over_eager"] == r["jax"]["ms_per_step"] / r["torch_eager"]["ms_per_step"]
    assert f"JAX time / PyTorch eager time: {r['jax_over_eager']:.2f}" in out and "n/a: --no-compile" in out
    # What limits both steps: their FLOPs per second, and the largest matmul alone at each step's rows.
    assert r["gflop_per_step"] == bench.jax_bench.train_flops(MODELS["test"], 4) / 1e9
    for side in ("jax", "torch_eager"):
        assert r[side]["gflops"] == pytest.approx(r["gflop_per_step"] / r[side]["ms_per_step"] * 1e3)
    mm = r["matmul"]
    assert mm["shape"] == [32, 64] and mm["torch_rows"] == 4 * 17  # the test recipe: 17 tokens, MLP 32 -> 64
    assert mm["jax_rows"] == 4 // r["jax"]["grad_accum"] // jax.device_count() * 17
    assert mm["jax_gflops"] > 0 and mm["torch_gflops"] > 0
    assert f"XLA      {mm['jax_gflops']:8.1f} GFLOP/s at N = {mm['jax_rows']:,} (" in out
    assert f"PyTorch  {mm['torch_gflops']:8.1f} GFLOP/s at N = {mm['torch_rows']:,} (its whole batch)" in out
    with open(out_json) as f:
        saved = json.load(f)
    assert saved["jax_over_eager"] == r["jax_over_eager"] and saved["cpu"] and "torch_eager" in saved


def test_bench_refuses_a_json_path_it_cannot_write_before_timing(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for path, why in ((tmp_path / "file" / "b.json", "a file, not a folder"), (tmp_path, "a folder, not a file")):
        with pytest.raises(SystemExit) as e:
            bench.main(["--recipe", "test", "--json", str(path)])
        assert e.value.code == 2 and capsys.readouterr().err == (
            f"error: cannot write to '{path.parent if path.name == 'b.json' else path}' ({why}): choose another --json\n")


def test_torch_augment_matches_the_jax_preprocessing_without_the_random_part():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    torch_x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    jax_x = augment.resize(images, 64)
    np.testing.assert_allclose(torch_x.permute(0, 2, 3, 1).numpy(), jax_x, atol=1e-6)
    assert bench.torch_augment(torch.from_numpy(images), 64).shape == (2, 3, 64, 64)
