"""The Triton kernels against the float64 reference: on a GPU natively, otherwise
through the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1). Every family of widths x strides x modes x layouts, forward and
the four gradients, in float32 and float16 (bfloat16 loads are broken in the
interpreter, triton#11584: bf16 is checked by the GPU tests below, vs cuDNN)."""

import pytest
import torch

from resnext_kernels import available_backends, fused_group_conv_bn_relu
from resnext_kernels.testing import (REL_TOLERANCE, Problem, make_arguments,
                                     opcheck_backend_ops, rel_error, resnext_layers,
                                     split_backward_errors)

pytestmark = pytest.mark.skipif("triton" not in available_backends(),
                                reason="the triton backend is not available")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Channels per group -> groups: enough groups that a 64-channel tile spans several,
# small enough that the interpreter stays within minutes.
WIDTHS = {4: 3, 8: 3, 12: 3, 16: 3, 32: 2, 40: 2, 64: 1, 128: 1}
NAMES = ("output", "grad_input", "grad_weight", "grad_bn_weight", "grad_bn_bias",
         "running_mean", "running_var")


def problem_for(width, stride, channels_last):
    if stride == 2:
        n, h, w = (1, 8, 6) if channels_last else (1, 9, 7)
    else:
        n, h, w = 2, 5, 4
    groups = WIDTHS[width]
    return Problem(n, groups * width, groups * width, h, w, groups, stride)


def fp32_tolerance():
    """float32 products run as TF32 (10-bit mantissa, like float16) on a GPU where
    PyTorch's conv would (cudnn.allow_tf32, its default); exactly under the interpreter
    and when the flag is off."""
    tf32 = DEVICE == "cuda" and torch.backends.cudnn.allow_tf32
    return REL_TOLERANCE[torch.float16] if tf32 else REL_TOLERANCE[torch.float32]


def run(backend, args, problem, training, grad, dtype=None):
    x, w, g, b, rm, rv = [t.to(DEVICE, dtype) if dtype else t.to(DEVICE).clone() for t in args]
    leaves = [t.detach().requires_grad_() for t in (x, w, g, b)]
    out = fused_group_conv_bn_relu(*leaves, rm, rv, stride=problem.stride,
                                   groups=problem.groups, training=training, backend=backend)
    out.backward(grad.to(DEVICE, out.dtype))
    return [out.detach()] + [t.grad for t in leaves] + [rm, rv]


def pytorch_error(args, problem, training, grad, expected):
    """PyTorch's own error in the arguments' dtype (conv in that dtype, BN in float32)."""
    x, w, g, b, rm, rv = [t.to(DEVICE).clone() for t in args]
    leaves = [t.detach().requires_grad_() for t in (x, w, g, b)]
    c = torch.nn.functional.conv2d(leaves[0], leaves[1], stride=problem.stride, padding=1,
                                   groups=problem.groups)
    out = torch.relu(torch.nn.functional.batch_norm(c.float(), rm, rv, leaves[2].float(),
                                                    leaves[3].float(), training))
    out.backward(grad.to(DEVICE, out.dtype))
    got = [out.to(x.dtype)] + [t.grad for t in leaves] + [rm, rv]
    return [rel_error(a, e) for a, e in zip(got, expected)]


@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_triton_matches_reference(width, stride, dtype, training, channels_last):
    problem = problem_for(width, stride, channels_last)
    gen = torch.Generator().manual_seed(width * 10 + stride)
    args = make_arguments(problem, dtype, channels_last=channels_last, generator=gen)
    grad = torch.randn(problem.output_shape, generator=gen, dtype=torch.float64)
    got = run("triton", args, problem, training, grad)
    expected = run("reference", args, problem, training, grad, dtype=torch.float64)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=memory_format)
    assert got[1].is_contiguous(memory_format=memory_format)
    baseline = pytorch_error(args, problem, training, grad, expected) \
        if dtype != torch.float32 else None
    for i, (name, g, e) in enumerate(zip(NAMES, got, expected)):
        assert g.shape == e.shape and not g.isnan().any(), name
        err = rel_error(g, e)
        bound = fp32_tolerance() if baseline is None else \
            max(2 * baseline[i], REL_TOLERANCE[dtype] / 4)
        assert err <= bound, (name, err, bound)


