"""Ahead-of-time compilation of every Triton kernel variant for NVIDIA targets, no GPU
needed (``triton.compile`` with a ``GPUTarget``), and its resources from the cubin
(``cuobjdump --dump-resource-usage``): the Triton half of ``resnext-bench kernels``,
and the cubins whose SASS ``resnext_kernels/bench/sass.py`` reads.

The compile specialises its arguments the way the JIT does at a ResNeXt-50 launch
(:func:`specialisation`), so the report describes the kernel that runs."""

import itertools
import os
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor

# Scalar (shape) arguments; every other upper-case argument is a constexpr.
INTS = {"N", "N_BUCKET", "H_A", "W_A", "KC", "H_O", "W_O", "NC", "KG", "NG", "H", "W", "C_in",
        "H_out", "W_out", "C_out", "CG_IN", "CG_OUT", "TILES", "CHUNKS", "R", "C",
        "FWD_TOTAL", "DGRAD_TOTAL", "ZERO_TOTAL", "C_IN", "C_OUT"}
FP32_POINTERS = {"partial_ptr", "va_ptr", "vb_ptr", "vc_ptr", "vd_ptr", "sv_ptr", "ve_ptr",
                 "dw_ptr", "mean_ptr", "var_ptr", "zero_ptr"}
FLOATS = {"eps", "count"}

# The JIT marks an argument ``tt.divisibility`` 16 when its value at the launch allows
# (triton/runtime/jit.py: ``specialize_impl`` gives "D" for a tensor whose data_ptr and
# an int whose value is a multiple of 16; backends/compiler.py ``parse_attr`` turns "D"
# into [["tt.divisibility", 16]]), and compiles one kernel per such pattern. The AOT
# compile has no values, so it assumes the pattern of every grouped 3x3 conv of
# ResNeXt-50 (32x4d) at batch 256, the layers the project is judged on:
# * pointers: always (PyTorch's allocations are 512-byte aligned and in a ResNeXt the
#   conv's input, weight and outputs are whole tensors; a view at an odd offset gets
#   another JIT kernel);
# * the channel counts KC, NC, C_in, C_out, C_IN, C_OUT: 128/256/512/1024 — multiples
#   of 16;
# * N and N_BUCKET (the batch, and it rounded up to a power of two): 256;
# * pack_kernel's FWD_TOTAL, DGRAD_TOTAL (their entries: multiples of 256, or 0) and
#   ZERO_TOTAL (C_out x 9 x Cg_in, a multiple of 16, or 0);
# * not the sizes (56, 28, 14, 7: 14 and 7 are not), KG/NG/CG_IN/CG_OUT (4 and 8 at
#   s2/s3), TILES and CHUNKS (wgrad's row tiles and their chunks).
# The JIT also turns an int argument equal to 1 into a constexpr: wgrad's CHUNKS can be 1
# at s5, a variant not compiled here.
DIVISIBLE_INTS = {"N", "N_BUCKET", "KC", "NC", "C_in", "C_out", "FWD_TOTAL",
                  "DGRAD_TOTAL", "ZERO_TOTAL", "C_IN", "C_OUT"}
# The input dtypes the report compiles by default. fp32 gets tiles of its own where its
# operands, twice the registers, would spill (``Plan``'s ``itemsize``, ``fixed_warps``); fp16
# has bf16's tiles and element size (compiled apart on 2026-12-07: 0 spills in 206
# variants), left out of the default to keep the report, which CI runs, short.
DTYPES = ("bf16", "fp32")
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}  # the dtypes it can compile


def variant_name(name: str, constexprs: dict, warps: int) -> str:
    """The key of a Triton variant, as the launch counters key their records
    (``count_triton.variant_name``): ``name(K=v,...,warps=w)``, booleans as 0/1."""
    flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items())
    return f"{name}({flags},warps={warps})"


