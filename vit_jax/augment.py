"""Preprocessing and augmentation on the device, inside the jitted steps.

uint8 (B, 32, 32, 3) batches go to the accelerator as they are; resizing, flipping, cropping and
normalization happen there, so the host never starves it. The order is the PyTorch tutorial's
torchvision pipeline: Resize(img_size, bilinear), RandomHorizontalFlip, RandomCrop(img_size,
padding=4), [a random translation (airbench's), RandomRotation, ColorJitter: the tutorial's optional tips], ToTensor, Normalize.
Plain jax.numpy: no image library to install on an accelerator machine.
"""

import functools

import jax
import jax.numpy as jnp

# CIFAR-10's per-channel statistics of the training set, on the [0, 1] scale.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
CROP_PADDING = 4


def resize(images, img_size: int):
    """uint8 (B, h, w, 3) -> float32 (B, img_size, img_size, 3) in [0, 1], bilinear."""
    x = images.astype(jnp.float32) / 255.0
    if x.shape[1:3] == (img_size, img_size):
        return x
    return jax.image.resize(x, (x.shape[0], img_size, img_size, 3), method="bilinear")


def normalize(x):
    return (x - jnp.asarray(MEAN)) / jnp.asarray(STD)


def preprocess(images, img_size: int):
    """Evaluation: resize and normalize. uint8 (B, 32, 32, 3) -> float32 (B, S, S, 3)."""
    return normalize(resize(images, img_size))


def flip(x):
    """Mirror images left to right: (..., H, W, C)."""
    return x[..., ::-1, :]


def _random_crop(key, x, padding: int = CROP_PADDING, mode: str = "constant"):
    """A random (S, S, 3) window of the (S, S, 3) image padded by `padding` on every side: with zeros,
    torchvision's RandomCrop(S, padding=4); with mode 'reflect', a random translation by up to
    `padding` pixels each way whose gap is filled by the image's mirrored edge (airbench's)."""
    padded = jnp.pad(x, ((padding, padding), (padding, padding), (0, 0)), mode=mode)
    dy, dx = jax.random.randint(key, (2,), 0, 2 * padding + 1)
    return jax.lax.dynamic_slice(padded, (dy, dx, 0), x.shape)


def rotate(x, angle):
    """One (S, S, C) image turned by `angle` radians (counterclockwise as displayed) about its centre;
    bilinear, zeros where the turned image has no source (torchvision's RandomRotation fills 0)."""
    side = x.shape[0]
    centre = (side - 1) / 2
    rows, cols = jnp.meshgrid(jnp.arange(side) - centre, jnp.arange(side) - centre, indexing="ij")
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    # Where each output pixel comes from: the inverse rotation of its position (rows grow downwards).
    src = [cos * rows + sin * cols + centre, -sin * rows + cos * cols + centre]
    return jnp.stack([jax.scipy.ndimage.map_coordinates(x[..., c], src, order=1, mode="constant", cval=0.0)
                      for c in range(x.shape[-1])], axis=-1)


def _jitter(key, x, strength: float):
    """torchvision's ColorJitter(brightness=s, contrast=s, saturation=s) on one [0, 1] image.

    Factors are drawn uniformly from [1 - s, 1 + s]; the order is fixed (torchvision shuffles it).
    """
    b, c, s = jax.random.uniform(key, (3,), minval=1 - strength, maxval=1 + strength)
    gray = lambda img: jnp.dot(img, jnp.asarray([0.299, 0.587, 0.114]))[..., None]
    x = jnp.clip(x * b, 0, 1)
    x = jnp.clip((x - gray(x).mean()) * c + gray(x).mean(), 0, 1)
    return jnp.clip((x - gray(x)) * s + gray(x), 0, 1)


def _augment_one(key, x, flips: bool, crops: bool, rotation: float, color_jitter: float, translate: int):
    """One resized [0, 1] image (S, S, 3): flip, padded crop, translation, optional rotation and jitter."""
    k_flip, k_crop, k_rot, k_jit = jax.random.split(key, 4)
    k_shift = jax.random.fold_in(key, 4)  # not a fifth split: the other draws stay those of earlier runs
    if flips:
        x = jnp.where(jax.random.bernoulli(k_flip), flip(x), x)
    if crops:
        x = _random_crop(k_crop, x)
    if translate:
        x = _random_crop(k_shift, x, translate, mode="reflect")
    if rotation:  # an angle drawn uniformly from [-rotation, rotation] degrees
        x = rotate(x, jax.random.uniform(k_rot, minval=-rotation, maxval=rotation) * jnp.pi / 180)
    if color_jitter:
        x = _jitter(k_jit, x, color_jitter)
    return x


def augment(key, images, img_size: int, rotation: float = 0.0, color_jitter: float = 0.0, flips: bool = True,
            crops: bool = True, translate: int = 0):
    """Training: uint8 (B, 32, 32, 3) -> augmented, normalized float32 (B, S, S, 3).

    Each image gets its own key, so the result depends only on `key`, never on the batch split.
    flips / crops False leave out the random flip / crop; translate N > 0 shifts each image by up to N
    pixels each way (all off: the images as they are).
    """
    x = resize(images, img_size)
    if flips or crops or rotation or color_jitter or translate:
        keys = jax.random.split(key, x.shape[0])
        one = functools.partial(_augment_one, flips=flips, crops=crops, rotation=rotation,
                                color_jitter=color_jitter, translate=translate)
        x = jax.vmap(one)(keys, x)
    return normalize(x)
