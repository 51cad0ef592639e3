"""`python -m vit_jax.analyze --workdir DIR`: which test images the best model gets wrong, and as what.

Over the whole test split, into DIR/analysis/ (or `--out`):
    confusion.png   the confusion matrix (true class per row) beside the accuracy of each class
    confusion.csv   its numbers, with the class names as header and first column
    errors.png      the misclassified images the model was surest of, true and predicted class
    report.json     accuracy, per-class accuracy, the most confused pairs and the matrix
"""

import argparse
import csv
import json
import math
import os

import numpy as np

from vit_jax import data
from vit_jax.errors import CommandParser, UserError, cli
from vit_jax.figure import figsize, save, subplots
from vit_jax.predict import class_names, predict_logits, softmax
from vit_jax.files import atomic_open
from vit_jax.workdir import load_best, make

ANALYSIS = "analysis"  # the folder it writes in the workdir

CONFUSION_PX = (1300, 600)  # (width, height) of confusion.png
ERROR_COLS, ERROR_ROWS = 8, 4  # errors.png shows at most ERROR_COLS * ERROR_ROWS images
ERROR_CELL_PX = 150
PER_PAIR = 3  # errors.png shows at most this many images of one (true, predicted) pair
TOP_PAIRS = 5


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: row = true class, column = predicted class."""
    return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def most_confused(cm: np.ndarray, names, k: int = TOP_PAIRS) -> list[dict]:
    """The k largest off-diagonal cells: which true class is most often taken for which other."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:k]
    pairs = []
    for true, pred in zip(*np.unravel_index(order, cm.shape)):
        if off[true, pred] == 0:
            break
        pairs.append({"true": names[true], "predicted": names[pred], "count": int(off[true, pred]),
                      "share_of_true": float(off[true, pred] / max(cm[true].sum(), 1))})
    return pairs


def per_class(cm: np.ndarray, names) -> dict:
    counts, correct = cm.sum(axis=1), np.diag(cm)
    return {name: {"count": int(n), "correct": int(c), "accuracy": 100.0 * c / n if n else None}
            for name, n, c in zip(names, counts, correct)}


def plot_confusion(cm: np.ndarray, names, title: str, out: str) -> str:
    """The matrix, colored by the share of each true class (so rare and common classes read alike),
    with the counts written in; beside it the accuracy of each class."""
    counts = cm.sum(axis=1, keepdims=True)
    share = cm / np.maximum(counts, 1)
    fig, (ax, bar) = subplots(1, 2, figsize=figsize(*CONFUSION_PX), width_ratios=(1.35, 1),
                              layout="constrained")
    fig.suptitle(title, fontsize=11)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    n = len(names)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")

    accuracy = 100.0 * np.diag(cm) / np.maximum(counts[:, 0], 1)
    overall = 100.0 * np.trace(cm) / max(cm.sum(), 1)
    y = np.arange(n)
    bar.barh(y, accuracy, color="tab:blue")
    bar.axvline(overall, color="tab:red", linestyle="--", label=f"all classes {overall:.1f}%")
    for i, a in enumerate(accuracy):
        bar.text(min(a + 1, 80), i, f"{a:.1f}% of {counts[i, 0]}", va="center", fontsize=8,
                 bbox={"facecolor": "white", "alpha": 0.8, "pad": 1, "linewidth": 0})
    bar.set_yticks(y, names, fontsize=8)
    bar.invert_yaxis()  # the same order as the matrix rows
    bar.set_xlim(0, 100)
    bar.set_xlabel("accuracy (%)")
    bar.set_title("per-class accuracy", fontsize=10)
    bar.legend(loc="lower right", fontsize=8)
    return save(fig, out)


def errors_size(num_shown: int) -> tuple[int, int]:
    """(width, height) in pixels of errors.png showing this many images."""
    return ERROR_COLS * ERROR_CELL_PX, max(math.ceil(num_shown / ERROR_COLS), 1) * ERROR_CELL_PX


def pick_errors(labels, preds, confidence) -> np.ndarray:
    """Indices of misclassified images to show: the surest mistakes first, since those say most about
    what the model has wrong, but at most PER_PAIR of each (true, predicted) pair, or one pair
    (ship taken for airplane, say) can fill the whole grid."""
    wrong = np.flatnonzero(preds != labels)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
    shown, per_pair = [], {}
    for i in wrong:
        pair = (labels[i], preds[i])
        if per_pair.get(pair, 0) < PER_PAIR:
            per_pair[pair] = per_pair.get(pair, 0) + 1
            shown.append(i)
            if len(shown) == ERROR_COLS * ERROR_ROWS:
                break
    return np.asarray(shown, np.int64)


