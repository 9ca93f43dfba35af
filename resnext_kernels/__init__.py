"""Fused grouped 3x3 convolution + BatchNorm + ReLU for ResNeXt.

Public API:

* ``fused_group_conv_bn_relu(input, weight, bn_weight, bn_bias, running_mean,
  running_var, *, stride=1, groups=32, eps=1e-5, momentum=0.1, training=False,
  backend="auto", process_group=None)``
* ``FusedGroupConv``: the module form, a drop-in for Conv2d + BatchNorm2d + ReLU.
* ``convert(model)`` / ``unconvert(model)``: fuse the bottlenecks of torchvision /
  timm ResNet-family models in place.
* ``available_backends()`` and ``build_info()``.
* ``auto_choices()``: what ``backend="auto"`` chose per problem, and the timings behind it.
* ``resnext_kernels.models``: ResNeXt models (needs torchvision, imported on first use).
"""

import importlib

from . import _compat  # noqa: F401  (checks the torch version first)
from ._native import build_info
from .auto import auto_choices
from .backends import BACKEND_NAMES, available_backends
from .convert import ConversionReport, convert, unconvert
from .functional import fused_group_conv_bn_relu
from .modules import FusedGroupConv

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "ConversionReport",
    "FusedGroupConv",
    "auto_choices",
    "available_backends",
    "build_info",
    "convert",
    "fused_group_conv_bn_relu",
    "unconvert",
]

_LAZY_SUBMODULES = ("models", "forms")


def __getattr__(name):
    # resnext_kernels.models needs torchvision: import it only when asked for.
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
