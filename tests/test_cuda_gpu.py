"""The `cuda` backend on a GPU against cuDNN (F.conv2d(groups) + BatchNorm + ReLU in
the same dtype) and the float64 reference, on every grouped-conv layer shape of
ResNeXt-50 32x4d and ResNeXt-101 32x8d / 64x4d. Skipped without a GPU."""

import pytest
import torch
import torch.nn.functional as F

from resnext_kernels import available_backends, fused_group_conv_bn_relu
from resnext_kernels.testing import (REL_TOLERANCE, Problem, make_arguments, opcheck_backend_ops,
                                    rel_error, resnext_layers)

pytestmark = pytest.mark.gpu

SHAPES = [(f"{c}x{d}d-{name}", c, channels, size, stride)
          for c, d in ((32, 4), (32, 8), (64, 4))
          for name, (channels, size, stride) in resnext_layers(c, d).items()]


@pytest.fixture(autouse=True)
def _needs_cuda_backend():
    if "cuda" not in available_backends():
        pytest.skip("the cuda backend is not built")


def cudnn(args, problem, training):
    x, w, g, b, rm, rv = [t.clone() for t in args]
    c = F.conv2d(x, w, stride=problem.stride, padding=1, groups=problem.groups)
    return F.relu(F.batch_norm(c, rm, rv, g.to(c.dtype), b.to(c.dtype), training))


@pytest.mark.parametrize("name,groups,channels,size,stride", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_cuda_matches_cudnn_on_resnext_layers(name, groups, channels, size, stride, dtype, training):
    problem = Problem(8, channels, channels, size, size, groups, stride)
    args = make_arguments(problem, dtype, "cuda", channels_last=True,
                          generator=torch.Generator().manual_seed(0))
    mine = [t.clone() for t in args]
    out = fused_group_conv_bn_relu(*mine, stride=stride, groups=groups, training=training,
                                   backend="cuda")
    ref64 = [t.double() for t in args]
    ref = fused_group_conv_bn_relu(*ref64, stride=stride, groups=groups, training=training,
                                   backend="reference")
    err, cudnn_err = rel_error(out, ref), rel_error(cudnn(args, problem, training), ref)
    assert err <= REL_TOLERANCE[dtype], (err, cudnn_err)
    assert err <= max(2 * cudnn_err, REL_TOLERANCE[torch.float32]), (err, cudnn_err)
    torch.testing.assert_close(mine[5].double(), ref64[5], atol=1e-4, rtol=1e-4)


def test_cuda_runs_under_cuda_graphs():
    problem = Problem(4, 128, 128, 14, 14, 32, 1)
    args = make_arguments(problem, torch.float16, "cuda", channels_last=True)
    run = lambda: fused_group_conv_bn_relu(*args, groups=32, training=False, backend="cuda")  # noqa: E731
    expected = run()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, expected)


def grads(fn, args, problem, training, grad, backend=None):
    leaves = [t.detach().clone().requires_grad_() for t in args[:4]]
    stats = [t.clone() for t in args[4:]]
    if backend is None:
        out = fn(leaves + stats, problem, training)
    else:
        out = fused_group_conv_bn_relu(*leaves, *stats, stride=problem.stride,
                                       groups=problem.groups, training=training, backend=backend)
    out.backward(grad.to(out.dtype))
    return [t.grad for t in leaves]


@pytest.mark.parametrize("name,groups,channels,size,stride", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_cuda_gradients_match_cudnn_on_resnext_layers(name, groups, channels, size, stride, dtype,
                                                     training):
    problem = Problem(8, channels, channels, size, size, groups, stride)
    gen = torch.Generator().manual_seed(1)
    args = make_arguments(problem, dtype, "cuda", channels_last=True, generator=gen)
    grad = torch.randn(problem.output_shape, generator=gen, dtype=torch.float64).cuda()
    mine = grads(None, args, problem, training, grad, backend="cuda")
    ref = grads(None, [t.double() for t in args], problem, training, grad, backend="reference")
    theirs = grads(cudnn, args, problem, training, grad)
    for label, m, r, t in zip(("input", "weight", "bn_weight", "bn_bias"), mine, ref, theirs):
        err, cudnn_err = rel_error(m, r), rel_error(t, r)
        assert err <= max(2 * cudnn_err, REL_TOLERANCE[torch.float32]), (label, err, cudnn_err)


def test_cuda_deterministic_gradients_are_bit_identical():
    problem = Problem(16, 256, 256, 28, 28, 32, 1)
    args = make_arguments(problem, torch.bfloat16, "cuda", channels_last=True)
    grad = torch.randn(problem.output_shape, device="cuda", dtype=torch.float64)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [grads(None, args, problem, True, grad, backend="cuda") for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cuda_training_step_under_cuda_graphs():
    problem = Problem(4, 128, 128, 14, 14, 32, 1)
    args = make_arguments(problem, torch.bfloat16, "cuda", channels_last=True)
    leaves = [t.detach().clone().requires_grad_() for t in args[:4]]
    grad = torch.randn(problem.output_shape, device="cuda", dtype=torch.bfloat16)

    def step():
        for t in leaves:
            t.grad = None
        out = fused_group_conv_bn_relu(*leaves, None, None, groups=32, training=True,
                                       backend="cuda")
        out.backward(grad)
        return out

    expected = [step()] + [t.grad.clone() for t in leaves]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip([captured] + [t.grad for t in leaves], expected):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_autocast_runs_in_the_autocast_dtype_like_conv_and_batchnorm(dtype):
    from torch import nn

    from resnext_kernels import FusedGroupConv

    module = FusedGroupConv(128, 128, groups=32, backend="cuda").cuda()
    seq = nn.Sequential(*[m.cuda() for m in module.to_modules()], nn.ReLU())
    x = torch.randn(8, 128, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=dtype):
        out, expected = module(x), seq(x)
    assert out.dtype == expected.dtype == dtype
    assert module.bn.running_mean.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected.float(), atol=0.1, rtol=0.05)


def test_cuda_ten_thousand_calls_keep_memory_stable():
    problem = Problem(4, 64, 64, 14, 14, 16, 1)
    args = make_arguments(problem, torch.bfloat16, "cuda", channels_last=True)
    leaves = [t.requires_grad_() for t in args[:4]]

    def call():
        out = fused_group_conv_bn_relu(*leaves, *args[4:], groups=16, training=True,
                                       backend="cuda")
        out.sum().backward()

    for _ in range(200):
        call()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(10_000):
        call()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 2**20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_ops_pass_opcheck(dtype):
    opcheck_backend_ops("cuda", "cuda", dtype)
