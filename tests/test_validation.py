"""Bad arguments raise a Python exception naming the argument and what is expected."""

import pytest
import torch

from resnext_kernels import fused_group_conv_bn_relu
from resnext_kernels.testing import Problem, make_arguments

PROBLEM = Problem(2, 8, 16, 5, 5, groups=4, stride=1)


def call(training=True, **override):
    x, w, g, b, rm, rv = make_arguments(PROBLEM, torch.float32)
    args = dict(input=x, weight=w, bn_weight=g, bn_bias=b, running_mean=rm, running_var=rv)
    kwargs = dict(stride=1, groups=4, eps=1e-5, momentum=0.1, training=training)
    for key, value in override.items():
        (args if key in args else kwargs)[key] = value(args) if callable(value) else value
    return fused_group_conv_bn_relu(*args.values(), **kwargs)


CASES = [
    (dict(input=[1.0]), TypeError, "input must be a torch.Tensor; got list"),
    (dict(input=lambda a: a["input"][0]), ValueError, r"input must be 4-D .*got shape \(8, 5, 5\)"),
    (dict(input=lambda a: a["input"].int()), TypeError, "input must have dtype .*got int32"),
    (dict(input=lambda a: a["input"].to(torch.complex64)), TypeError, "got complex64"),
    (dict(weight=lambda a: a["weight"].double()), TypeError,
     "weight must have dtype float32 .*got float64"),
    (dict(weight=lambda a: a["weight"][:, :, :2]), ValueError,
     r"weight must have shape \[C_out, C_in/groups, 3, 3\] = \[16, 2, 3, 3\]"),
    (dict(weight=lambda a: a["weight"][:15]), ValueError, "divisible by groups=4"),
    (dict(weight=None), TypeError, "weight must be a torch.Tensor; got NoneType"),
    (dict(groups=3), ValueError, "groups=3 must divide the input channels 8"),
    (dict(groups=0), ValueError, "groups must be positive; got 0"),
    (dict(groups=2.0), TypeError, "groups must be an int; got float"),
    (dict(stride=3), ValueError, r"stride must be one of \(1, 2\); got 3"),
    (dict(stride=True), TypeError, "stride must be an int; got bool"),
    (dict(eps=-1e-5), ValueError, "eps must be a non-negative float; got -1e-05"),
    (dict(eps=float("nan")), ValueError, "eps must be a non-negative float"),
    (dict(momentum="0.1"), TypeError, "momentum must be a float; got str"),
    (dict(training=1), TypeError, "training must be a bool; got int"),
    (dict(bn_weight=lambda a: a["bn_weight"][:8]), ValueError,
     r"bn_weight must have shape \[16\] \(the output channels\); got \[8\]"),
    (dict(bn_bias=lambda a: a["bn_bias"][None]), ValueError, "bn_bias must be 1-D"),
    (dict(running_var=lambda a: a["running_var"].double()), TypeError,
     "running_var must have dtype float32"),
    (dict(running_var=None), ValueError, "running_mean and running_var must both be given"),
    (dict(input=lambda a: a["input"][:1, :, :1, :1]), ValueError,
     "Expected more than 1 value per channel when training"),
    (dict(input=lambda a: a["input"].to("meta")), ValueError,
     "weight must be on the input's device meta; got cpu"),
]


@pytest.mark.parametrize("override,error,match", CASES)
def test_bad_argument_raises(override, error, match):
    with pytest.raises(error, match=match):
        call(**override)


def test_eval_needs_running_stats():
    with pytest.raises(ValueError, match="required when training=False"):
        call(training=False, running_mean=None, running_var=None)


def test_half_input_takes_float32_batchnorm_tensors():
    x, w, g, b, rm, rv = make_arguments(PROBLEM, torch.float16)
    assert g.dtype == torch.float32
    out = fused_group_conv_bn_relu(x, w, g, b, rm, rv, groups=4, training=True)
    assert out.dtype == torch.float16 and rm.dtype == torch.float32
    with pytest.raises(TypeError, match="bn_weight must have dtype float16 or float32"):
        fused_group_conv_bn_relu(x, w, g.double(), b, rm, rv, groups=4)
