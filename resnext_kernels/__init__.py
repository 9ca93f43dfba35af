"""Fused grouped 3x3 convolution + BatchNorm + ReLU for ResNeXt.

Public API:

* ``fused_group_conv_bn_relu(input, weight, bn_weight, bn_bias, running_mean,
  running_var, *, stride=1, groups=32, eps=1e-5, momentum=0.1, training=False,
  backend="auto")``
* ``FusedGroupConv``: the module form, a drop-in for Conv2d + BatchNorm2d + ReLU.
* ``available_backends()`` and ``build_info()``.
"""

from . import _compat  # noqa: F401  (checks the torch version first)
from ._native import build_info
from .backends import BACKEND_NAMES, available_backends
from .functional import fused_group_conv_bn_relu
from .modules import FusedGroupConv

__version__ = "0.1.0"

__all__ = [
    "BACKEND_NAMES",
    "FusedGroupConv",
    "available_backends",
    "build_info",
    "fused_group_conv_bn_relu",
]
