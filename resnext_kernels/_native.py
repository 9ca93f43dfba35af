"""Loads the compiled library ``resnext_kernels._C`` when it was built.

The package works without it (the reference backend needs no native code);
``build_info()`` then says why it is missing.
"""

import importlib
from typing import Any

import torch  # noqa: F401  (loads libtorch, which _C links against)

try:
    _C = importlib.import_module("resnext_kernels._C")
    _IMPORT_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def _info() -> dict[str, Any]:
    if _C is None:
        return {"native": False, "import_error": _IMPORT_ERROR, "torch_version": None,
                "compiler": None, "with_cuda": False, "cuda_version": None,
                "nvcc_version": None, "cuda_archs": [], "kernel_families": []}
    return {"native": True, "import_error": None, **_C.build_info()}


# Computed once at import, so that code traced by torch.compile reads a plain dict.
_BUILD_INFO = _info()


def build_info() -> dict[str, Any]:
    """What ``resnext_kernels._C`` was built with.

    Keys: ``native`` (was _C importable), ``import_error`` (why not), ``torch_version``
    and ``compiler`` it was built with, ``with_cuda``, ``cuda_version``,
    ``nvcc_version``, ``cuda_archs`` (compiled SM versions as ints, e.g. ``[800, 900]``)
    and ``kernel_families`` (names of the kernel families compiled in).
    """
    return dict(_BUILD_INFO)
