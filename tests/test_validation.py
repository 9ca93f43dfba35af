"""Input validation for every backend that runs here, in every dtype and mode: bad
arguments raise a Python exception naming the argument and what is expected; valid
oddities (sliced, strided, channels_last, empty, 1x1, NaN/Inf, ...) give PyTorch's
result. Over 200 cases per backend (docs/robustness.md lists the checks)."""

import pytest
import torch
from torch import nn

from resnext_kernels import fused_group_conv_bn_relu
from resnext_kernels.backends import usable_backends
from resnext_kernels.testing import ELEMENT_TOLERANCE, Problem, make_arguments

PROBLEM = Problem(2, 8, 16, 5, 5, groups=4, stride=1)
BACKENDS = usable_backends(torch.empty(0, 0, 0, 0))  # those that take float32 on the CPU
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]


def skip_unless_takes(backend, dtype):
    if backend not in usable_backends(torch.empty(0, 0, 0, 0, dtype=dtype)):
        pytest.skip(f"{backend} does not take {dtype} here (the Triton interpreter has no bf16)")


def names(dtype):
    """(the input dtype's name, the BN tensors' allowed dtypes as the message says)."""
    name = str(dtype).removeprefix("torch.")
    return name, name if dtype == torch.float32 else f"{name} or float32"


def call(backend_, dtype_, training_, **override):
    x, w, g, b, rm, rv = make_arguments(PROBLEM, dtype_)
    args = dict(input=x, weight=w, bn_weight=g, bn_bias=b, running_mean=rm, running_var=rv)
    kwargs = dict(stride=1, groups=4, eps=1e-5, momentum=0.1, training=training_,
                  backend=backend_)
    for key, value in override.items():
        (args if key in args else kwargs)[key] = value(args) if callable(value) else value
    return fused_group_conv_bn_relu(*args.values(), **kwargs)


