"""The ResNeXt paper's three forms of the aggregated transformation are equal."""

import pytest
import torch

from resnext_kernels.forms import AggregatedTransform


@pytest.mark.parametrize("cardinality,width", [(32, 4), (8, 8), (2, 40)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_three_forms_agree_in_float64(cardinality, width, stride, training):
    gen = torch.Generator().manual_seed(cardinality * 100 + width)
    block = AggregatedTransform.random(64, cardinality, width, 64, generator=gen)
    x = torch.randn(2, 64, 9, 7, dtype=torch.float64, generator=gen)
    a = block.form_a(x, stride, training)
    b = block.form_b(x, stride, training)
    c = block.form_c(x, stride, training)
    assert c.shape == (2, 64, 5 if stride == 2 else 9, 4 if stride == 2 else 7)
    assert c.abs().max() > 0.1  # a real signal, not ReLU'd away
    torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-11)
    torch.testing.assert_close(b, c, atol=1e-12, rtol=1e-11)


def test_forms_differ_when_weights_differ():
    """The comparison can fail: perturbing one path's 3x3 weights changes (c) only."""
    gen = torch.Generator().manual_seed(0)
    block = AggregatedTransform.random(64, 8, 4, 64, generator=gen)
    x = torch.randn(2, 64, 6, 6, dtype=torch.float64, generator=gen)
    a = block.form_a(x)
    block.w2[:4] += 0.1
    assert (block.form_c(x) - a).abs().max() > 1e-3