def specialisation(fn, dtype: str):
    """(signature, attrs) of ``fn`` for ``ASTSource``: the JIT's types (i32 shapes,
    ``*dtype`` tensors, fp32 for the statistics/affine/dw buffers) and its
    ``tt.divisibility`` 16 marks for the pointers and ``DIVISIBLE_INTS``, keyed by the
    argument's position as the JIT keys them (``JITFunction._pack_args``)."""
    signature, attrs = {}, {}
    for index, arg in enumerate(fn.arg_names):
        if arg in INTS:
            signature[arg] = "i32"
            divisible = arg in DIVISIBLE_INTS
        elif arg in FLOATS:
            signature[arg] = "fp32"
            divisible = False
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in FP32_POINTERS else f"*{dtype}"
            divisible = True
        else:
            signature[arg] = "constexpr"
            divisible = False
        if divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def compile_variant(name: str, constexprs: dict, warps: int, arch: int, dtype: str):
    """``triton.compile`` of one variant for ``sm_{arch}``, specialised like the JIT
    (its ``cuda_capability_geq`` sees ``sm_{arch}``, as on such a GPU: the compile
    target, not this machine's, which may have none)."""
    from unittest import mock

    import triton
    import triton.language.target_info as target_info
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .. import triton_kernels

    fn = getattr(triton_kernels, name)
    signature, attrs = specialisation(fn, dtype)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    from .. import triton_backend

    options = {"num_warps": warps}
    if name in ("conv_rows_kernel", "wgrad_kernel"):
        options["maxnreg"] = triton_backend.MAXNREG
    target = GPUTarget("cuda", arch, 32)

    def current_target():
        return target

    current_target.__triton_builtin__ = True  # as the function it stands in for
    with mock.patch.object(target_info, "current_target", current_target):
        return triton.compile(source, target=target, options=options)


def _ordered(name: str, constexprs: dict) -> dict:
    """``constexprs`` in the kernel's signature order (the launch records' order)."""
    from .. import triton_kernels

    order = getattr(triton_kernels, name).arg_names
    return {k: constexprs[k] for k in order if k in constexprs}


