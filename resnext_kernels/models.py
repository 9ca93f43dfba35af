"""ResNeXt models in torchvision's ResNet structure, with the fused op.

The networks are torchvision's own ``ResNet(Bottleneck, layers, groups=C,
width_per_group=d)`` — the same modules, parameter names and counts, so
torchvision checkpoints load with ``strict=True`` — converted with
``resnext_kernels.convert`` so that every bottleneck's grouped 3x3 conv + BN +
ReLU runs through the fused op. The paper's "C×d" is ``cardinality`` × ``width``.
"""

from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from .backends import check_backend_name
from .convert import convert

# Bottleneck blocks per stage (He et al. 2016; ResNet-200 from He et al., Identity Mappings).
LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}


def resnext(depth: int, cardinality: int, width: int, *, num_classes: int = 1000,
            fused: bool = True, backend: str = "auto") -> nn.Module:
    """ResNeXt-``depth`` with ``cardinality`` groups of ``width`` channels in the first
    stage's bottleneck (doubling per stage). ``cardinality=1, width=64`` is ResNet.

    Args:
        depth: 50, 101, 152 or 200.
        cardinality, width: the paper's C and d (positive ints).
        fused: run each grouped conv + BN + ReLU through the fused op (else plain torchvision).
        backend: backend of the fused op (see ``resnext_kernels.available_backends``).
    """
    if depth not in LAYERS:
        raise ValueError(f"depth must be one of {sorted(LAYERS)}; got {depth!r}")
    for name, value in (("cardinality", cardinality), ("width", width),
                        ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    check_backend_name(backend)
    model = ResNet(Bottleneck, list(LAYERS[depth]), num_classes=num_classes,
                   groups=cardinality, width_per_group=width)
    if fused:
        convert(model, backend=backend)
    return model


def resnext50_32x4d(**kwargs) -> nn.Module:
    """ResNeXt-50 32×4d (torchvision ``resnext50_32x4d``)."""
    return resnext(50, 32, 4, **kwargs)


def resnext101_32x4d(**kwargs) -> nn.Module:
    """ResNeXt-101 32×4d."""
    return resnext(101, 32, 4, **kwargs)


def resnext101_32x8d(**kwargs) -> nn.Module:
    """ResNeXt-101 32×8d (torchvision ``resnext101_32x8d``)."""
    return resnext(101, 32, 8, **kwargs)


def resnext101_64x4d(**kwargs) -> nn.Module:
    """ResNeXt-101 64×4d (torchvision ``resnext101_64x4d``)."""
    return resnext(101, 64, 4, **kwargs)
