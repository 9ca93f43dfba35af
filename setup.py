"""Build of resnext_kernels._C.

What is built depends on what is present, never on a visible GPU:

* torch with CUDA (``torch.version.cuda``) and a CUDA toolkit with nvcc: the C++
  glue plus the CUDA sources under ``csrc/cuda`` (``RESNEXT_WITH_CUDA``).
* otherwise (CPU-only torch, or no nvcc): the C++ glue alone. The package still
  installs and imports; ``available_backends()`` then omits ``cuda``.

Environment variables (the user's value always wins):

* ``CUDA_HOME`` / ``CUDA_PATH``: toolkit root. When unset, the root is asked of
  nvcc itself (``nvcc --dryrun`` prints it), which sees through wrapper scripts
  that make ``torch.utils.cpp_extension`` guess one level too high.
* ``TORCH_CUDA_ARCH_LIST``: when unset and no GPU is visible, ``8.0;9.0+PTX``.
* ``MAX_JOBS``: when unset, sized from CPU cores and available memory.
* ``RESNEXT_BUILD_EMULATED``: ``0`` skips ``resnext_kernels._C_emulated`` (the
  kernels for the CPU emulator, tests only; a GPU machine does not need it).

The chosen configuration is printed at the start of the build.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# A torch-including translation unit needs ~2 GiB of memory to compile.
MEMORY_PER_JOB_GIB = 3


def log(msg):
    print(f"[resnext_kernels setup] {msg}", file=sys.stderr, flush=True)


def is_toolkit_root(path):
    """A CUDA toolkit root holds the runtime header, nvcc and the runtime library."""
    p = Path(path)
    return ((p / "include" / "cuda_runtime.h").is_file()
            and (p / "bin" / "nvcc").exists()
            and any((p / lib / "libcudart.so").exists() for lib in ("lib64", "lib")))


def nvcc_toolkit_root(nvcc):
    """The toolkit root as nvcc reports it (``TOP`` in its dry-run), or None."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cu"
        src.write_text("\n")
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", str(src), "-o", str(Path(tmp) / "probe.o")],
                capture_output=True, text=True, timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def find_cuda_home():
    """Return (root, how) for the CUDA toolkit, or (None, reason)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if is_toolkit_root(value):
                return os.path.realpath(value), f"from ${var}"
            return None, (f"${var}={value} is not a CUDA toolkit root "
                          "(needs include/cuda_runtime.h, bin/nvcc and lib64/libcudart.so)")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        if is_toolkit_root("/usr/local/cuda"):
            return os.path.realpath("/usr/local/cuda"), "default location /usr/local/cuda"
        return None, "no nvcc on PATH, CUDA_HOME unset and no toolkit at /usr/local/cuda"
    root = nvcc_toolkit_root(nvcc)
    if root and is_toolkit_root(root):
        return root, f"reported by {nvcc} --dryrun"
    return None, f"{nvcc} did not report a toolkit root holding include/cuda_runtime.h"


def nvcc_version(cuda_home):
    out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--version"],
                         capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        by_memory = max(1, avail_kib // (MEMORY_PER_JOB_GIB * 1024 * 1024))
    except (OSError, StopIteration, ValueError):
        by_memory = cores
    return max(1, min(cores, by_memory))


def configure():
    """Decide what to build; returns (ext_modules, cmdclass)."""
    import torch

    with_cuda = False
    if torch.version.cuda is None:
        skip = f"torch {torch.__version__} is a CPU-only build"
    else:
        cuda_home, how = find_cuda_home()
        if cuda_home is None:
            skip = how
        else:
            os.environ["CUDA_HOME"] = cuda_home
            with_cuda = True

    # CUDA_HOME is read when cpp_extension is imported: import it only now.
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    log(f"MAX_JOBS={os.environ['MAX_JOBS']}")

    def files(folder, pattern):
        return sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).glob(pattern))

    sources = ["csrc/module.cpp"]
    define_macros = []
    extra = {"cxx": ["-O3"]}
    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home
        version = nvcc_version(cuda_home)
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        log(f"CUDA_HOME={cuda_home} ({how}); nvcc {version[0]}.{version[1]}")
        log(f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(the visible GPUs)')}")
        sources += ["csrc/conv_bn_relu.cpp"] + files("csrc/cuda", "*.cu")
        define_macros.append(("RESNEXT_WITH_CUDA", "1"))
        extra["nvcc"] = ["-O3", "-lineinfo"]
        ext_cls = cpp_extension.CUDAExtension
        log("building resnext_kernels._C with the CUDA sources")
    else:
        ext_cls = cpp_extension.CppExtension
        log(f"skipping the CUDA sources: {skip}; building resnext_kernels._C without them")

    extensions = [ext_cls(
        name="resnext_kernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
    )]

    # The same kernels for the host SIMT emulator (backend "cuda_emulated", tests only):
    # needs the toolkit's headers (cuda_fp16.h, ...), not a CUDA build of torch.
    headers = cuda_home if with_cuda else find_cuda_home()[0]
    emulated = os.environ.get("RESNEXT_BUILD_EMULATED", "1")
    if emulated not in ("0", "1"):
        sys.exit(f"setup.py: RESNEXT_BUILD_EMULATED must be 0 or 1; got {emulated!r}")
    if emulated == "0":
        log("skipping resnext_kernels._C_emulated: RESNEXT_BUILD_EMULATED=0")
    elif headers is not None:
        extensions.append(cpp_extension.CppExtension(
            name="resnext_kernels._C_emulated",
            sources=["csrc/conv_bn_relu.cpp"] + files("csrc/emulated", "*.cpp"),
            include_dirs=[str(ROOT / "csrc"), str(Path(headers) / "include")],
            define_macros=[("RESNEXT_EMULATED", "1")],
            extra_compile_args={"cxx": ["-O2", "-std=c++20", "-pthread", "-Wno-unknown-pragmas"]},
            extra_link_args=["-pthread"],
        ))
        log(f"building resnext_kernels._C_emulated (CUDA headers from {headers})")
    else:
        log("skipping resnext_kernels._C_emulated: no CUDA toolkit headers")
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return extensions, cmdclass


ext_modules, cmdclass = configure()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
