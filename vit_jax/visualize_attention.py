"""`python -m vit_jax.visualize_attention --workdir DIR`: where the best model looks, as one PNG.

One row per image: the image with the true and predicted class, the attention rollout over all
layers, and the last layer's class-token attention for each head, each map upsampled to the image
and laid over it. Test images by default (`--num_images N`), or your own (`--images a.png b.jpg`).
Written to DIR/attention.png unless `--out` says otherwise.
"""

import os

import numpy as np

from vit_jax import attention, data
from vit_jax.errors import CommandParser, UserError, cli
from vit_jax.figure import figsize, save, subplots
from vit_jax.predict import class_names, load_images, softmax
from vit_jax.workdir import check_output, load_best

ATTENTION = "attention.png"

CELL_PX = 160  # each map is drawn in a CELL_PX x CELL_PX square
OVERLAY_ALPHA = 0.55


def figure_size(num_images: int, num_heads: int) -> tuple[int, int]:
    """(width, height) in pixels of the grid: image, rollout and one column per head; a row per image."""
    return (2 + num_heads) * CELL_PX, num_images * CELL_PX


def draw(images: np.ndarray, rollout_maps: np.ndarray, head_maps: np.ndarray, labels: list[str], out: str,
         title: str) -> str:
    """Writes the grid. images uint8 (B, S, S, 3); rollout_maps (B, g, g); head_maps (B, H, g, g)."""
    num_images, num_heads = head_maps.shape[:2]
    side = images.shape[1]
    rollout_up = attention.upsample(rollout_maps, side)  # (B, S, S)
    heads_up = attention.upsample(head_maps, side)  # (B, H, S, S)
    maps_raw = [[rollout_maps[b]] + list(head_maps[b]) for b in range(num_images)]  # patch resolution
    width, height = figure_size(num_images, num_heads)
    fig, axes = subplots(num_images, 2 + num_heads, figsize=figsize(width, height), squeeze=False,
                         layout="constrained")
    fig.suptitle(f"{title}\nEach map is stretched from its minimum (blue) to its maximum (red); "
                 f"peak: its maximum over its mean (1.0x is flat)", fontsize=9, wrap=True)  # few heads: narrow
    columns = ["rollout, all layers"] + [f"last layer, head {h + 1}" for h in range(num_heads)]
    for b in range(num_images):
        axes[b, 0].imshow(images[b], interpolation="bilinear")
        axes[b, 0].set_title(labels[b], fontsize=8)
        maps = [rollout_up[b]] + list(heads_up[b])
        for c, (ax, m) in enumerate(zip(axes[b, 1:], maps)):
            ax.imshow(images[b], interpolation="bilinear")
            # Each map stretched from its own minimum to its maximum: a rollout is close to uniform
            # (the identity it adds for the residual dominates), and on a common scale its shape would
            # vanish. How peaked it really is goes in the corner: its maximum over its mean.
            ax.imshow((m - m.min()) / max(m.max() - m.min(), 1e-12), cmap="jet", alpha=OVERLAY_ALPHA,
                      interpolation="bilinear")
            patches = maps_raw[b][c]
            ax.text(0.03, 0.03, f"peak {patches.max() / patches.mean():.1f}x", transform=ax.transAxes,
                    fontsize=7, bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "linewidth": 0})
            ax.set_title(columns[c] if b == 0 else "", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return save(fig, out)


def visualize(model_cfg, params, images: np.ndarray, names: list[str], out: str, title: str,
              true_labels=None) -> dict:
    """Runs the model on uint8 images (B, 32, 32, 3) and draws the grid; returns the maps and the path."""
    logits, attn = attention.attention_weights(model_cfg, params, images)
    probs = softmax(logits)
    classes = class_names(model_cfg.num_classes)
    labels = []
    for b, p in enumerate(probs):
        guess = f"pred {classes[p.argmax()]} {100 * p.max():.0f}%"
        first = names[b] if true_labels is None else f"true {classes[true_labels[b]]}"
        labels.append(f"{first}\n{guess}")
    maps = attention.rollout(attn, model_cfg.class_token)
    heads = attention.head_attention(attn, model_cfg.class_token)
    path = draw(images, maps, heads, labels, out, title)
    return {"path": path, "rollout": maps, "heads": heads, "probs": probs}


@cli
def main(argv=None) -> dict:
    parser = CommandParser(prog="python -m vit_jax.visualize_attention",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="checkpoints", help="the training run whose best model to use")
    data.add_source_arguments(parser)
    parser.add_argument("--num_images", type=int, default=8, help="how many test images, from the first")
    parser.add_argument("--images", nargs="+", metavar="IMAGE", help="your own images instead of test images")
    parser.add_argument("--out", default=None, help="PNG to write, .png added to a name without an extension "
                                                    "(default: WORKDIR/attention.png)")
    a = parser.parse_args(argv)
    if a.num_images <= 0:
        raise UserError(f"--num_images must be positive, got {a.num_images}")

    loaded = load_images(a.images) if a.images else None
    run = load_best(a.workdir)
    if a.out:
        check_output(a.out)
    cfg, model_cfg, meta = run.cfg, run.model_cfg, run.meta
    true_labels = None
    if loaded:
        images = np.stack(list(loaded.values()))
        names = [os.path.basename(p) for p in loaded]
    else:
        images, true_labels = data.load_split("test", limit=a.num_images, **data.source(a, cfg))
        names = [f"test {i}" for i in range(len(images))]
    out = a.out or os.path.join(a.workdir, ATTENTION)
    g = model_cfg.img_size // model_cfg.patch_size
    p = model_cfg.patch_size
    tokens = (f"{p}x{p}-pixel patches" if model_cfg.stem == "patch" else
              f"tokens from the conv stem, one per {p}x{p} pixels")
    title = (f"Attention of the best model ({cfg.recipe}, epoch {meta['epoch']}, test acc "
             f"{meta['test_acc']:.1f}%; {model_cfg.depth} layers, {model_cfg.num_heads} heads, a {g}x{g} grid of "
             f"{tokens})")
    result = visualize(model_cfg, run.params, images, names, out, title, true_labels)
    print(f"Wrote {result['path']}")
    return result


if __name__ == "__main__":
    main()
