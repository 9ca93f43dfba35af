"""The public functional op: argument checks, backend choice, running statistics."""

import numbers
from typing import Optional, Union

import torch

import torch.distributed as dist

from . import auto, backends, distributed, reference

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_tensor(name: str, t, *, dim: int, input: torch.Tensor, param: bool) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D; got shape {tuple(t.shape)}")
    if t.device != input.device:
        raise ValueError(f"{name} must be on the input's device {input.device}; got {t.device}")
    allowed = (input.dtype, torch.float32) if param and input.dtype in HALF_DTYPES else (input.dtype,)
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype {' or '.join(map(_dtype_name, allowed))} "
                        f"(input is {_dtype_name(input.dtype)}); got {_dtype_name(t.dtype)}")


def _check_int(name: str, value, allowed=None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if allowed is not None and value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {value}")


def check_arguments(input, weight, bn_weight, bn_bias, running_mean, running_var,
                    stride, groups, eps, momentum, training, synchronized=False) -> None:
    """Validate every argument of ``fused_group_conv_bn_relu`` before any kernel runs.

    Raises TypeError / ValueError naming the argument, the value received and what
    is expected. ``synchronized``: batch statistics are taken over a process group, so
    the "more than 1 value per channel" rule applies to the group's total instead.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor; got {type(input).__name__}")
    if input.dtype not in backends.ALL_DTYPES:
        raise TypeError("input must have dtype float16, bfloat16, float32 or float64; "
                        f"got {_dtype_name(input.dtype)}")
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D [N, C, H, W]; got shape {tuple(input.shape)}")
    _check_int("stride", stride, (1, 2))
    _check_int("groups", groups)
    if groups <= 0:
        raise ValueError(f"groups must be positive; got {groups}")
    c_in = input.shape[1]
    if c_in % groups:
        raise ValueError(f"groups={groups} must divide the input channels {c_in}")
    _check_tensor("weight", weight, dim=4, input=input, param=False)
    c_out = weight.shape[0]
    expected = (c_out, c_in // groups, 3, 3)
    if tuple(weight.shape) != expected or c_out % groups:
        raise ValueError(f"weight must have shape [C_out, C_in/groups, 3, 3] = {list(expected)} "
                         f"with C_out divisible by groups={groups}; got {list(weight.shape)}")
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        _check_tensor(name, t, dim=1, input=input, param=True)
        if t.shape[0] != c_out:
            raise ValueError(f"{name} must have shape [{c_out}] (the output channels); "
                             f"got {list(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool; got {type(training).__name__}")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float; got {eps!r}")
    if not isinstance(momentum, (numbers.Real, torch.Tensor)) or isinstance(momentum, bool):
        raise TypeError(f"momentum must be a float; got {type(momentum).__name__}")
    if training and not synchronized:
        count = input.shape[0] * reference.output_size(input.shape[2], stride) \
            * reference.output_size(input.shape[3], stride)
        if count == 1:
            raise ValueError("Expected more than 1 value per channel when training, got "
                             f"input size {tuple(input.shape)} (stride {stride})")


def _autocast_dtype(input) -> Optional[torch.dtype]:
    """The autocast dtype for ``input``'s device when autocast is on there, else None."""
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        return None
    device = input.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def _group_size(process_group) -> int:
    """World size of ``process_group`` (1 for None); a clear error if it cannot be used."""
    if process_group is None:
        return 1
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group was given but torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    return dist.get_world_size(process_group)


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor,
                         mean: torch.Tensor, var: torch.Tensor,
                         momentum: Union[float, torch.Tensor], count: int) -> None:
    """In-place running-statistics update, as ``torch.nn.functional.batch_norm`` does.

    ``running = (1 - momentum) * running + momentum * batch``, with the batch
    variance made unbiased (``var * count / (count - 1)``); computed in the
    statistics' dtype and written back in the running statistics' dtype.
    """
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        running_mean.copy_(running_mean.to(mean.dtype) * (1 - momentum) + mean * momentum)
        running_var.copy_(running_var.to(var.dtype) * (1 - momentum) + unbiased * momentum)