def variants(quick: bool, major: int = 9, dtype: str = "bf16"):
    """(kernel name, constexprs, num_warps) of every launch the backend makes on the
    ResNeXt-50 32x4d layers on a GPU of compute capability ``major`` for ``dtype`` inputs
    (their tiling is per layer, GPU and element size: ``triton_backend.Plan``): the
    fixed warps of every pass and, unless ``quick``, each autotuning config of the
    passes that autotune; wgrad for both flag pairs."""
    from .. import reference, testing
    from .. import triton_backend as tb
    from .. import triton_kernels as K

    out = {}
    itemsize = ITEMSIZE[dtype]

    def add(name, constexprs, warps):
        if name == "conv_rows_kernel":  # its dots are split by the launch's warps
            constexprs = dict(constexprs, WARPS=warps)
        constexprs = _ordered(name, constexprs)
        out[variant_name(name, constexprs, warps)] = (name, constexprs, warps)

    warps = [tb.FIXED_WARPS] if quick else sorted({tb.FIXED_WARPS, *tb.CONFIGS})
    for merge in ("stats_kernel", "sums_kernel"):
        add(merge, dict(BLOCK_R=tb.STATS_R, BLOCK_C=tb.STATS_C), tb.FIXED_WARPS)
    for channels, size, stride in testing.resnext_layers(32, 4).values():
        cg, out_size = channels // 32, reference.output_size(size, stride)
        fwd = tb.Plan(channels, channels, cg, cg, out_size, out_size, major, itemsize=itemsize)
        dgrad = tb.Plan(channels, channels, cg, cg, size, size, major, cols=stride,
                        itemsize=itemsize)
        common = dict(PRECISION="tf32")
        for fold in (False, True):
            add("pack_kernel", dict(F_K_STEPS=fwd.k_steps, F_SUB_K=fwd.sub_k,
                                    F_SUB_N=fwd.sub_n, D_K_STEPS=dgrad.k_steps,
                                    D_SUB_K=dgrad.sub_k, D_SUB_N=dgrad.sub_n, FOLD=fold,
                                    BLOCK=tb.PACK_BLOCK), tb.FIXED_WARPS)
        for mode in (K.WRITE, K.STATS, K.REDUCE, K.DC):
            fixed = tb.fixed_warps(mode, unroll=fwd.unroll, bw=fwd.bw, stride=stride, major=major)
            tuned = sorted({fixed, *(() if quick else tb.CONFIGS)})
            for save in ((False, True) if mode == K.WRITE else (False,)):
                for w in (tuned if mode == K.WRITE else [fixed]):
                    add("conv_rows_kernel", dict(MODE=mode, STRIDE=stride, DIL=1, FROM_DY=False,
                                                 BW=fwd.bw, SAVE=save, WGRAD=False,
                                                 **fwd.constexprs(), **common), w)
        for from_dy in (False, True):
            plain = dict(MODE=K.PLAIN, STRIDE=1, DIL=stride, FROM_DY=from_dy, BW=dgrad.bw,
                         SAVE=False, **common)
            for w in warps:  # dgrad alone (no weight gradient wanted, or deterministic)
                add("conv_rows_kernel", dict(plain, WGRAD=False, **dgrad.constexprs()), w)
            if dgrad.fuse_wgrad:  # dgrad + wgrad, at batch 256
                add("conv_rows_kernel", dict(plain, WGRAD=True,
                                             **dgrad.constexprs(dgrad.fused_run(256), wgrad=True)),
                    tb.fixed_warps(K.PLAIN, True, bw=dgrad.bw, major=major, itemsize=itemsize))
            for deterministic in (False, True):
                add("wgrad_kernel", dict(FROM_DY=from_dy, STRIDE=stride,
                                         DETERMINISTIC=deterministic, K_STEPS=fwd.w_k_steps,
                                         PIECES=fwd.w_pieces, SUB_K=fwd.w_sub_k,
                                         SUB_N=fwd.sub_n, SPLIT=fwd.w_split, BW=fwd.w_bw,
                                         ROWS=fwd.rows, IMGS=fwd.imgs, ALIGNED=fwd.aligned,
                                         **common),
                    tb.WGRAD_WARPS)
    return list(out.values())


def _compile(job):
    """Compile one variant for one arch; returns a resources row (runs in a worker)."""
    from .kernels import KernelResources, find_cuobjdump, parse

    name, constexprs, warps, arch, dtype = job
    compiled = compile_variant(name, constexprs, warps, arch, dtype)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        report = subprocess.run([find_cuobjdump(), "--dump-resource-usage", f.name],
                                capture_output=True, text=True, check=True).stdout
    (row,) = parse(report)
    return KernelResources(f"sm_{arch}",
                           f"triton {variant_name(name, constexprs, warps)[:-1]},{dtype})",
                           row.registers, max(row.shared, compiled.metadata.shared), row.stack,
                           row.local)


def report(quick: bool, archs=(80, 90), dtypes=DTYPES):
    """Resources of every Triton variant for ``archs`` (sm_90 only with ``quick``) and
    ``dtypes``; the autotuning configs only where they run
    (``triton_backend.TUNE_MIN_MAJOR``)."""
    from .. import triton_backend as tb

    def fixed(name, constexprs, arch, dtype):
        if name == "conv_rows_kernel":
            return tb.fixed_warps(constexprs["MODE"], constexprs["WGRAD"], constexprs["UNROLL"],
                                  constexprs["BW"], constexprs["STRIDE"], arch // 10,
                                  ITEMSIZE[dtype])
        return tb.WGRAD_WARPS if name == "wgrad_kernel" else tb.FIXED_WARPS

    jobs = [(name, constexprs, warps, arch, dtype)
            for dtype in dtypes
            for arch in ((90,) if quick else archs)
            for name, constexprs, warps in variants(quick, arch // 10, dtype)
            if warps == fixed(name, constexprs, arch, dtype) or arch >= 10 * tb.TUNE_MIN_MAJOR]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(_compile, jobs))
