"""The CUDA backward kernels, executed on the CPU through the host SIMT emulator
(backend "cuda_emulated"), against the float64 reference: the gradients of all four
inputs for every family of widths x strides x dtypes x modes x layouts, with random
upstream gradients; the γ ≈ 0 fallback, the deterministic path, the split ops, the
bytes saved for backward and double backward."""

import pytest
import torch
import torch.nn as nn

from resnext_kernels import available_backends, fused_group_conv_bn_relu
from resnext_kernels.testing import (REL_TOLERANCE, Problem, make_arguments, rel_error,
                                    split_backward_errors)

pytestmark = pytest.mark.skipif("cuda_emulated" not in available_backends(),
                                reason="resnext_kernels._C_emulated is not built")

WIDTHS = [4, 8, 16, 32, 64, 12, 80]  # 12 and 80: the generic kernels (80: two channel chunks)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ("input", "weight", "bn_weight", "bn_bias")


def problem_for(width, stride, even=False):
    # 6 groups of 4: packed pairs on tensor cores, a tile with 24 of its 32 channels (an
    # odd number of 4-channel groups runs the generic kernels)
    groups = 6 if width == 4 else 3 if width <= 16 else 2
    if stride == 2:
        n, h, w = (2, 8, 6) if even else (1, 9, 7)
    else:
        n, h, w = (2, 7, 5)
    return Problem(n, groups * width, groups * width, h, w, groups, stride)


def gradients(backend, args, problem, training, grad, dtype=None):
    """Gradients of (input, weight, bn_weight, bn_bias) for upstream gradient ``grad``,
    the arguments converted to ``dtype`` (kept when None)."""
    x, w, g, b, rm, rv = [t.to(dtype) if dtype else t.clone() for t in args]
    leaves = [t.detach().requires_grad_() for t in (x, w, g, b)]
    out = fused_group_conv_bn_relu(*leaves, rm, rv, stride=problem.stride,
                                   groups=problem.groups, training=training, backend=backend)
    out.backward(grad.to(out.dtype))
    return [t.grad for t in leaves]


def pytorch_gradients(args, problem, training, grad):
    """PyTorch's own unfused gradients in the arguments' dtype (BatchNorm in float32, as
    under autocast): the baseline for "within 2x of PyTorch's own error"."""
    x, w, g, b, rm, rv = [t.clone() for t in args]
    leaves = [t.detach().requires_grad_() for t in (x, w, g, b)]
    c = nn.functional.conv2d(leaves[0], leaves[1], stride=problem.stride, padding=1,
                             groups=problem.groups)
    out = nn.functional.relu(nn.functional.batch_norm(c.float(), rm, rv, leaves[2].float(),
                                                      leaves[3].float(), training))
    out.backward(grad.float())
    return [t.grad for t in leaves]


def check_gradients(got, want, dtype, baseline=None):
    for name, g, r, *base in zip(NAMES, got, want, *([baseline] if baseline else [])):
        assert g.shape == r.shape and g.dtype in (torch.float32, dtype), name
        assert not g.isnan().any(), f"{name}: NaN (unwritten, poisoned) elements"
        err = rel_error(g, r)
        if base:  # half precision: within 2x of PyTorch's own error in that dtype
            bound = max(2 * rel_error(base[0], r), REL_TOLERANCE[dtype] / 4)
        else:
            bound = REL_TOLERANCE[dtype]
        assert err <= bound, (name, err, bound)


