"""On-device augmentation, checked on known inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import augment


def _images(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_normalization_constants():
    np.testing.assert_allclose(augment.MEAN, (0.4914, 0.4822, 0.4465))
    np.testing.assert_allclose(augment.STD, (0.2470, 0.2435, 0.2616))
    x = np.full((1, 32, 32, 3), 255, np.uint8)
    out = augment.preprocess(x, 32)
    np.testing.assert_allclose(out[0, 0, 0], (1 - np.array(augment.MEAN)) / np.array(augment.STD), rtol=1e-6)


def test_preprocess_resizes_bilinearly():
    x = _images(2)
    out = augment.preprocess(x, 224)
    assert out.shape == (2, 224, 224, 3) and out.dtype == jnp.float32
    # A constant image stays constant under bilinear resizing.
    flat = np.full((1, 32, 32, 3), 100, np.uint8)
    np.testing.assert_allclose(augment.resize(flat, 224), 100 / 255, rtol=1e-6)


def test_same_key_same_result_and_keys_matter():
    x = _images()
    a = augment.augment(jax.random.key(0), x, 32)
    b = augment.augment(jax.random.key(0), x, 32)
    c = augment.augment(jax.random.key(1), x, 32)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def _unnormalize(x):
    return np.asarray(x) * np.array(augment.STD) + np.array(augment.MEAN)


def test_every_output_is_a_flip_and_a_crop_of_the_padded_image():
    """Each augmented image equals some window of the zero-padded (possibly mirrored) input."""
    x = _images(8, seed=1)
    out = _unnormalize(augment.augment(jax.random.key(3), x, 32))
    flips = crops_seen = 0
    for img, aug in zip(x.astype(np.float32) / 255, out):
        matches = []
        for flipped in (False, True):
            src = np.pad(img[:, ::-1] if flipped else img, ((4, 4), (4, 4), (0, 0)))
            for dy in range(9):
                for dx in range(9):
                    if np.allclose(src[dy:dy + 32, dx:dx + 32], aug, atol=1e-5):
                        matches.append((flipped, dy, dx))
        assert matches, "augmented image is not a flip/crop of the padded input"
        flips += matches[0][0]
        crops_seen += matches[0][1:] != (4, 4)
    assert 0 < flips < 8  # both flipped and unflipped images occur
    assert crops_seen > 0  # not every crop is the centre


def test_flip_is_a_flip():
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[:, :, :16] = 255  # left half white
    outs = [_unnormalize(augment.augment(jax.random.key(k), img, 32))[0] for k in range(20)]
    # Away from the crop's shift, the white half is either on the left or on the right.
    sides = {"left" if o[16, 8].mean() > 0.9 else "right" for o in outs if abs(o[16, 8].mean() - 0.5) > 0.4}
    assert sides == {"left", "right"}


def test_rotation_and_color_jitter_change_the_image_and_stay_finite():
    x = _images(4)
    plain = augment.augment(jax.random.key(0), x, 32)
    rotated = augment.augment(jax.random.key(0), x, 32, rotation=15.0)
    jittered = augment.augment(jax.random.key(0), x, 32, color_jitter=0.2)
    for out in (rotated, jittered):
        assert out.shape == plain.shape and np.all(np.isfinite(out))
        assert not np.allclose(out, plain)
    raw = _unnormalize(jittered)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5  # jitter clips to the valid range


def test_rotate_turns_about_the_centre_and_fills_zeros():
    img = np.zeros((9, 9, 1), np.float32)
    img[4, 8] = 1.0  # right of the centre (4, 4)
    quarter = np.asarray(augment.rotate(img, np.pi / 2))
    assert quarter[0, 4, 0] == pytest.approx(1.0, abs=1e-5)  # now above it: counterclockwise as displayed
    assert quarter.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(augment.rotate(img, 0.0), img, atol=1e-6)
    full = np.ones((9, 9, 1), np.float32)
    corners = np.asarray(augment.rotate(full, np.pi / 4))
    assert corners[0, 0, 0] == 0.0 and corners[4, 4, 0] == pytest.approx(1.0)  # no source: zero fill


def test_no_flip_crop_leaves_the_images_as_they_are():
    x = _images()
    plain = augment.augment(jax.random.key(0), x, 32, flips=False, crops=False)
    np.testing.assert_allclose(plain, augment.preprocess(x, 32))


def test_flip_alone_gives_each_image_or_its_mirror_uncropped():
    x = _images(16)
    plain = np.asarray(augment.preprocess(x, 32))
    out = np.asarray(augment.augment(jax.random.key(5), x, 32, crops=False))
    mirrored = [np.array_equal(o, p[:, ::-1]) for o, p in zip(out, plain)]
    kept = [np.array_equal(o, p) for o, p in zip(out, plain)]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert any(mirrored) and any(kept)


def test_translation_is_a_window_of_the_reflect_padded_image_with_every_shift_drawn():
    """--translate 2: each image is one of the 25 windows of its mirror-padded self, as the key draws
    it; the flip and the other draws are those of the run without translation."""
    x = _images(64, seed=2)
    key = jax.random.key(7)
    out = np.asarray(augment.augment(key, x, 32, crops=False, translate=2))
    flipped_only = np.asarray(augment.augment(key, x, 32, crops=False))
    shifts = set()
    for k, img, aug in zip(jax.random.split(key, len(x)), flipped_only, out):
        dy, dx = np.asarray(jax.random.randint(jax.random.fold_in(k, 4), (2,), 0, 5))
        expected = np.pad(img, ((2, 2), (2, 2), (0, 0)), mode="reflect")[dy:dy + 32, dx:dx + 32]
        np.testing.assert_allclose(aug, expected, atol=1e-6)
        shifts.add((int(dy), int(dx)))
    assert len(shifts) > 15  # the draws spread over the 25 shifts
    np.testing.assert_array_equal(augment.augment(key, x, 32, crops=False, translate=0), flipped_only)
