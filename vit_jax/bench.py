"""Benchmark of the train step: `python -m vit_jax.bench --recipe P --batch_size B [--dtype D] [--breakdown]`.

Prints compile time, time to the first step, ms per step and images/s after warm-up, the compiled
step's memory, and the model FLOP utilization: FLOPs counted from the model's shapes (`train_flops`)
over the device's peak. (XLA's own count, from its cost analysis, is printed beside it; it cannot see
inside cuDNN's fused attention.) `--breakdown` also times the step's parts alone: augmentation,
forward, backward and the optimizer update; `--profile` traces the whole step and adds up the time of
each kind of XLA operation (on the CPU: matmul fusions, transposed copies, elementwise fusions...).
Random uint8 batches stand in for data: no dataset, no TensorFlow, no tfds.
"""

import collections
import dataclasses
import functools
import glob
import os
import re
import tempfile
import time

import jax
import numpy as np

from vit_jax import augment, step
from vit_jax.config import MODELS, RECIPES, ModelConfig, TrainConfig
from vit_jax.devices import CPU_DEVICES_HELP, DataParallel, split_cpu
from vit_jax.errors import CommandParser, UserError, cli
from vit_jax.model import attention_implementation, count_params

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


def forward_flops(cfg: ModelConfig, tokens: int | None = None) -> float:
    """FLOPs of one image's forward pass (a multiply-add counts 2): the matmuls and the attention
    products, from the model's shapes, with `tokens` through the blocks (default: all of them). Norms,
    activations and softmax are left out, as usual."""
    tokens, d, hidden = tokens or cfg.num_tokens, cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    patch_embed = 2 * cfg.num_patches * (cfg.patch_size ** 2 * 3) * d
    if cfg.stem == "conv":  # each 3x3 stride-2 layer on a grid halved from the last, then the 1x1 projection
        widths, side = [3] + cfg.stem_widths, cfg.img_size
        patch_embed = 2 * cfg.num_patches * d * d + sum(
            2 * (side >> (i + 1)) ** 2 * 9 * c_in * c_out for i, (c_in, c_out) in enumerate(zip(widths, widths[1:])))
    block = (2 * tokens * d * 3 * d  # qkv
             + 2 * 2 * tokens * tokens * d  # q.k and attention.v, over all heads
             + 2 * tokens * d * d  # proj
             + 2 * 2 * tokens * d * hidden)  # fc1, fc2
    return patch_embed + cfg.depth * block + 2 * d * cfg.num_classes


def train_flops(cfg: ModelConfig, batch_size: int) -> float:
    """FLOPs of one training step: forward and backward, the backward counted twice the forward, with the
    tokens that training keeps (--patch_drop_rate) through the blocks."""
    return 3 * batch_size * forward_flops(cfg, cfg.num_tokens - cfg.num_patches + cfg.patches_kept())


def xla_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per computation
        analysis = analysis[0]
    return float((analysis or {}).get("flops", 0.0))


def memory_bytes(compiled) -> int | None:
    """The compiled step's device memory: its arguments, outputs and temporaries (donated buffers once)."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def _seconds_per_call(fn, args, steps: int, warmup: int) -> float:
    """Mean seconds of fn(*args) after warm-up, waiting for the device (inputs are not donated)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / steps


def _random_batch(batch_size: int):
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, 10, batch_size).astype(np.int32), np.ones(batch_size, np.float32))