@pytest.mark.parametrize("allow_tf32", [True, False], ids=["tf32", "ieee"])
def test_triton_float32_follows_cudnn_allow_tf32(monkeypatch, allow_tf32):
    """TF32 products where cudnn.allow_tf32 is set, exact fp32 ones where it is not; each
    within the tolerance it implies."""
    from resnext_kernels import triton_backend

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow_tf32)
    assert triton_backend._precision(torch.float32) == ("tf32" if allow_tf32 else "ieee")
    assert triton_backend._precision(torch.float16) == "tf32"  # no effect on 16-bit types
    assert_fp32_training_matches(Problem(2, 32, 32, 6, 5, 4, 1), seed=11)


@pytest.mark.parametrize("width", [4, 8, 16])
def test_triton_rows_of_32_pixels(width):
    """64 channels in rows of 20 columns: 32-pixel row tiles, whose dots the 8-warp
    passes (statistics, reduce, dc, dgrad + wgrad) split along the pixels."""
    from resnext_kernels import triton_backend

    assert triton_backend.Plan(64, 64, width, width, 3, 20).bw == 32
    assert_fp32_training_matches(Problem(1, 64, 64, 3, 20, 64 // width, 1), seed=width)


def test_triton_fp32_weight_gradient_in_16_pixel_tiles():
    """fp32 on rows of 20 columns, deterministic (the separate weight-gradient pass): the
    conv's row tiles are 32 pixels, the weight gradient's 16 (``Plan.w_bw``: fp32's
    32-pixel x tiles spill), two column tiles a row, the second partly past it."""
    from resnext_kernels import triton_backend

    bf16, fp32 = (triton_backend.Plan(64, 64, 4, 4, 3, 20, itemsize=i) for i in (2, 4))
    assert (bf16.bw, bf16.w_bw, fp32.bw, fp32.w_bw) == (32, 32, 32, 16)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert_fp32_training_matches(Problem(1, 64, 64, 3, 20, 16, 1), seed=21)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_triton_several_groups_of_64_channels():
    assert_fp32_training_matches(Problem(1, 128, 128, 5, 4, 2, 1), seed=3)


@pytest.mark.parametrize("stride", [1, 2])
def test_triton_programs_of_several_row_tiles(stride):
    """s5's tiling (7 x 7 rows, two images a row tile, 32 channels per group): a program
    walks RUN = 4 consecutive row tiles with the weight tiles loaded once; 5 row tiles
    make 2 programs, the second one partly past the batch (its statistics and sums
    merged with the first's)."""
    from resnext_kernels import triton_backend

    problem = Problem(10 if stride == 1 else 9, 64, 64, 7 * stride, 7 * stride, 2, stride)
    plan = triton_backend.Plan(64, 64, 32, 32, 7, 7)
    assert (plan.rows, plan.imgs, plan.run) == (7, 2, 4)
    assert triton_backend._row_programs(plan, problem.n) == 2
    assert_fp32_training_matches(problem, seed=5 + stride)


@pytest.mark.parametrize("stride", [1, 2])
def test_triton_weight_gradient_in_16_wide_steps(stride):
    """24 channels per group (the paper's 4 x 24d): a piece of 32 output channels spans
    48 input channels, which wgrad_kernel takes in three 16-wide steps (two of 32 would
    pad them to 64)."""
    from resnext_kernels.triton_backend import Plan

    problem = Problem(1, 48, 48, 6, 5, 2, stride)
    plan = Plan(48, 48, 24, 24, *problem.output_shape[2:])
    assert (plan.w_sub_k, plan.w_k_steps, plan.fuse_wgrad) == (16, 3, False)
    assert_fp32_training_matches(problem, seed=24 + stride)


def assert_fp32_training_matches(problem, seed):
    """Training forward and all gradients in float32 vs float64, NHWC."""
    gen = torch.Generator().manual_seed(seed)
    args = make_arguments(problem, torch.float32, channels_last=True, generator=gen)
    grad = torch.randn(problem.output_shape, generator=gen, dtype=torch.float64)
    for g, e in zip(run("triton", args, problem, True, grad),
                    run("reference", args, problem, True, grad, dtype=torch.float64)):
        assert rel_error(g, e) <= fp32_tolerance()


def test_triton_deterministic_mode_is_bit_identical():
    problem = Problem(2, 24, 24, 6, 5, 3, 1)
    gen = torch.Generator().manual_seed(4)
    args = make_arguments(problem, torch.float32, channels_last=True, generator=gen)
    grad = torch.randn(problem.output_shape, generator=gen, dtype=torch.float64)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = (run("triton", args, problem, True, grad) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_triton_split_ops_match_reference():
    """backward_reduce + backward_apply, the distributed path."""
    errors = split_backward_errors("triton", DEVICE)
    assert len(errors) == 4 and max(errors) <= fp32_tolerance(), errors


def test_triton_empty_batch():
    problem = Problem(2, 16, 16, 5, 5, 4, 1)
    x, w, g, b, rm, rv = [t.to(DEVICE) for t in make_arguments(problem, torch.float32)]
    leaves = [t.detach().requires_grad_() for t in (x[:0], w, g, b)]
    out = fused_group_conv_bn_relu(*leaves, rm, rv, groups=4, training=False, backend="triton")
    assert out.shape == (0, 16, 5, 5)
    out.sum().backward()
    assert leaves[0].grad.shape == (0, 16, 5, 5)
    assert torch.equal(leaves[1].grad, torch.zeros_like(w))


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's dtype limit")
def test_interpreter_refuses_bfloat16_clearly():
    problem = Problem(2, 16, 16, 5, 5, 4, 1)
    args = make_arguments(problem, torch.bfloat16)
    with pytest.raises(RuntimeError, match="backend 'triton' supports dtypes float16, float32"):
        fused_group_conv_bn_relu(*args, groups=4, backend="triton")


LAYER_SHAPES = [(f"{c}x{d}d-{name}", c, channels, size, stride)
                for c, d in ((32, 4), (32, 8), (64, 4))
                for name, (channels, size, stride) in resnext_layers(c, d).items()]


@pytest.mark.gpu
@pytest.mark.parametrize("name,groups,channels,size,stride", LAYER_SHAPES,
                         ids=[s[0] for s in LAYER_SHAPES])
@pytest.mark.parametrize("dtype,tf32", [(torch.bfloat16, True), (torch.float16, True),
                                        (torch.float32, True), (torch.float32, False)],
                         ids=["bf16", "fp16", "fp32-tf32", "fp32"])
def test_triton_matches_cudnn_on_resnext_layers(monkeypatch, name, groups, channels, size,
                                                stride, dtype, tf32):
    """bf16 included (the interpreter cannot check it), fp32 with TF32 on and off (both
    sides follow cudnn.allow_tf32): within 2x cuDNN's own error."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    problem = Problem(8, channels, channels, size, size, groups, stride)
    gen = torch.Generator().manual_seed(0)
    args = make_arguments(problem, dtype, channels_last=True, generator=gen)
    grad = torch.randn(problem.output_shape, generator=gen, dtype=torch.float64)
    got = run("triton", args, problem, True, grad)
    expected = run("reference", args, problem, True, grad, dtype=torch.float64)
    baseline = pytorch_error(args, problem, True, grad, expected)
    for i, (label, g, e) in enumerate(zip(NAMES, got, expected)):
        err = rel_error(g, e)
        assert err <= max(2 * baseline[i], REL_TOLERANCE[torch.float32]), (label, err, baseline[i])


@pytest.mark.gpu
def test_triton_module_compiles_without_graph_breaks():
    from resnext_kernels import FusedGroupConv

    module = FusedGroupConv(128, 128, groups=32, backend="triton").cuda()
    x = torch.randn(8, 128, 14, 14, device="cuda").contiguous(memory_format=torch.channels_last)
    expected = module(x)
    compiled = torch.compile(module, fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, atol=1e-4, rtol=1e-4)
    out = compiled(x.requires_grad_())
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_ops_pass_opcheck(dtype):
    """The triton_op registration (torch.compile sees into it) on CUDA tensors."""
    opcheck_backend_ops("triton", "cuda", dtype)


def test_triton_autotune_key_is_the_whole_shape():
    """The autotuned conv is keyed on every size of the conv (real arguments; the dtype is
    in every Triton key) and on the batch rounded up to a power of two, so a new batch
    size re-tunes only when it crosses a power of two."""
    from resnext_kernels import triton_backend
    from resnext_kernels import triton_kernels as K

    assert set(triton_backend.TUNE_KEYS) <= set(K.conv_rows_kernel.arg_names)
    assert {"N_BUCKET", "H_A", "W_A", "KC", "NC", "KG", "NG"} <= set(triton_backend.TUNE_KEYS)
    assert [triton_backend._next_pow2(n) for n in (1, 2, 3, 200, 256, 257)] == \
        [1, 2, 4, 256, 256, 512]


@pytest.mark.parametrize("width,groups", [(4, 32), (8, 32), (16, 32), (32, 32), (12, 3),
                                          (40, 2), (64, 1), (512, 1)])
def test_plan_covers_every_group_with_its_input_channels(width, groups):
    """A piece's input-channel range holds every group of its output channels; 4 and 8
    channels per group pack 4 and 2 groups into 16; wide groups take K steps of 32 (a
    piece of 64 output channels: [64, 64] tiles spill)."""
    from resnext_kernels.triton_backend import Plan

    c = width * groups
    plan = Plan(c, c, width, width, 28, 28)
    assert plan.pieces * plan.sub_n <= 64 or plan.pieces == 1
    assert plan.k_steps * plan.sub_k >= plan.slots * width
    if width in (4, 8):
        assert (plan.sub_n, plan.sub_k, plan.slots) == (16, 16, 16 // width)
    if width in (16, 32):
        assert (plan.sub_n, plan.sub_k, plan.slots, plan.constexprs()["GUARD"]) == \
            (width, width, 1, False)
    if width >= 40:
        assert (plan.sub_n, plan.sub_k, plan.k_steps) == (64, 32, -(-plan.slots * width // 32))
        assert plan.w_bw == 16  # its 32-pixel rows spill in wgrad_kernel
    # row tiles a program walks with its held weight tiles (28 rows of 28: 1; wide
    # groups reload their tiles each row: 1)
    assert plan.run == 1 and plan.hold == (width <= 32)
    # wgrad's steps: as wide as its sums of 1,024 entries allow without padding a
    # piece's channels past a multiple of 16; parts of 8 channels at least
    assert plan.w_k_steps * plan.w_sub_k == -(-plan.slots * width // 16) * 16
    assert plan.w_pieces * plan.sub_n * plan.w_sub_k <= 1024
    assert plan.w_sub_k // plan.w_split >= 8
    if width == 32:  # s5: one step of one group, in 4 parts (a batch entry a warp)
        assert (plan.w_sub_k, plan.w_pieces, plan.w_split) == (32, 1, 4)
    # fp32: input-channel steps of 32 at most (64-wide steps spill from 24 channels a
    # group), wgrad's rows of 16 pixels; the rest as above
    fp32 = Plan(c, c, width, width, 28, 28, itemsize=4)
    assert fp32.k_steps * fp32.sub_k >= fp32.slots * width and fp32.sub_k <= 32
    assert (fp32.sub_n, fp32.pieces, fp32.slots) == (plan.sub_n, plan.pieces, plan.slots)
    assert fp32.w_bw == 16


def test_autotune_setting_is_checked_at_each_call(monkeypatch):
    from resnext_kernels import triton_backend

    monkeypatch.setenv("RESNEXT_TRITON_AUTOTUNE", "0")
    assert not triton_backend._autotune_enabled()
    monkeypatch.setenv("RESNEXT_TRITON_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="RESNEXT_TRITON_AUTOTUNE must be 0 or 1; got 'yes'"):
        triton_backend._autotune_enabled()
