"""Reference implementation of the fused grouped 3x3 conv + BatchNorm + ReLU.

This module is the oracle: every kernel backend is tested against it, evaluated
in float64. It is written with plain PyTorch ops for clarity, not speed, and runs
on any device. The ``reference`` backend registers these functions as the
implementation of its ops (see ``resnext_kernels/ops.py``).

Notation (all shapes for NCHW; channels_last tensors have the same shapes):

* ``input``  x: ``[N, C_in, H, W]``
* ``weight`` w: ``[C_out, C_in / groups, 3, 3]``; 3x3 kernel, padding 1, dilation 1
* conv output c: ``[N, C_out, H_out, W_out]`` with ``H_out = (H - 1) // stride + 1``
* per-channel vectors (``bn_weight`` γ, ``bn_bias`` β, ``mean``, ``var``): ``[C_out]``
* ``x̂ = (c - mean) * rsqrt(var + eps)``, ``z = γ x̂ + β``, ``out = relu(z)``

In training mode mean/var are the batch statistics of c over (N, H_out, W_out)
(biased variance, as ``torch.nn.functional.batch_norm`` normalises with); in eval
mode they are the running statistics. Half-precision inputs are computed in
float32 (the accumulation type of every backend); float64 stays float64.
"""

import torch
import torch.nn.functional as F

KERNEL_SIZE = 3
PADDING = 1


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype for an input dtype: float64 stays, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_size(size: int, stride: int) -> int:
    """Spatial output size of a 3x3 conv with padding 1: ``(size - 1) // stride + 1``."""
    return (size + 2 * PADDING - KERNEL_SIZE) // stride + 1


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The memory format an output should follow for a 4-D input ``t``.

    Contiguous (NCHW) wins when both layouts match (C == 1 or H == W == 1), as in
    PyTorch's convolutions; a non-contiguous view follows its stride order.
    """
    if t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.channels_last if t.stride(1) < t.stride(3) else torch.contiguous_format


def conv(input: torch.Tensor, weight: torch.Tensor, stride: int, groups: int) -> torch.Tensor:
    """Grouped 3x3 convolution in the compute dtype. Returns c: ``[N, C_out, H_out, W_out]``."""
    dtype = compute_dtype(input.dtype)
    return F.conv2d(input.to(dtype), weight.to(dtype), stride=stride, padding=PADDING, groups=groups)


def batch_statistics(c: torch.Tensor):
    """Per-channel mean and biased variance of c over (N, H, W). Returns two ``[C]``.

    An empty batch has no statistics; it gets mean 0 and var 1 (never used: PyTorch
    leaves the running statistics alone for an empty batch).
    """
    if c.numel() == 0:
        return c.new_zeros(c.shape[1]), c.new_ones(c.shape[1])
    var, mean = torch.var_mean(c, dim=(0, 2, 3), correction=0)
    return mean, var


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v[None, :, None, None]


def forward(input, weight, bn_weight, bn_bias, running_mean, running_var,
            stride: int, groups: int, eps: float, training: bool):
    """Fused forward.

    Args:
        input: ``[N, C_in, H, W]``; weight: ``[C_out, C_in/groups, 3, 3]``, same dtype.
        bn_weight, bn_bias: ``[C_out]``. running_mean, running_var: ``[C_out]`` or None
        (required when ``training`` is False; never modified here).

    Returns:
        ``(out, mean, var)``: out ``[N, C_out, H_out, W_out]`` in the input's dtype and
        memory format; mean and var ``[C_out]`` in the compute dtype, the statistics
        used to normalise (batch statistics with biased variance in training, copies
        of the running statistics in eval).
    """
    dtype = compute_dtype(input.dtype)
    c = conv(input, weight, stride, groups)
    if training:
        mean, var = batch_statistics(c)
    else:
        mean, var = running_mean.to(dtype, copy=True), running_var.to(dtype, copy=True)
    scale = bn_weight.to(dtype) * torch.rsqrt(var + eps)
    shift = bn_bias.to(dtype) - mean * scale
    out = torch.relu(c * _per_channel(scale) + _per_channel(shift))
    return out.to(input.dtype).contiguous(memory_format=memory_format_of(input)), mean, var


def batch_moments(input, weight, stride: int, groups: int):
    """Per-channel mean and M2 = Σ (c − mean)² of the conv output c over (N, H_out, W_out).

    The first half of a training forward, for statistics merged across processes
    (``resnext_kernels.distributed``); the count is ``N·H_out·W_out``. Returns two
    ``[C_out]`` in the compute dtype (zeros for an empty batch).
    """
    c = conv(input, weight, stride, groups)
    if c.numel() == 0:
        return c.new_zeros(c.shape[1]), c.new_zeros(c.shape[1])
    mean = c.mean(dim=(0, 2, 3))
    return mean, (c - _per_channel(mean)).square().sum(dim=(0, 2, 3))


def _normalized_and_masked(grad_out, input, weight, out, mean, var, stride, groups, eps):
    """x̂ = (conv(x) − mean)·rsqrt(var + eps) and dz = grad_out·[out > 0], compute dtype."""
    dtype = compute_dtype(input.dtype)
    c = conv(input, weight, stride, groups)
    x_hat = (c - _per_channel(mean.to(dtype))) * _per_channel(torch.rsqrt(var.to(dtype) + eps))
    return x_hat, _masked(grad_out, out, dtype)


def _masked(grad_out, out, dtype):
    """dz = grad_out·[out > 0] in ``dtype``."""
    return torch.where(out > 0, grad_out.to(dtype), 0)


def backward_reduce(grad_out, input, weight, bn_weight, bn_bias, out, mean, var,
                    stride: int, groups: int, eps: float):
    """The per-channel sums the input gradient needs: ``(Σ dz, Σ dz·x̂)``, each ``[C_out]``
    in the compute dtype, over (N, H_out, W_out); dz = grad_out·[out > 0]. They are also
    the gradients of bn_bias and bn_weight."""
    x_hat, dz = _normalized_and_masked(grad_out, input, weight, out, mean, var, stride, groups, eps)
    return dz.sum(dim=(0, 2, 3)), (dz * x_hat).sum(dim=(0, 2, 3))


def backward_apply(grad_out, input, weight, bn_weight, bn_bias, out, mean, var, sum_dz,
                   sum_dz_xhat, count: int, stride: int, groups: int, eps: float, output_mask):
    """Input and weight gradients from the per-channel sums of ``backward_reduce``.

    dc = γ·rsqrt(var+eps)·(dz − Σdz/count − x̂·Σdz·x̂/count); d input = conv_transpose(dc, w),
    d weight = Σ_{N,H,W} x ⋆ dc per group: the training gradient, given the sums of a whole
    batch and its count. ``output_mask`` (2 bools) skips a gradient (returned ``[0]``).
    Returns ``(grad_input, grad_weight)`` in the dtypes (and input memory format) of the inputs.
    """
    dtype = compute_dtype(input.dtype)
    x_hat, dz = _normalized_and_masked(grad_out, input, weight, out, mean, var, stride, groups, eps)
    dc = _gain(bn_weight, var, eps, dtype) * (dz - _per_channel(sum_dz.to(dtype) / count)
                                              - x_hat * _per_channel(sum_dz_xhat.to(dtype) / count))
    return _conv_gradients(input, weight, dc, stride, groups, output_mask)


def _gain(bn_weight, var, eps, dtype):
    """γ·rsqrt(var + eps) per channel, broadcast over [N, C, H, W]."""
    return _per_channel(bn_weight.to(dtype) * torch.rsqrt(var.to(dtype) + eps))


def _conv_gradients(input, weight, dc, stride, groups, output_mask):
    """The conv's input and weight gradients given dc (``backward_apply``)."""
    dtype = dc.dtype
    x, w = input.to(dtype), weight.to(dtype)
    grad_input = input.new_empty(0)
    if output_mask[0]:
        grad_input = torch.nn.grad.conv2d_input(
            x.shape, w, dc, stride=stride, padding=PADDING, groups=groups
        ).to(input.dtype).contiguous(memory_format=memory_format_of(input))
    grad_weight = weight.new_empty(0)
    if output_mask[1]:
        grad_weight = torch.nn.grad.conv2d_weight(
            x, w.shape, dc, stride=stride, padding=PADDING, groups=groups
        ).to(weight.dtype).contiguous()
    return grad_input, grad_weight


