"""resnext-bench on the CPU: runs, checks against the reference, writes JSON, fails loudly."""

import json
import subprocess
import sys

import pytest

from resnext_kernels.bench import main


def test_bench_checks_every_available_backend(tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main(["--device", "cpu", "--layer", "s5-down", "--batch", "2", "--repeats", "1",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {(r["provider"], r["mode"]): r for r in data["results"]}
    assert set(rows) == {(p, m) for p in ("pytorch", "reference") for m in ("eval", "train")}
    for (provider, mode), row in rows.items():
        assert row["ok"] and row["rel_error"] < row["tolerance"] and row["time_ms"] > 0
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
