"""Backend registry: which implementations exist, which can run, and "auto".

A backend is a pair of registered ops (``resnext_kernels/ops.py``) plus what it
accepts (device types, dtypes). Each kernel family registers its backend here;
names that are known but not present in this install are kept with the reason,
so an explicit request says what is missing.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from . import auto, ops, reference, triton_backend
from ._native import build_info

BACKEND_NAMES = ("auto", "reference", "cuda", "triton", "cuda_emulated")

# The candidates of "auto" per device type, in its static order (RESNEXT_AUTO=static
# takes the first usable one; otherwise resnext_kernels.auto measures them when there
# is more than one). Emulated CUDA and the Triton interpreter are test vehicles,
# never candidates.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference")}
AUTO_DEFAULT = ("reference",)

ALL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True)
class Backend:
    name: str
    ops: ops.BackendOps
    device_types: frozenset
    dtypes: frozenset
    # Has a deterministic path (used under torch.use_deterministic_algorithms(True));
    # "auto" leaves out backends without one in that mode.
    deterministic: bool = True

    def unsupported_reason(self, input: torch.Tensor) -> Optional[str]:
        """Why this backend cannot take ``input``, or None when it can."""
        if input.device.type not in self.device_types:
            return (f"backend '{self.name}' runs on {', '.join(sorted(self.device_types))} "
                    f"tensors, but input is on {input.device}")
        if input.dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            return f"backend '{self.name}' supports dtypes {names}, but input is {input.dtype}"
        return None


_REGISTRY: dict[str, Backend] = {}


def _missing_reasons() -> dict[str, str]:
    info = build_info()
    if not info["native"]:
        cuda = f"resnext_kernels._C could not be imported ({info['import_error']})"
    elif not info["with_cuda"]:
        cuda = ("resnext_kernels._C was built without CUDA (a CPU-only torch or no nvcc at "
                "build time); rebuild with `pip install --no-build-isolation .` on a machine "
                "with nvcc and a CUDA build of torch")
    else:
        cuda = "the conv_fwd kernel family is not compiled into resnext_kernels._C"
    return {
        "cuda": cuda,
        "triton": (f"triton cannot be imported ({triton_backend.IMPORT_ERROR})"
                   if triton_backend.triton is None else
                   "the Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 set before "
                   "importing resnext_kernels: the CPU interpreter, for tests)"),
        "cuda_emulated": ("resnext_kernels._C_emulated could not be imported "
                          f"({info['emulated_error']}); it is built when the CUDA toolkit's "
                          "headers are found at build time"),
    }


_MISSING = _missing_reasons()


def register(backend: Backend) -> None:
    """Make ``backend`` available (called once by each kernel family at import)."""
    if backend.name not in BACKEND_NAMES or backend.name == "auto":
        raise ValueError(f"unknown backend name {backend.name!r}")
    _REGISTRY[backend.name] = backend
    _MISSING.pop(backend.name, None)


def check_backend_name(name) -> str:
    """Return ``name`` if it is a backend name, else raise ValueError listing the valid ones."""
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}; got {name!r}")
    return name


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine (registered, with a device present).

    ``"auto"`` is not listed: it always resolves to one of these.
    """
    devices = {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())
    return [name for name in BACKEND_NAMES
            if name in _REGISTRY and _REGISTRY[name].device_types & devices]


def usable_backends(input: torch.Tensor) -> list[str]:
    """Names of the registered backends that can take ``input`` (its device and dtype)."""
    return [name for name in BACKEND_NAMES
            if name in _REGISTRY and _REGISTRY[name].unsupported_reason(input) is None]


def auto_candidates(input: torch.Tensor) -> list[Backend]:
    """The backends "auto" may choose for ``input``, in ``AUTO_ORDER``: registered, able
    to take ``input``, and deterministic when ``torch.use_deterministic_algorithms`` is on."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    found = [_REGISTRY[name] for name in AUTO_ORDER.get(input.device.type, AUTO_DEFAULT)
             if name in _REGISTRY]
    return [b for b in found
            if b.unsupported_reason(input) is None and (b.deterministic or not deterministic)]


def resolve(name: str, input: torch.Tensor, call: Optional[auto.Call] = None) -> Backend:
    """The backend to run for ``input``: ``name`` itself, or for "auto" the one
    ``resnext_kernels.auto`` chooses for ``call`` (the first candidate without a call).

    Raises RuntimeError when an explicitly named backend is missing or cannot take
    ``input``, saying why.
    """
    check_backend_name(name)
    if name == "auto":
        candidates = auto_candidates(input)
        if not candidates:
            raise RuntimeError(f"no backend can run on {input.device} tensors of dtype "
                               f"{input.dtype}")
        return candidates[0] if call is None else auto.SELECTOR.choose(candidates, call)
    backend = _REGISTRY.get(name)
    if backend is None:
        raise RuntimeError(f"backend {name!r} is not available: {_MISSING[name]}")
    reason = backend.unsupported_reason(input)
    if reason is not None:
        raise RuntimeError(reason)
    return backend


# A kernel backend's functions: forward, backward and the split backward ops are
# registered from C++ (csrc/conv_bn_relu.cpp); the moments op, used only to merge
# statistics across processes, is the reference's.
KERNEL_IMPLEMENTATION = ops.Implementation(None, None, reference.batch_moments, None, None)


register(Backend(
    name="reference",
    ops=ops.define_backend_ops("reference", {None: ops.Implementation(
        reference.forward, reference.backward, reference.batch_moments,
        reference.backward_reduce, reference.backward_apply)}),
    device_types=frozenset({"cpu", "cuda", "meta"}),  # meta: shapes only (fake kernels)
    dtypes=ALL_DTYPES,
))

KERNEL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})

if "conv_fwd" in build_info()["kernel_families"]:
    register(Backend(
        name="cuda",
        ops=ops.define_backend_ops("cuda", {"cuda": KERNEL_IMPLEMENTATION}),
        device_types=frozenset({"cuda"}),
        dtypes=KERNEL_DTYPES,
    ))

if build_info()["emulated"]:
    register(Backend(
        name="cuda_emulated",
        ops=ops.define_backend_ops("cuda_emulated", {"cpu": KERNEL_IMPLEMENTATION}),
        device_types=frozenset({"cpu"}),
        dtypes=KERNEL_DTYPES,
    ))

if triton_backend.triton is not None and (triton_backend.INTERPRET or torch.cuda.is_available()):
    TRITON_IMPLEMENTATION = ops.Implementation(
        triton_backend.forward, triton_backend.backward, reference.batch_moments,
        triton_backend.backward_reduce, triton_backend.backward_apply)
    if triton_backend.INTERPRET:
        # CPU tensors through the interpreter (tests); bf16 loads are broken there.
        register(Backend(
            name="triton",
            ops=ops.define_backend_ops("triton", {"cpu": TRITON_IMPLEMENTATION}),
            device_types=frozenset({"cpu"}),
            dtypes=frozenset({torch.float16, torch.float32}),
        ))
    else:  # triton_op + wrap_triton (torch >= 2.6, checked at import)
        register(Backend(
            name="triton",
            ops=ops.define_backend_ops(
                "triton", {None: ops.Implementation(None, None, reference.batch_moments, None,
                                                    None)},
                triton_ops=TRITON_IMPLEMENTATION._replace(moments=None)),
            device_types=frozenset({"cuda"}),
            dtypes=KERNEL_DTYPES,
        ))
