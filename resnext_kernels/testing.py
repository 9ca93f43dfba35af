"""Helpers shared by the tests and resnext-bench: tolerances, error measures and
random problem instances compared against the float64 reference."""

from dataclasses import dataclass

import torch

from . import reference

# Tolerated relative error ‖out − ref‖ / ‖ref‖ against the float64 reference, and
# the element-wise (atol, rtol) for torch.testing.assert_close, per dtype. The
# half-precision figures allow the output rounding plus fp32 accumulation over
# 9·C_in/groups products.
REL_TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
ELEMENT_TOLERANCE = {
    torch.float64: (1e-12, 1e-11),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (1.5e-1, 5e-2),
}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖₂ / ‖expected‖₂ in float64 (0 when both are empty)."""
    a, e = actual.double(), expected.double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def pytorch_same_dtype(args, stride: int, groups: int, training: bool) -> torch.Tensor:
    """PyTorch's own unfused result in the arguments' dtype: ``F.conv2d`` in that dtype,
    BatchNorm in float32 (as autocast does), ReLU. Running statistics are not touched.
    The baseline for "within 2x of PyTorch's own error"."""
    import torch.nn.functional as F

    x, w, g, b, rm, rv = [t.clone() for t in args]
    c = F.conv2d(x, w, stride=stride, padding=1, groups=groups)
    return F.relu(F.batch_norm(c.float(), rm, rv, g.float(), b.float(), training)).to(x.dtype)


@dataclass(frozen=True)
class Problem:
    """One layer instance: shapes of the fused op's arguments."""

    n: int
    c_in: int
    c_out: int
    h: int
    w: int
    groups: int
    stride: int

    @property
    def output_shape(self):
        return (self.n, self.c_out, reference.output_size(self.h, self.stride),
                reference.output_size(self.w, self.stride))


def resnext_layers(cardinality: int = 32, width: int = 4, image: int = 224):
    """The grouped 3x3 layers of a ResNeXt with ``cardinality`` x ``width``d at ``image``²:
    ``{name: (channels, input size, stride)}``, groups = cardinality. Stage s (2..5)
    has ``cardinality·width·2^(s-2)`` channels; its first block has stride 2 (from
    stage 3 on) and the rest stride 1."""
    layers = {}
    for stage in range(2, 6):
        channels = cardinality * width * 2 ** (stage - 2)
        size = image // 2 ** stage  # the stage's output size
        if stage > 2:
            layers[f"s{stage}-down"] = (channels, size * 2, 2)
        layers[f"s{stage}"] = (channels, size, 1)
    return layers


def make_arguments(problem: Problem, dtype: torch.dtype, device="cpu", *,
                   channels_last: bool = False, generator: torch.Generator = None):
    """Fresh random arguments for ``problem``: (input, weight, bn_weight, bn_bias,
    running_mean, running_var). BN tensors are float32 for half inputs (mixed
    precision) and the input's dtype otherwise; never zeros, variances positive."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    p = problem

    def randn(*shape, dt):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dt, device=device)

    x = randn(p.n, p.c_in, p.h, p.w, dt=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fan_in = 9 * p.c_in // p.groups
    weight = (randn(p.c_out, p.c_in // p.groups, 3, 3, dt=torch.float64) / fan_in ** 0.5).to(dtype)
    bn_weight = (randn(p.c_out, dt=torch.float64).abs() + 0.5).to(param_dtype)
    bn_bias = randn(p.c_out, dt=param_dtype)
    running_mean = randn(p.c_out, dt=param_dtype) * 0.1
    running_var = (randn(p.c_out, dt=torch.float64).abs() + 0.5).to(param_dtype)
    return x, weight, bn_weight, bn_bias, running_mean, running_var


def split_backward_errors(backend: str, device="cpu") -> list:
    """Relative errors, against the float64 reference, of the distributed path of
    ``backend``'s ops: backward_reduce's two per-channel sums (Σdz, Σdz·x̂), then
    backward_apply's input and weight gradients (training, stride 2, odd sizes, 3
    groups of 8 channels, fp32, a random upstream gradient)."""
    from .backends import resolve

    problem = Problem(2, 24, 24, 7, 6, 3, 2)
    gen = torch.Generator().manual_seed(11)
    x, w, g, b, _, _ = make_arguments(problem, torch.float32, generator=gen)
    grad = torch.randn(problem.output_shape, generator=gen, dtype=torch.float64)
    results = {}
    for name, dtype in ((backend, torch.float32), ("reference", torch.float64)):
        op = resolve(name, x.to(device)).ops
        xs, ws, gs, bs = (t.to(device, dtype) for t in (x, w, g, b))
        out, mean, var = op.forward(xs, ws, gs, bs, None, None, 2, 3, 1e-5, True)
        dy = grad.to(device, dtype)
        sums = op.backward_reduce(dy, xs, ws, gs, bs, out, mean, var, 2, 3, 1e-5)
        count = out.numel() // out.shape[1]
        results[name] = [*sums, *op.backward_apply(dy, xs, ws, gs, bs, out, mean, var, *sums,
                                                   count, 2, 3, 1e-5, [True, True])]
    return [rel_error(got, want) for got, want in zip(results[backend], results["reference"])]


def opcheck_backend_ops(backend: str, device="cpu", dtype=torch.float32) -> None:
    """``torch.library.opcheck`` (schema, fake tensors, autograd registration, AOT
    dispatch) of ``backend``'s forward (training and eval), backward and split
    backward ops on ``device`` tensors: stride 2, odd sizes, channels_last input."""
    from .backends import resolve

    problem = Problem(2, 16, 16, 7, 6, 2, 2)
    x, w, g, b, rm, rv = (t.to(device) for t in make_arguments(problem, dtype,
                                                                 channels_last=True))
    ops = resolve(backend, x).ops
    shape = (problem.stride, problem.groups, 1e-5)
    for training in (True, False):
        leaves = [t.detach().requires_grad_() for t in (x, w, g, b)]
        torch.library.opcheck(ops.forward, (*leaves, rm, rv, *shape, training))
    out, mean, var = ops.forward(x, w, g, b, rm, rv, *shape, True)
    common = (torch.randn_like(out), x, w, g, b, out, mean, var)
    torch.library.opcheck(ops.backward, (*common, *shape, True, [True] * 4))
    torch.library.opcheck(ops.backward_reduce, (*common, *shape))
    sums = ops.backward_reduce(*common, *shape)
    count = out.numel() // out.shape[1]
    torch.library.opcheck(ops.backward_apply, (*common, *sums, count, *shape, [True, True]))
