"""Ahead-of-time compilation of every Triton kernel variant for NVIDIA targets, no GPU
needed (``triton.compile`` with a ``GPUTarget``), and its resources from the cubin
(``cuobjdump --dump-resource-usage``): the Triton half of ``resnext-bench kernels``."""

import itertools
import os
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor

# Scalar (shape) arguments; every other upper-case argument is a constexpr.
INTS = {"P", "P_in", "H", "W", "C_in", "C_out", "H_out", "W_out", "CG_IN", "CG_OUT", "CHUNKS"}
FP32_POINTERS = {"scale_ptr", "shift_ptr", "partial_ptr", "mean_ptr", "invstd_ptr",
                 "dz_scale_ptr", "dc_shift_ptr", "dc_xhat_ptr", "dw_ptr"}


def variants(quick: bool):
    """(kernel name, constexprs, num_warps) for every launch the backend can make: the
    fixed GPU tiles for each flag combination, and each autotuning config."""
    from .. import triton_backend as tb

    fixed = {"BLOCK_P": 32, "BLOCK_C": 32}
    out = []
    for stride in (1, 2):
        out.append(("conv_fwd_kernel", dict(STRIDE=stride, STATS=True, **fixed), 4))
        out.append(("bwd_reduce_kernel", dict(STRIDE=stride, **fixed), 4))
        for deterministic, from_dy in itertools.product((False, True), repeat=2):
            out.append(("bwd_wgrad_kernel", dict(STRIDE=stride, FROM_DY=from_dy,
                                                  DETERMINISTIC=deterministic,
                                                  BLOCK_P=32, BLOCK_E=64), tb.WGRAD_WARPS))
        tiles = [(32, 32, 4)] if quick else tb.TILES
        for p, c, warps in tiles:
            tile = {"BLOCK_P": p, "BLOCK_C": c}
            out.append(("conv_fwd_kernel", dict(STRIDE=stride, STATS=False, **tile), warps))
            out.append(("bwd_dc_kernel", dict(STRIDE=stride, **tile), warps))
            for from_dy in (False, True):
                out.append(("bwd_dgrad_kernel", dict(STRIDE=stride, FROM_DY=from_dy, **tile),
                            warps))
    return out


def _compile(job):
    """Compile one variant for one arch; returns a resources row (runs in a worker)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .. import triton_kernels
    from .kernels import KernelResources, find_cuobjdump, parse

    name, constexprs, warps, arch, dtype = job
    fn = getattr(triton_kernels, name)
    signature = {}
    for arg in fn.arg_names:
        if arg in INTS:
            signature[arg] = "i32"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in FP32_POINTERS else f"*{dtype}"
        else:
            signature[arg] = "constexpr"
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        report = subprocess.run([find_cuobjdump(), "--dump-resource-usage", f.name],
                                capture_output=True, text=True, check=True).stdout
    (row,) = parse(report)
    flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items())
    return KernelResources(f"sm_{arch}", f"triton {name}({flags},warps={warps},{dtype})",
                           row.registers, max(row.shared, compiled.metadata.shared), row.stack,
                           row.local)


def report(quick: bool, archs=(80, 90), dtype: str = "bf16"):
    """Resources of every Triton variant for ``archs`` (sm_90 only with ``quick``)."""
    jobs = [(name, constexprs, warps, arch, dtype)
            for arch in ((90,) if quick else archs)
            for name, constexprs, warps in variants(quick)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(_compile, jobs))
