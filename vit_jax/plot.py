"""`python -m vit_jax.plot --workdir DIR`: the training curves of a run, from its metrics.jsonl, as one PNG.

`--compare DIR2 [DIR3 ...]` draws several runs on shared axes against wall-clock minutes instead
(test accuracy and training loss), to set recipes side by side at the same budget.

Loss and accuracy, train and test, per epoch, and the learning rate; the best epoch is marked.
It reads metrics.jsonl, which training rewrites whole after every epoch, and config.json, so it works
while a run is still going. Written to DIR/curves.png unless `--out` says otherwise.
"""

import os

from vit_jax.errors import CommandParser, cli
from vit_jax.figure import figsize, save, subplots
from vit_jax.workdir import check_output, finished_epochs, read_config

CURVES = "curves.png"
COMPARE = "compare.png"

CURVES_PX = (1500, 450)  # (width, height) of curves.png
COMPARE_PX = (1200, 450)  # of --compare's picture


def best_row(rows: list[dict]) -> dict:
    """The epoch with the best test accuracy; the first of equals, as training keeps it."""
    return max(rows, key=lambda r: (r["test_acc"], -r["epoch"]))


def plot_curves(rows: list[dict], out: str, title: str = "") -> str:
    epochs = [r["epoch"] for r in rows]
    best = best_row(rows)
    fig, axes = subplots(1, 3, figsize=figsize(*CURVES_PX), layout="constrained")
    if title:
        fig.suptitle(title, fontsize=11)
    panels = [("loss", "cross-entropy loss"), ("acc", "accuracy (%)")]
    for ax, (key, label) in zip(axes, panels):
        for split, color in (("train", "tab:blue"), ("test", "tab:orange")):
            ax.plot(epochs, [r[f"{split}_{key}"] for r in rows], "o-", color=color, markersize=3, label=split)
        ax.set_ylabel(label)
    axes[1].plot(best["epoch"], best["test_acc"], "*", color="tab:red", markersize=12,
                 label=f"best test {best['test_acc']:.2f}% (epoch {best['epoch']})")
    axes[2].plot(epochs, [r["lr"] for r in rows], "o-", color="tab:green", markersize=3)
    axes[2].set_ylabel("learning rate (at the epoch's start)")
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in axes:
        ax.axvline(best["epoch"], color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)  # no epoch 1.5
    axes[0].legend()
    axes[1].legend()
    return save(fig, out)


def _name(workdir: str) -> str:
    return os.path.basename(os.path.abspath(workdir))


def plot_run(workdir: str, out: str | None = None) -> str:
    """Draws DIR/metrics.jsonl to `out` (default DIR/curves.png); returns the path."""
    rows = finished_epochs(workdir)
    cfg, _ = read_config(workdir)
    length = f"--time_budget {cfg.time_budget:g} min" if cfg.time_budget else f"{len(rows)} of {cfg.epochs} epochs"
    title = f"Training curves of {_name(workdir)} ({cfg.recipe} recipe, {length})"
    return plot_curves(rows, out or os.path.join(workdir, CURVES), title)


def plot_comparison(workdirs: list[str], out: str) -> str:
    """Test accuracy and training loss of several runs against wall-clock minutes (training and
    evaluation, start-up left out), one line each."""
    fig, axes = subplots(1, 2, figsize=figsize(*COMPARE_PX), layout="constrained")
    for workdir in workdirs:
        rows, (cfg, _) = finished_epochs(workdir), read_config(workdir)
        minutes = [sum(r["seconds"] for r in rows[:i + 1]) / 60 for i in range(len(rows))]
        label = f"{_name(workdir)}: {cfg.recipe} recipe, best {best_row(rows)['test_acc']:.1f}%"
        axes[0].plot(minutes, [r["test_acc"] for r in rows], "o-", markersize=3, label=label)
        axes[1].plot(minutes, [r["train_loss"] for r in rows], "o-", markersize=3, label=label)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].set_ylabel("training loss")
    for ax in axes:
        ax.set_xlabel("minutes of training and evaluation")
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
    axes[0].legend(fontsize=8)
    fig.suptitle("Runs side by side, by wall-clock time", fontsize=11)
    return save(fig, out)


@cli
def main(argv=None) -> str:
    parser = CommandParser(prog="python -m vit_jax.plot", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="checkpoints", help="the training run to draw")
    parser.add_argument("--out", default=None, help="PNG to write, .png added to a name without an extension "
                                                    "(default: WORKDIR/curves.png, or with --compare "
                                                    "WORKDIR/compare.png)")
    parser.add_argument("--compare", nargs="+", metavar="WORKDIR", default=None,
                        help="other runs to draw beside --workdir's, against wall-clock minutes")
    a = parser.parse_args(argv)
    if a.out:
        check_output(a.out)
    if a.compare:
        out = plot_comparison([a.workdir, *a.compare], a.out or os.path.join(a.workdir, COMPARE))
    else:
        out = plot_run(a.workdir, a.out)
    print(f"Wrote {out}")
    return out


if __name__ == "__main__":
    main()
