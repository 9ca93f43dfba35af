"""resnext-bench on the CPU: every subcommand runs with --quick, checks against the
float64 reference, writes JSON / CSV / PNG, and fails loudly (one line) on bad options
and on wrong results."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from resnext_kernels import build_info
from resnext_kernels.backends import usable_backends
from resnext_kernels.bench import common, main

CPU_BACKENDS = usable_backends(torch.empty(0, 0, 0, 0))
LAYERS = ("s2", "s3-down", "s3", "s4-down", "s4", "s5-down", "s5")


def test_layers_quick_writes_json_csv_and_plots(tmp_path, capsys):
    paths = {k: tmp_path / f"r.{k}" for k in ("json", "csv")}
    assert main(["layers", "--device", "cpu", "--quick", "--json", str(paths["json"]),
                 "--csv", str(paths["csv"]), "--plot", str(tmp_path / "plots" / "l")]) == 0
    data = json.loads(paths["json"].read_text())
    for key in ("device", "torch", "triton", "cuda", "timestamp", "copy_gbps", "rows"):
        assert key in data, key
    assert data["compile_mode"] == "default"  # --quick keeps torch.compile short
    rows = data["rows"]
    assert {(r["layer"], r["provider"]) for r in rows} == {
        (layer, p) for layer in LAYERS for p in ["pytorch"] + CPU_BACKENDS}
    for r in rows:
        assert {"layer", "provider", "mode", "dtype", "median_ms"} <= set(r)
        assert r["mode"] == "eval" and r["dtype"] == "float32" and r["ok"]
        assert r["max_error"] < 1e-5
        if r["provider"] in common.UNTIMED:
            assert r["median_ms"] is None  # the emulator is never timed
        else:
            assert r["median_ms"] > 0 and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
            assert r["gbps"] > 0 and r["pct_floor"] > 0 and r["tflops"] > 0
            assert r["speedup"] > 0
    assert len(paths["csv"].read_text().splitlines()) == len(rows) + 1
    for name in ("l-speedup.png", "l-roofline.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pytorch" in capsys.readouterr().out


def test_layers_training_backward_rows(tmp_path):
    out = tmp_path / "r.json"
    assert main(["layers", "--device", "cpu", "--quick", "--layers", "s5", "--mode",
                 "train,train-backward", "--backends", "pytorch,reference",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["mode"], r["provider"]) for r in rows} == {
        (m, p) for m in ("train", "train-backward") for p in ("pytorch", "reference")}
    backward = [r for r in rows if r["mode"] == "train-backward"]
    assert all(r["worst"].startswith(("grad_", "output")) for r in backward)


def test_floor_bytes_and_flops():
    problem = common.Problem(256, 128, 128, 56, 56, 32, 1)
    inp, out = common.tensor_bytes(problem, torch.bfloat16)
    assert inp == out == 256 * 128 * 56 * 56 * 2
    assert common.floor_bytes(problem, torch.bfloat16, "eval") == 2 * inp
    assert common.floor_bytes(problem, torch.bfloat16, "train") == 3 * inp  # 2·in + out
    assert common.floor_bytes(problem, torch.bfloat16, "train-backward") == 9 * inp
    assert common.flops(problem, "eval") == 2 * 256 * 56 * 56 * 128 * 9 * 4  # 7.4 GFLOP
    assert common.flops(problem, "train-backward") == 3 * common.flops(problem, "eval")


def test_validate_quick_passes_and_reports(tmp_path):
    out = tmp_path / "v.json"
    assert main(["validate", "--device", "cpu", "--quick", "--layers", "s5-down",
                 "--steps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["provider"] for r in rows} == set(CPU_BACKENDS)
    assert {r["mode"] for r in rows} == {"eval", "train-backward", "step 1"}
    assert {r["tensor"] for r in rows if r["mode"] == "train-backward"} == {
        "output", "grad_input", "grad_weight", "grad_bn_weight", "grad_bn_bias"}
    assert all(r["ok"] and r["rel_error"] <= r["bound"] for r in rows)


def test_validate_fails_on_a_wrong_backend(monkeypatch, capsys):
    """A planted 1 % error in one backend's output makes validate exit 1."""
    run = common.Provider.run

    def wrong(self, args):
        result = run(self, args)
        planted = self.name == "reference" and args[0].dtype != torch.float64  # not the oracle
        return {k: v * 1.01 if planted and k == "output" else v for k, v in result.items()}

    monkeypatch.setattr(common.Provider, "run", wrong)
    assert main(["validate", "--device", "cpu", "--quick", "--layers", "s5", "--steps", "0",
                 "--backends", "reference", "--mode", "eval"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_model_quick_reports_the_headline(tmp_path):
    out = tmp_path / "m.json"
    assert main(["model", "--device", "cpu", "--quick", "--backends", "reference",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["layer"], r["provider"]) for r in rows} == {
        ("resnet50", "pytorch"), ("resnext50_32x4d", "pytorch"), ("resnext50_32x4d", "reference")}
    for r in rows:
        assert r["images_per_s"] > 0 and r["median_ms"] > 0
        if r["layer"] == "resnet50":
            assert r["vs_resnet50"] == 1.0


@pytest.mark.parametrize("args,message", [
    (["layers", "--backends", "cudnn"], "--backends: invalid value 'cudnn'"),
    (["layers", "--mode", "fast"], "--mode: invalid value 'fast'; choose from eval, train"),
    (["layers", "--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["layers", "--layers", "s9"], "--layers: invalid value 's9'; choose from s2"),
    (["validate", "--backends", "pytorch"], "pytorch is the baseline"),
    (["model", "--batch", "1"], "--batch must be at least 2"),
])
def test_bad_options_give_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args[:1] + ["--device", "cpu", "--quick"] + args[1:])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_unknown_command_is_refused(capsys):
    assert main(["bogus"]) == 2
    assert "unknown command 'bogus'; choose from layers" in capsys.readouterr().err


def test_module_entry_point_defaults_to_layers():
    result = subprocess.run([sys.executable, "-m", "resnext_kernels.bench", "--device", "cpu",
                             "--quick", "--layers", "s5", "--backends", "pytorch"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "grouped-conv layers" in result.stdout and "pytorch" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_gpu_check_script_stops_clearly_without_a_gpu(tmp_path):
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh"), str(tmp_path)],
                            capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert result.returncode == 1
    assert "no CUDA device is visible" in result.stderr
    assert "Nothing was run" in (tmp_path / "log.txt").read_text()


def test_row_writer_leaves_every_finished_row_on_disk(tmp_path):
    """layers, validate and model write their rows as they go: a run cut short (the
    GPU check's step limit) still returns what it finished."""
    json_path, csv_path = tmp_path / "rows.json", tmp_path / "rows.csv"
    writer = common.RowWriter({"device": "cpu"}, str(json_path), str(csv_path))
    writer.add([{"layer": "s2", "ms": 1.0}])
    assert json.loads(json_path.read_text()) == {"device": "cpu",
                                                 "rows": [{"layer": "s2", "ms": 1.0}]}
    writer.add([{"layer": "s3", "ms": 2.0, "ok": True}])
    assert [r["layer"] for r in json.loads(json_path.read_text())["rows"]] == ["s2", "s3"]
    assert csv_path.read_text().splitlines() == ["layer,ms,ok", "s2,1.0,", "s3,2.0,True"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv", "rows.json"]


def test_layers_reports_what_auto_chose(tmp_path, monkeypatch, capsys):
    """`auto` is a provider of layers (on a GPU by default); what it chose per problem,
    and the timings behind it, are printed and kept in the JSON header."""
    choice = {"batch": 2, "in_channels": 1024, "height": 7, "width": 7, "stride": 1,
              "groups": 32, "dtype": "float32", "training": False, "requires_grad": False,
              "choice": "cuda", "source": "measured",
              "timings_ms": {"cuda": 0.011, "triton": None, "reference": 0.02}}
    monkeypatch.setattr(common, "auto_choices", lambda: [choice])
    path = tmp_path / "layers.json"
    assert main(["layers", "--device", "cpu", "--quick", "--layers", "s5", "--backends",
                 "pytorch,auto", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "N=2 C=1024 7x7 s1 g32 float32" in out and "cuda 0.011, triton —" in out
    data = json.loads(path.read_text())
    assert data["auto_choices"] == [choice]
    assert {r["provider"] for r in data["rows"]} == {"pytorch", "auto"}


@pytest.mark.slow
@pytest.mark.skipif(not build_info()["with_cuda"], reason="needs _C built with the CUDA sources")
def test_compiled_kernels_do_not_spill():
    """`resnext-bench kernels --check` needs no GPU, so CI runs it (not the GPU check):
    no nvcc kernel or Triton ahead-of-time variant uses stack or local memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # set by conftest
    result = subprocess.run([sys.executable, "-m", "resnext_kernels.bench", "kernels", "--check"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^0 of [1-9]\d* kernels use stack or local memory$", result.stdout, re.M)