def backward(grad_out, input, weight, bn_weight, bn_bias, out, mean, var,
             stride: int, groups: int, eps: float, training: bool, output_mask):
    """Gradients of ``forward`` for (input, weight, bn_weight, bn_bias).

    Args:
        grad_out, out: ``[N, C_out, H_out, W_out]``; out is forward's output, whose
        sign gives the ReLU mask. mean, var: forward's returned statistics ``[C_out]``.
        output_mask: four bools; a gradient whose flag is False is returned empty
        (``[0]``) and not computed.

    ``backward_reduce`` gives dβ = Σ dz, dγ = Σ dz·x̂; in training ``backward_apply``
    subtracts their means from the input gradient (the statistics depend on the input),
    in eval dc = γ·rsqrt(var + eps)·dz (x̂ not involved: a non-finite conv output does not
    reach dc, as in PyTorch).

    Returns:
        ``(grad_input, grad_weight, grad_bn_weight, grad_bn_bias)``, each in the dtype
        of the matching input (grad_input in the input's memory format).
    """
    d_bias, d_gamma = backward_reduce(grad_out, input, weight, bn_weight, bn_bias, out, mean,
                                      var, stride, groups, eps)
    if training:
        count = max(out.numel() // out.shape[1], 1)
        grad_input, grad_weight = backward_apply(grad_out, input, weight, bn_weight, bn_bias,
                                                 out, mean, var, d_bias, d_gamma, count, stride,
                                                 groups, eps, output_mask[:2])
    else:  # constant statistics: dc = γ·rsqrt(var + eps)·dz, x̂ not involved (as PyTorch's)
        dtype = compute_dtype(input.dtype)
        dc = _gain(bn_weight, var, eps, dtype) * _masked(grad_out, out, dtype)
        grad_input, grad_weight = _conv_gradients(input, weight, dc, stride, groups,
                                                  output_mask[:2])
    grad_bn_weight = d_gamma.to(bn_weight.dtype) if output_mask[2] else bn_weight.new_empty(0)
    grad_bn_bias = d_bias.to(bn_bias.dtype) if output_mask[3] else bn_bias.new_empty(0)
    return grad_input, grad_weight, grad_bn_weight, grad_bn_bias
