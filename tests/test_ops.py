"""The registered ops: opcheck, gradcheck, torch.compile, dispatch, double backward."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from resnext_kernels import FusedGroupConv, fused_group_conv_bn_relu
from resnext_kernels.backends import resolve
from resnext_kernels import available_backends
from resnext_kernels.testing import Problem, make_arguments, opcheck_backend_ops

OPS = resolve("reference", torch.empty(0, 0, 0, 0)).ops

PROBLEMS = [
    pytest.param(Problem(2, 8, 8, 5, 5, groups=2, stride=1), False, id="s1"),
    pytest.param(Problem(2, 8, 16, 7, 6, groups=4, stride=2), True, id="s2-cl-cout16"),
    pytest.param(Problem(3, 4, 4, 1, 1, groups=1, stride=2), False, id="1x1"),
]


def forward_args(problem, channels_last, training, requires_grad=True):
    x, w, g, b, rm, rv = make_arguments(problem, torch.float64, channels_last=channels_last)
    for t in (x, w, g, b):
        t.requires_grad_(requires_grad)
    return (x, w, g, b, rm, rv, problem.stride, problem.groups, 1e-5, training)


@pytest.mark.parametrize("problem,channels_last", PROBLEMS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_forward(problem, channels_last, training):
    torch.library.opcheck(OPS.forward, forward_args(problem, channels_last, training))


@pytest.mark.parametrize("problem,channels_last", PROBLEMS)
@pytest.mark.parametrize("mask", [[True] * 4, [False, True, True, True]], ids=["all", "no-dx"])
def test_opcheck_backward(problem, channels_last, mask):
    args = forward_args(problem, channels_last, True, requires_grad=False)
    out, mean, var = OPS.forward(*args)
    x, w, g, b = args[:4]
    grad_out = torch.randn_like(out)
    torch.library.opcheck(OPS.backward, (grad_out, x, w, g, b, out, mean, var,
                                         problem.stride, problem.groups, 1e-5, True, mask))


@pytest.mark.parametrize("problem,channels_last", PROBLEMS[:2])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(problem, channels_last, training):
    x, w, g, b, rm, rv = forward_args(problem, channels_last, training)[:6]

    def fn(x, w, g, b):
        # In training the running statistics are left out: gradcheck calls fn many times.
        return fused_group_conv_bn_relu(x, w, g, b, None if training else rm,
                                        None if training else rv, stride=problem.stride,
                                        groups=problem.groups, training=training)

    assert torch.autograd.gradcheck(fn, (x, w, g, b))


def test_masked_gradients_are_not_computed():
    x, w, g, b, rm, rv = make_arguments(Problem(2, 8, 8, 5, 5, 2, 1), torch.float64)
    w.requires_grad_()
    out = fused_group_conv_bn_relu(x, w, g, b, rm, rv, groups=2, training=True)
    out.backward(torch.randn_like(out))
    assert x.grad is None and g.grad is None and w.grad.shape == w.shape


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "resnext_kernels":
            self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_module_goes_through_the_registered_ops():
    module = FusedGroupConv(8, 8, groups=2, backend="reference")
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with RecordOps() as mode:
        module(x).sum().backward()
    assert mode.names == ["conv_bn_relu_reference.default",
                          "conv_bn_relu_reference_backward.default"]


def test_double_backward_raises():
    x, w, g, b, rm, rv = forward_args(Problem(2, 4, 4, 4, 4, 2, 1), False, True)[:6]
    out = fused_group_conv_bn_relu(x, w, g, b, rm, rv, groups=2, training=True)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gx.sum().backward()


class TwoLayers(torch.nn.Module):
    def __init__(self, momentum):
        super().__init__()
        self.a = FusedGroupConv(16, 32, groups=4, stride=2, momentum=momentum)
        self.b = FusedGroupConv(32, 32, groups=8, momentum=momentum)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.slow
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_torch_compile_fullgraph_cpu(momentum):
    eager = TwoLayers(momentum)
    compiled_model = TwoLayers(momentum)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True)
    for training in (True, True, False):
        eager.train(training), compiled_model.train(training)
        x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = eager(xa), compiled(xb)
        torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
        grad = torch.randn_like(ya)
        ya.backward(grad), yb.backward(grad)
        torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled_model.state_dict().items()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=name)



@pytest.mark.parametrize("problem,channels_last", PROBLEMS)
def test_opcheck_split_ops(problem, channels_last):
    args = forward_args(problem, channels_last, True, requires_grad=False)
    x, w, g, b = args[:4]
    out, mean, var = OPS.forward(*args)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(OPS.moments, (x, w, problem.stride, problem.groups))
    common = (grad_out, x, w, g, b, out, mean, var)
    torch.library.opcheck(OPS.backward_reduce, common + (problem.stride, problem.groups, 1e-5))
    sums = OPS.backward_reduce(*common, problem.stride, problem.groups, 1e-5)
    count = out.numel() // out.shape[1]
    torch.library.opcheck(OPS.backward_apply, common + sums + (count, problem.stride,
                                                               problem.groups, 1e-5, [True, True]))


def test_split_ops_compose_to_the_fused_ops():
    """moments + forward(given stats) == training forward; reduce + apply == backward."""
    problem = Problem(3, 8, 16, 7, 6, groups=4, stride=2)
    x, w, g, b, rm, rv = make_arguments(problem, torch.float64)
    out, mean, var = OPS.forward(x, w, g, b, rm, rv, 2, 4, 1e-5, True)
    m, m2 = OPS.moments(x, w, 2, 4)
    count = out.numel() // out.shape[1]
    torch.testing.assert_close(m, mean, atol=1e-14, rtol=1e-13)
    torch.testing.assert_close(m2 / count, var, atol=1e-14, rtol=1e-13)
    again, _, _ = OPS.forward(x, w, g, b, m, m2 / count, 2, 4, 1e-5, False)
    torch.testing.assert_close(again, out, atol=1e-14, rtol=1e-13)
    grad_out = torch.randn_like(out)
    expected = OPS.backward(grad_out, x, w, g, b, out, mean, var, 2, 4, 1e-5, True, [True] * 4)
    sums = OPS.backward_reduce(grad_out, x, w, g, b, out, mean, var, 2, 4, 1e-5)
    grads = OPS.backward_apply(grad_out, x, w, g, b, out, mean, var, *sums, count, 2, 4, 1e-5,
                               [True, True])
    for got, want in zip(grads + sums[::-1], expected):
        torch.testing.assert_close(got, want, atol=1e-14, rtol=1e-12)


@pytest.mark.skipif("cuda_emulated" not in available_backends(), reason="needs the emulated kernels")
def test_opcheck_emulated_kernel_ops():
    opcheck_backend_ops("cuda_emulated")
