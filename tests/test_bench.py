"""The benchmark runs on random batches, prints its figures, and needs neither TensorFlow nor tfds."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_prints_figures_without_tensorflow():
    code = ("import sys; from vit_jax import bench; "
            "r = bench.main(['--preset', 'test', '--batch_size', '16', '--steps', '3', '--warmup', '1']); "
            "assert r['images_per_sec'] > 0 and r['tflops_per_step'] > 0 and r['compile_s'] > 0, r; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'torch')]")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for label in ("compile:", "first step at:", "images/s", "FLOPs per step:", "MFU:"):
        assert label in run.stdout, label


def test_bench_refuses_bad_batch_size():
    run = subprocess.run([sys.executable, "-m", "vit_jax.bench", "--preset", "test", "--batch_size", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr and "positive" in run.stderr
