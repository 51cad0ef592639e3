"""`python -m vit_jax.summary --workdir DIR`: DIR/summary.md, a record of a run to paste into your notes.

The config (and the command that reproduces it), best and final accuracy with their epochs, total
time and images/s, the hardware, and links to the pictures the inspection commands made in DIR.
Training writes it when it ends; run this to refresh it after making more pictures.
"""

import dataclasses
import datetime
import json
import os
import shlex

import jax

from vit_jax import plot
from vit_jax.config import ModelConfig, TrainConfig, parse_args
from vit_jax.devices import describe_devices
from vit_jax.errors import CommandParser, cli
from vit_jax.model import count_params, init_params
from vit_jax.files import write_atomic
from vit_jax.analyze import ANALYSIS
from vit_jax.plot import CURVES
from vit_jax.tensorboard_log import FOLDER as TENSORBOARD
from vit_jax.visualize_attention import ATTENTION
from vit_jax.workdir import finished_epochs, read_config

SUMMARY = "summary.md"

# (file in the workdir, what it shows, the command that makes it; {workdir} is filled in)
PICTURES = [
    (CURVES, "Training curves", "python -m vit_jax.plot --workdir {workdir}"),
    (ATTENTION, "Attention maps", "python -m vit_jax.visualize_attention --workdir {workdir}"),
    (f"{ANALYSIS}/confusion.png", "Confusion matrix and per-class accuracy",
     "python -m vit_jax.analyze --workdir {workdir}"),
    (f"{ANALYSIS}/errors.png", "Misclassified test images", "python -m vit_jax.analyze --workdir {workdir}"),
]
REPORT = f"{ANALYSIS}/report.json"
DATA_FILES = [(f"{ANALYSIS}/confusion.csv", "confusion matrix (CSV)"), (REPORT, "error analysis (JSON)")]


def reproduce_command(cfg: TrainConfig, model_cfg: ModelConfig) -> str:
    """The train command with the flags that differ from its recipe's defaults. (With --time_budget, the
    run's length is the budget's: on another machine, or another day, the same budget trains longer or
    shorter.)"""
    base, base_model = parse_args(["--recipe", cfg.recipe])
    flags = [_flag("recipe", cfg.recipe)] if cfg.recipe != "tutorial" else []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name == "workdir" or (f.name != "recipe" and value != getattr(base, f.name)):
            flags.append(_flag(f.name, value))
    flags += [_flag(f.name, getattr(model_cfg, f.name)) for f in dataclasses.fields(ModelConfig)
              if getattr(model_cfg, f.name) != getattr(base_model, f.name)]
    return " ".join(["python -m vit_jax.train", *filter(None, flags)])


def _flag(name: str, value) -> str:
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return "" if value is None else f"--{name} {shlex.quote(str(value))}"  # a path may hold spaces


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m} min" if hours else f"{m} min {s} s" if m else f"{s} s"


