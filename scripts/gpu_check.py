"""The GPU run in one go: `bash scripts/gpu_check.sh [--smoke] DATA OUT`. See gpu_check.sh.

Each measurement runs in its own process with its own time limit, so one that fails or hangs costs
only its own figures; the whole run keeps within --budget seconds (9 minutes by default). Every
figure lands in OUT/summary.json, each step's output in OUT/steps.log, each training's in
OUT/train_RECIPE.log (at most 7 files: what the device tool brings back).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (recipe, batch, dtype), the most telling first: a step that runs out of time loses the last ones.
# On the H200 (2026-12-04) each shape compiled in 14-17 s: 80 s held four.
FULL_BENCH = [("fast", 64, "float32"), ("tutorial", 64, "float32"), ("tutorial", 512, "bfloat16"),
              ("fast", 64, "bfloat16"), ("fast", 1024, "bfloat16"), ("cifar", 512, "bfloat16")]
SMOKE_BENCH = [("test", 8, "float32"), ("test", 8, "bfloat16")]

BENCH_CODE = """
import json, sys
from vit_jax import bench
for recipe, batch, dtype in json.loads(sys.argv[1]):
    try:
        r = bench.run(recipe, batch, dtype, steps=int(sys.argv[2]), warmup=2, peak=None)
    except Exception as e:  # out of memory, an unsupported kernel...: recorded, and the next one runs
        r = {"recipe": recipe, "batch_size": batch, "dtype": dtype, "error": f"{type(e).__name__}: {e}"[:500]}
    print("BENCH " + json.dumps(r), flush=True)
"""

ENV_CODE = """
import json, importlib
out = {}
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "torch"):
    try:
        out[name] = importlib.import_module(name).__version__
    except Exception as e:
        out[name] = f"missing ({type(e).__name__})"
import jax
out["devices"] = [f"{d.platform}: {d.device_kind}" for d in jax.devices()]
try:
    import torch
    out["torch_cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no cuda"
except Exception as e:
    out["torch_cuda"] = f"n/a ({type(e).__name__})"
print("ENV " + json.dumps(out))
"""


class Run:
    """Runs the steps one by one, each within its limit and the whole run's budget; records everything."""

    def __init__(self, out: str, budget: float):
        self.out, self.deadline = out, time.time() + budget
        try:
            os.makedirs(out, exist_ok=True)
            self.log = open(os.path.join(out, "steps.log"), "w")
        except OSError as e:
            sys.exit(f"error: cannot write to {out} ({e.strerror}): give another OUT folder")
        self.summary = {"steps": {}}

    def step(self, name: str, cmd: list[str], limit: float, reserve: float = 0.0, shown: str | None = None) -> str:
        """Runs cmd for at most `limit` seconds (less when the budget, minus `reserve` for the steps
        after it, runs out); returns its output, whole or as far as it got."""
        limit = max(min(limit, self.deadline - reserve - time.time()), 1.0)
        started = time.time()
        print(f"[{name}] {shown or ' '.join(cmd)} (at most {limit:.0f} s)", flush=True)
        try:
            done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=limit, env=self.env())
            output, status = done.stdout, done.returncode
        except subprocess.TimeoutExpired as e:
            output, status = (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""), "timeout"
        seconds = time.time() - started
        self.summary["steps"][name] = {"status": status, "seconds": round(seconds, 1)}
        self.log.write(f"\n===== {name}: {' '.join(cmd)}\n===== status {status} after {seconds:.1f} s\n{output}")
        self.log.flush()
        print(f"[{name}] status {status} after {seconds:.1f} s", flush=True)
        return output

    @staticmethod
    def env() -> dict:
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "PYTHONUNBUFFERED": "1"}
        # Compiled steps are shared between processes: the training reuses the benchmark's compile.
        env.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/vit_jax_gpu_check_cache")
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
        return env

    def save(self):
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(self.summary, f, indent=2)