def run(recipe: str, batch_size: int, dtype: str, steps: int, warmup: int, peak: float | None,
        attention: str = "auto", grad_accum: int | None = None, profile: bool = False) -> dict:
    """Times the train step; first_step_s counts from this call (state, compile, first step).
    grad_accum: the step's micro-batches (None: the run's default, `step.micro_batches`).
    profile: also `op_times` of the step, as 'profile_ms'."""
    started = time.perf_counter()
    model_cfg = dataclasses.replace(MODELS[recipe], dtype=dtype, attention=attention).validate()
    cfg = TrainConfig(recipe=recipe, batch_size=batch_size, grad_accum=grad_accum).validate()
    parallel = DataParallel.create(batch_size)
    state = parallel.replicate(step.create_train_state(model_cfg, cfg))
    metrics = parallel.replicate(step.zero_metrics())
    batch = parallel.put_batch(*_random_batch(batch_size))
    key = jax.random.key(0)
    settings = step.Settings.of(model_cfg, cfg)
    train_fn = step.jit_train_step(parallel, settings, step.Schedule.of(cfg, 782))

    t = time.perf_counter()
    compiled = train_fn.lower(state, metrics, *batch, key).compile()
    compile_s = time.perf_counter() - t
    one_step = lambda s, m: compiled(s, m, *batch, key, train_fn.schedule)
    state, metrics = one_step(state, metrics)
    jax.block_until_ready(metrics)
    first_step_s = time.perf_counter() - started
    for _ in range(warmup):
        state, metrics = one_step(state, metrics)
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = one_step(state, metrics)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t) / steps

    ops = op_times(one_step, state, metrics, steps) if profile else None
    device = jax.local_devices()[0]
    flops = train_flops(model_cfg, batch_size)  # for the whole (global) batch
    peak = peak or peak_tflops(device, dtype)
    n = jax.device_count()
    return {
        "recipe": recipe, "batch_size": batch_size, "grad_accum": settings.grad_accum, "dtype": dtype,
        "device": f"{n} x {device.device_kind}",
        "attention": attention_implementation(model_cfg), "params": count_params(state.params),
        "compile_s": compile_s, "first_step_s": first_step_s, "ms_per_step": 1e3 * step_s,
        "images_per_sec": batch_size / step_s, "tflops_per_step": flops / 1e12,
        "xla_tflops_per_step": xla_flops(compiled) / 1e12, "achieved_tflops": flops / step_s / 1e12,
        "peak_tflops": peak, "mfu": flops / step_s / (peak * 1e12 * n) if peak else None,
        "memory_bytes": memory_bytes(compiled), "profile_ms": ops,
    }


# An XLA operation's event in a trace is named after its HLO instruction: 'ynn_fusion.47', 'copy.3',
# 'dot'. The runtime's own events ('ThunkExecutor::Execute', 'end: copy.3') and Python's are not.
_OP_EVENT = re.compile(r"^([A-Za-z][\w-]*?)(\.\d+)?$")


def op_times(step_fn, state, metrics, steps: int) -> dict:
    """{kind of XLA operation: ms per step}, from a jax.profiler trace of `steps` calls of
    step_fn(state, metrics) -> (state, metrics). Kinds are instruction names less their number
    ('ynn_fusion', 'transpose_copy_fusion'); times are summed over the threads that ran them."""
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for _ in range(steps):
                state, metrics = step_fn(state, metrics)
            jax.block_until_ready(metrics)
        (path,) = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    ns = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                match = _OP_EVENT.match(event.name)
                if match:
                    ns[match.group(1)] += event.duration_ns
    return {kind: t / 1e6 / steps for kind, t in ns.most_common()}


def print_op_times(ms: dict, top: int = 12):
    total = sum(ms.values())
    print(f"  where the step's time goes by kind of XLA operation (traced; summed over threads: {total:.1f} ms):")
    for kind, t in list(ms.items())[:top]:
        print(f"    {kind:<28} {t:9.1f} ms  {100 * t / total:5.1f}%")