# How the reduce pass gets x̂ (csrc/kernels/conv_bwd.h): fp32 runs both ways (the
# default, recompute, and the opt-in recover), fp16/bf16 the default (recovering from
# a half-precision output loses several times PyTorch's accuracy in dγ).
XHAT = [pytest.param(torch.float32, "recover", id="float32-recover"),
        pytest.param(torch.float32, None, id="float32"),
        pytest.param(torch.float16, None, id="float16"),
        pytest.param(torch.bfloat16, None, id="bfloat16")]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype,xhat", XHAT)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_emulated_gradients_match_reference(width, stride, dtype, xhat, training, channels_last,
                                            monkeypatch):
    if xhat is not None:
        monkeypatch.setenv("RESNEXT_BWD_XHAT", xhat)
    problem = problem_for(width, stride, even=channels_last)
    gen = torch.Generator().manual_seed(width * 100 + stride * 10 + int(training))
    args = make_arguments(problem, dtype, channels_last=channels_last, generator=gen)
    grad = torch.randn(problem.output_shape, generator=gen, dtype=torch.float64)
    got = gradients("cuda_emulated", args, problem, training, grad)
    want = gradients("reference", args, problem, training, grad, dtype=torch.float64)
    assert got[0].is_contiguous(memory_format=torch.channels_last) == channels_last
    baseline = None if dtype == torch.float32 else pytorch_gradients(args, problem, training, grad)
    check_gradients(got, want, dtype, baseline)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_packed_groups_keep_a_non_finite_input_in_its_group(training):
    """At 4 channels per group the passes that recompute the conv multiply pairs of
    groups block-diagonally: an infinity in one group's input gives non-finite
    gradients where the float64 reference does, and nowhere else."""
    problem = Problem(2, 64, 64, 6, 9, 16, 1)
    gen = torch.Generator().manual_seed(17)
    x, *rest = make_arguments(problem, torch.bfloat16, channels_last=True, generator=gen)
    x = x.clone()
    x[1, 9, 2, 4] = float("inf")  # group 2, the even member of a pair
    args = [x, *rest]
    grad = torch.randn(problem.output_shape, generator=gen, dtype=torch.float64)
    got = gradients("cuda_emulated", args, problem, training, grad)
    want = gradients("reference", args, problem, training, grad, dtype=torch.float64)
    for name, g, r in zip(NAMES, got, want):
        assert torch.equal(g.isfinite(), r.isfinite()), name
        assert r.isfinite().any(), name
    assert not want[1].isfinite().all()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_parameters_as_views_at_an_unaligned_offset(training):
    """γ, β and the running statistics as views 4 bytes into their storage: kernels read
    per-channel vectors 16 bytes at a time (eval's masked dc), which the emulator, like a
    GPU, refuses at an address not aligned to 16; the glue reads from aligned copies."""
    problem = problem_for(8, 1)
    gen = torch.Generator().manual_seed(23)
    args = make_arguments(problem, torch.bfloat16, channels_last=True, generator=gen)
    grad = torch.randn(problem.output_shape, generator=gen, dtype=torch.float64)

    def unaligned(t):
        storage = torch.empty(t.numel() + 1, dtype=t.dtype)
        storage[1:] = t
        return storage[1:]

    x, w, g, b, rm, rv = args
    leaves = [x.detach().requires_grad_(), w.detach().requires_grad_(),
              unaligned(g).requires_grad_(), unaligned(b).requires_grad_()]
    assert leaves[2].data_ptr() % 16 != 0
    out = fused_group_conv_bn_relu(*leaves, unaligned(rm), unaligned(rv), stride=problem.stride,
                                   groups=problem.groups, training=training,
                                   backend="cuda_emulated")
    out.backward(grad.to(out.dtype))
    want = gradients("reference", args, problem, training, grad, dtype=torch.float64)
    check_gradients([t.grad for t in leaves], want, torch.bfloat16,
                    pytorch_gradients(args, problem, training, grad))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_with_tiny_gamma_recompute_the_conv(training, monkeypatch):
    """x̂ cannot be recovered from the output where γ ≈ 0 or β ≫ γ: those channel tiles
    recompute the conv (csrc/kernels/conv_bwd.h); the others recover x̂."""
    monkeypatch.setenv("RESNEXT_BWD_XHAT", "recover")
    dtype = torch.float32
    problem = Problem(2, 64, 64, 6, 5, 4, 1)  # 16 channels per group: one tile per group
    gen = torch.Generator().manual_seed(7)
    x, w, g, b, rm, rv = make_arguments(problem, dtype, generator=gen)
    g = g.clone()
    b = b.clone()
    g[0:16:3] = 0.0  # group 0: exact zeros
    g[16:32:5] = 1e-6  # group 1: tiny
    b[32:48] = 10 * g[32:48]  # group 2: β dominates; group 3 recovers
    args = (x, w, g, b, rm, rv)
    grad = torch.randn(problem.output_shape, generator=gen, dtype=torch.float64)
    got = gradients("cuda_emulated", args, problem, training, grad)
    want = gradients("reference", args, problem, training, grad, dtype=torch.float64)
    check_gradients(got, want, dtype)
    # and with every channel tile recomputing
    monkeypatch.setenv("RESNEXT_BWD_XHAT", "recompute")
    check_gradients(gradients("cuda_emulated", args, problem, training, grad), want, dtype)