def start_archive(data: str, scratch: str):
    """(archive path, process still writing it or None). A .npz (the JPEG copy) is turned into the
    official layout by make_cifar10_archive.py beside it, in the background."""
    if not data.endswith(".npz"):
        return data, None
    script = os.path.join(os.path.dirname(os.path.abspath(data)), "make_cifar10_archive.py")
    if not os.path.exists(script):
        sys.exit(f"error: {data} is the JPEG copy, but make_cifar10_archive.py is not beside it")
    os.makedirs(scratch, exist_ok=True)
    proc = subprocess.Popen([sys.executable, script, scratch, "--npz", data, "--no-tar"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return os.path.join(scratch, "cifar-10-batches-bin"), proc


def lines(output: str, tag: str) -> list[dict]:
    return [json.loads(line[len(tag) + 1:]) for line in output.splitlines() if line.startswith(tag + " ")]


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bash scripts/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("data", help="cifar10_jpeg.npz (with make_cifar10_archive.py beside it), or the official "
                                     "cifar-10-binary.tar.gz or its folder")
    parser.add_argument("out", help="folder for summary.json, steps.log, the training logs and the parity figures")
    parser.add_argument("--smoke", action="store_true", help="the same steps, tiny: minutes on a CPU")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run (default 540)")
    a = parser.parse_args(argv)
    if not os.path.exists(a.data):  # found now, not after minutes of benchmarks on a borrowed GPU
        parser.error(f"{a.data} does not exist: give cifar10_jpeg.npz, or cifar-10-binary.tar.gz or its folder")
    smoke, py = a.smoke, sys.executable
    run = Run(a.out, a.budget)
    started = time.time()
    scratch = tempfile.mkdtemp(prefix="vit_jax_gpu_check-")  # the archive and the run's checkpoints: not OUT

    env = lines(run.step("env", [py, "-c", ENV_CODE], 60, shown="versions and devices"), "ENV")
    run.summary["env"] = env[0] if env else None
    try:
        run.summary["env"]["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired, TypeError):
        pass
    gpu = bool(run.summary["env"]) and any(d.startswith("gpu") for d in run.summary["env"]["devices"])
    archive, maker = start_archive(a.data, os.path.join(scratch, "data"))
    run.save()

    configs = SMOKE_BENCH if smoke else FULL_BENCH
    output = run.step("bench", [py, "-c", BENCH_CODE, json.dumps(configs), "2" if smoke else "10"],
                      90 if smoke else 75, reserve=0 if smoke else 435,
                      shown=f"vit_jax.bench.run for {len(configs)} (recipe, batch, dtype)")
    run.summary["bench"] = lines(output, "BENCH")
    run.save()

    if maker is not None:
        try:
            made = maker.communicate(timeout=max(run.deadline - time.time(), 1))[0]
        except subprocess.TimeoutExpired:
            maker.kill()
            made = maker.communicate()[0]
        run.log.write(f"\n===== make_cifar10_archive.py\n{made}")
        run.summary["steps"]["data"] = {"status": maker.returncode}
    # The fast recipe for 20 epochs (what a GPU user runs: docs/recipes.md has its CPU runs), then the
    # tutorial's recipe, 20 epochs at batch 64. A training cut short by its limit keeps its epochs. On
    # the H200 (2026-12-04): 94 s, and 14.5 s then 8.5 s an epoch (about 190 s in all).
    trainings = ([("test", ["--recipe", "test", "--epochs", "2", "--batch_size", "16", "--train_limit", "96",
                            "--test_limit", "32"], 120, 0)] if smoke else
                 [("fast", ["--recipe", "fast", "--epochs", "20"], 110, 325),
                  ("tutorial", ["--recipe", "tutorial", "--epochs", "20"], 210, 115)])
    for recipe, flags, limit, reserve in trainings:
        workdir = os.path.join(scratch, f"run_{recipe}")
        output = run.step(f"train_{recipe}", [py, "-m", "vit_jax.train", "--archive", archive, "--workdir", workdir,
                                              "--log_every", "1000", *flags], limit, reserve=reserve)
        with open(os.path.join(a.out, f"train_{recipe}.log"), "w") as f:
            f.write(output)
        rows = []
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            with open(os.path.join(workdir, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f if line.strip()]
        run.summary[f"train_{recipe}"] = {"flags": flags, "epochs": rows,
                                          "best_test_acc": max((r["test_acc"] for r in rows), default=None)}
        run.save()

    for recipe, extra, limit in ((("test", ["--no-compile"], 60),) if smoke else
                                 (("fast", [], 70),)):  # the tutorial's model: 0.35 (docs/gpu.md)
        path = os.path.join(a.out, f"parity_bench_{recipe}.json")
        run.step(f"parity_bench_{recipe}", [py, "-m", "parity.bench", "--recipe", recipe, "--batch_size",
                                            "8" if smoke else "64", "--steps", "2" if smoke else "10",
                                            "--json", path, *extra], limit, reserve=0 if smoke else 45)
        run.summary[f"parity_bench_{recipe}"] = read_json(path)
        run.save()

    path = os.path.join(a.out, "compare.json")
    run.step("compare", [py, "-m", "parity.compare", "--recipe", "test" if smoke else "tutorial", "--device",
                         "gpu" if gpu else "cpu", "--archive", archive, "--num_images", "32" if smoke else "256",
                         "--batch_size", "32", "--json", path], 60 if smoke else 45)
    run.summary["compare"] = read_json(path)
    run.summary["seconds"] = round(time.time() - started, 1)
    run.save()
    shutil.rmtree(scratch, ignore_errors=True)
    report(run.summary)
    return int(any(step["status"] != 0 for step in run.summary["steps"].values()))


def report(s: dict):
    """The figures as a short table: the end of the output is what a remote run shows first."""
    print(f"\n== {s['env'] and s['env'].get('devices')} | {s['env'] and s['env'].get('nvidia_smi')}")
    print(f"== versions: {s['env'] and {k: v for k, v in s['env'].items() if k not in ('devices', 'nvidia_smi')}}")
    print("== vit_jax.bench")
    for r in s.get("bench", []):
        if "error" in r:
            print(f"  {r['recipe']:<6} {r['batch_size']:>5} {r['dtype']:<9} {r['error'][:150]}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        print(f"  {r['recipe']:<6} {r['batch_size']:>5} {r['dtype']:<9} {r['ms_per_step']:9.2f} ms "
              f"{r['images_per_sec']:10.0f} img/s  MFU {mfu:>6}  attention {r['attention']}  "
              f"compile {r['compile_s']:.1f} s  memory {(r.get('memory_bytes') or 0) / 2**30:.2f} GiB")
    for key in [k for k in s if k.startswith("train_")]:
        t = s[key]
        print(f"== {key} {' '.join(t['flags'])}: {len(t['epochs'])} epochs, best test acc {t['best_test_acc']}")
        for r in t["epochs"]:
            print(f"  epoch {r['epoch']:>2} {r['seconds']:7.2f} s  train acc {r['train_acc']:6.2f}%  "
                  f"test acc {r['test_acc']:6.2f}%  {r['images_per_sec']:.0f} img/s")
    for key in [k for k in s if k.startswith("parity_bench_")]:
        p = s[key]
        if p:
            eager, compiled = p["torch_eager"], p["torch_compile"]
            print(f"== {key}: JAX {p['jax']['ms_per_step']:.2f} ms, eager {eager['ms_per_step']:.2f} ms, "
                  f"compile {compiled if isinstance(compiled, str) else round(compiled['ms_per_step'], 2)}; "
                  f"JAX time / PyTorch eager time {p['jax_over_eager']:.2f}")
    c = s.get("compare")
    if c:
        print(f"== compare ({c.get('recipe')}): max |logits diff| {c['max_abs_logits_diff']:.2e}, argmax agreement "
              f"{c['argmax_agreement']:.2f}%, passed {c['passed']}")
    print(f"== steps: {s['steps']} | total {s.get('seconds')} s")


if __name__ == "__main__":
    sys.exit(main())