def _throughput(speeds: list[float]) -> str:
    # The first epoch's figure includes compiling the steps, which can be most of a short epoch.
    if len(speeds) == 1:
        return f"{speeds[0]:,.0f} images/s in training (one epoch, compilation included)"
    later = speeds[1:]
    which = "epoch 2" if len(speeds) == 2 else f"mean of epochs 2 to {len(speeds)}"
    return (f"{sum(later) / len(later):,.0f} images/s in training, {which} "
            f"(epoch 1, compilation included: {speeds[0]:,.0f})")


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def render(workdir: str, cfg: TrainConfig, model_cfg: ModelConfig, rows: list[dict], device: str,
           num_params: int, existing: set[str], analysis: dict | None = None) -> str:
    """The markdown text; `existing`: the workdir-relative files that exist; `analysis`: report.json."""
    best, final = plot.best_row(rows), rows[-1]
    seconds = sum(r["seconds"] for r in rows)
    lines = [
        f"# ViT on CIFAR-10: {os.path.basename(os.path.abspath(workdir))}",
        "",
        f"`{cfg.recipe}` recipe, {num_params:,} parameters, {len(rows)} "
        f"{f'epochs in --time_budget {cfg.time_budget:g} min' if cfg.time_budget else f'of {cfg.epochs} epochs'} "
        f"(workdir `{workdir}`; written {datetime.datetime.now():%Y-%m-%d %H:%M}).",
        "",
        *_table(["", "epoch", "test accuracy", "test loss", "train accuracy", "train loss"], [
            [name, r["epoch"], f"{r['test_acc']:.2f}%", f"{r['test_loss']:.4f}", f"{r['train_acc']:.2f}%",
             f"{r['train_loss']:.4f}"] for name, r in (("**best**", best), ("final", final))]),
        "",
        *([f"- Test accuracy during training is over the first {cfg.test_limit:,} test images (--test_limit)"]
          if cfg.test_limit else []),
        *([f"- Error analysis of the best model (epoch {analysis.get('epoch')}): {analysis['accuracy']:.2f}% of "
           f"{analysis['images']:,} test images"] if analysis else []),
        f"- Total time: {_duration(seconds)} over {len(rows)} epochs, training and evaluation",
        f"- Throughput: {_throughput([r['images_per_sec'] for r in rows])}",
        f"- Hardware: {device}",
        "",
        "## Pictures",
        "",
    ]
    missing = {}  # command -> what it would make
    for path, what, command in PICTURES:
        if path in existing:
            lines += [f"**{what}** (`{path}`)", "", f"![{what}]({path})", ""]
        else:
            missing.setdefault(command.format(workdir=shlex.quote(workdir)), []).append(what.lower())
    data_links = [f"[{what}]({path})" for path, what in DATA_FILES if path in existing]
    if data_links:
        lines += ["Numbers: " + ", ".join(data_links), ""]
    if TENSORBOARD in existing:
        lines += [f"TensorBoard: `tensorboard --logdir {shlex.quote(os.path.join(workdir, TENSORBOARD))}`", ""]
    if missing:
        lines += ["Not made yet:", "", *(f"- {', '.join(whats)}: `{command}`" for command, whats in missing.items()), ""]
    model_fields = dataclasses.asdict(model_cfg)
    lines += [
        "## Config",
        "",
        "To reproduce" + (" (the budget's length is this machine's):" if cfg.time_budget else ":"),
        "",
        "```bash",
        reproduce_command(cfg, model_cfg),
        "```",
        "",
        *_table(["model", "value"], [[k, f"`{v}`"] for k, v in model_fields.items()]),
        "",
        *_table(["run", "value"], [[k, f"`{v}`"] for k, v in dataclasses.asdict(cfg).items()]),
        "",
        "## Per epoch",
        "",
        *_table(["epoch", "lr", "train loss", "train acc", "test loss", "test acc", "seconds", "images/s"], [
            [r["epoch"], f"{r['lr']:.2e}", f"{r['train_loss']:.4f}", f"{r['train_acc']:.2f}%",
             f"{r['test_loss']:.4f}", f"{r['test_acc']:.2f}%", f"{r['seconds']:.1f}", f"{r['images_per_sec']:,.0f}"]
            for r in rows]),
        "",
    ]
    return "\n".join(lines)


def write_summary(workdir: str, device: str | None = None, curves: bool = True) -> str:
    """Writes DIR/summary.md from config.json and metrics.jsonl; returns its path.

    device: the hardware the run trained on. The default describes this machine's JAX devices,
    which is right when training calls this at its end. curves: (re)draw DIR/curves.png first, so
    the record always has its training curves.
    """
    cfg, model_cfg = read_config(workdir)
    rows = finished_epochs(workdir)
    device = device or describe_devices()
    if curves:
        plot.plot_run(workdir)
    num_params = count_params(jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0))))
    candidates = [p for p, _, _ in PICTURES] + [p for p, _ in DATA_FILES] + [TENSORBOARD]
    existing = {p for p in candidates if os.path.exists(os.path.join(workdir, p))}
    analysis = None
    if REPORT in existing:
        with open(os.path.join(workdir, REPORT)) as f:
            analysis = json.load(f)
    path = os.path.join(workdir, SUMMARY)
    write_atomic(path, render(workdir, cfg, model_cfg, rows, device, num_params, existing, analysis))
    return path


@cli
def main(argv=None) -> str:
    parser = CommandParser(prog="python -m vit_jax.summary", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="checkpoints", help="the training run to summarize")
    parser.add_argument("--device", default=None,
                        help="the hardware it trained on, in words (default: this machine's devices)")
    a = parser.parse_args(argv)
    path = write_summary(a.workdir, a.device)
    print(f"Wrote {path}")
    return path


if __name__ == "__main__":
    main()
