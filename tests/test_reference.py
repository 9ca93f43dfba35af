"""The reference itself against an independent composition of PyTorch ops, and its
half-precision behaviour against float64."""

import pytest
import torch
import torch.nn.functional as F

from resnext_kernels import fused_group_conv_bn_relu, reference
from resnext_kernels.testing import (ELEMENT_TOLERANCE, REL_TOLERANCE, Problem, make_arguments,
                                     rel_error)

PROBLEMS = [Problem(2, 8, 8, 7, 7, 2, 1), Problem(2, 8, 16, 13, 11, 4, 2),
            Problem(1, 64, 64, 5, 5, 32, 1)]


def composed(x, w, g, b, rm, rv, stride, groups, eps, training, momentum=0.1):
    c = F.conv2d(x, w, stride=stride, padding=1, groups=groups)
    return F.relu(F.batch_norm(c, rm, rv, g, b, training, momentum, eps))


@pytest.mark.parametrize("problem", PROBLEMS, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_backward_match_autograd_of_composition(problem, training):
    args = make_arguments(problem, torch.float64)
    leaves = [t.clone().requires_grad_() for t in args[:4]]
    out, mean, var = reference.forward(*args, problem.stride, problem.groups, 1e-5, training)
    expected = composed(*leaves, args[4].clone(), args[5].clone(), problem.stride,
                        problem.groups, 1e-5, training)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-11)
    grad_out = torch.randn_like(out)
    grads = reference.backward(grad_out, *args[:4], out, mean, var, problem.stride,
                               problem.groups, 1e-5, training, [True] * 4)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    for name, got, want in zip(("input", "weight", "bn_weight", "bn_bias"), grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_low_precision_against_float64(dtype, training):
    problem = Problem(4, 64, 64, 9, 9, 32, 1)
    args = make_arguments(problem, dtype, channels_last=True)
    args64 = [t.double() for t in args]
    out = fused_group_conv_bn_relu(*args, groups=32, training=training, backend="reference")
    ref = fused_group_conv_bn_relu(*args64, groups=32, training=training, backend="reference")
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert rel_error(out, ref) <= REL_TOLERANCE[dtype]
    atol, rtol = ELEMENT_TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    # The running statistics stay in their own (float32) dtype and follow float64's.
    torch.testing.assert_close(args[4].double(), args64[4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(args[5].double(), args64[5], atol=1e-5, rtol=1e-5)


def test_running_stats_update_matches_batch_norm():
    problem = Problem(3, 8, 8, 6, 5, 2, 1)
    x, w, g, b, rm, rv = make_arguments(problem, torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    fused_group_conv_bn_relu(x, w, g, b, rm, rv, groups=2, momentum=0.3, training=True)
    composed(x, w, g, b, rm2, rv2, 1, 2, 1e-5, True, momentum=0.3)
    torch.testing.assert_close(rm, rm2, atol=1e-14, rtol=1e-13)
    torch.testing.assert_close(rv, rv2, atol=1e-14, rtol=1e-13)


def test_empty_batch_gives_empty_output_and_keeps_running_stats():
    x, w, g, b, rm, rv = make_arguments(Problem(1, 8, 8, 5, 5, 2, 1), torch.float64)
    before = rm.clone(), rv.clone()
    out = fused_group_conv_bn_relu(x[:0], w, g, b, rm, rv, groups=2, training=True)
    assert out.shape == (0, 8, 5, 5)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@pytest.mark.parametrize("size,stride,expected", [(56, 1, 56), (56, 2, 28), (7, 2, 4), (1, 2, 1)])
def test_output_size(size, stride, expected):
    assert reference.output_size(size, stride) == expected
    x = torch.randn(1, 1, size, size)
    assert F.conv2d(x, torch.randn(1, 1, 3, 3), stride=stride, padding=1).shape[-1] == expected