def plot_errors(images, labels, shown, preds, confidence, names, title: str, out: str) -> str:
    """A grid of the images `shown` (indices), with true and predicted class and the confidence."""
    width, height = errors_size(len(shown))
    rows = height // ERROR_CELL_PX
    fig, axes = subplots(rows, ERROR_COLS, figsize=figsize(width, height), squeeze=False,
                         layout="constrained")
    fig.suptitle(title, fontsize=10)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, shown):
        ax.imshow(images[i], interpolation="bilinear")
        ax.set_title(f"true {names[labels[i]]}\npred {names[preds[i]]} {100 * confidence[i]:.0f}%", fontsize=8)
    if not len(shown):
        axes[0, 0].text(0, 0.5, "no misclassified images", fontsize=10)
    return save(fig, out)


def write_csv(cm: np.ndarray, names, out: str) -> str:
    with atomic_open(out, newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *names])
        w.writerows([name, *map(int, row)] for name, row in zip(names, cm))
    return out


def analyze(model_cfg, params, images, labels, out_dir: str, title: str, batch_size: int = 256,
            epoch: int | None = None, tta_flip: bool = False) -> dict:
    """Predicts every image and writes the four files; returns the report with the matrix as an array.

    epoch: the training epoch the parameters are from, recorded in the report; tta_flip: average each
    image's logits with its mirror image's, as a run with --tta_flip evaluated."""
    names = class_names(model_cfg.num_classes)
    probs = softmax(predict_logits(model_cfg, params, images, batch_size, tta_flip))
    preds = probs.argmax(axis=1)
    cm = confusion_matrix(labels, preds, model_cfg.num_classes)
    shown = pick_errors(labels, preds, probs.max(axis=1))
    os.makedirs(out_dir, exist_ok=True)
    accuracy = 100.0 * np.trace(cm) / len(labels)
    report = {"epoch": epoch, "images": int(len(labels)), "accuracy": accuracy, "per_class": per_class(cm, names),
              "most_confused": most_confused(cm, names), "classes": list(names), "confusion": cm.tolist()}
    with atomic_open(os.path.join(out_dir, "report.json")) as f:
        json.dump(report, f, indent=2)
    paths = {
        "confusion_png": plot_confusion(cm, names, f"{title}: {accuracy:.2f}% of {len(labels):,} test images",
                                        os.path.join(out_dir, "confusion.png")),
        "confusion_csv": write_csv(cm, names, os.path.join(out_dir, "confusion.csv")),
        "errors_png": plot_errors(images, labels, shown, preds, probs.max(axis=1), names,
                                  f"{title}: misclassified test images, the most confident first "
                                  f"(at most {PER_PAIR} per pair of classes)",
                                  os.path.join(out_dir, "errors.png")),
        "report_json": os.path.join(out_dir, "report.json"),
    }
    return {**report, "confusion": cm, "preds": preds, "probs": probs, "errors_shown": shown, "paths": paths}


@cli
def main(argv=None) -> dict:
    parser = CommandParser(prog="python -m vit_jax.analyze", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="checkpoints", help="the training run whose best model to use")
    data.add_source_arguments(parser)
    parser.add_argument("--out", default=None, help="folder for the results (default: WORKDIR/analysis)")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--test_limit", type=int, default=None, help="only the first N test images")
    parser.add_argument("--tta_flip", action=argparse.BooleanOptionalAction, default=None,
                        help="average each image's logits with its mirror image's (default: as the run evaluated)")
    a = parser.parse_args(argv)
    if a.batch_size <= 0:
        raise UserError(f"--batch_size must be positive, got {a.batch_size}")

    run = load_best(a.workdir)
    if a.out:
        make(a.out, "--out")
    images, labels = data.load_split("test", limit=a.test_limit, **data.source(a, run.cfg))
    out_dir = a.out or os.path.join(a.workdir, ANALYSIS)
    result = analyze(run.model_cfg, run.params, images, labels, out_dir,
                     f"Best model ({run.cfg.recipe}, epoch {run.meta['epoch']})", a.batch_size, run.meta["epoch"],
                     run.cfg.tta_flip if a.tta_flip is None else a.tta_flip)

    print(f"Test accuracy {result['accuracy']:.2f}% on {result['images']:,} images. Per class:")
    for name, c in result["per_class"].items():
        print(f"  {name:<11} {c['accuracy'] if c['accuracy'] is not None else float('nan'):6.2f}% "
              f"of {c['count']}")
    print("Most confused (true -> predicted):")
    for p in result["most_confused"]:
        print(f"  {p['true']} -> {p['predicted']}: {p['count']} ({100 * p['share_of_true']:.1f}% of {p['true']})")
    print(f"Wrote {', '.join(result['paths'].values())}")
    return result


if __name__ == "__main__":
    main()