def fused_group_conv_bn_relu(
    input: torch.Tensor,
    weight: torch.Tensor,
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    *,
    stride: int = 1,
    groups: int = 32,
    eps: float = 1e-5,
    momentum: float = 0.1,
    training: bool = False,
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """``relu(batch_norm(conv2d(input, weight, stride, padding=1, groups), ...))``, fused.

    Args:
        input: ``[N, C_in, H, W]``, float16 / bfloat16 / float32 / float64, NCHW or
            channels_last (the output follows the input's memory format).
        weight: ``[C_out, C_in/groups, 3, 3]``, the input's dtype. No conv bias.
        bn_weight, bn_bias: ``[C_out]`` BatchNorm affine parameters, or None (1 and 0).
        running_mean, running_var: ``[C_out]`` running statistics. In training they are
            updated in place (momentum, unbiased variance) when given; in eval they are
            required and used to normalise. BN tensors may be float32 for a float16 /
            bfloat16 input, like ``nn.BatchNorm2d`` under mixed precision.
        stride: 1 or 2. groups: divides C_in and C_out. eps: added to the variance.
        momentum: running-statistics factor (a float, or a 0-D tensor).
        training: normalise with batch statistics (True) or running statistics (False).
        backend: ``"auto"``, ``"reference"``, ``"cuda"``, ``"triton"`` or ``"cuda_emulated"``.
            Under ``torch.autocast`` input and weight run in the autocast dtype (the
            BatchNorm tensors stay as they are), like ``nn.Conv2d`` + ``nn.BatchNorm2d``.
        process_group: a ``torch.distributed`` process group: in training, the batch
            statistics (and the backward's per-channel sums) are those of every
            process's batch together, as with ``nn.SyncBatchNorm``. None: this
            process's batch alone. No communication in eval.

    Returns:
        ``[N, C_out, H_out, W_out]`` with ``H_out = (H - 1) // stride + 1``, input's dtype.
    """
    autocast_dtype = _autocast_dtype(input)
    if autocast_dtype is not None and input.dtype != autocast_dtype:
        # As nn.Conv2d + nn.BatchNorm2d under autocast: the conv runs in the autocast
        # dtype; BatchNorm parameters and statistics stay in their (float32) dtype.
        input, weight = input.to(autocast_dtype), weight.to(autocast_dtype)
    if autocast_dtype is not None:
        with torch.autocast(input.device.type, enabled=False):
            return fused_group_conv_bn_relu(
                input, weight, bn_weight, bn_bias, running_mean, running_var, stride=stride,
                groups=groups, eps=eps, momentum=momentum, training=training, backend=backend,
                process_group=process_group)
    synchronized = training and _group_size(process_group) > 1
    check_arguments(input, weight, bn_weight, bn_bias, running_mean, running_var,
                    stride, groups, eps, momentum, training, synchronized)
    c_out = weight.shape[0]
    param_dtype = torch.float32 if input.dtype in HALF_DTYPES else input.dtype
    if bn_weight is None:
        bn_weight = torch.ones(c_out, dtype=param_dtype, device=input.device)
    if bn_bias is None:
        bn_bias = torch.zeros(c_out, dtype=param_dtype, device=input.device)
    impl = backends.resolve(backend, input, auto.Call(
        input, weight, bn_weight, bn_bias, running_mean, running_var, stride, groups,
        float(eps), training, synchronized, process_group))
    if synchronized:
        out, mean, var, count = distributed.sync_forward(impl.ops, input, weight, bn_weight,
                                                         bn_bias, stride, groups, float(eps),
                                                         process_group)
    else:
        out, mean, var = impl.ops.forward(input, weight, bn_weight, bn_bias, running_mean,
                                          running_var, stride, groups, float(eps), training)
        count = out.numel() // c_out if c_out else 0
    if training and running_mean is not None and count > 0:
        update_running_stats(running_mean, running_var, mean, var, momentum, count)
    return out
