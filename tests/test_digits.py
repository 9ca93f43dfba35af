"""Short version of examples/digits.py: fused and unfused training on real data agree."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("torchvision")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.py"


@pytest.mark.slow
def test_digits_loss_curves_agree():
    spec = importlib.util.spec_from_file_location("digits_example", EXAMPLE)
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    result = digits.run(steps=15, batch=32)
    fused, unfused = result["losses_fused"], result["losses_unfused"]
    assert len(fused) == len(unfused) == 15
    assert result["max_loss_difference"] < 1e-9
    assert fused[-1] < fused[0]  # it learns
    assert 0.0 <= result["accuracy_fused"] <= 1.0
    assert abs(result["accuracy_fused"] - result["accuracy_unfused"]) < 1e-12
