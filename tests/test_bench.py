"""resnext-bench on the CPU: runs, checks against the reference, writes JSON, fails loudly."""

import json
import subprocess
import sys

import pytest

import torch

from resnext_kernels.backends import usable_backends
from resnext_kernels.bench import main


def test_bench_checks_every_available_backend(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["--device", "cpu", "--layer", "s5-down", "--batch", "2", "--repeats", "1",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {(r["provider"], r["mode"]): r for r in data["results"]}
    providers = ["pytorch"] + usable_backends(torch.empty(0, 0, 0, 0))
    assert set(rows) == {(p, m) for p in providers for m in ("eval", "train")}
    for (provider, mode), row in rows.items():
        assert row["ok"] and row["rel_error"] < row["tolerance"]
        if provider == "cuda_emulated":
            assert row["time_ms"] is None  # the emulator is not timed
        else:
            assert row["time_ms"] > 0
        assert row["shape"] == "2x1024x7x7"
    assert rows[("reference", "train")]["worst"].startswith(("grad_", "running_", "output"))
    assert "reference" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--backends", "cudnn"], "backend must be one of"),
    (["--modes", "fast"], "--modes takes eval and/or train"),
])
def test_bench_rejects_bad_options(args, message):
    with pytest.raises(SystemExit, match=message):
        main(["--device", "cpu", "--layer", "s5", "--batch", "2"] + args)


def test_bench_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "resnext_kernels.bench", "--device", "cpu",
                             "--layer", "s5", "--batch", "2", "--repeats", "1", "--modes", "eval"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "reference" in result.stdout


def test_bench_fails_when_an_error_exceeds_the_tolerance(monkeypatch, capsys):
    import torch

    monkeypatch.setitem(sys.modules["resnext_kernels.bench.check"].REL_TOLERANCE, torch.float32, 0.0)
    assert main(["--device", "cpu", "--layer", "s5", "--batch", "2", "--repeats", "1",
                 "--modes", "eval"]) == 1
    assert "FAIL" in capsys.readouterr().out


SAMPLE_REPORT = """
Fatbin elf code:
================
arch = sm_90
 Function _ZN2rk6detail15finalize_kernelENS_14FinalizeParamsE:
  REG:44 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:584 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z4spillv:
  REG:255 STACK:64 SHARED:1024 LOCAL:8 CONSTANT[0]:584 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_kernel_report_parsing_flags_spills():
    from resnext_kernels.bench.kernels import parse

    rows = parse(SAMPLE_REPORT)
    assert [(r.arch, r.registers, r.stack, r.local, r.spills) for r in rows] == [
        ("sm_90", 44, 0, 0, False), ("sm_90", 255, 64, 8, True)]
    assert rows[0].name == "rk::detail::finalize_kernel(rk::FinalizeParams)"


def test_kernels_report_of_this_build_has_no_spills(tmp_path):
    import resnext_kernels

    if not resnext_kernels.build_info()["with_cuda"]:
        pytest.skip("resnext_kernels._C was built without CUDA kernels")
    out = tmp_path / "kernels.json"
    assert main(["kernels", "--check", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) >= 73 and all(r["stack"] == 0 and r["local"] == 0 for r in rows)