# (override, exception, message; "{dtype}" / "{bn}" stand for names(dtype)). Cases that
# only apply in one mode say so with a fourth element.
CASES = [
    (dict(input=[1.0]), TypeError, "input must be a torch.Tensor; got list"),
    (dict(input=lambda a: a["input"][0]), ValueError, r"input must be 4-D .*got shape \(8, 5, 5\)"),
    (dict(input=lambda a: a["input"][None]), ValueError, r"input must be 4-D .*\(1, 2, 8, 5, 5\)"),
    (dict(input=lambda a: a["input"].int()), TypeError, "input must have dtype .*got int32"),
    (dict(input=lambda a: a["input"] > 0), TypeError, "input must have dtype .*got bool"),
    (dict(input=lambda a: a["input"].to(torch.complex64)), TypeError, "got complex64"),
    (dict(input=lambda a: a["input"].to("meta")), ValueError,
     "weight must be on the input's device meta; got cpu"),
    (dict(weight=lambda a: a["weight"].double()), TypeError,
     "weight must have dtype {dtype} .*got float64"),
    (dict(weight=lambda a: a["weight"].int()), TypeError, "weight must have dtype {dtype} .*got int32"),
    (dict(weight=lambda a: a["weight"][:, :, :2]), ValueError,
     r"weight must have shape \[C_out, C_in/groups, 3, 3\] = \[16, 2, 3, 3\]"),
    (dict(weight=lambda a: a["weight"].repeat(1, 1, 2, 2)[:, :, :5, :5]), ValueError,
     r"= \[16, 2, 3, 3\] .*got \[16, 2, 5, 5\]"),
    (dict(weight=lambda a: a["weight"][:, :1]), ValueError, r"got \[16, 1, 3, 3\]"),
    (dict(weight=lambda a: a["weight"][:15]), ValueError, "divisible by groups=4"),
    (dict(weight=lambda a: a["weight"][0]), ValueError, "weight must be 4-D"),
    (dict(weight=None), TypeError, "weight must be a torch.Tensor; got NoneType"),
    (dict(groups=3), ValueError, "groups=3 must divide the input channels 8"),
    (dict(groups=0), ValueError, "groups must be positive; got 0"),
    (dict(groups=-4), ValueError, "groups must be positive; got -4"),
    (dict(groups=2.0), TypeError, "groups must be an int; got float"),
    (dict(groups=2), ValueError, r"= \[16, 4, 3, 3\]"),
    (dict(stride=3), ValueError, r"stride must be one of \(1, 2\); got 3"),
    (dict(stride=0), ValueError, r"stride must be one of \(1, 2\); got 0"),
    (dict(stride=True), TypeError, "stride must be an int; got bool"),
    (dict(stride=(1, 1)), TypeError, "stride must be an int; got tuple"),
    (dict(eps=-1e-5), ValueError, "eps must be a non-negative float; got -1e-05"),
    (dict(eps=float("nan")), ValueError, "eps must be a non-negative float"),
    (dict(eps="1e-5"), ValueError, "eps must be a non-negative float; got '1e-5'"),
    (dict(momentum="0.1"), TypeError, "momentum must be a float; got str"),
    (dict(training=1), TypeError, "training must be a bool; got int"),
    (dict(bn_weight=lambda a: a["bn_weight"][:8]), ValueError,
     r"bn_weight must have shape \[16\] \(the output channels\); got \[8\]"),
    (dict(bn_bias=lambda a: a["bn_bias"][None]), ValueError, "bn_bias must be 1-D"),
    (dict(bn_weight=lambda a: a["bn_weight"].to(torch.complex64)), TypeError,
     "bn_weight must have dtype {bn} .*got complex64"),
    (dict(running_mean=lambda a: a["running_mean"][:4]), ValueError,
     r"running_mean must have shape \[16\]"),
    (dict(running_var=lambda a: a["running_var"].double()), TypeError,
     "running_var must have dtype {bn} .*got float64"),
    (dict(running_var=None), ValueError, "running_mean and running_var must both be given"),
    (dict(running_mean=None), ValueError, "running_mean and running_var must both be given"),
    (dict(running_mean=None, running_var=None), ValueError, "required when training=False",
     False),
    (dict(input=lambda a: a["input"][:1, :, :1, :1]), ValueError,
     "Expected more than 1 value per channel when training", True),
    (dict(backend="cudnn"), ValueError, "backend must be one of 'auto', 'reference'"),
    (dict(backend="cuda"), RuntimeError, "backend 'cuda'"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}" for k in c[0]))
def test_bad_argument_raises(backend, dtype, training, case):
    override, error, template, *only = case
    if only and only[0] != training:
        pytest.skip("this check applies in the other mode")
    dtype_name, bn_names = names(dtype)
    match = template.replace("{dtype}", dtype_name).replace("{bn}", bn_names)
    with pytest.raises(error, match=match):
        call(backend, dtype, training, **override)


def pytorch_result(x, w, g, b, rm, rv, stride, groups, training):
    """nn.Conv2d + nn.BatchNorm2d + nn.ReLU on copies (BN in its tensors' dtype)."""
    conv = nn.Conv2d(x.shape[1], w.shape[0], 3, stride, 1, groups=groups, bias=False,
                     dtype=x.dtype)
    bn = nn.BatchNorm2d(w.shape[0], dtype=torch.float32 if g is None else g.dtype)
    with torch.no_grad():
        conv.weight.copy_(w)
        if g is not None:
            bn.weight.copy_(g)
        if b is not None:
            bn.bias.copy_(b)
        bn.running_mean.copy_(rm), bn.running_var.copy_(rv)
    bn.train(training)
    return torch.relu(bn(conv(x)))


def oddity(name, x, w):
    """Valid but unusual arguments: (x, w, stride) for the named oddity."""
    if name == "sliced-channels":  # a channel slice of a wider tensor: non-contiguous
        wide = torch.cat([x, x.flip(1)], dim=1)
        return wide[:, :x.shape[1]], w, 1
    if name == "strided-spatial":  # every other row and column of a larger tensor
        big = torch.repeat_interleave(torch.repeat_interleave(x, 2, dim=2), 2, dim=3)
        return big[:, :, ::2, ::2], w, 1
    if name == "channels-last":
        return x.contiguous(memory_format=torch.channels_last), w, 1
    if name == "permuted-weight":  # same values, non-contiguous storage
        return x, w.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2), 1
    if name == "one-by-one":
        return x[:, :, :1, :1], w, 1
    if name == "one-row-stride2":
        return x[:, :, :1], w, 2
    if name == "odd-stride2":
        return x[:, :, :5, :3], w, 2
    if name == "even-stride2":
        return torch.cat([x, x], dim=3)[:, :, :4, :6], w, 2
    if name == "nan-inf":
        x = x.clone()
        x[0, 1, 2, 3] = float("nan")
        x[1, 5, 0, 0] = float("inf")
        return x, w, 1
    raise ValueError(name)