def test_unknown_xhat_mode_is_refused(monkeypatch):
    monkeypatch.setenv("RESNEXT_BWD_XHAT", "guess")
    args = make_arguments(Problem(2, 16, 16, 5, 5, 4, 1), torch.float32)
    leaves = [t.detach().requires_grad_() for t in args[:4]]
    out = fused_group_conv_bn_relu(*leaves, *args[4:], groups=4, training=True,
                                   backend="cuda_emulated")
    with pytest.raises(ValueError, match="RESNEXT_BWD_XHAT must be recover or recompute"):
        out.sum().backward()


@pytest.mark.parametrize("width,dtype", [(4, torch.float32), (16, torch.bfloat16), (12, torch.float16)])
def test_deterministic_mode_gives_bit_identical_gradients(width, dtype):
    problem = problem_for(width, 1)
    gen = torch.Generator().manual_seed(3)
    args = make_arguments(problem, dtype, channels_last=True, generator=gen)
    grad = torch.randn(problem.output_shape, generator=gen, dtype=torch.float64)
    default = gradients("cuda_emulated", args, problem, True, grad)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [gradients("cuda_emulated", args, problem, True, grad) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for name, a, b, d in zip(NAMES, *runs, default):
        assert torch.equal(a, b), name
        # the atomic (default) path sums in another order: equal up to rounding
        torch.testing.assert_close(d.float(), a.float(), rtol=1e-2, atol=1e-3)


def test_split_ops_match_reference():
    """backward_reduce + backward_apply (the distributed path) of the kernels."""
    errors = split_backward_errors("cuda_emulated")
    assert len(errors) == 4 and max(errors) <= REL_TOLERANCE[torch.float32], errors


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves while running ``fn``."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = \
            t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saved_for_backward_is_smaller_than_unfused(dtype):
    """Saved: input, output and per-channel vectors (and the parameters); the unfused
    sequence also keeps the conv output. The figures are in docs/kernels.md."""
    problem = Problem(4, 64, 64, 14, 14, 16, 1)
    x, w, g, b, rm, rv = make_arguments(problem, dtype, channels_last=True)
    x.requires_grad_()
    conv = nn.Conv2d(64, 64, 3, padding=1, groups=16, bias=False).to(dtype)
    bn = nn.BatchNorm2d(64)
    unfused = nn.Sequential(conv, bn, nn.ReLU())
    params = [t.detach().requires_grad_() for t in (w, g, b)]

    def fused():
        fused_group_conv_bn_relu(x, *params, rm.clone(), rv.clone(), groups=16, training=True,
                                 backend="cuda_emulated")

    def pytorch():
        c = conv(x)
        unfused[2](bn(c.float())).to(dtype)

    fused_bytes, unfused_bytes = saved_bytes(fused), saved_bytes(pytorch)
    activation = x.numel() * x.element_size()
    assert fused_bytes <= unfused_bytes - activation, (fused_bytes, unfused_bytes)


def test_double_backward_raises():
    problem = Problem(2, 8, 8, 5, 5, 2, 1)
    x, w, g, b, rm, rv = make_arguments(problem, torch.float32)
    x.requires_grad_()
    out = fused_group_conv_bn_relu(x, w, g, b, rm, rv, groups=2, training=True,
                                   backend="cuda_emulated")
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gx.sum().backward()


def test_empty_batch_gradients():
    problem = Problem(2, 16, 16, 5, 5, 4, 1)
    x, w, g, b, rm, rv = make_arguments(problem, torch.float32)
    leaves = [t.detach().requires_grad_() for t in (x[:0], w, g, b)]
    out = fused_group_conv_bn_relu(*leaves, rm, rv, groups=4, training=False,
                                   backend="cuda_emulated")
    out.sum().backward()
    assert leaves[0].grad.shape == (0, 16, 5, 5)
    for t in leaves[1:]:
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.slow
def test_wide_layer_where_wgrad_blocks_loop_over_pixel_tiles():
    """64 groups x 4 channels (ResNeXt 64x4d's s2 width) at 48x48: 36 pixel tiles over
    32 wgrad chunks, so some blocks accumulate two tiles (the C++ test covers 1 and 2
    chunks on both emulator back-ends)."""
    problem = Problem(2, 256, 256, 48, 48, 64, 1)
    gen = torch.Generator().manual_seed(13)
    args = make_arguments(problem, torch.float32, channels_last=True, generator=gen)
    grad = torch.randn(problem.output_shape, generator=gen, dtype=torch.float64)
    got = gradients("cuda_emulated", args, problem, True, grad)
    want = gradients("reference", args, problem, True, grad, dtype=torch.float64)
    check_gradients(got, want, torch.float32)
