"""One-call conversion of torchvision / timm ResNet-family models to the fused op.

``convert(model)`` finds every bottleneck block whose 3x3 conv is followed by
BatchNorm and ReLU and makes that sequence run through
``fused_group_conv_bn_relu``. It does so by switching the block's class to a
subclass whose ``forward`` calls the fused op; the block keeps its submodules,
parameters and buffers, so state_dict keys, checkpoints (``strict=True``) and
optimizer state are untouched. ``unconvert(model)`` switches the classes back.

Blocks are converted only when the sequence is exactly conv → BatchNorm2d → ReLU
and the class's ``forward`` is the library's own; anything else (a DropBlock or
other layer between conv and ReLU, a dilated conv, a subclass with its own
forward) is left alone, and the report says why.
"""

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from .backends import check_backend_name
from .modules import conv_bn_relu, unfusable_reason


def _torchvision_bottleneck_forward(self, x):
    # torchvision.models.resnet.Bottleneck.forward with conv2 → bn2 → relu fused.
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = conv_bn_relu(self.conv2, self.bn2, out, backend=self.fused_backend,
                       process_group=self.fused_process_group)
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    out += identity
    return self.relu(out)


def _torchvision_bottleneck_check(block) -> Optional[str]:
    if type(block.relu) is not nn.ReLU:
        return f"relu is {type(block.relu).__name__}, not nn.ReLU"
    return None


def _timm_bottleneck_forward(self, x):
    # timm.models.resnet.Bottleneck.forward with conv2 → bn2 → act2 fused (drop_block
    # is an Identity in every converted block).
    shortcut = x
    x = self.act1(self.bn1(self.conv1(x)))
    x = conv_bn_relu(self.conv2, self.bn2, x, backend=self.fused_backend,
                     process_group=self.fused_process_group)
    x = self.aa(x)
    x = self.bn3(self.conv3(x))
    if self.se is not None:
        x = self.se(x)
    if self.drop_path is not None:
        x = self.drop_path(x)
    if self.downsample is not None:
        shortcut = self.downsample(shortcut)
    x += shortcut
    return self.act3(x)


def _timm_bottleneck_check(block) -> Optional[str]:
    if type(block.drop_block) is not nn.Identity:
        return f"{type(block.drop_block).__name__} (drop_block) sits between bn2 and act2"
    if type(block.act2) is not nn.ReLU:
        return f"act2 is {type(block.act2).__name__}, not nn.ReLU"
    return None


@dataclass(frozen=True)
class _Family:
    """A block class this module knows how to fuse."""

    module: str  # where the class lives
    name: str
    forward: Callable
    check: Callable  # block -> reason it cannot be fused beyond conv2/bn2, or None


_FAMILIES = (
    _Family("torchvision.models.resnet", "Bottleneck", _torchvision_bottleneck_forward,
            _torchvision_bottleneck_check),
    _Family("timm.models.resnet", "Bottleneck", _timm_bottleneck_forward, _timm_bottleneck_check),
)

# original class -> its fused subclass (created once per class)
_FUSED_CLASSES: dict[type, type] = {}


def _known_classes() -> dict[type, _Family]:
    """The family classes whose libraries are importable here."""
    known = {}
    for family in _FAMILIES:
        try:
            cls = getattr(importlib.import_module(family.module), family.name)
        except ImportError:
            continue
        known[cls] = family
    return known


def _fused_class(cls: type, family: _Family) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {
            "forward": family.forward,
            "__module__": __name__,
            "__doc__": f"{cls.__module__}.{cls.__qualname__} with conv2 + bn2 + ReLU fused.",
        })
    return _FUSED_CLASSES[cls]


def _original_class(cls: type) -> Optional[type]:
    for original, fused in _FUSED_CLASSES.items():
        if fused is cls:
            return original
    return None


@dataclass
class ConversionReport:
    """What ``convert`` did: converted block names, and skipped ones with the reason."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} block(s) to the fused op"]
        lines += [f"  left alone {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def convert(model: nn.Module, *, backend: str = "auto", process_group=None) -> ConversionReport:
    """Make every fusable bottleneck of ``model`` run conv2 + bn2 + ReLU through the
    fused op, in place. Returns a ``ConversionReport``.

    ``process_group``: synchronise the training statistics of the fused BatchNorms
    over this ``torch.distributed`` group, as ``nn.SyncBatchNorm.convert_sync_batchnorm``
    does for BatchNorm layers (pass ``torch.distributed.group.WORLD`` for all
    processes; None keeps them local).

    Known blocks: ``torchvision.models.resnet.Bottleneck`` and
    ``timm.models.resnet.Bottleneck`` (exact classes: a subclass may have changed
    ``forward``). Blocks already converted get the new ``backend`` and group.
    """
    check_backend_name(backend)
    known = _known_classes()
    report = ConversionReport()
    for name, block in model.named_modules():
        cls = type(block)
        original = _original_class(cls)
        if original is not None:  # converted before
            block.fused_backend, block.fused_process_group = backend, process_group
            report.converted.append(name)
            continue
        family = known.get(cls)
        if family is None:
            subclass_of = next((k for k in known if isinstance(block, k)), None)
            if subclass_of is not None:
                report.skipped[name] = (f"{cls.__qualname__} subclasses {subclass_of.__module__}."
                                        f"{subclass_of.__qualname__}; its forward may differ")
            continue
        reason = unfusable_reason(block.conv2, block.bn2)
        reason = reason[1] if reason is not None else family.check(block)
        if reason is not None:
            report.skipped[name] = reason
            continue
        block.fused_backend, block.fused_process_group = backend, process_group
        block.__class__ = _fused_class(cls, family)
        report.converted.append(name)
    return report


def unconvert(model: nn.Module) -> list[str]:
    """Undo ``convert`` in place; returns the names of the blocks restored."""
    restored = []
    for name, block in model.named_modules():
        original = _original_class(type(block))
        if original is not None:
            block.__class__ = original
            del block.fused_backend, block.fused_process_group
            restored.append(name)
    return restored
