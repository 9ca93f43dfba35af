"""FusedGroupConv against nn.Sequential(Conv2d, BatchNorm2d, ReLU): outputs, the four
gradients, running statistics and num_batches_tracked over training steps and eval."""

import copy

import pytest
import torch
from torch import nn

from resnext_kernels import FusedGroupConv
from resnext_kernels.testing import ELEMENT_TOLERANCE

SHAPES = [
    # (n, c_in, c_out, h, w, groups)
    pytest.param(2, 8, 8, 8, 8, 2, id="square"),
    pytest.param(2, 8, 8, 7, 7, 4, id="7x7"),
    pytest.param(3, 12, 12, 13, 11, 3, id="13x11"),
    pytest.param(2, 8, 16, 9, 6, 4, id="cout!=cin"),
]


def unfused(module: FusedGroupConv) -> nn.Sequential:
    conv, bn = copy.deepcopy(module.to_modules())
    return nn.Sequential(conv, bn, nn.ReLU())


def assert_same_state(fused: FusedGroupConv, seq: nn.Sequential, tol) -> None:
    atol, rtol = tol
    conv, bn = seq[0], seq[1]
    for ours, theirs in ((fused.conv.weight, conv.weight), (fused.bn.weight, bn.weight),
                         (fused.bn.bias, bn.bias)):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(fused.bn.running_mean, bn.running_mean, atol=atol, rtol=rtol)
    torch.testing.assert_close(fused.bn.running_var, bn.running_var, atol=atol, rtol=rtol)
    assert fused.bn.num_batches_tracked.item() == bn.num_batches_tracked.item()


def run_steps(fused, seq, shape, dtype, channels_last, steps):
    """Forward + backward with random upstream gradients, then an SGD step on both."""
    tol = ELEMENT_TOLERANCE[dtype]
    opt_a = torch.optim.SGD(fused.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(seq.parameters(), lr=0.1)
    for _ in range(steps):
        x = torch.randn(shape, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = fused(xa), seq(xb)
        assert ya.dtype == yb.dtype and ya.shape == yb.shape
        assert ya.is_contiguous(memory_format=torch.channels_last) == channels_last
        torch.testing.assert_close(ya, yb, atol=tol[0], rtol=tol[1])
        grad = torch.randn_like(yb)
        ya.backward(grad)
        yb.backward(grad)
        torch.testing.assert_close(xa.grad, xb.grad, atol=tol[0], rtol=tol[1])
        assert xa.grad.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert_same_state(fused, seq, tol)
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()


@pytest.mark.parametrize("n,c_in,c_out,h,w,groups", SHAPES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_matches_unfused_float64(n, c_in, c_out, h, w, groups, stride, channels_last, momentum):
    fused = FusedGroupConv(c_in, c_out, groups=groups, stride=stride, momentum=momentum,
                           dtype=torch.float64, backend="reference")
    with torch.no_grad():  # non-trivial BN parameters and statistics
        fused.bn.weight.uniform_(0.5, 1.5)
        fused.bn.bias.normal_()
        fused.bn.running_mean.normal_()
        fused.bn.running_var.uniform_(0.5, 2.0)
    seq = unfused(fused)
    shape = (n, c_in, h, w)
    run_steps(fused.train(), seq.train(), shape, torch.float64, channels_last, steps=3)
    run_steps(fused.eval(), seq.eval(), shape, torch.float64, channels_last, steps=2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_unfused_float32(training):
    fused = FusedGroupConv(64, 64, groups=32, stride=1)
    seq = unfused(fused)
    fused.train(training), seq.train(training)
    run_steps(fused, seq, (4, 64, 10, 10), torch.float32, channels_last=True, steps=2)


@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_from_modules_batchnorm_variants(affine, track):
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False, dtype=torch.float64)
    bn = nn.BatchNorm2d(8, affine=affine, track_running_stats=track, dtype=torch.float64)
    seq = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU())
    fused = FusedGroupConv.from_modules(conv, bn)
    for training in (True, False):
        fused.train(training), seq.train(training)
        x = torch.randn(3, 8, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(fused(x), seq(x), atol=1e-12, rtol=1e-10)
        if track:
            torch.testing.assert_close(fused.bn.running_var, seq[1].running_var)


def test_state_dict_keys_and_round_trip():
    fused = FusedGroupConv(64, 128, groups=32, stride=2)
    assert list(fused.state_dict()) == ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean",
                                        "bn.running_var", "bn.num_batches_tracked"]
    conv, bn = fused.to_modules()
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    assert conv.stride == (2, 2) and conv.groups == 32 and conv.bias is None
    seq = nn.Sequential(nn.Conv2d(64, 128, 3, 2, 1, groups=32, bias=False), nn.BatchNorm2d(128))
    seq.load_state_dict({k.replace("conv.", "0.").replace("bn.", "1."): v
                         for k, v in fused.state_dict().items()}, strict=True)
    again = FusedGroupConv.from_modules(seq[0], seq[1])
    assert again.conv is seq[0] and again.bn is seq[1]


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=1, padding=0), "kernel_size"),
    (dict(kernel_size=3, padding=2), "padding"),
    (dict(kernel_size=3, padding=1, dilation=2), "dilation"),
    (dict(kernel_size=3, padding=1, stride=3), "stride"),
    (dict(kernel_size=3, padding=1, bias=True), "bias"),
    (dict(kernel_size=3, padding=1, padding_mode="reflect"), "padding_mode"),
])
def test_from_modules_rejects_other_convs(kwargs, match):
    bias = kwargs.pop("bias", False)
    conv = nn.Conv2d(8, 8, groups=2, bias=bias, **kwargs)
    with pytest.raises(ValueError, match=match):
        FusedGroupConv.from_modules(conv, nn.BatchNorm2d(8))


def test_from_modules_rejects_mismatched_batchnorm():
    conv = nn.Conv2d(8, 16, 3, padding=1, groups=2, bias=False)
    with pytest.raises(ValueError, match="num_features"):
        FusedGroupConv.from_modules(conv, nn.BatchNorm2d(8))
    with pytest.raises(TypeError, match="bn must be an nn.BatchNorm2d"):
        FusedGroupConv.from_modules(conv, nn.BatchNorm1d(16))
