"""The CUDA forward kernels, executed on the CPU through the host SIMT emulator
(backend "cuda_emulated"), against the float64 reference: every family of widths x
strides x dtypes x modes x layouts, on small random shapes with odd sizes."""

import pytest
import torch

from resnext_kernels import available_backends, fused_group_conv_bn_relu
from resnext_kernels.backends import resolve
from resnext_kernels.testing import (REL_TOLERANCE, Problem, make_arguments, pytorch_same_dtype,
                                     rel_error)

pytestmark = pytest.mark.skipif("cuda_emulated" not in available_backends(),
                                reason="resnext_kernels._C_emulated is not built")

WIDTHS = [4, 8, 16, 32, 64, 12, 80]  # 12 and 80: the generic kernels (80: two channel chunks)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def problem_for(width, stride):
    # 6 groups of 4: packed pairs on tensor cores, a tile with 24 of its 32 channels (an
    # odd number of 4-channel groups runs the generic kernels)
    groups = 6 if width == 4 else 3 if width <= 16 else 2
    n, h, w = (1, 9, 7) if stride == 2 else (2, 7, 5)
    return Problem(n, groups * width, groups * width, h, w, groups, stride)


def run(backend, args, problem, training):
    args = [t.clone() for t in args]
    out = fused_group_conv_bn_relu(*args, stride=problem.stride, groups=problem.groups,
                                   training=training, backend=backend)
    return out, args[4], args[5]


# Training runs either strategy (csrc/kernels/conv_fwd.cuh): "raw" writes the raw conv
# output then normalises it in place; "recompute" recomputes the conv to write.
MODES = [pytest.param(False, None, id="eval"), pytest.param(True, "raw", id="train-raw"),
         pytest.param(True, "recompute", id="train-recompute")]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training,strategy", MODES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_emulated_forward_matches_reference(width, stride, dtype, training, strategy,
                                            channels_last, monkeypatch):
    if strategy is not None:
        monkeypatch.setenv("RESNEXT_TRAIN_STRATEGY", strategy)
    problem = problem_for(width, stride)
    gen = torch.Generator().manual_seed(width * 100 + stride * 10 + int(training))
    args = make_arguments(problem, dtype, channels_last=channels_last, generator=gen)
    out, rm, rv = run("cuda_emulated", args, problem, training)
    ref, rm64, rv64 = run("reference", [t.double() for t in args], problem, training)

    assert out.dtype == dtype and out.shape == problem.output_shape
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert not out.isnan().any(), "unwritten (poisoned) output elements"
    err = rel_error(out, ref)
    assert err <= REL_TOLERANCE[dtype], err
    if dtype != torch.float32:  # fp32 errors are rounding noise on both sides
        torch_err = rel_error(pytorch_same_dtype(args, problem.stride, problem.groups, training),
                              ref)
        assert err <= 2 * torch_err, (err, torch_err)
    torch.testing.assert_close(rm.double(), rm64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rv.double(), rv64, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("width,groups", [(8, 5), (8, 6), (8, 7), (16, 3), (4, 10), (4, 3)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_emulated_forward_tiles_of_whole_groups(width, groups, stride, training):
    """At 4, 8 and 16 channels per group a tensor-core block owns 32 channels, whole
    groups: full tiles, and a last tile that ends after 1, 2 or 3 of its groups (of
    8 channels; after 1 of 16; after a pair of 4). An odd number of 4-channel groups
    runs the generic kernels."""
    problem = Problem(2, groups * width, groups * width, 6, 5, groups, stride)
    gen = torch.Generator().manual_seed(groups * 10 + width + stride)
    args = make_arguments(problem, torch.bfloat16, channels_last=True, generator=gen)
    out, rm, rv = run("cuda_emulated", args, problem, training)
    ref, rm64, rv64 = run("reference", [t.double() for t in args], problem, training)
    assert not out.isnan().any(), "unwritten (poisoned) output elements"
    assert rel_error(out, ref) <= REL_TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(rm.double(), rm64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rv.double(), rv64, atol=1e-5, rtol=1e-5)


def with_non_finite_values(x):
    """x (N, 64, H, W) with a NaN and two infinities, in groups 0, 2 and 7 of 4 channels
    (the even or odd member of a packed pair), one at a corner, one in the last column."""
    x = x.clone()
    x[0, 1, 2, 3] = float("nan")
    x[1, 9, 0, 0] = float("inf")
    x[1, 30, 4, -1] = float("-inf")
    return x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_emulated_packed_groups_keep_non_finite_values_in_their_group(dtype, stride, training):
    """At 4 channels per group the tensor cores multiply pairs of groups with
    block-diagonal weights: a NaN or an infinity in one group's input must not reach the
    other group's outputs through the zeros (0 x Inf = NaN). The float64 reference's
    NaN and Inf pattern, and its finite values."""
    problem = Problem(2, 64, 64, 6, 9, 16, stride)
    gen = torch.Generator().manual_seed(40 + stride)
    x, w, g, b, rm, rv = make_arguments(problem, dtype, channels_last=True, generator=gen)
    args = [with_non_finite_values(x), w, g, b, rm, rv]
    out, _, _ = run("cuda_emulated", args, problem, training)
    ref, _, _ = run("reference", [t.double() for t in args], problem, training)
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf())
    assert ref.isnan().any() and ref.isfinite().any()
    finite = ref.isfinite()
    assert rel_error(out[finite], ref[finite]) <= REL_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype,stats_dtype,n", [
    (torch.bfloat16, torch.float32, 3), (torch.float16, torch.float16, 3),
    (torch.float32, torch.float32, 3), (torch.bfloat16, torch.float32, 0)],
    ids=["bf16-fp32-stats", "fp16-fp16-stats", "fp32", "empty"])
