"""Synchronised batch statistics across processes, with ``nn.SyncBatchNorm``'s semantics.

In training with a process group, the fused op is split where the statistics
cross processes, and the crossing uses torch.distributed's own collectives:

forward
    1. ``moments``: each process's per-channel (count, mean, M2) of its conv output;
    2. ``all_gather`` of (count, mean, M2), merged in rank order with Chan's formula
       (stable for |mean| ≫ std, uneven and empty per-process batches);
    3. the forward op normalises with the merged statistics; every process updates its
       running statistics with them (unbiased variance over the total count).
backward
    1. ``backward_reduce``: each process's Σdz and Σdz·x̂;
    2. ``all_reduce`` (sum) of both;
    3. ``backward_apply``: input and weight gradients from the global sums and count.

The BatchNorm parameter gradients are the local sums and the conv weight gradient
is local, as with ``nn.SyncBatchNorm``: DistributedDataParallel averages them.
"""

import torch
import torch.distributed as dist

from .ops import BackendOps
from .reference import output_size


def merge_moments(counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor):
    """Chan's parallel merge of per-process moments, in rank order.

    Args:
        counts ``[R]``, means ``[R, C]``, m2s ``[R, C]`` (M2 = Σ (x − mean)²).
    Returns:
        ``(count, mean [C], m2 [C])`` of the union.
    """
    total = counts.sum()
    weights = (counts / total.clamp(min=1))[:, None]
    mean = (weights * means).sum(dim=0)
    m2 = (m2s + counts[:, None] * (means - mean).square()).sum(dim=0)
    return total, mean, m2


class _NormalizeWithGlobalStatistics(torch.autograd.Function):
    """Forward: the forward op with given (global) statistics. Backward: per-channel sums
    all-reduced over the group before the input gradient is formed."""

    @staticmethod
    def forward(ctx, input, weight, bn_weight, bn_bias, mean, var, count, ops: BackendOps,
                stride, groups, eps, process_group):
        out, _, _ = ops.forward(input, weight, bn_weight, bn_bias, mean, var, stride, groups,
                                eps, False)
        ctx.save_for_backward(input, weight, bn_weight, bn_bias, out, mean, var)
        ctx.config = (ops, stride, groups, eps, process_group, count)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, bn_weight, bn_bias, out, mean, var = ctx.saved_tensors
        ops, stride, groups, eps, process_group, count = ctx.config
        sum_dz, sum_dz_xhat = ops.backward_reduce(grad_out, input, weight, bn_weight, bn_bias,
                                                  out, mean, var, stride, groups, eps)
        sums = torch.cat([sum_dz, sum_dz_xhat])
        dist.all_reduce(sums, group=process_group)
        c_out = weight.shape[0]
        mask = list(ctx.needs_input_grad[:2])
        grad_input, grad_weight = ops.backward_apply(
            grad_out, input, weight, bn_weight, bn_bias, out, mean, var, sums[:c_out],
            sums[c_out:], count, stride, groups, eps, mask)
        return (grad_input if mask[0] else None, grad_weight if mask[1] else None,
                sum_dz_xhat.to(bn_weight.dtype) if ctx.needs_input_grad[2] else None,
                sum_dz.to(bn_bias.dtype) if ctx.needs_input_grad[3] else None) + (None,) * 8


def global_statistics(ops: BackendOps, input, weight, stride: int, groups: int, process_group):
    """Per-channel (count, mean, biased var) of the conv output over every process's batch."""
    with torch.no_grad():
        mean, m2 = ops.moments(input, weight, stride, groups)
    count = input.shape[0] * output_size(input.shape[2], stride) * output_size(input.shape[3], stride)
    packed = torch.cat([torch.tensor([count], dtype=torch.float64, device=input.device),
                        mean.double(), m2.double()])
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, packed, group=process_group)
    table = torch.stack(gathered)
    c_out = weight.shape[0]
    total, g_mean, g_m2 = merge_moments(table[:, 0], table[:, 1:1 + c_out], table[:, 1 + c_out:])
    total = int(total.item())
    return total, g_mean.to(mean.dtype), (g_m2 / max(total, 1)).to(mean.dtype)


def sync_forward(ops: BackendOps, input, weight, bn_weight, bn_bias, stride: int, groups: int,
                 eps: float, process_group):
    """Training forward with batch statistics over ``process_group``.

    Returns ``(out, mean, var, count)``: the output, the merged statistics (var biased)
    and the total count, for the running-statistics update.
    """
    count, mean, var = global_statistics(ops, input, weight, stride, groups, process_group)
    if count <= 1:
        raise ValueError("Expected more than 1 value per channel when training, got "
                         f"{count} over the process group")
    out = _NormalizeWithGlobalStatistics.apply(input, weight, bn_weight, bn_bias, mean, var,
                                               count, ops, stride, groups, eps, process_group)
    return out, mean, var, count
