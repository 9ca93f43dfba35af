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
INTS = {"P", "P_in", "H", "W", "C_in", "C_out", "H_out", "W_out", "CG_IN", "CG_OUT", "CHUNKS"}
FP32_POINTERS = {"scale_ptr", "shift_ptr", "partial_ptr", "mean_ptr", "invstd_ptr",
                 "dz_scale_ptr", "dc_shift_ptr", "dc_xhat_ptr", "dw_ptr"}

# The JIT marks an argument ``tt.divisibility`` 16 when its value at the launch allows
# (triton/runtime/jit.py: ``specialize_impl`` gives "D" for a tensor whose data_ptr and
# an int whose value is a multiple of 16; backends/compiler.py ``parse_attr`` turns "D"
# into [["tt.divisibility", 16]]), and compiles one kernel per such pattern. The AOT
# compile has no values, so it assumes the pattern of every grouped 3x3 conv of
# ResNeXt-50 (32x4d) at batch 256, the layers the project is judged on:
# * pointers: always (PyTorch's allocations are 512-byte aligned and in a ResNeXt the
#   conv's input, weight and outputs are whole tensors; a view at an odd offset gets
#   another JIT kernel);
# * C_in, C_out: the group width 128/256/512/1024 — multiples of 16 at every layer;
# * P (= N·H_out·W_out) and P_in (= N·H·W): multiples of 16 at batch 256 (256·49 at
#   s5); at 56² and 28² pixels at any batch, at 14² for N % 4 == 0, at 7² for
#   N % 16 == 0 — other batches get another JIT kernel there;
# * not H, W, H_out, W_out (56, 28, 14, 7: 14 and 7 are not), CG_IN, CG_OUT (4 and 8
#   at s2/s3), CHUNKS (wgrad's pixel-chunk count, 29/8/2 at s2–s4).
# The JIT also turns an int argument equal to 1 into a constexpr: wgrad's CHUNKS is 1
# at s5 (1024·9·32 entries fill the 2,048 target programs), a variant not compiled here.
DIVISIBLE_INTS = {"P", "P_in", "C_in", "C_out"}


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
    """``triton.compile`` of one variant for ``sm_{arch}``, specialised like the JIT."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .. import triton_kernels

    fn = getattr(triton_kernels, name)
    signature, attrs = specialisation(fn, dtype)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps})


def variants(quick: bool):
    """(kernel name, constexprs, num_warps) for every launch the backend can make: the
    fixed GPU tiles for each flag combination, and each autotuning config."""
    from .. import triton_backend as tb

    fixed = {"BLOCK_P": 32, "BLOCK_C": 32}
    out = []
    for stride in (1, 2):
        out.append(("conv_fwd_kernel", dict(STRIDE=stride, STATS=True, **fixed), tb.STATS_WARPS))
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


def report(quick: bool, archs=(80, 90), dtype: str = "bf16"):
    """Resources of every Triton variant for ``archs`` (sm_90 only with ``quick``)."""
    jobs = [(name, constexprs, warps, arch, dtype)
            for arch in ((90,) if quick else archs)
            for name, constexprs, warps in variants(quick)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(_compile, jobs))
