"""The torch.library ops: schemas (the one place they are written), fake kernels
and autograd.

Every backend gets the same five functional ops in the ``resnext_kernels``
namespace, built from the five schemas below: the forward and backward pair

* ``resnext_kernels::conv_bn_relu_<backend>`` (forward), returning
  ``(out, mean, var)``: the output and the per-channel statistics it was
  normalised with (batch statistics in training, running statistics in eval);
* ``resnext_kernels::conv_bn_relu_<backend>_backward``, returning the gradients of
  input, weight, bn_weight and bn_bias (empty ``[0]`` where ``output_mask`` is
  False);

and the same computation split where statistics cross processes
(``resnext_kernels.distributed``: the per-channel reductions are all-reduced
between the halves):

* ``..._moments``: per-channel mean and M2 of the conv output (a training
  forward's first half; the second is the forward op given those statistics);
* ``..._backward_reduce``: the per-channel sums Σdz and Σdz·x̂;
* ``..._backward_apply``: input and weight gradients given those sums and their count.

The forward op is functional (it never writes the running statistics), so it can
carry an autograd formula; ``resnext_kernels.functional`` updates the running
statistics beside it. Implementations are attached per device type from Python
(``define_backend_ops(..., impls=...)``) or from C++ with
``TORCH_LIBRARY_IMPL(resnext_kernels, CUDA, m)`` in a kernel family's launcher.
"""

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from . import reference

NAMESPACE = "resnext_kernels"

FORWARD_SCHEMA = (
    "(Tensor input, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
    "Tensor? running_mean, Tensor? running_var, int stride, int groups, float eps, "
    "bool training) -> (Tensor out, Tensor mean, Tensor var)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor input, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
    "Tensor out, Tensor mean, Tensor var, int stride, int groups, float eps, "
    "bool training, bool[4] output_mask) -> (Tensor grad_input, Tensor grad_weight, "
    "Tensor grad_bn_weight, Tensor grad_bn_bias)"
)
MOMENTS_SCHEMA = "(Tensor input, Tensor weight, int stride, int groups) -> (Tensor mean, Tensor m2)"
BACKWARD_REDUCE_SCHEMA = (
    "(Tensor grad_out, Tensor input, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
    "Tensor out, Tensor mean, Tensor var, int stride, int groups, float eps) "
    "-> (Tensor sum_dz, Tensor sum_dz_xhat)"
)
BACKWARD_APPLY_SCHEMA = (
    "(Tensor grad_out, Tensor input, Tensor weight, Tensor bn_weight, Tensor bn_bias, "
    "Tensor out, Tensor mean, Tensor var, Tensor sum_dz, Tensor sum_dz_xhat, int count, "
    "int stride, int groups, float eps, bool[2] output_mask) "
    "-> (Tensor grad_input, Tensor grad_weight)"
)

# Keeps the registrations alive for the life of the process.
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")

# The calibration probe of `resnext-bench device` (csrc/kernels/probe.cuh): implemented
# by resnext_kernels._C (CUDA) and _C_emulated (CPU); returns the multiply-adds issued.
# `out` holds blocks x PROBE_THREADS floats (rk::kProbeThreads; the op checks it).
PROBE_THREADS = 128
torch.library.define(f"{NAMESPACE}::mma_probe", "(Tensor(a!) out, int blocks, int iterations) -> int",
                     lib=_LIB)


class Implementation(NamedTuple):
    """A backend's functions for one device type, with the schemas' signatures; None
    where C++ registers the implementation (``TORCH_LIBRARY_IMPL``)."""

    forward: Callable
    backward: Callable
    moments: Callable
    backward_reduce: Callable
    backward_apply: Callable


# op name suffix and schema, in Implementation's field order
_OPS = (("", FORWARD_SCHEMA), ("_backward", BACKWARD_SCHEMA), ("_moments", MOMENTS_SCHEMA),
        ("_backward_reduce", BACKWARD_REDUCE_SCHEMA), ("_backward_apply", BACKWARD_APPLY_SCHEMA))


@dataclass(frozen=True)
class BackendOps:
    """The registered ops of one backend (fields as in ``Implementation``)."""

    forward: torch._ops.OpOverload
    backward: torch._ops.OpOverload
    moments: torch._ops.OpOverload
    backward_reduce: torch._ops.OpOverload
    backward_apply: torch._ops.OpOverload


def _forward_fake(input, weight, bn_weight, bn_bias, running_mean, running_var,
                  stride, groups, eps, training):
    n, _, h, w = input.shape
    c_out = weight.shape[0]
    shape = (n, c_out, reference.output_size(h, stride), reference.output_size(w, stride))
    out = torch.empty(shape, dtype=input.dtype, device=input.device,
                      memory_format=reference.memory_format_of(input))
    stats = reference.compute_dtype(input.dtype)
    return (out, input.new_empty((c_out,), dtype=stats), input.new_empty((c_out,), dtype=stats))


