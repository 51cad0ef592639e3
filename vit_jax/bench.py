"""Benchmark of the train step: `python -m vit_jax.bench --preset P --batch_size B [--dtype D]`.

Prints compile time, time to the first step, ms per step and images/s after warm-up, and the model
FLOP utilization (FLOPs from XLA's cost analysis of the compiled step, against the device's peak).
Random uint8 batches of the right shape stand in for data: no dataset, no TensorFlow, no tfds.
"""

import argparse
import dataclasses
import time

import jax
import numpy as np

from vit_jax import step
from vit_jax.config import PRESETS, TrainConfig
from vit_jax.devices import DataParallel
from vit_jax.errors import UserError, cli
from vit_jax.model import count_params

# Dense peak TFLOP/s per device by (device kind substring, dtype). float32 matmuls on these GPUs run
# on TF32 tensor cores under XLA's default precision, so their float32 peak is the TF32 one.
PEAK_TFLOPS = {
    ("H200", "bfloat16"): 989.0, ("H200", "float32"): 494.0,
    ("H100", "bfloat16"): 989.0, ("H100", "float32"): 494.0,
    ("A100", "bfloat16"): 312.0, ("A100", "float32"): 156.0,
    ("L4", "bfloat16"): 121.0, ("L4", "float32"): 60.0,
    ("RTX 4090", "bfloat16"): 165.0, ("RTX 4090", "float32"): 82.6,
}


def peak_tflops(device, dtype: str):
    for (kind, dt), value in PEAK_TFLOPS.items():
        if kind in device.device_kind and dt == dtype:
            return value
    return None


def step_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per computation
        analysis = analysis[0]
    return float((analysis or {}).get("flops", 0.0))


def run(preset: str, batch_size: int, dtype: str, steps: int, warmup: int, peak: float | None) -> dict:
    """Times the train step; first_step_s counts from this call (state, compile, first step)."""
    started = time.perf_counter()
    model_cfg = dataclasses.replace(PRESETS[preset], dtype=dtype).validate()
    cfg = TrainConfig(preset=preset, batch_size=batch_size).validate()
    parallel = DataParallel.create(batch_size)
    state = parallel.replicate(step.create_train_state(model_cfg, cfg, steps_per_epoch=782))
    metrics = parallel.replicate(step.zero_metrics())
    rng = np.random.default_rng(0)
    batch = parallel.put_batch(rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
                               rng.integers(0, 10, batch_size).astype(np.int32),
                               np.ones(batch_size, np.float32))
    key = jax.random.key(0)
    train_fn = step.jit_train_step(parallel, step.Augment(model_cfg.img_size))

    t = time.perf_counter()
    compiled = train_fn.lower(state, metrics, *batch, key).compile()
    compile_s = time.perf_counter() - t
    state, metrics = compiled(state, metrics, *batch, key)
    jax.block_until_ready(metrics)
    first_step_s = time.perf_counter() - started
    for _ in range(warmup):
        state, metrics = compiled(state, metrics, *batch, key)
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, metrics, *batch, key)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t) / steps

    device = jax.local_devices()[0]
    flops = step_flops(compiled)  # for the whole (global) batch
    peak = peak or peak_tflops(device, dtype)
    n = jax.local_device_count()
    return {
        "preset": preset, "batch_size": batch_size, "dtype": dtype, "device": f"{n} x {device.device_kind}",
        "params": count_params(state.params), "compile_s": compile_s, "first_step_s": first_step_s,
        "ms_per_step": 1e3 * step_s, "images_per_sec": batch_size / step_s,
        "tflops_per_step": flops / 1e12, "achieved_tflops": flops / step_s / 1e12,
        "mfu": flops / step_s / (peak * 1e12 * n) if peak and flops else None,
    }


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="seed")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=20, help="timed steps, after warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for the MFU (known GPUs are looked up)")
    a = parser.parse_args(argv)
    if a.batch_size <= 0 or a.steps <= 0 or a.warmup < 0:
        raise UserError("batch_size and steps must be positive, warmup non-negative")
    r = run(a.preset, a.batch_size, a.dtype, a.steps, a.warmup, a.peak_tflops)
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (unknown peak; pass --peak_tflops)"
    print(f"{r['preset']} ({r['params']:,} params) | batch {r['batch_size']} | {r['dtype']} | {r['device']}")
    print(f"  compile:        {r['compile_s']:.2f} s")
    print(f"  first step at:  {r['first_step_s']:.2f} s (state, compile and one step)")
    print(f"  step:           {r['ms_per_step']:.1f} ms  ({r['images_per_sec']:.1f} images/s)")
    print(f"  FLOPs per step: {1e3 * r['tflops_per_step']:.2f} GFLOP ({r['achieved_tflops']:.3f} TFLOP/s achieved)")
    print(f"  MFU:            {mfu}")
    return r


if __name__ == "__main__":
    main()