ODDITIES = ["sliced-channels", "strided-spatial", "channels-last", "permuted-weight",
            "one-by-one", "one-row-stride2", "odd-stride2", "even-stride2", "nan-inf"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("name", ODDITIES)
def test_valid_oddities_match_pytorch(backend, dtype, training, name):
    skip_unless_takes(backend, dtype)
    gen = torch.Generator().manual_seed(len(name))
    x, w, g, b, rm, rv = make_arguments(PROBLEM, dtype, generator=gen)
    x, w, stride = oddity(name, x, w)
    expected = pytorch_result(x, w, g, b, rm.clone(), rv.clone(), stride, 4, training)
    out = fused_group_conv_bn_relu(x, w, g, b, rm, rv, stride=stride, groups=4,
                                   training=training, backend=backend)
    assert out.shape == expected.shape and out.dtype == dtype
    for memory_format in (torch.contiguous_format, torch.channels_last):  # PyTorch's layout
        assert (out.is_contiguous(memory_format=memory_format)
                == expected.is_contiguous(memory_format=memory_format)), memory_format
    assert torch.equal(out.isnan(), expected.isnan())
    finite = expected.isfinite() & out.isfinite()
    assert torch.equal(finite, expected.isfinite())
    atol, rtol = ELEMENT_TOLERANCE[dtype]
    torch.testing.assert_close(out[finite].float(), expected[finite].float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", MODES)
def test_empty_batch_and_default_bn_parameters(backend, dtype, training):
    skip_unless_takes(backend, dtype)
    x, w, g, b, rm, rv = make_arguments(PROBLEM, dtype)
    before = rm.clone(), rv.clone()
    empty = fused_group_conv_bn_relu(x[:0], w, g, b, rm, rv, groups=4, training=training,
                                     backend=backend)
    assert empty.shape == (0, 16, 5, 5) and empty.dtype == dtype
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])  # as PyTorch: untouched
    out = fused_group_conv_bn_relu(x, w, None, None, rm, rv, groups=4, training=training,
                                   backend=backend)
    expected = pytorch_result(x, w, None, None, *before, 1, 4, training)
    atol, rtol = ELEMENT_TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)


def test_eval_needs_running_stats():
    with pytest.raises(ValueError, match="required when training=False"):
        call("reference", torch.float32, False, running_mean=None, running_var=None)


def test_half_input_takes_float32_batchnorm_tensors():
    x, w, g, b, rm, rv = make_arguments(PROBLEM, torch.float16)
    assert g.dtype == torch.float32
    out = fused_group_conv_bn_relu(x, w, g, b, rm, rv, groups=4, training=True)
    assert out.dtype == torch.float16 and rm.dtype == torch.float32
    with pytest.raises(TypeError, match="bn_weight must have dtype float16 or float32"):
        fused_group_conv_bn_relu(x, w, g.double(), b, rm, rv, groups=4)


@pytest.mark.skipif("cuda_emulated" not in BACKENDS, reason="needs the emulated kernels")
def test_too_large_for_the_kernels_grid_is_refused_before_launch():
    """N·H·W ≥ 2³⁷ pixels: refused with a clear error (a zero-stride view: nothing is
    allocated or computed)."""
    x = torch.zeros(1, 8, 1, 1).expand(2**20, 8, 2**9, 2**9)
    w = torch.zeros(8, 2, 3, 3)
    rm, rv = torch.zeros(8), torch.ones(8)
    with pytest.raises(ValueError, match=r"input too large: N \* H \* W = 274877906944"):
        fused_group_conv_bn_relu(x, w, None, None, rm, rv, groups=4, training=False,
                                 backend="cuda_emulated")


@pytest.mark.skipif("cuda_emulated" not in BACKENDS, reason="needs the emulated kernels")
def test_an_image_side_of_2_to_the_24_is_refused_before_launch():
    """The kernels index a block's pixels with 32-bit divisions by H_out and W_out:
    a side of 2²⁴ is refused with a clear error (a zero-stride view)."""
    x = torch.zeros(1, 8, 1, 1).expand(1, 8, 1, 2**24)
    w = torch.zeros(8, 2, 3, 3)
    rm, rv = torch.zeros(8), torch.ones(8)
    with pytest.raises(ValueError, match=r"height and width must each be below 2\^24; got 1 x 16777216"):
        fused_group_conv_bn_relu(x, w, None, None, rm, rv, groups=4, training=False,
                                 backend="cuda_emulated")


@pytest.mark.parametrize("backend,width", [(b, 300 if b == "cuda_emulated" else 96)
                                           for b in BACKENDS if b != "reference"])
def test_groups_of_any_width_run(backend, width):
    """A group wider than any instantiated width (the CUDA kernels loop over channel
    chunks of 64; ResNet-50's 512 runs the same way; the Triton interpreter, whose
    loops are Python-level, takes 96): the training forward, running statistics and
    all four gradients match float64."""
    problem = Problem(2, width, width, 3, 4, 1, 1)
    args = make_arguments(problem, torch.float32, generator=torch.Generator().manual_seed(5))
    grad = torch.randn(problem.output_shape, generator=torch.Generator().manual_seed(6),
                       dtype=torch.float64)
    results = []
    for name, dtype in ((backend, torch.float32), ("reference", torch.float64)):
        x, w, g, b, rm, rv = [t.to(dtype, copy=True) for t in args]
        leaves = [t.detach().requires_grad_() for t in (x, w, g, b)]
        out = fused_group_conv_bn_relu(*leaves, rm, rv, groups=1, training=True, backend=name)
        out.backward(grad.to(dtype))
        results.append([out, rm, rv] + [t.grad for t in leaves])
    for got, want in zip(*results):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
