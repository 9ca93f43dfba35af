"""Loads the compiled library ``resnext_kernels._C`` when it was built.

The package works without it (the reference backend needs no native code);
``build_info()`` then says why it is missing.
"""

import importlib
from typing import Any, Optional

from packaging.version import Version

import torch  # loads libtorch, which _C links against

try:
    _C = importlib.import_module("resnext_kernels._C")
    _IMPORT_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def torch_mismatch(built: str, running: str) -> Optional[str]:
    """Why a library built against torch ``built`` must not be used with torch
    ``running`` (C++ ABI), or None when the versions match."""
    if Version(Version(built).base_version) != Version(Version(running).base_version):
        return (f"resnext_kernels._C was built against torch {built} but torch {running} is "
                "running; rebuild with `pip install --no-build-isolation .`")
    return None


def _info() -> dict[str, Any]:
    error = _IMPORT_ERROR
    if _C is not None:
        info = _C.build_info()
        error = torch_mismatch(info["torch_version"], torch.__version__)
        if error is None:
            return {"native": True, "import_error": None, **info}
    return {"native": False, "import_error": error, "torch_version": None,
            "compiler": None, "with_cuda": False, "cuda_version": None,
            "nvcc_version": None, "cuda_archs": [], "kernel_families": []}


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
