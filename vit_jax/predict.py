"""`python -m vit_jax.predict --workdir DIR IMAGE...`: the best model's top classes for your own images.

Also what the other inspection commands share: images read the way CIFAR-10's were made
(`load_image`), and logits of many images in batches of one size (`predict_logits`).
"""

import argparse

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vit_jax import data, step
from vit_jax.config import ModelConfig
from vit_jax.errors import CommandParser, UserError, cli
from vit_jax.workdir import load_best

CIFAR_SIDE = 32


def class_names(num_classes: int) -> tuple[str, ...]:
    """CIFAR-10's names; plain indices for a model trained with another number of classes."""
    if num_classes == len(data.CLASS_NAMES):
        return data.CLASS_NAMES
    return tuple(str(i) for i in range(num_classes))


def load_image(path: str) -> np.ndarray:
    """Any image Pillow reads -> uint8 (32, 32, 3), made the way CIFAR-10's images were: small and square.

    The photo is turned upright (EXIF), transparency is laid over white, the largest centered square
    is kept (squashing a wide photo would distort its objects), and it is reduced to 32x32 with an
    antialiasing filter, so fine detail averages out instead of aliasing. Raises OSError for a file
    that is missing or not an image (PIL's UnidentifiedImageError is one).
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "P"):
            img = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img)
        img = img.convert("RGB")
        img = ImageOps.fit(img, (CIFAR_SIDE, CIFAR_SIDE), method=Image.Resampling.LANCZOS)
        return np.asarray(img, np.uint8)


def load_images(paths) -> dict[str, np.ndarray]:
    """{path: uint8 (32, 32, 3)}, in the order given, for the commands that take your images (predict,
    visualize_attention), which call it before loading the model. A file that is not an image is a
    UserError naming each such file: every command refuses it alike, in one line, before any work."""
    loaded, bad = {}, []
    for path in paths:
        try:
            loaded[path] = load_image(path)
        except UnidentifiedImageError:
            bad.append(f"{path} is not an image Pillow can read")
        except OSError as e:  # missing, a folder, unreadable, truncated
            bad.append(f"cannot read {path} ({e.strerror or e})")
    if bad:
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise UserError(f"{'; '.join(bad[:3])}{more}: give only image files (PNG, JPEG, ...)")
    return loaded


def predict_logits(model_cfg: ModelConfig, params, images: np.ndarray, batch_size: int = 256,
                   tta_flip: bool = False) -> np.ndarray:
    """uint8 images (N, 32, 32, 3) -> logits (N, C) float32, through the eval pipeline (with the
    mirror images' logits averaged in if tta_flip).

    Batches are padded to one size, so the apply compiles once however many images there are.
    """
    if len(images) == 0:
        return np.zeros((0, model_cfg.num_classes), np.float32)
    batch_size = min(batch_size, len(images))
    out = []
    for x, _, mask in data.epoch_batches(images, np.zeros(len(images), np.int32), batch_size):
        out.append(np.asarray(step.infer_jit(model_cfg, params, x, tta_flip=tta_flip)["logits"])[mask > 0])
    return np.concatenate(out)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64, so that each row sums to one to the last digit that matters."""
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_k(probs: np.ndarray, names, k: int = 3) -> list[tuple[str, float]]:
    order = np.argsort(-probs, kind="stable")[:k]
    return [(names[i], float(probs[i])) for i in order]


@cli
def main(argv=None) -> dict:
    """Prints the top classes of each image; returns {path: probabilities (C,)}."""
    parser = CommandParser(prog="python -m vit_jax.predict", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files in any format Pillow reads")
    parser.add_argument("--workdir", default="checkpoints", help="the training run whose best model to use")
    parser.add_argument("--top", type=int, default=3, help="how many classes to print per image")
    parser.add_argument("--tta_flip", action=argparse.BooleanOptionalAction, default=None,
                        help="average each image's logits with its mirror image's (default: as the run evaluated)")
    a = parser.parse_args(argv)
    if a.top <= 0:
        raise UserError(f"--top must be positive, got {a.top}")

    loaded = load_images(a.images)
    run = load_best(a.workdir)
    names = class_names(run.model_cfg.num_classes)
    tta_flip = run.cfg.tta_flip if a.tta_flip is None else a.tta_flip
    probs = softmax(predict_logits(run.model_cfg, run.params, np.stack(list(loaded.values())), tta_flip=tta_flip))
    results = dict(zip(loaded, probs))
    print(f"Best model of {a.workdir} (epoch {run.meta['epoch']}, test accuracy {run.meta['test_acc']:.2f}% "
          f"when saved):")
    for path, p in results.items():
        print(f"{path}: " + " | ".join(f"{name} {100 * q:.1f}%" for name, q in top_k(p, names, a.top)))
    return results


if __name__ == "__main__":
    main()
