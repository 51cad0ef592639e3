"""`python -m parity.bench --recipe P --batch_size B`: the JAX train step beside the PyTorch twin's.

All three run in one process, one after the other, on the same device and the same batch shape: the
jitted JAX step (`vit_jax.bench`), the twin's step in eager PyTorch, and the same under
`torch.compile` (reported as n/a, with the reason, where it fails). Every step does the same work:
uint8 images -> resize, flip, padded crop, normalize -> forward, cross-entropy, backward, AdamW.
Random uint8 batches stand in for data. Prints ms/step, images/s and GFLOP/s of each, and each
one's time over PyTorch eager's ("JAX time / PyTorch eager time": below 1, JAX is faster); --json
PATH writes the figures.

It also times what limits both steps: their largest matmul, the MLP's first, alone, in XLA at the
rows of the JAX step's micro-batches and in PyTorch at the rows of its whole batch. The step's FLOPs
at that rate estimate the fastest it could run with that kernel.
"""

import argparse
import json
import math
import os
import platform
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F

from parity.model import VisionTransformer
from vit_jax import augment
from vit_jax import bench as jax_bench
from vit_jax.augment import CROP_PADDING
from vit_jax.config import MODELS, RECIPES, TrainConfig
from vit_jax.devices import CPU_DEVICES_HELP, describe_devices, split_cpu
from vit_jax.errors import CommandParser, UserError, cli, reason
from vit_jax.files import atomic_open
from vit_jax.workdir import check_output

MEAN = torch.tensor(augment.MEAN).view(1, 3, 1, 1)
STD = torch.tensor(augment.STD).view(1, 3, 1, 1)


def torch_augment(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """vit_jax.augment.augment's work in PyTorch: uint8 (B, 32, 32, 3) -> float (B, 3, S, S)."""
    B, device = images.shape[0], images.device
    x = images.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, 32, 32)
    if x.shape[-1] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    flip = torch.rand(B, device=device) < 0.5
    x = torch.where(flip.view(B, 1, 1, 1), x.flip(-1), x)
    x = F.pad(x, (CROP_PADDING,) * 4)  # (B, 3, S + 8, S + 8), zeros
    dy, dx = torch.randint(0, 2 * CROP_PADDING + 1, (2, B, 1), device=device)
    rows = (dy + torch.arange(img_size, device=device)).view(B, 1, img_size, 1)
    cols = (dx + torch.arange(img_size, device=device)).view(B, 1, 1, img_size)
    x = x[torch.arange(B, device=device).view(B, 1, 1, 1), torch.arange(3, device=device).view(1, 3, 1, 1), rows, cols]
    return (x - MEAN.to(device)) / STD.to(device)  # (B, 3, S, S)


