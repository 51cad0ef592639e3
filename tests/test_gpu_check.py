"""scripts/gpu_check.sh --smoke: the GPU run's every step, tiny, on this machine."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_mode_runs_every_step_and_writes_every_figure(tmp_path, cifar_archive):
    out = tmp_path / "out"
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke", cifar_archive, str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {name: s["status"] for name, s in summary["steps"].items()} == {
        "env": 0, "bench": 0, "train": 0, "parity_bench_test": 0, "compare": 0}, (out / "steps.log").read_text()[-3000:]
    assert summary["env"]["jax"] and summary["env"]["devices"]
    assert [(r["preset"], r["dtype"]) for r in summary["bench"]] == [("test", "float32"), ("test", "bfloat16")]
    assert all(r["images_per_sec"] > 0 and "error" not in r for r in summary["bench"])
    assert [r["epoch"] for r in summary["train"]["epochs"]] == [1, 2]
    assert summary["parity_bench_test"]["jax_over_eager"] > 0
    assert summary["compare"]["passed"] and summary["compare"]["max_abs_logits_diff"] <= 1e-5
    for name in ("steps.log", "train.log", "metrics.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert "== vit_jax.bench" in run.stdout and "== train: 2 epochs" in run.stdout
