"""scripts/gpu_check.sh rehearsed on the CPU (GPU_CHECK_REHEARSAL=1): the same steps
with the CPU stand-ins, the same files, so the script's plumbing is proven before a
lent GPU's minutes are spent on it."""

import json
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = ["build", "device", "smoke", "sanitizer", "predict", "layers", "compile", "validate",
         "model", "triton"]


def rehearse(out, *args, budget=None):
    env = {**os.environ, "GPU_CHECK_REHEARSAL": "1", "PYTHON": sys.executable}
    if budget is not None:
        env["GPU_CHECK_BUDGET"] = str(budget)
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), *args],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)


@pytest.mark.slow
def test_rehearsal_runs_every_step_and_returns_its_files(tmp_path):
    result = rehearse(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rehearsal"] is True
    assert [s["name"] for s in summary["steps"]] == STEPS
    status = {s["name"]: s["status"] for s in summary["steps"]}
    skipped = {"compile": "GPU-only"}
    for name, verdict in status.items():
        if name in skipped:
            assert verdict.startswith("skipped") and skipped[name] in verdict, (name, verdict)
        else:
            assert verdict == "ok", (name, verdict)
    assert sum(s["seconds"] for s in summary["steps"]) <= summary["budget_s"] == 470
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["device.json", "layers.json", "log.txt", "model.json", "predict.json",
                     "steps.tar.gz", "summary.json", "validate.json"]  # at most 8 come back
    predict = json.loads((tmp_path / "predict.json").read_text())
    assert predict["label"] == "modelled (CPU counters), not measured"
    assert {r["layer"] for r in predict["rows"]} == {"s2", "s4-down"}
    with tarfile.open(tmp_path / "steps.tar.gz") as tar:
        packed = {pathlib.PurePath(n).name for n in tar.getnames()}
    for step in summary["steps"]:
        assert set(step["files"]) <= packed, step
    assert {"smoke.xml", "triton.xml", "layers.csv", "smoke.log"} <= packed
    device = json.loads((tmp_path / "device.json").read_text())
    assert [r["measure"] for r in device["rows"]] == ["copy_gbps", "launch_interval_us",
                                                      "mma_sync", "gemm"]
    assert device["rows"][2]["value"]["via"] == "cuda_emulated"
    layers = json.loads((tmp_path / "layers.json").read_text())["rows"]
    assert {r["provider"] for r in layers} == {"pytorch", "cuda_emulated", "triton"}
    assert all(r["ok"] for r in layers)


def test_unknown_step_is_refused(tmp_path):
    result = rehearse(tmp_path, "build", "benchmark")
    assert result.returncode == 2
    assert "unknown step 'benchmark'; choose from build device smoke" in result.stderr


def test_selected_steps_only_and_out_of_time_is_recorded(tmp_path):
    result = rehearse(tmp_path, "build", "model", budget=0)
    assert result.returncode == 1  # a build that could not run stops the script
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == [{"name": "build", "status": "skipped: out of time",
                                 "seconds": 0, "files": []}]
    assert "the build did not succeed; nothing else is run" in (tmp_path / "log.txt").read_text()