def time_torch(recipe: str, batch_size: int, steps: int, warmup: int, compile: bool, device: str) -> dict:
    """ms per step and images/s of the twin's train step; the first step's time includes compiling."""
    model_cfg = MODELS[recipe]
    cfg = TrainConfig(recipe=recipe, batch_size=batch_size).validate()
    model = VisionTransformer.from_config(model_cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    forward = torch.compile(model) if compile else model
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)).to(device)
    labels = torch.from_numpy(rng.integers(0, 10, batch_size)).to(device)

    def train_step():
        loss = F.cross_entropy(forward(torch_augment(images, model_cfg.img_size)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def run(n):
        t = time.perf_counter()
        losses = [train_step() for _ in range(n)]
        if losses:
            losses[-1].item()  # waits for the device
        return time.perf_counter() - t

    first_step_s = run(1)
    run(warmup)
    step_s = run(steps) / steps
    return {"first_step_s": first_step_s, "ms_per_step": 1e3 * step_s, "images_per_sec": batch_size / step_s}


def matmul_gflops(jax_rows: int, torch_rows: int, fan_in: int, fan_out: int, device: str) -> dict:
    """GFLOP/s of (rows, fan_in) @ (fan_in, fan_out) in float32, jitted in XLA and in PyTorch, each
    timed alone over 10 to 1,000 calls (about 20 GFLOP where that is enough)."""
    def rate(matmul, rows, wait):
        flops = 2 * rows * fan_in * fan_out
        calls = min(1000, max(10, math.ceil(2e10 / flops)))
        wait(matmul())
        t = time.perf_counter()
        for _ in range(calls):
            out = matmul()
        wait(out)
        return flops * calls / (time.perf_counter() - t) / 1e9

    rng = np.random.default_rng(0)
    x, w = (rng.standard_normal(shape, np.float32) for shape in ((jax_rows, fan_in), (fan_in, fan_out)))
    x, w = jax.device_put(x), jax.device_put(w)
    jax_mm = jax.jit(lambda x, w: x @ w)
    xt, wt = (torch.from_numpy(rng.standard_normal(shape, np.float32)).to(device)
              for shape in ((torch_rows, fan_in), (fan_in, fan_out)))
    torch_wait = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return {"shape": [fan_in, fan_out], "jax_rows": jax_rows, "torch_rows": torch_rows,
            "jax_gflops": rate(lambda: jax_mm(x, w), jax_rows, jax.block_until_ready),
            "torch_gflops": rate(lambda: xt @ wt, torch_rows, lambda _: torch_wait())}


def bench(recipe: str, batch_size: int, steps: int, warmup: int, compile: bool = True) -> dict:
    """{'jax', 'torch_eager', 'torch_compile'}: each a dict of timings, or a string saying why not."""
    # PyTorch goes where JAX is: the GPU when both have one, else the CPU.
    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    out = {"recipe": recipe, "batch_size": batch_size, "jax_device": describe_devices(),
           "torch_device": device, "torch_threads": torch.get_num_threads(), "cpu": cpu_name(),
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_version": jax.__version__,
           "torch_version": torch.__version__}
    out["jax"] = jax_bench.run(recipe, batch_size, "float32", steps, warmup, None)
    out["torch_eager"] = time_torch(recipe, batch_size, steps, warmup, False, device)
    if not compile:
        out["torch_compile"] = "n/a: --no-compile"
    else:
        try:
            out["torch_compile"] = time_torch(recipe, batch_size, steps, warmup, True, device)
        except Exception as e:  # inductor fails in many ways (no compiler, unsupported op); all mean n/a
            out["torch_compile"] = f"n/a: {type(e).__name__}: {reason(e)}"
    eager = out["torch_eager"]["ms_per_step"]
    out["jax_over_eager"] = out["jax"]["ms_per_step"] / eager
    if not isinstance(out["torch_compile"], str):
        out["torch_compile"]["over_eager"] = out["torch_compile"]["ms_per_step"] / eager
    m = MODELS[recipe]
    flops = jax_bench.train_flops(m, batch_size)
    out["gflop_per_step"] = flops / 1e9
    for side in ("jax", "torch_eager", "torch_compile"):
        if not isinstance(out[side], str):
            out[side]["gflops"] = flops / out[side]["ms_per_step"] / 1e6
    tokens = m.num_tokens - m.num_patches + m.patches_kept()  # through the blocks in training
    jax_rows = batch_size // out["jax"]["grad_accum"] // jax.device_count() * tokens
    out["matmul"] = matmul_gflops(jax_rows, batch_size * tokens, m.embed_dim, int(m.embed_dim * m.mlp_ratio),
                                  device)
    return out


def cpu_name() -> str:
    """The processor's model name, for reading timings (they are only comparable on one machine)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


@cli
def main(argv=None):
    parser = CommandParser(prog="python -m parity.bench", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--recipe", choices=list(RECIPES), default="tutorial")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the step under torch.compile")
    parser.add_argument("--cpu_devices", type=int, default=0, help=CPU_DEVICES_HELP)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures here")
    parser.add_argument("--torch_threads", type=int, default=None,
                        help="PyTorch's CPU threads (default: its own choice, one per core); on a CPU that "
                             "other processes share, 1 can be faster")
    a = parser.parse_args(argv)
    if a.batch_size <= 0 or a.steps <= 0 or a.warmup < 0 or (a.torch_threads is not None and a.torch_threads <= 0):
        raise UserError("batch_size, steps and torch_threads must be positive, warmup non-negative")
    split_cpu(a.cpu_devices, a.batch_size)
    if a.json:
        check_output(a.json, "--json")  # before minutes of timing, not after
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    r = bench(a.recipe, a.batch_size, a.steps, a.warmup, a.compile)
    print(f"{a.recipe} ({r['jax']['params']:,} params) | batch {a.batch_size} | float32 | JAX on {r['jax_device']}, "
          f"PyTorch on {r['torch_device']} ({r['torch_threads']} threads) | {a.steps} timed steps | {r['cpu']}")
    print("each step: uint8 batch -> resize, flip, crop, normalize -> forward, backward, AdamW")
    print(f"  {'':<24} {'ms/step':>9}  {'images/s':>9}  {'GFLOP/s':>8}  time / PyTorch eager time")
    jax_r, eager = r["jax"], r["torch_eager"]
    k = jax_r["grad_accum"]
    micro = f"; the batch in {k} micro-batches of {a.batch_size // k}, as training on this device" if k > 1 else ""
    row = lambda name, t: f"  {name:<24} {t['ms_per_step']:>9.1f}  {t['images_per_sec']:>9.1f}  {t['gflops']:>8.1f}"
    print(f"{row('JAX (jit)', jax_r)}  {r['jax_over_eager']:.2f}  (compile {jax_r['compile_s']:.1f} s{micro})")
    print(f"{row('PyTorch eager', eager)}  1.00")
    t = r["torch_compile"]
    if isinstance(t, str):
        print(f"  {'PyTorch torch.compile':<24} {t}")
    else:
        print(f"{row('PyTorch torch.compile', t)}  {t['over_eager']:.2f}  (first step {t['first_step_s']:.1f} s)")
    mm, gflop = r["matmul"], r["gflop_per_step"]
    print(f"what limits them: {gflop:.3g} GFLOP per step (from the model's shapes), and the largest matmul alone, "
          f"(N, {mm['shape'][0]}) @ ({mm['shape'][0]}, {mm['shape'][1]}):")
    jax_whose = ("a micro-batch of the JAX step" if k > 1 else
                 "a device's share of its batch" if jax.device_count() > 1 else "its whole batch")
    for name, rate, rows, what in (("XLA", mm["jax_gflops"], mm["jax_rows"], jax_whose),
                                   ("PyTorch", mm["torch_gflops"], mm["torch_rows"], "its whole batch")):
        print(f"  {name:<8} {rate:8.1f} GFLOP/s at N = {rows:,} ({what}): the step's FLOPs at that rate take "
              f"{gflop / rate * 1e3:,.1f} ms")
    print(f"JAX time / PyTorch eager time: {r['jax_over_eager']:.2f}")
    if a.json:
        with atomic_open(a.json) as f:
            json.dump(r, f, indent=2)
    return r

if __name__ == "__main__":
    main()
