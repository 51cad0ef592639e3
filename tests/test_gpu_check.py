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
        "env": 0, "bench": 0, "train_test": 0, "parity_bench_test": 0, "compare": 0}, (out / "steps.log").read_text()[-3000:]
    assert summary["env"]["jax"] and summary["env"]["devices"]
    assert [(r["recipe"], r["dtype"]) for r in summary["bench"]] == [("test", "float32"), ("test", "bfloat16")]
    assert all(r["images_per_sec"] > 0 and "error" not in r for r in summary["bench"])
    assert [r["epoch"] for r in summary["train_test"]["epochs"]] == [1, 2]
    assert summary["parity_bench_test"]["jax_over_eager"] > 0
    assert summary["compare"]["passed"] and summary["compare"]["max_abs_logits_diff"] <= 1e-5
    for name in ("steps.log", "train_test.log"):
        assert (out / name).stat().st_size > 0, name
    assert "== vit_jax.bench" in run.stdout and "== train_test --recipe test" in run.stdout and "2 epochs" in run.stdout


def test_data_that_is_not_there_and_an_out_that_cannot_be_written_stop_it_at_once(tmp_path, cifar_archive):
    """Before any step: on a borrowed GPU, a mistyped path must not cost the benchmarks' minutes first."""
    (tmp_path / "file").write_text("")
    for data, out, status, message in (
            (str(tmp_path / "missing.npz"), str(tmp_path / "out"), 2, "missing.npz does not exist: give cifar10_jpeg.npz"),
            (cifar_archive, str(tmp_path / "file" / "out"), 1, f"error: cannot write to {tmp_path / 'file' / 'out'} "
                                                              f"(Not a directory): give another OUT folder")):
        run = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke", data, out], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})
        assert run.returncode == status and message in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert run.stdout == ""  # no step ran
