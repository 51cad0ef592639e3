"""The benchmark runs on random batches, prints its figures, and needs neither TensorFlow nor tfds."""

import os
import subprocess
import sys

import pytest

from vit_jax import bench
from vit_jax.config import MODELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_prints_figures_the_breakdown_and_the_profile_without_tensorflow():
    code = ("import sys; from vit_jax import bench; "
            "r = bench.main(['--recipe', 'test', '--batch_size', '16', '--steps', '3', '--warmup', '1', '--breakdown', "
            "'--profile']); "
            "assert r['images_per_sec'] > 0 and r['tflops_per_step'] > 0 and r['compile_s'] > 0, r; "
            "assert r['memory_bytes'] > 0 and all(v > 0 for k, v in r['breakdown_ms'].items() if k != 'backward'), r; "
            "ops = r['profile_ms']; assert ops and all(v > 0 for v in ops.values()), ops; "
            "assert not [k for k in ops if k.split('.')[-1].isdigit() or ':' in k], ops; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'torch')]")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for label in ("compile:", "first step at:", "images/s", "FLOPs per step:", "MFU:", "step memory:",
                  "augmentation", "forward", "backward", "optimizer update", "the whole step, fused",
                  "by kind of XLA operation"):
        assert label in run.stdout, label


def test_flops_counted_from_the_shapes():
    """The seed model by hand: 196 patches of 16x16x3 -> 384, 197 tokens through 6 blocks, 10 classes."""
    t, d, m = 197, 384, 1536
    per_block = 2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d + 4 * t * d * m
    forward = 2 * 196 * 768 * d + 6 * per_block + 2 * d * 10
    assert bench.forward_flops(MODELS["tutorial"]) == forward
    assert bench.train_flops(MODELS["tutorial"], 64) == 3 * 64 * forward
    assert round(bench.train_flops(MODELS["tutorial"], 64) / 1e9) == 894  # XLA's cost analysis: ~900


def test_conv_stem_flops_by_hand():
    """fast with the conv stem: 3x3 stride-2 layers 3->32 (16x16 out), 32->64 (8x8), 64->128 (4x4), 1x1 128->128."""
    import dataclasses

    cfg = MODELS["fast"]
    assert cfg.stem == "conv"
    stem = 2 * 9 * (256 * 3 * 32 + 64 * 32 * 64 + 16 * 64 * 128) + 2 * 16 * 128 * 128
    patch = 2 * 16 * 192 * 128
    assert bench.forward_flops(cfg) - bench.forward_flops(dataclasses.replace(cfg, stem="patch")) == stem - patch


def test_training_flops_count_the_tokens_training_keeps():
    """fast drops a quarter of its 16 tokens in training: the blocks see 12 (the stem sees all 16)."""
    import dataclasses

    cfg = MODELS["fast"]
    assert bench.train_flops(cfg, 64) == 3 * 64 * bench.forward_flops(cfg, tokens=12)
    assert bench.train_flops(dataclasses.replace(cfg, patch_drop_rate=0.0), 64) == 3 * 64 * bench.forward_flops(cfg)
    assert bench.forward_flops(cfg, tokens=12) < bench.forward_flops(cfg)


def test_bench_refuses_bad_batch_size():
    run = subprocess.run([sys.executable, "-m", "vit_jax.bench", "--recipe", "test", "--batch_size", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr and "positive" in run.stderr


@pytest.mark.parametrize("module", ["vit_jax.bench", "parity.bench"])
def test_bench_refuses_a_negative_number_of_cpu_devices(module):
    run = subprocess.run([sys.executable, "-m", module, "--recipe", "test", "--cpu_devices", "-1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "--cpu_devices must be 0 (one per core) or positive, got -1" in run.stderr
