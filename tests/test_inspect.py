"""Looking inside a trained model: attention maps, error analysis, curves, predictions, run summary.

Every command runs on one tiny `test`-recipe run trained on a small archive (--archive), and each
picture is opened to check its size in pixels.
"""

import csv
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from vit_jax import analyze, attention, data, evaluate, plot, predict, step, summary, train, visualize_attention
from vit_jax.config import MODELS, ModelConfig
from vit_jax.errors import UserError
from vit_jax.model import init_params
from vit_jax.workdir import load_best


def _png_size(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def _random_params(cfg, seed=0):
    """Parameters of the right shapes, drawn in numpy: an unjitted Flax init takes seconds on a CPU."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def run(tmp_path_factory, cifar_archive):
    """The workdir of a 2-epoch `test`-recipe run on 40 images of a small archive."""
    workdir = str(tmp_path_factory.mktemp("inspect") / "run")
    train.main(["--recipe", "test", "--epochs", "2", "--batch_size", "16", "--train_limit", "40",
                "--archive", cifar_archive, "--workdir", workdir])
    return workdir


# --------------------------------------------------------------------------------------------------
# Attention


def test_rollout_by_hand():
    rng = np.random.default_rng(0)
    attn = rng.random((2, 1, 3, 5, 5))  # (L, B, H, T, T): 4 patches on a 2x2 grid
    attn /= attn.sum(-1, keepdims=True)
    a1, a2 = [(layer[0].mean(0) + np.eye(5)) / 2 for layer in attn]  # head mean, residual, rows sum to 1
    expected = (a2 @ a1)[0, 1:]
    np.testing.assert_allclose(attention.rollout(attn)[0].ravel(), expected / expected.sum(), rtol=1e-12)


@pytest.mark.parametrize("cfg", [
    MODELS["test"],  # 4x4 patches
    ModelConfig(img_size=32, patch_size=4, embed_dim=16, depth=3, num_heads=4, mlp_ratio=1.0),  # 8x8
    ModelConfig(img_size=48, patch_size=16, embed_dim=16, depth=1, num_heads=1, mlp_ratio=1.0),  # 3x3, resized
    ModelConfig(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_ratio=1.0, class_token=False,
                global_pool="avg"),  # no class token: the maps read the mean of the tokens
], ids=["4x4", "8x8", "3x3", "avg"])
def test_maps_come_from_the_model_and_are_distributions_on_any_patch_grid(cfg, tmp_path):
    params = _random_params(cfg)
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), np.uint8)
    logits, attn = attention.attention_weights(cfg, params, images)
    g = cfg.img_size // cfg.patch_size
    assert attn.shape == (cfg.depth, 3, cfg.num_heads, cfg.num_tokens, cfg.num_tokens)
    # The very forward pass that trains: the same logits as a plain apply (predict's).
    np.testing.assert_allclose(logits, predict.predict_logits(cfg, params, images), rtol=1e-5, atol=1e-5)

    maps = attention.rollout(attn, cfg.class_token)
    assert maps.shape == (3, g, g) and (maps >= 0).all()
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-9)
    heads = attention.head_attention(attn, cfg.class_token)
    assert heads.shape == (3, cfg.num_heads, g, g) and (heads >= 0).all()
    assert (heads.sum(axis=(2, 3)) <= 1 + 1e-6).all()
    assert (attention.upsample(maps, 32) >= 0).all()

    out = visualize_attention.visualize(cfg, params, images, ["a", "b", "c"], str(tmp_path / "a.png"), "title")
    assert _png_size(out["path"]) == visualize_attention.figure_size(3, cfg.num_heads)


def test_visualize_attention_command(run, tmp_path, capsys):
    out = visualize_attention.main(["--workdir", run, "--num_images", "3"])
    assert out["path"] == os.path.join(run, "attention.png")
    assert _png_size(out["path"]) == visualize_attention.figure_size(3, MODELS["test"].num_heads)
    assert (out["rollout"] >= 0).all()
    np.testing.assert_allclose(out["rollout"].sum(axis=(1, 2)), 1.0, rtol=1e-9)

    # Your own images.
    Image.new("RGB", (90, 60), "orange").save(tmp_path / "mine.jpg")
    out = visualize_attention.main(["--workdir", run, "--images", str(tmp_path / "mine.jpg"),
                                    "--out", str(tmp_path / "own.png")])
    assert _png_size(tmp_path / "own.png") == visualize_attention.figure_size(1, MODELS["test"].num_heads)

    out = visualize_attention.main(["--workdir", run, "--num_images", "1", "--out", str(tmp_path / "named")])
    assert out["path"] == str(tmp_path / "named.png") and os.path.isfile(out["path"])
    assert f"Wrote {out['path']}\n" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Error analysis


def test_analyze_confusion_matches_the_split_and_evaluate(run, cifar_archive):
    result = analyze.main(["--workdir", run])
    _, labels = data.load_split("test", archive=cifar_archive)
    _, acc = evaluate.main(["--workdir", run])
    cm = result["confusion"]
    np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(labels, minlength=10))
    assert 100.0 * np.trace(cm) / len(labels) == pytest.approx(acc, abs=1e-6)
    assert result["accuracy"] == pytest.approx(acc, abs=1e-6)
    for name, c in result["per_class"].items():
        i = data.CLASS_NAMES.index(name)
        assert (c["count"], c["correct"]) == (cm[i].sum(), cm[i, i])
    off = cm - np.diag(np.diag(cm))
    if result["most_confused"]:
        top = result["most_confused"][0]
        assert top["count"] == off.max()
        assert off[data.CLASS_NAMES.index(top["true"]), data.CLASS_NAMES.index(top["predicted"])] == off.max()

    paths = result["paths"]
    assert paths["confusion_png"] == os.path.join(run, "analysis", "confusion.png")
    assert _png_size(paths["confusion_png"]) == analyze.CONFUSION_PX
    shown = result["errors_shown"]
    assert 0 < len(shown) <= min(off.sum(), analyze.ERROR_COLS * analyze.ERROR_ROWS)  # a 2-epoch model errs
    assert (result["preds"][shown] != labels[shown]).all()
    assert _png_size(paths["errors_png"]) == analyze.errors_size(len(shown))
    with open(paths["confusion_csv"]) as f:
        table = list(csv.reader(f))
    assert table[0][1:] == list(data.CLASS_NAMES)
    np.testing.assert_array_equal(np.array([r[1:] for r in table[1:]], int), cm)
    with open(paths["report_json"]) as f:
        assert json.load(f)["confusion"] == cm.tolist()



def test_evaluate_analyze_and_predict_evaluate_as_the_run_did(run, cifar_archive, tmp_path):
    """A run trained with --tta_flip is evaluated with it by default; a flag overrides either way."""
    images, labels = data.load_split("test", archive=cifar_archive)
    best = load_best(run)
    logits = {flip: np.asarray(step.infer(best.model_cfg, best.params, images, tta_flip=flip)["logits"])
              for flip in (False, True)}
    assert not np.allclose(logits[False], logits[True], atol=1e-4)  # the mirror images do change them
    loss = {flip: float(np.mean(step.cross_entropy(l, labels))) for flip, l in logits.items()}
    tta_run = str(tmp_path / "tta")
    shutil.copytree(run, tta_run)
    with open(os.path.join(tta_run, "config.json")) as f:
        config = json.load(f)
    config["train"]["tta_flip"] = True
    with open(os.path.join(tta_run, "config.json"), "w") as f:
        json.dump(config, f)
    for workdir, flags, flip in [(run, [], False), (tta_run, [], True), (tta_run, ["--no-tta_flip"], False),
                                 (run, ["--tta_flip"], True)]:
        assert evaluate.main(["--workdir", workdir, *flags])[0] == pytest.approx(loss[flip], rel=1e-5), (workdir, flags)
        result = analyze.main(["--workdir", workdir, "--out", str(tmp_path / "analysis"), *flags])
        np.testing.assert_allclose(result["probs"], predict.softmax(logits[flip]), atol=1e-5)
    np.testing.assert_allclose(predict.predict_logits(best.model_cfg, best.params, images, tta_flip=True),
                               logits[True], rtol=1e-5, atol=1e-5)


def test_evaluate_says_which_test_images_and_which_the_run_evaluated(run, tmp_path, capsys):
    """The full test split by default, said so; and the run's --test_limit, whose images gave its best accuracy."""
    limited = str(tmp_path / "limited")
    shutil.copytree(run, limited)
    config = json.loads(pathlib.Path(limited, "config.json").read_text())
    config["train"]["test_limit"] = 16
    pathlib.Path(limited, "config.json").write_text(json.dumps(config))
    for workdir, flags, said in [
            (run, [], "on all 32 test images\n"),
            (limited, [], "on all 32 test images (the run evaluated its first 16: --test_limit 16)\n"),
            (limited, ["--test_limit", "8"], "on the first 8 test images (the run evaluated its first 16: "
                                             "--test_limit 16)\n"),
            (limited, ["--test_limit", "16"], "on the first 16 test images\n")]:
        evaluate.main(["--workdir", workdir, *flags])
        out = capsys.readouterr().out
        assert out.endswith(said), (flags, out)


def test_error_grid_shows_the_surest_mistakes_a_few_per_pair():
    labels = np.array([0, 0, 0, 0, 0, 1, 2])
    preds = np.array([1, 1, 1, 1, 0, 2, 2])
    confidence = np.array([0.5, 0.9, 0.8, 0.7, 0.99, 0.6, 0.95])
    assert analyze.pick_errors(labels, preds, confidence).tolist() == [1, 2, 3, 5]  # one 0->1 over PER_PAIR


# --------------------------------------------------------------------------------------------------
# Training curves and the summary


def _synthetic_run(run, tmp_path, accs):
    """A copy of the run's config, for len(accs) epochs, with a metrics.jsonl whose test accuracies are `accs`."""
    workdir = tmp_path / "synthetic"
    workdir.mkdir()
    config = json.loads(pathlib.Path(run, "config.json").read_text())
    config["train"]["epochs"] = len(accs)
    (workdir / "config.json").write_text(json.dumps(config))
    rows = [{"epoch": e + 1, "lr": 1e-3 / (e + 1), "train_loss": 2.0 - 0.1 * e, "train_acc": 10.0 + e,
             "test_loss": 2.1 - 0.1 * e, "test_acc": a, "seconds": 10.0, "images_per_sec": 100.0 + e}
            for e, a in enumerate(accs)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(workdir)


def test_plot_curves(run, tmp_path, capsys):
    out = plot.main(["--workdir", run])
    assert out == os.path.join(run, "curves.png") and _png_size(out) == plot.CURVES_PX
    # A name without an extension: matplotlib writes NAME.png, and that is the path reported.
    out = plot.main(["--workdir", run, "--out", str(tmp_path / "curves")])
    assert out == str(tmp_path / "curves.png") and _png_size(out) == plot.CURVES_PX
    assert capsys.readouterr().out.splitlines()[-1] == f"Wrote {out}"
    # A run still going: one epoch done so far.
    partial = _synthetic_run(run, tmp_path, [12.5])
    assert _png_size(plot.plot_run(partial)) == plot.CURVES_PX
    os.remove(os.path.join(partial, "metrics.jsonl"))
    with pytest.raises(UserError, match="no epoch .* has finished yet"):
        plot.plot_run(partial)
    with pytest.raises(SystemExit) as e:
        plot.main(["--workdir", str(tmp_path / "nothing")])
    assert e.value.code == 2


def test_plot_compares_runs_by_wall_clock_time(run, tmp_path):
    slow = _synthetic_run(run, tmp_path, [10.0, 30.0, 35.0])
    out = plot.main(["--workdir", run, "--compare", slow])
    assert out == os.path.join(run, "compare.png") and _png_size(out) == plot.COMPARE_PX
    with pytest.raises(SystemExit):
        plot.main(["--workdir", run, "--compare", str(tmp_path / "nothing")])


def test_an_output_that_cannot_be_written_is_one_line_before_any_work(run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    file, under = str(tmp_path / "file"), str(tmp_path / "file" / "sub")
    for command, out, folder, why in ((plot.main, under + "/c.png", under, "Not a directory"),
                                      (visualize_attention.main, file + "/a.png", file, "a file, not a folder"),
                                      (analyze.main, under, under, "Not a directory"),
                                      (analyze.main, file, file, "a file, not a folder"),
                                      (plot.main, str(tmp_path), str(tmp_path), "a folder, not a file"),
                                      (visualize_attention.main, str(tmp_path), str(tmp_path), "a folder, not a file")):
        with pytest.raises(SystemExit) as e:
            command(["--workdir", run, "--out", out])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err == f"error: cannot write to '{folder}' ({why}): choose another --out\n", err


def test_a_closed_output_pipe_is_one_line_not_a_traceback(run):
    """`python -m vit_jax.plot ... | head -0`: the reader is gone before the command writes."""
    proc = subprocess.Popen([sys.executable, "-m", "vit_jax.plot", "--workdir", run], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1 and "Traceback" not in err and "Exception ignored" not in err, err
    assert err.startswith("error: the output was closed before the command ended") and err.count("\n") == 1, err


def test_reading_a_checkpoint_logs_no_warning(run, caplog):
    """orbax warns about every option of a read-only checkpoint manager: four lines of each evaluate."""
    with caplog.at_level(logging.WARNING):
        evaluate.main(["--workdir", run])
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_summary_names_the_best_epoch_of_metrics(run, tmp_path):
    path = summary.write_summary(run, device="2 x test device")
    text = pathlib.Path(path).read_text()
    best = max(_rows(run), key=lambda r: r["test_acc"])
    assert f"| **best** | {best['epoch']} | {best['test_acc']:.2f}% |" in text
    assert "2 x test device" in text and "24,234 parameters" in text
    assert "![Training curves](curves.png)" in text  # drawn by write_summary
    assert "--recipe test --epochs 2 --batch_size 16" in text

    # The first of equal accuracies, as training keeps it; pictures not made yet are named with their command.
    synthetic = _synthetic_run(run, tmp_path, [10.0, 30.0, 30.0, 20.0])
    text = pathlib.Path(summary.main(["--workdir", synthetic, "--device", "cpu"])).read_text()
    assert "| **best** | 2 | 30.00% |" in text and "| final | 4 | 20.00% |" in text
    assert "4 of 4 epochs" in text
    assert "![Attention maps]" not in text and "python -m vit_jax.visualize_attention --workdir" in text
    assert "Total time: 40 s over 4 epochs" in text
    assert "102 images/s in training, mean of epochs 2 to 4 (epoch 1, compilation included: 100)" in text


def test_summary_commands_quote_paths_with_spaces():
    import dataclasses
    import shlex

    from vit_jax.config import parse_args

    cfg, model_cfg = parse_args(["--recipe", "test", "--workdir", "my runs/a'b", "--archive", "/data/cifar 10.tar.gz"])
    command = summary.reproduce_command(cfg, model_cfg)
    args = shlex.split(command)  # as a shell reads the line pasted from summary.md
    assert args[:3] == ["python", "-m", "vit_jax.train"]
    assert parse_args(args[3:]) == (cfg, model_cfg)
    rows = [{"epoch": 1, "lr": 1e-3, "train_loss": 2.0, "train_acc": 10.0, "test_loss": 2.1, "test_acc": 12.0,
             "seconds": 10.0, "images_per_sec": 100.0}]
    text = summary.render(cfg.workdir, dataclasses.replace(cfg, epochs=1), model_cfg, rows, "cpu", 1, {"tensorboard"})
    assert "`python -m vit_jax.plot --workdir 'my runs/a'\"'\"'b'`" in text
    assert "`tensorboard --logdir 'my runs/a'\"'\"'b/tensorboard'`" in text


# --------------------------------------------------------------------------------------------------
# Predictions on your own images


def test_load_image_reduces_like_cifar(tmp_path):
    wide = np.zeros((40, 120, 3), np.uint8)  # red | green | blue thirds
    wide[:, :40, 0] = wide[:, 40:80, 1] = wide[:, 80:, 2] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    img = predict.load_image(str(tmp_path / "wide.png"))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    np.testing.assert_allclose(img[4:-4, 4:-4].mean(axis=(0, 1)), [0, 255, 0], atol=2)  # the centered square
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(tmp_path / "clear.png")  # transparent -> white
    assert (predict.load_image(str(tmp_path / "clear.png")) == 255).all()


def test_predict_probabilities(run, tmp_path, capsys):
    rgba = np.random.default_rng(0).integers(0, 256, (300, 500, 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "big.png")
    Image.new("L", (50, 80), 128).save(tmp_path / "gray.jpg")
    files = [str(tmp_path / n) for n in ("big.png", "gray.jpg")]
    results = predict.main(["--workdir", run, *files])
    assert list(results) == files
    for f in files:
        assert results[f].shape == (10,) and (results[f] >= 0).all()
        assert results[f].sum() == pytest.approx(1.0, abs=1e-9)
    out = capsys.readouterr().out
    top = predict.top_k(results[files[0]], data.CLASS_NAMES)
    assert f"big.png: {top[0][0]} {100 * top[0][1]:.1f}% | {top[1][0]}" in out
    assert out.count("%") == 2 * 3 + 1  # top-3 for the two images, and the header's accuracy

    # Batches of any size give the same logits.
    images = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3), np.uint8)
    model_cfg, params = load_best(run)[1:3]
    np.testing.assert_allclose(predict.predict_logits(model_cfg, params, images, batch_size=2),
                               predict.predict_logits(model_cfg, params, images), rtol=1e-5, atol=1e-6)



def test_a_file_that_is_not_an_image_is_refused_alike_by_predict_and_visualize_attention(tmp_path, capsys):
    """One line naming each such file and status 2, before the model is loaded (the workdir is not read)."""
    Image.new("RGB", (40, 40), "orange").save(tmp_path / "good.png")
    (tmp_path / "notes.txt").write_text("not an image")
    files = [str(tmp_path / n) for n in ("good.png", "notes.txt", "missing.bmp")]
    message = (f"error: {files[1]} is not an image Pillow can read; cannot read {files[2]} (No such file or "
               f"directory): give only image files (PNG, JPEG, ...)\n")
    for argv in ([*files], ["--images", *files]):
        command = predict.main if argv[0] != "--images" else visualize_attention.main
        with pytest.raises(SystemExit) as e:
            command(["--workdir", str(tmp_path / "no run"), *argv])
        assert e.value.code == 2 and capsys.readouterr().err == message
