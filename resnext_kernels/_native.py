"""Loads the compiled library ``resnext_kernels._C`` when it was built.

The package works without it (the reference backend needs no native code);
``build_info()`` then says why it is missing.
"""

import importlib
from typing import Any, Optional

from packaging.version import Version

import torch  # loads libtorch, which _C links against

def _load(name):
    """(module, None) or (None, why it could not be imported)."""
    try:
        return importlib.import_module(name), None
    except ImportError as exc:  # not built, or built against another torch
        return None, f"{type(exc).__name__}: {exc}"


_C, _IMPORT_ERROR = _load("resnext_kernels._C")
# The CUDA kernels compiled for the host SIMT emulator (backend "cuda_emulated");
# importing it registers their CPU implementations.
_C_emulated, _EMULATED_ERROR = _load("resnext_kernels._C_emulated")


def torch_mismatch(built: str, running: str) -> Optional[str]:
    """Why a library built against torch ``built`` must not be used with torch
    ``running`` (C++ ABI), or None when the versions match."""
    if Version(Version(built).base_version) != Version(Version(running).base_version):
        return (f"resnext_kernels._C was built against torch {built} but torch {running} is "
                "running; rebuild with `pip install --no-build-isolation .`")
    return None


def _info() -> dict[str, Any]:
    emulated = {"emulated": _C_emulated is not None, "emulated_error": _EMULATED_ERROR}
    error = _IMPORT_ERROR
    if _C is not None:
        info = _C.build_info()
        error = torch_mismatch(info["torch_version"], torch.__version__)
        if error is None:
            return {"native": True, "import_error": None, **info, **emulated}
    return {"native": False, "import_error": error, "torch_version": None,
            "compiler": None, "with_cuda": False, "cuda_version": None,
            "nvcc_version": None, "cuda_archs": [], "kernel_families": [], **emulated}


# Computed once at import, so that code traced by torch.compile reads a plain dict.
_BUILD_INFO = _info()


def build_info() -> dict[str, Any]:
    """What ``resnext_kernels._C`` was built with.

    Keys: ``native`` (was _C importable), ``import_error`` (why not), ``torch_version``
    and ``compiler`` it was built with, ``with_cuda``, ``cuda_version``,
    ``nvcc_version``, ``cuda_archs`` (compiled SM versions as ints, e.g. ``[800, 900]``)
    ``kernel_families`` (names of the kernel families compiled in), ``emulated``
    (is ``resnext_kernels._C_emulated``, the kernels built for the host SIMT
    emulator, importable) and ``emulated_error`` (why not).
    """
    return dict(_BUILD_INFO)