def breakdown(recipe: str, batch_size: int, dtype: str, steps: int, warmup: int,
              grad_accum: int | None = None) -> dict:
    """ms of each part of a step, each jitted alone: augmentation, forward (with the loss), backward
    (forward and backward, less the forward), optimizer update; and the whole step. The forward and
    backward take the batch in the step's micro-batches."""
    model_cfg = dataclasses.replace(MODELS[recipe], dtype=dtype).validate()
    cfg = TrainConfig(recipe=recipe, batch_size=batch_size, grad_accum=grad_accum).validate()
    settings = step.Settings.of(model_cfg, cfg)
    k = settings.grad_accum
    state = step.create_train_state(model_cfg, cfg)
    schedule = step.Schedule.of(cfg, 782)
    images, labels, mask = _random_batch(batch_size)
    key = jax.random.key(0)

    loss_fn = functools.partial(step.loss, state.apply_fn, 0.0)
    micro = lambda a: a.reshape(k, batch_size // k, *a.shape[1:])

    def forward(params, x):  # the loss of k micro-batches of the step's size, one after the other
        return jax.lax.map(lambda b: loss_fn(params, *b, key, "sum")[0], (micro(x), micro(labels), micro(mask))).sum()

    aug = jax.jit(lambda rng, im: augment.augment(rng, im, model_cfg.img_size))
    x = aug(key, images)
    forward_backward = jax.jit(lambda p, x: step.gradients(loss_fn, p, (x, labels, mask), key, k))
    grads, _ = forward_backward(state.params, x)
    whole = jax.jit(lambda s, m: step.train_step(s, m, images, labels, mask, key, schedule, settings))
    ms = {
        "augmentation": _seconds_per_call(aug, (key, images), steps, warmup),
        "forward": _seconds_per_call(jax.jit(forward), (state.params, x), steps, warmup),
        "forward_backward": _seconds_per_call(forward_backward, (state.params, x), steps, warmup),
        "optimizer_update": _seconds_per_call(jax.jit(lambda s, g: s.apply_gradients(grads=g, lr=schedule(s.step))),
                                              (state, grads), steps, warmup),
        "whole_step": _seconds_per_call(whole, (state, step.zero_metrics()), steps, warmup),
    }
    ms = {part: 1e3 * seconds for part, seconds in ms.items()}
    ms["backward"] = ms["forward_backward"] - ms["forward"]
    ms["micro_batches"] = k
    return ms


def print_breakdown(ms: dict):
    parts = ("augmentation", "forward", "backward", "optimizer_update")
    total = sum(ms[p] for p in parts)
    k = ms["micro_batches"]
    each = f"; forward and backward in {k} micro-batches, as the step" if k > 1 else ""
    print(f"  where a step's time goes (each part jitted and timed alone{each}):")
    for p in parts:
        print(f"    {p.replace('_', ' '):<18} {ms[p]:9.1f} ms  {100 * ms[p] / total:5.1f}%")
    print(f"    {'sum of the parts':<18} {total:9.1f} ms  (the whole step, fused: {ms['whole_step']:.1f} ms)")


@cli
def main(argv=None):
    parser = CommandParser(prog="python -m vit_jax.bench", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--recipe", choices=list(RECIPES), default="tutorial")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--attention", choices=["auto", "xla", "cudnn"], default="auto")
    parser.add_argument("--grad_accum", type=int, default=None,
                        help="micro-batches per update (default: the run's, see vit_jax.train --help)")
    parser.add_argument("--cpu_devices", type=int, default=0, help=CPU_DEVICES_HELP)
    parser.add_argument("--steps", type=int, default=20, help="timed steps, after warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time augmentation, forward, backward and the optimizer update apart")
    parser.add_argument("--profile", action="store_true",
                        help="also trace the step and add up the time of each kind of XLA operation")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for the MFU (known GPUs are looked up)")
    a = parser.parse_args(argv)
    if a.batch_size <= 0 or a.steps <= 0 or a.warmup < 0:
        raise UserError("batch_size and steps must be positive, warmup non-negative")
    if a.peak_tflops is not None and not 0 < a.peak_tflops < float("inf"):
        raise UserError(f"--peak_tflops must be a positive number, got {a.peak_tflops}")
    split_cpu(a.cpu_devices, a.batch_size)
    r = run(a.recipe, a.batch_size, a.dtype, a.steps, a.warmup, a.peak_tflops, a.attention, a.grad_accum, a.profile)
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (unknown peak; pass --peak_tflops)"
    memory = f"{r['memory_bytes'] / 2**20:,.0f} MiB" if r["memory_bytes"] is not None else "n/a"
    accum = f" in {r['grad_accum']} micro-batches" if r["grad_accum"] > 1 else ""
    print(f"{r['recipe']} ({r['params']:,} params) | batch {r['batch_size']}{accum} | {r['dtype']} | {r['device']} | "
          f"attention {r['attention']}")
    print(f"  compile:        {r['compile_s']:.2f} s")
    print(f"  first step at:  {r['first_step_s']:.2f} s (state, compile and one step)")
    print(f"  step:           {r['ms_per_step']:.1f} ms  ({r['images_per_sec']:.1f} images/s)")
    print(f"  FLOPs per step: {1e3 * r['tflops_per_step']:.2f} GFLOP from the model's shapes "
          f"(XLA counts {1e3 * r['xla_tflops_per_step']:.2f}{', a loop body once' if accum else ''}); "
          f"{r['achieved_tflops']:.3f} TFLOP/s achieved")
    print(f"  MFU:            {mfu}")
    print(f"  step memory:    {memory} (arguments, outputs and temporaries of the compiled step)")
    if a.breakdown:
        r["breakdown_ms"] = breakdown(a.recipe, a.batch_size, a.dtype, a.steps, a.warmup, a.grad_accum)
        print_breakdown(r["breakdown_ms"])
    if a.profile:
        print_op_times(r["profile_ms"])
    return r


if __name__ == "__main__":
    main()