def test_emulated_eval_returns_the_running_statistics(dtype, stats_dtype, n):
    """Eval's returned (mean, var) are fresh fp32 copies of the running statistics,
    exact: the conv pass's pixel block 0 writes them for every channel tile (three
    tiles of 32 channels and several pixel blocks here), the glue where no block runs."""
    problem = Problem(max(n, 1), 96, 96, 12, 11, 12, 1)
    gen = torch.Generator().manual_seed(n + 7)
    x, w, g, b, rm, rv = make_arguments(problem, dtype, channels_last=True, generator=gen)
    rm, rv = rm.to(stats_dtype), rv.to(stats_dtype)
    ops = resolve("cuda_emulated", x).ops
    _, mean, var = ops.forward(x[:n], w, g, b, rm, rv, 1, 12, 1e-5, False)
    for got, running in ((mean, rm), (var, rv)):
        assert got.dtype == torch.float32 and got.data_ptr() != running.data_ptr()
        assert torch.equal(got, running.float())


@pytest.mark.parametrize("offset", [100.0, 1000.0])
@pytest.mark.parametrize("strategy", ["raw", "recompute"])
def test_training_statistics_are_stable_for_large_means(offset, strategy, monkeypatch):
    """|mean| >> std: shifted (Chan) merges keep the variance; raw E[x²] − E[x]² would not."""
    monkeypatch.setenv("RESNEXT_TRAIN_STRATEGY", strategy)
    problem = Problem(2, 32, 32, 9, 9, 8, 1)
    gen = torch.Generator().manual_seed(5)
    x, w, g, b, rm, rv = make_arguments(problem, torch.float32, channels_last=True, generator=gen)
    w = w.abs()  # a positive filter keeps the offset in the conv output's mean
    args = [x + offset, w, g, b, rm, rv]
    out, _, rv_out = run("cuda_emulated", args, problem, True)
    ref, _, rv_ref = run("reference", [t.double() for t in args], problem, True)
    assert rel_error(out, ref) <= REL_TOLERANCE[torch.float32]
    torch.testing.assert_close(rv_out.double(), rv_ref, atol=0, rtol=1e-4)


def test_unknown_training_strategy_is_refused(monkeypatch):
    monkeypatch.setenv("RESNEXT_TRAIN_STRATEGY", "fast")
    args = make_arguments(Problem(2, 16, 16, 5, 5, 4, 1), torch.float32)
    with pytest.raises(ValueError, match="RESNEXT_TRAIN_STRATEGY must be raw or recompute"):
        fused_group_conv_bn_relu(*args, groups=4, training=True, backend="cuda_emulated")


def test_emulated_forward_with_empty_batch():
    problem = Problem(2, 16, 16, 5, 5, 4, 1)
    x, w, g, b, rm, rv = make_arguments(problem, torch.float32)
    empty = fused_group_conv_bn_relu(x[:0], w, g, b, rm, rv, groups=4, training=True,
                                     backend="cuda_emulated")
    assert empty.shape == (0, 16, 5, 5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_emulated_forward_with_views_off_a_16_byte_boundary(channels_last):
    """The tensor-core loop copies 16-byte chunks: inputs and weights that start 2 bytes
    past a boundary (views into a larger buffer) still give the right result."""
    problem = problem_for(16, 1)
    gen = torch.Generator().manual_seed(11)
    x, w, g, b, rm, rv = make_arguments(problem, torch.bfloat16, channels_last=channels_last,
                                        generator=gen)

    def shifted(t):
        memory_format = (torch.channels_last if t.dim() == 4 and channels_last
                         else torch.contiguous_format)
        dense = t.contiguous(memory_format=memory_format)
        flat = torch.empty(dense.numel() + 1, dtype=t.dtype)
        view = flat[1:].as_strided(dense.shape, dense.stride())
        view.copy_(dense)
        assert view.data_ptr() % 16 != 0
        return view

    args = [shifted(x), shifted(w), g, b, rm, rv]
    out, _, _ = run("cuda_emulated", args, problem, False)
    ref, _, _ = run("reference", [t.double() for t in args], problem, False)
    assert rel_error(out, ref) <= REL_TOLERANCE[torch.bfloat16]
