"""Version facts about the running torch, compared with ``packaging.version``."""

from packaging.version import Version

import torch

TORCH_VERSION = Version(Version(torch.__version__).base_version)
MIN_TORCH = Version("2.6")

if TORCH_VERSION < MIN_TORCH:
    raise ImportError(f"resnext_kernels needs torch >= {MIN_TORCH}; found {torch.__version__}")