def _backward_fake(grad_out, input, weight, bn_weight, bn_bias, out, mean, var,
                   stride, groups, eps, training, output_mask):
    def like(t, wanted, memory_format=torch.contiguous_format):
        if not wanted:
            return t.new_empty(0)
        return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=memory_format)

    return (like(input, output_mask[0], reference.memory_format_of(input)),
            like(weight, output_mask[1]),
            like(bn_weight, output_mask[2]),
            like(bn_bias, output_mask[3]))


def _forward_flops(input, weight, *args, out_shape=None, **kwargs):
    # The convolution's 2·MACs, as torch.utils.flop_counter counts F.conv2d (BN and
    # ReLU are not counted there either). Arguments arrive as shapes.
    return conv_flop_count(input, weight, out_shape[0], transposed=False)


def _backward_flops(grad_out, input, weight, *args, out_shape=None, **kwargs):
    # grad_input is a transposed conv of the same size; grad_weight a conv of the same size.
    mask = args[-1]
    return conv_flop_count(input, weight, grad_out, transposed=False) * (mask[0] + mask[1])


def _moments_fake(input, weight, stride, groups):
    stats = reference.compute_dtype(input.dtype)
    return tuple(input.new_empty((weight.shape[0],), dtype=stats) for _ in range(2))


def _backward_reduce_fake(grad_out, input, weight, bn_weight, bn_bias, out, mean, var,
                          stride, groups, eps):
    return _moments_fake(input, weight, stride, groups)


def _backward_apply_fake(grad_out, input, weight, bn_weight, bn_bias, out, mean, var, sum_dz,
                         sum_dz_xhat, count, stride, groups, eps, output_mask):
    return _backward_fake(grad_out, input, weight, bn_weight, bn_bias, out, mean, var, stride,
                          groups, eps, True, list(output_mask) + [False, False])[:2]


def _setup_context(ctx, inputs, output):
    input, weight, bn_weight, bn_bias, _, _, stride, groups, eps, training = inputs
    out, mean, var = output
    ctx.save_for_backward(input, weight, bn_weight, bn_bias, out, mean, var)
    ctx.config = (stride, groups, eps, training)
    ctx.mark_non_differentiable(mean, var)


def _make_backward(backward_op):
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        input, weight, bn_weight, bn_bias, out, mean, var = ctx.saved_tensors
        stride, groups, eps, training = ctx.config
        mask = list(ctx.needs_input_grad[:4])
        grads = backward_op(grad_out, input, weight, bn_weight, bn_bias, out, mean, var,
                            stride, groups, eps, training, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None,) * 6

    return backward


def _double_backward(ctx, *grads):
    raise NotImplementedError(
        "fused_group_conv_bn_relu does not support double backward (create_graph=True "
        "through its gradient); use the unfused nn.Conv2d + nn.BatchNorm2d + nn.ReLU for that")


def define_backend_ops(backend: str,
                       impls: Optional[dict[Optional[str], Implementation]] = None,
                       triton_ops: Optional[Implementation] = None) -> BackendOps:
    """Define the ops of ``backend`` with fake kernels, FLOP formulas and autograd.

    Args:
        backend: backend name; the ops are ``resnext_kernels::conv_bn_relu_<backend>``,
            ``..._backward``, ``..._moments``, ``..._backward_reduce`` and
            ``..._backward_apply``.
        impls: device type (``"cpu"``, ``"cuda"``) or ``None`` (every device) mapped to
            the backend's functions. Device types implemented in C++ are left out here.
        triton_ops: functions built from Triton kernels called through
            ``torch.library.wrap_triton``: their ops are defined with
            ``torch.library.triton_op`` (so ``torch.compile`` sees into them; the fake
            kernel comes from tracing the function); None entries are defined as usual.
    """
    base = f"{NAMESPACE}::conv_bn_relu_{backend}"
    fakes = (_forward_fake, _backward_fake, _moments_fake, _backward_reduce_fake,
             _backward_apply_fake)
    for (suffix, schema), fake, fn in zip(_OPS, fakes, triton_ops or (None,) * len(_OPS)):
        if fn is not None:
            torch.library.triton_op(base + suffix, fn, mutates_args=(), schema=schema)
            continue
        torch.library.define(base + suffix, schema, lib=_LIB)
        torch.library.register_fake(base + suffix, fake, lib=_LIB)
    for device_type, functions in (impls or {}).items():
        for (suffix, _), fn in zip(_OPS, functions):
            if fn is not None:
                torch.library.register_kernel(base + suffix, device_type, fn, lib=_LIB)

    namespace = getattr(torch.ops, NAMESPACE)
    packets = [getattr(namespace, f"conv_bn_relu_{backend}{suffix}") for suffix, _ in _OPS]
    ops = BackendOps(*(packet.default for packet in packets))
    register_flop_formula(packets[0])(_forward_flops)
    register_flop_formula(packets[1])(_backward_flops)
    torch.library.register_autograd(base, _make_backward(ops.backward),
                                    setup_context=_setup_context, lib=_LIB)
    torch.library.register_autograd(base + "_backward", _double_backward, lib=_LIB)
    return ops
