"""``FusedGroupConv``: a drop-in for ``nn.Sequential(Conv2d(bias=False), BatchNorm2d, ReLU)``."""

from typing import Optional

import torch
from torch import nn

from .backends import check_backend_name
from .functional import fused_group_conv_bn_relu


def unfusable_reason(conv, bn):
    """Why ``conv`` + ``bn`` cannot run as the fused op: ``(exception type, message)``,
    or None when they can."""
    if type(conv) is not nn.Conv2d:
        return TypeError, f"conv must be an nn.Conv2d; got {type(conv).__name__}"
    if type(bn) is not nn.BatchNorm2d:
        return TypeError, f"bn must be an nn.BatchNorm2d; got {type(bn).__name__}"
    expected = {"kernel_size": (3, 3), "padding": (1, 1), "dilation": (1, 1),
                "padding_mode": "zeros"}
    for attr, want in expected.items():
        if getattr(conv, attr) != want:
            return ValueError, f"conv.{attr} must be {want!r}; got {getattr(conv, attr)!r}"
    if conv.stride not in ((1, 1), (2, 2)):
        return ValueError, f"conv.stride must be (1, 1) or (2, 2); got {conv.stride!r}"
    if conv.bias is not None:
        return ValueError, "conv.bias must be None (a conv bias before BatchNorm is not supported)"
    if bn.num_features != conv.out_channels:
        return ValueError, (f"bn.num_features must equal conv.out_channels={conv.out_channels}; "
                            f"got {bn.num_features}")
    return None


def conv_bn_relu(conv: nn.Conv2d, bn: nn.BatchNorm2d, input: torch.Tensor, *,
                 backend: str = "auto", process_group=None) -> torch.Tensor:
    """``relu(bn(conv(input)))`` through the fused op, with ``bn`` behaving exactly as
    ``nn.BatchNorm2d.forward`` would: the statistics it uses and updates,
    ``num_batches_tracked``, ``momentum=None`` as a cumulative average — or, with a
    ``process_group``, as ``nn.SyncBatchNorm`` over it. ``conv`` must satisfy
    ``FusedGroupConv.from_modules``'s conditions (3x3, padding 1, no bias)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average; a tensor, so graphs don't specialise
            momentum = 1.0 / bn.num_batches_tracked.to(torch.float64)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_running = not bn.training or bn.track_running_stats
    return fused_group_conv_bn_relu(
        input, conv.weight, bn.weight, bn.bias,
        bn.running_mean if keep_running else None,
        bn.running_var if keep_running else None,
        stride=conv.stride[0], groups=conv.groups, eps=bn.eps,
        momentum=momentum, training=use_batch_stats, backend=backend,
        process_group=process_group,
    )


class FusedGroupConv(nn.Module):
    """Grouped 3x3 conv (padding 1, no bias) + BatchNorm2d + ReLU in one fused op.

    Parameters and buffers live in a standard ``nn.Conv2d`` at ``conv`` and
    ``nn.BatchNorm2d`` at ``bn``, so the state_dict keys (``conv.weight``,
    ``bn.weight``, ``bn.bias``, ``bn.running_mean``, ``bn.running_var``,
    ``bn.num_batches_tracked``) are those of the unfused pair, and ``train()`` /
    ``eval()``, ``momentum=None`` (cumulative average) and ``num_batches_tracked``
    behave exactly as in ``nn.BatchNorm2d``.

    With a ``process_group`` (e.g. ``torch.distributed.group.WORLD``), training-mode
    statistics are synchronised over it as by ``nn.SyncBatchNorm``; None (the default)
    keeps them local. Unlike ``nn.SyncBatchNorm``, None does not mean "the world".

    Shapes: input ``[N, in_channels, H, W]`` → output
    ``[N, out_channels, (H - 1) // stride + 1, (W - 1) // stride + 1]``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, groups: int = 32,
                 stride: int = 1, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 backend: str = "auto", process_group=None, device=None, dtype=None):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2; got {stride!r}")
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1,
                              groups=groups, bias=False, device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum,
                                 device=device, dtype=dtype)
        self.backend = check_backend_name(backend)
        self.process_group = process_group

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, backend: str = "auto",
                     process_group=None) -> "FusedGroupConv":
        """Wrap an existing ``conv`` + ``bn`` pair (the modules themselves, not copies).

        ``conv`` must be a 3x3 ``nn.Conv2d`` with padding 1, dilation 1, zero padding,
        no bias and stride 1 or 2 (the same in both directions); ``bn`` a
        ``nn.BatchNorm2d`` over its output channels. Training mode follows ``bn``.
        """
        problem = unfusable_reason(conv, bn)
        if problem is not None:
            error, message = problem
            raise error(message)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.conv = conv
        module.bn = bn
        module.backend = check_backend_name(backend)
        module.process_group = process_group
        module.train(bn.training)
        return module

    def to_modules(self) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
        """The wrapped ``(conv, bn)`` pair (the same modules; follow with ``nn.ReLU``)."""
        return self.conv, self.bn

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return conv_bn_relu(self.conv, self.bn, input, backend=self.backend,
                            process_group=self.process_group)

    def extra_repr(self) -> str:
        return (f"{self.conv.in_channels}, {self.conv.out_channels}, groups={self.conv.groups}, "
                f"stride={self.conv.stride[0]}, backend={self.backend!r}")
