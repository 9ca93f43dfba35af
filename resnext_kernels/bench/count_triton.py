"""What every kernel launch of a Triton-backend pass moves and issues, counted through the
Triton interpreter on the CPU (issue #14 item 2). Gives :class:`counters.Launch`
records, like the CUDA counters; everything is *modelled (CPU counters), not measured*.

``count_pass(problem, pass_name, dtype)`` runs the real glue
(``triton_backend.forward`` / ``backward``) at the full batch on random data with the
interpreter hooked, and returns, in call order, one record per Triton kernel launch
and one per torch glue operation that would be a kernel launch on a GPU.

How a Triton launch is counted (the assumptions, in one place):

* **Sampling.** ``GridExecutor`` runs every program of the grid; a gate lets only a
  contiguous window of programs run, in GPU launch order (program id x fastest, then
  y, then z). A wave is ``WAVE_PROGRAMS`` = 132 SMs x 4 resident programs (an
  assumption: the H200's SM count, 4 programs per SM, as for the CUDA kernels'
  blocks: ``counters.SMS`` x ``counters.BLOCKS_PER_SM``). ``warmup_waves`` waves of
  warm-up programs (their sectors only prime the L2 model: ``trace_counted`` False)
  are followed by ``waves`` waves of counted programs; the counted window starts at
  the middle of the grid, clamped so that it and its warm-up fit. A grid smaller
  than warm-up + window runs whole, all counted. Programs outside the window do not
  run at all: their outputs stay garbage, which the counts do not depend on (the
  kernels' addresses come from indices, never from data). ``scale`` = programs of
  the grid / counted programs, ``window_start`` = programs before the counted window
  / programs of the grid.
* **Warp instructions.** Each ``tl.load`` / ``tl.store`` / atomic of a program is a
  tile of addresses (the interpreter's pointer tensor) and a mask. The flattened
  row-major tile is cut into warp instructions of 32 lanes x ``vec`` elements, where
  ``vec`` is the elements per thread along the last (contiguous) dimension: 1 unless
  that dimension has consecutive addresses; then ``min(16 bytes / element size,
  run)``, ``run`` being the longest power-of-two aligned run of consecutive addresses
  along the last dimension. Atomics always use ``vec`` = 1. This is the layout a
  Triton ``BlockedLayout`` gets when it vectorises (threads along the contiguous
  dimension first); the compiled kernel's layout may differ: other thread
  arrangements, tiles smaller than the block replicated over warps, and ``vec`` is
  read from the addresses while the compiler vectorises only what its axis analysis
  proves (not, e.g., wgrad's runs of CG_IN channels, a runtime argument). Per
  instruction with >= 1 active lane: distinct 32-byte sectors
  (``global_sectors``), distinct bytes (``global_bytes``), distinct 128-byte lines
  (``global_wavefronts``); ``global_requests`` counts the instructions.
  ``atomics`` counts the active atomic lanes (elements).
* **Addresses.** Each tensor's storage is given a GPU-like address range starting on a
  512-byte boundary (:class:`AddressSpace`; the CPU allocator aligns to 64 bytes only),
  so sectors, lines and traces do not depend on where the CPU put the tensors; the
  traces hold these virtual sector numbers, consistent across the launches of a pass.
* **L1 model / traces.** Each program's distinct sectors in first-touch order, with
  READ/WRITE/ATOMIC bits OR-ed over its accesses to the sector, programs in launch
  order (warm-up first): ``trace_sector`` (address // 32), ``trace_kind``,
  ``trace_counted``.
* **tl.dot** (the builder's ``create_dot``): ``mma`` = 16x8x16 steps after padding
  M to 16, N to 8, K to 16 (per batch entry of a 3-D dot); ``executed_macs`` = padded
  M·N·K; ``useful_macs`` = (m, n, k) with A[m, k] and B[k, n] both non-zero;
  ``mma_kind`` "tl.dot" for 2-D dots (wgmma on sm_90) and "tl.dot batched" once a
  3-D dot is seen (Triton lowers those to mma.sync: ``HMMA`` in the SASS). Shared
  memory is invisible to the interpreter: each operand is charged its bytes x 2 / 128
  wavefronts (staged once and read once, 128 bytes a wavefront, assumed
  conflict-free) in both ``smem_wavefronts`` and ``smem_ideal_wavefronts``, once per
  program for the same operand tensor used by several dots (it is converted to the
  MMA operand layout once and held in registers); no other shared-memory traffic is
  modelled (reductions' scratch and layout conversions of epilogues included).
* **FMA.** Every fp32 element-wise multiply (the builder's ``create_fmul``) and fp32
  ``create_fma`` counts one FMA per element of its result, masked lanes included: the
  kernels' ``acc += x * w`` is one FFMA per element, but a plain multiply in an
  epilogue is counted as an FMA too, and fp32 adds, reductions and integer address
  arithmetic are not counted (the SASS report, ``bench/sass.py``, covers the issue
  rate).
* ``threads`` = ``num_warps`` x 32 of the launch (4 warps unless the launch passes
  ``num_warps``); ``symbol`` = :func:`variant_name` of the kernel, its constexprs (in
  the kernel's signature order) and ``num_warps``, the key of the AOT/SASS reports.

Tiles: ``triton_backend`` launches the same tiles under the interpreter as on a GPU
with ``RESNEXT_TRITON_AUTOTUNE=0`` (its per-layer ``Plan`` and ``FIXED`` rows per
program; the variants ``bench/triton_aot.py`` compiles); the autotuned tiles a GPU may
choose instead are not modelled.

Glue: a ``TorchDispatchMode`` around the call records every aten operation outside
the Triton launches that would launch a kernel on a GPU, as a record with kernel
``"torch aten::<op>"``, symbol ``"aten::<op>"`` (the spelling of
``counters.glue_launches``, whose profiler would also see the interpreter's own
copies inside a launch), grid (1, 1, 1), one block,
``scale`` 1 and every count 0 (``threads`` 0): the model charges it a launch cost
only. Not recorded: views and metadata operations (:data:`METADATA_OPS` and any op
whose schema returns an alias), allocations (``empty``...), host reads (``item``),
and ops that return one of their inputs unchanged without mutating it. A
``.contiguous()`` or ``.to()`` that has nothing to do dispatches no aten op at all.
Inputs are channels_last by default (``channels_last=False`` adds the NCHW↔NHWC
conversions the glue then makes).

Must run with ``TRITON_INTERPRET=1`` set before triton is imported;
:func:`count_pass_subprocess` runs :func:`count_pass` in a child process that has it.
Speed-ups while counting, which change no result: the interpreter's integer-overflow
checks (``sanitize_overflow``) are off, a ``@triton.jit`` helper called by a running
kernel skips the interpreter's re-patching of ``triton.language``, the interpreter's
numpy-dtype lookup is memoised, and the copy of the arguments back after a launch is
skipped (CPU tensors: the interpreter works on them in place).

Cost (2 CPU cores, fp16, batch 256, ``waves=2``: 1,320 programs run per launch): the
interpreter's cost is per interpreted operation, so a launch costs its programs' loop
trips: 40-530 ms a program for the conv-shaped kernels (9 taps x CG channels), i.e.
1-12 minutes a launch from s2 to s5, but 0.8-2.7 s a program for wgrad, whose programs
loop over hundreds of pixel tiles (its CHUNKS): 18-60 minutes a wgrad launch, most of
a backward pass's count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .counters import (ATOMIC, BLOCKS_PER_SM, LINE, READ, SECTOR, SMS, WRITE, Launch,
                       window_blocks)

# A wave: the H200's 132 SMs x 4 resident programs each (an assumption, the same as the
# CUDA counters' blocks: counters.SMS, counters.BLOCKS_PER_SM).
WAVE_PROGRAMS = SMS * BLOCKS_PER_SM
WARP = 32
VECTOR_BYTES = 16         # the widest per-thread global access (LDG/STG.128)
MMA_M, MMA_N, MMA_K = 16, 8, 16
SMEM_WAVEFRONT_BYTES = 128
DEFAULT_WARPS = 4         # Triton's default num_warps

PASSES = ("eval", "train_fwd", "train_bwd", "eval_bwd")
EPS = 1e-5

# aten ops that launch no kernel on a GPU: views, metadata, allocations, host reads.
METADATA_OPS = frozenset({
    "empty", "empty_like", "empty_strided", "empty_permuted", "new_empty",
    "new_empty_strided", "view", "_unsafe_view", "_reshape_alias", "as_strided", "permute",
    "reshape", "expand", "expand_as", "view_as", "detach", "alias", "unbind", "select",
    "slice", "t", "transpose", "unsqueeze", "squeeze", "narrow", "split", "split_with_sizes",
    "chunk", "contiguous", "to", "lift_fresh", "set_", "resize_", "_local_scalar_dense",
    "item", "is_nonzero", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
})


def variant_name(kernel_name: str, constexprs: dict, num_warps: int) -> str:
    """The key of a Triton variant (as ``bench/triton_aot.py`` names them):
    ``name(K=v,...,warps=w)``, booleans as 0/1, constexprs in the given order."""
    flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items())
    return f"{kernel_name}({flags},warps={num_warps})"


@dataclasses.dataclass(frozen=True)
class Window:
    """Programs [warm_start, count_start) warm up, [count_start, count_end) are counted
    (linear ids in launch order)."""
    total: int
    warm_start: int
    count_start: int
    count_end: int

    @property
    def counted(self) -> int:
        return self.count_end - self.count_start

    @property
    def scale(self) -> float:
        return self.total / self.counted if self.counted else 1.0

    @property
    def window_start(self) -> float:
        return self.count_start / self.total if self.total else 0.0


def sample_window(total: int, waves: float = 2.0, warmup_waves: float = 0.5) -> Window:
    """The sampled window of a grid of ``total`` programs (module docstring)."""
    counted = window_blocks(waves)
    warmup = max(0, round(warmup_waves * WAVE_PROGRAMS))
    if total <= warmup + counted:
        return Window(total, 0, 0, total)
    start = min(max(total // 2, warmup), total - counted)
    return Window(total, start - warmup, start, start + counted)


def interpreting() -> bool:
    """Whether this process runs Triton kernels through the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction

        from .. import triton_kernels
    except ImportError:
        return False
    return isinstance(triton_kernels.conv_rows_kernel, InterpretedFunction)


# --------------------------------------------------------------------------- accesses

_SENTINEL = np.uint64(np.iinfo(np.uint64).max)


def vector_width(ptrs: np.ndarray, element_size: int) -> int:
    """Elements per thread along the last dimension (module docstring)."""
    if ptrs.ndim == 0 or ptrs.shape[-1] < 2:
        return 1
    length = ptrs.shape[-1]
    consecutive = (ptrs[..., 1:] - ptrs[..., :-1]) == np.uint64(element_size)
    run = min(VECTOR_BYTES // element_size, length)
    position = np.arange(1, length)
    while run > 1:
        # within every aligned chunk of `run` elements, neighbours are consecutive
        if consecutive[..., position % run != 0].all():
            return run
        run //= 2
    return 1


def _distinct_per_row(sorted_values: np.ndarray, valid: np.ndarray) -> int:
    """Sum over rows of the distinct values among the valid entries; ``sorted_values``
    sorted along each row, with the valid entries first."""
    new = np.empty(sorted_values.shape, dtype=bool)
    new[:, 0] = True
    np.not_equal(sorted_values[:, 1:], sorted_values[:, :-1], out=new[:, 1:])
    return int(np.count_nonzero(new & valid))


def request_stats(addresses: np.ndarray, active: np.ndarray, element_size: int, vec: int):
    """(requests, sectors, bytes, lines) of a flattened access cut into warp
    instructions of WARP x vec elements."""
    width = WARP * vec
    n = addresses.size
    rows = -(-n // width)
    pad = rows * width - n
    if pad:
        addresses = np.concatenate([addresses, np.zeros(pad, np.uint64)])
        active = np.concatenate([active, np.zeros(pad, bool)])
    addresses = addresses.reshape(rows, width)
    active = active.reshape(rows, width)
    keep = active.any(axis=1)
    if not keep.all():
        addresses, active = addresses[keep], active[keep]
    if addresses.shape[0] == 0:
        return 0, 0, 0, 0
    element = np.where(active, addresses, _SENTINEL)
    element.sort(axis=1)
    valid = element != _SENTINEL
    distinct_elements = _distinct_per_row(element, valid)
    sectors = _distinct_per_row(element // np.uint64(SECTOR), valid)
    lines = _distinct_per_row(element // np.uint64(LINE), valid)
    return addresses.shape[0], sectors, distinct_elements * element_size, lines


def _first_touch(sectors: np.ndarray) -> np.ndarray:
    """The distinct values of ``sectors`` in first-occurrence order."""
    if sectors.size <= 1:
        return sectors
    _, first = np.unique(sectors, return_index=True)
    first.sort()
    return sectors[first]


# --------------------------------------------------------------------------- recorder

class _Program:
    __slots__ = ("counted", "sectors", "kinds", "operands")

    def __init__(self, counted):
        self.counted = counted
        self.operands = {}  # id -> dot operand already charged (kept alive: ids stay unique)
        self.sectors = []  # per access: distinct sectors, first touch first
        self.kinds = []    # per access: its kind bit

    def trace(self):
        """(sectors, kinds): distinct sectors in first-touch order, kind bits OR-ed."""
        if not self.sectors:
            return np.zeros(0, np.int64), np.zeros(0, np.uint8)
        sectors = np.concatenate(self.sectors)
        kinds = np.concatenate([np.full(s.size, k, np.uint8)
                                for s, k in zip(self.sectors, self.kinds)])
        unique, first, inverse = np.unique(sectors, return_index=True, return_inverse=True)
        kind = np.zeros(unique.size, np.uint8)
        for bit in (READ, WRITE, ATOMIC):
            kind[inverse[(kinds & bit) != 0]] |= bit
        order = np.argsort(first, kind="stable")
        return unique[order].astype(np.int64), kind[order]


class _LaunchState:
    def __init__(self, name, constexprs, num_warps):
        self.name, self.constexprs, self.num_warps = name, constexprs, num_warps
        self.grid = None
        self.window = None
        self.batched = False  # a 3-D tl.dot was seen (mma.sync, not wgmma)
        self.patched = frozenset()  # ids of the triton.language modules patched
        self.traces = {}  # linear program id -> (sectors, kinds, counted)
        self.counts = dict(global_requests=0, global_sectors=0, global_bytes=0,
                           global_wavefronts=0, smem_wavefronts=0, smem_ideal_wavefronts=0,
                           mma=0, executed_macs=0, useful_macs=0, fma=0, atomics=0)

    def to_launch(self) -> Launch:
        grid = self.grid or (0, 0, 0)
        window = self.window or Window(0, 0, 0, 0)
        ids = sorted(self.traces)
        parts = [self.traces[i] for i in ids]
        sectors = (np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64))
        kinds = (np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.uint8))
        counted = (np.concatenate([np.full(p[0].size, p[2], bool) for p in parts]) if parts
                   else np.zeros(0, bool))
        return Launch(
            backend="triton", kernel=self.name,
            symbol=variant_name(self.name, self.constexprs, self.num_warps),
            grid=tuple(grid), threads=self.num_warps * WARP, blocks=window.total,
            sampled_blocks=window.counted, scale=window.scale,
            mma_kind=("" if not self.counts["mma"]
                      else "tl.dot batched" if self.batched else "tl.dot"),
            trace_sector=sectors, trace_kind=kinds, trace_counted=counted,
            window_start=window.window_start, **self.counts)


class AddressSpace:
    """GPU-like addresses for the CPU tensors the kernels see: each storage gets its
    own range starting on a ``ALIGN``-byte boundary (the CUDA caching allocator's
    alignment; the CPU allocator's 64 bytes would make line counts depend on the run),
    in the order the launches first pass it; a storage seen again at the same place
    and size (memory reused) keeps its range."""

    ALIGN = 512
    BASE = 1 << 40

    def __init__(self):
        self.known = {}  # (start, bytes) -> virtual start
        self.live = []   # (start, end, virtual start) of the storages in use
        self.next = self.BASE
        self.starts = self.virtual = np.zeros(0, np.uint64)

    def register(self, start: int, nbytes: int) -> None:
        key = (start, nbytes)
        if key not in self.known:
            self.known[key] = self.next
            self.next += -(-max(nbytes, 1) // self.ALIGN) * self.ALIGN + self.ALIGN
        entry = (start, start + max(nbytes, 1), self.known[key])
        if entry in self.live:
            return
        # memory now owned by this storage belongs to no earlier one any more
        self.live = sorted([r for r in self.live if r[1] <= entry[0] or r[0] >= entry[1]]
                           + [entry])
        self.starts = np.array([r[0] for r in self.live], np.uint64)
        self.virtual = np.array([r[2] for r in self.live], np.uint64)

    def translate(self, addresses: np.ndarray) -> np.ndarray:
        """Virtual addresses of host ``addresses`` (uint64) that lie in a registered
        storage (anything else, e.g. a masked-off lane's address, maps arbitrarily)."""
        if self.starts.size == 0:
            return addresses
        index = np.searchsorted(self.starts, addresses, side="right") - 1
        np.maximum(index, 0, out=index)
        return addresses - self.starts[index] + self.virtual[index]


class _Recorder:
    """The hooks' state: the records so far, the running launch and program."""

    def __init__(self, waves, warmup_waves, kernel_waves=None):
        self.waves, self.warmup_waves = waves, warmup_waves
        self.kernel_waves = dict(kernel_waves or {})  # per jit function name
        self.launches = []
        self.launch = None
        self.program = None
        self.addresses = AddressSpace()

    # accesses ---------------------------------------------------------------
    def access(self, ptrs, mask, kind):
        program = self.program
        if program is None:
            return
        element_size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        data = ptrs.data
        addresses = self.addresses.translate(np.ascontiguousarray(data).reshape(-1))
        if mask is None:
            active = np.ones(addresses.size, bool)
        else:
            # a mask may come as int32 (an & of a scalar comparison): nonzero is active
            active = np.broadcast_to(mask.data, data.shape).reshape(-1).astype(bool)
        if program.counted:
            vec = 1 if kind == ATOMIC else vector_width(data, element_size)
            requests, sectors, nbytes, lines = request_stats(addresses, active, element_size,
                                                             vec)
            counts = self.launch.counts
            counts["global_requests"] += requests
            counts["global_sectors"] += sectors
            counts["global_bytes"] += nbytes
            counts["global_wavefronts"] += lines
            if kind == ATOMIC:
                counts["atomics"] += int(np.count_nonzero(active))
        touched = addresses[active] // np.uint64(SECTOR)
        if touched.size:
            program.sectors.append(_first_touch(touched))
            program.kinds.append(kind)

    def fma(self, result):
        if self.program is not None and self.program.counted \
                and result.data.dtype == np.float32:
            self.launch.counts["fma"] += int(result.data.size)

    def dot(self, a, b):
        if self.program is None or not self.program.counted:
            return
        a_data, b_data = a.data, b.data
        m, k = a_data.shape[-2:]
        n = b_data.shape[-1]
        batch = int(np.prod(a_data.shape[:-2], dtype=np.int64))
        pm, pn, pk = (-(-m // MMA_M) * MMA_M, -(-n // MMA_N) * MMA_N, -(-k // MMA_K) * MMA_K)
        counts = self.launch.counts
        counts["mma"] += batch * (pm // MMA_M) * (pn // MMA_N) * (pk // MMA_K)
        counts["executed_macs"] += batch * pm * pn * pk
        nonzero = np.matmul((a_data != 0).astype(np.float64), (b_data != 0).astype(np.float64))
        counts["useful_macs"] += int(round(float(nonzero.sum())))
        operand_bytes = 0
        for operand in (a, b):
            if id(operand) not in self.program.operands:
                self.program.operands[id(operand)] = operand
                operand_bytes += operand.data.size * operand.data.itemsize
        if batch > 1 or a_data.ndim > 2:
            self.launch.batched = True
        wavefronts = -(-operand_bytes * 2 // SMEM_WAVEFRONT_BYTES)
        counts["smem_wavefronts"] += wavefronts
        counts["smem_ideal_wavefronts"] += wavefronts

    # launches and programs --------------------------------------------------
    def program_gate(self, fn):
        """A stand-in for the kernel function that runs only the sampled programs."""
        recorder = self

        class Gate:
            def __init__(self):
                self.__signature__ = inspect.signature(fn)
                self.__globals__ = fn.__globals__
                self.__name__ = fn.__name__

            def __call__(self, **kwargs):
                launch = recorder.launch
                from triton.runtime.interpreter import interpreter_builder as builder

                if launch.window is None:
                    launch.grid = tuple(builder.grid_dim)
                    gx, gy, gz = launch.grid
                    waves = recorder.kernel_waves.get(launch.name, recorder.waves)
                    launch.window = sample_window(gx * gy * gz, waves,
                                                  min(recorder.warmup_waves, waves / 4))
                gx, gy, _ = launch.grid
                x, y, z = builder.grid_idx
                linear = x + gx * (y + gy * z)
                window = launch.window
                if not window.warm_start <= linear < window.count_end:
                    return None
                recorder.program = _Program(linear >= window.count_start)
                try:
                    return fn(**kwargs)
                finally:
                    program, recorder.program = recorder.program, None
                    sectors, kinds = program.trace()
                    launch.traces[linear] = (sectors, kinds, program.counted)

        return Gate()


_ACTIVE: _Recorder | None = None


_MODULES_OF = {}


def _language_modules(fn) -> frozenset:
    """The triton.language modules the interpreter patches for ``fn`` (those its
    globals hold)."""
    key = id(fn.__globals__)
    if key not in _MODULES_OF:
        import triton.language as tl

        _MODULES_OF[key] = frozenset(id(v) for v in fn.__globals__.values()
                                     if inspect.ismodule(v) and v in (tl, tl.core))
    return _MODULES_OF[key]


def _cached_np_dtype(get_np_dtype):
    """The interpreter's ``_get_np_dtype`` (which builds a dict at every call) with
    its answers remembered per element type."""
    import triton.language as tl

    cache = {}

    def np_dtype(tt_dtype):
        key = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        try:
            return cache[key]
        except (KeyError, TypeError):
            result = get_np_dtype(tt_dtype)
            try:
                cache[key] = result
            except TypeError:  # an unhashable type
                pass
            return result

    return np_dtype


@contextlib.contextmanager
def hooked(waves: float = 2.0, warmup_waves: float = 0.5, kernel_waves=None):
    """Hooks the Triton interpreter for the duration; yields the recorder, whose
    ``launches`` list receives one record per Triton launch made meanwhile."""
    global _ACTIVE
    from triton.runtime import interpreter as I

    if _ACTIVE is not None:
        raise RuntimeError("count_triton.hooked is not reentrant")
    recorder = _Recorder(waves, warmup_waves, kernel_waves)
    Builder, Executor = I.InterpreterBuilder, I.GridExecutor
    # create_load/create_store (unmasked) call the masked builders in triton 3.x.
    saved = {name: Builder.__dict__[name] for name in
             ("create_masked_load", "create_masked_store", "create_atomic_rmw",
              "create_atomic_cas", "create_fmul", "create_fma", "create_dot")
             if name in Builder.__dict__}
    saved_call = Executor.__call__
    saved_device_call = I.InterpretedFunction.__call__
    saved_restore = Executor._restore_args_dev
    saved_options = I.interpreter_builder.options
    saved_np_dtype = I._get_np_dtype

    def masked_load(self, ptrs, mask, other, *args):
        recorder.access(ptrs, mask, READ)
        return saved["create_masked_load"](self, ptrs, mask, other, *args)

    def masked_store(self, ptrs, value, mask, *args):
        recorder.access(ptrs, mask, WRITE)
        return saved["create_masked_store"](self, ptrs, value, mask, *args)

    def atomic_rmw(self, op, ptr, val, mask, *args):
        recorder.access(ptr, mask, ATOMIC)
        return saved["create_atomic_rmw"](self, op, ptr, val, mask, *args)

    def atomic_cas(self, ptr, cmp, val, *args):
        recorder.access(ptr, None, ATOMIC)
        return saved["create_atomic_cas"](self, ptr, cmp, val, *args)

    def fmul(self, lhs, rhs):
        result = saved["create_fmul"](self, lhs, rhs)
        recorder.fma(result)
        return result

    def fma(self, x, y, z):
        result = saved["create_fma"](self, x, y, z)
        recorder.fma(result)
        return result

    def dot(self, a, b, d, *args):
        recorder.dot(a, b)
        return saved["create_dot"](self, a, b, d, *args)

    def device_call(self, *args, **kwargs):
        # A @triton.jit helper (tl.sum included) called by the running kernel: the
        # interpreter re-patches triton.language at every such call (inspect.getmembers
        # over its modules, ~1 ms) and never undoes it within the launch; skip that when
        # the launch has patched the same modules already.
        launch = recorder.launch
        if launch is None:
            return saved_device_call(self, *args, **kwargs)
        modules = _language_modules(self.fn)
        if not modules <= launch.patched:
            launch.patched |= modules
            return saved_device_call(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise I.InterpreterError(repr(e)) from e

    def call(self, *args, **kwargs):
        argspec = inspect.getfullargspec(self.fn)
        bound = inspect.getcallargs(self.fn, *args,
                                    **{k: v for k, v in kwargs.items() if k in argspec.args})
        constexprs = {name: bound[name] for name in self.constexprs}
        recorder.launch = _LaunchState(self.fn.__name__, constexprs,
                                       kwargs.get("num_warps") or DEFAULT_WARPS)
        recorder.launch.patched = _language_modules(self.fn)
        for value in bound.values():
            if hasattr(value, "untyped_storage"):
                storage = value.untyped_storage()
                recorder.addresses.register(storage.data_ptr(), storage.nbytes())
        fn = self.fn
        self.fn = recorder.program_gate(fn)
        try:
            saved_call(self, *args, **kwargs)
            recorder.launches.append(recorder.launch.to_launch())
        finally:
            self.fn = fn
            recorder.launch = recorder.program = None

    def restore_args(self, args_dev, args_hst, kwargs, kwargs_hst):
        # The host copies of CPU tensors share their storage: copying back is a no-op.
        tensors = [a for a in [*args_dev, *kwargs.values()] if hasattr(a, "data_ptr")]
        if any(t.device.type != "cpu" for t in tensors):
            saved_restore(self, args_dev, args_hst, kwargs, kwargs_hst)

    patches = dict(create_masked_load=masked_load, create_masked_store=masked_store,
                   create_atomic_rmw=atomic_rmw, create_atomic_cas=atomic_cas,
                   create_fmul=fmul, create_fma=fma, create_dot=dot)
    try:
        for name, function in patches.items():
            if name in saved:
                setattr(Builder, name, function)
        Executor.__call__ = call
        Executor._restore_args_dev = restore_args
        I.InterpretedFunction.__call__ = device_call
        I._get_np_dtype = _cached_np_dtype(saved_np_dtype)
        I.interpreter_builder.options = dataclasses.replace(saved_options,
                                                            sanitize_overflow=False)
        _ACTIVE = recorder
        with np.errstate(all="ignore"):  # garbage data from skipped programs
            yield recorder
    finally:
        _ACTIVE = None
        for name, function in saved.items():
            setattr(Builder, name, function)
        Executor.__call__ = saved_call
        Executor._restore_args_dev = saved_restore
        I.InterpretedFunction.__call__ = saved_device_call
        I._get_np_dtype = saved_np_dtype
        I.interpreter_builder.options = saved_options


# --------------------------------------------------------------------------- glue ops

def glue_launch(func) -> Launch:
    """The record of a torch glue op: a launch cost, no counts."""
    name = f"aten::{func.overloadpacket.__name__}"  # as counters.glue_launches names them
    return Launch(backend="triton", kernel=f"torch {name}", symbol=name, grid=(1, 1, 1),
                  threads=0, blocks=1, sampled_blocks=1, scale=1.0)


def launches_kernel(func, args, kwargs, out) -> bool:
    """Whether aten op ``func`` (called with ``args``/``kwargs``, giving ``out``) would
    launch a GPU kernel (module docstring)."""
    import torch

    if func.overloadpacket.__name__ in METADATA_OPS:
        return False
    if any(r.alias_info is not None and not r.alias_info.is_write
           for r in func._schema.returns):
        return False  # a view
    outputs = [t for t in (out if isinstance(out, (tuple, list)) else (out,))
               if isinstance(t, torch.Tensor)]
    if not outputs:
        return False
    if not func._schema.is_mutable:
        inputs = [t for t in (*args, *(kwargs or {}).values()) if isinstance(t, torch.Tensor)]
        if all(any(o is i for i in inputs) for o in outputs):
            return False  # returned an input unchanged
    return True


def _glue_mode(recorder):
    from torch.utils._python_dispatch import TorchDispatchMode

    class GlueOps(TorchDispatchMode):
        """Records the aten ops run outside the Triton launches."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if recorder.launch is None and launches_kernel(func, args, kwargs, out):
                recorder.launches.append(glue_launch(func))
            return out

    return GlueOps()


def _direct_triton_calls():
    """wrap_triton's kernels called directly, not through its higher-order op (which a
    dispatch mode would have to handle): what triton_op does for plain tensors."""
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:  # older torch: wrap_triton always calls the kernel
        return contextlib.nullcontext()
    return set_wrap_triton_enabled(False)


# --------------------------------------------------------------------------- passes

def _pass_call(problem, pass_name, dtype, seed, channels_last):
    """The backend call of ``pass_name`` on fresh random full-size data."""
    import torch

    from .. import testing
    from .. import triton_backend as tb

    if pass_name not in PASSES:
        raise ValueError(f"pass_name must be one of {PASSES}; got {pass_name!r}")
    gen = torch.Generator().manual_seed(seed)
    x, w, g, b, rm, rv = testing.make_arguments(problem, dtype, channels_last=channels_last,
                                                generator=gen)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    shape = (problem.stride, problem.groups, EPS)
    if pass_name in ("eval", "train_fwd"):
        training = pass_name == "train_fwd"
        return lambda: tb.forward(x, w, g, b, rm, rv, *shape, training)

    def random(relu=False):
        t = torch.randn(problem.output_shape, generator=gen, dtype=torch.float32)
        if relu:
            t.relu_()
        return t.to(dtype).contiguous(memory_format=layout)

    dy, y = random(), random(relu=True)
    mean, var = rm.float(), rv.float()  # saved statistics: random, variances positive
    training = pass_name == "train_bwd"
    mask = (True, True, True, True) if training else (True, True, False, False)
    return lambda: tb.backward(dy, x, w, g, b, y, mean, var, *shape, training, mask)


def count_pass(problem, pass_name: str, dtype, *, waves: float = 2.0,
               warmup_waves: float = 0.5, kernel_waves=None, seed=0,
               channels_last: bool = True) -> list:
    """The :class:`counters.Launch` records of one pass of the Triton backend on
    ``problem`` (a ``testing.Problem`` at its full batch), in call order.

    ``pass_name``: "eval" (forward, running statistics), "train_fwd" (statistics pass +
    normalising pass), "train_bwd" (backward, training, all four gradients), "eval_bwd"
    (backward through an eval-mode forward, input and weight gradients). ``dtype``:
    torch.float16 or float32 (the interpreter's bf16 is broken; fp16 moves the same
    bytes). ``kernel_waves``: waves for particular kernels ({jit function name: waves},
    e.g. wgrad, whose programs each loop over hundreds of pixel tiles); their warm-up
    is at most a quarter of their window. Needs ``TRITON_INTERPRET=1`` (see
    :func:`count_pass_subprocess`)."""
    if not interpreting():
        raise RuntimeError("count_pass needs the Triton interpreter: set TRITON_INTERPRET=1 "
                           "before triton is imported, or use count_pass_subprocess")
    import torch

    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"dtype must be torch.float16 or torch.float32; got {dtype}")
    call = _pass_call(problem, pass_name, dtype, seed, channels_last)
    with _direct_triton_calls(), torch.no_grad(), \
            hooked(waves, warmup_waves, kernel_waves) as recorder, _glue_mode(recorder):
        call()
    return recorder.launches


def _child_main(path_in, path_out):
    with open(path_in, "rb") as f:
        problem, pass_name, dtype, kw = pickle.load(f)
    launches = count_pass(problem, pass_name, dtype, **kw)
    with open(path_out, "wb") as f:
        pickle.dump(launches, f, protocol=pickle.HIGHEST_PROTOCOL)


def run_in_child(problem, pass_name: str, dtype, **kw) -> list:
    """:func:`count_pass` in a child Python process with ``TRITON_INTERPRET=1``."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        path_in, path_out = os.path.join(tmp, "in.pkl"), os.path.join(tmp, "out.pkl")
        with open(path_in, "wb") as f:
            pickle.dump((problem, pass_name, dtype, kw), f)
        code = ("import sys; from resnext_kernels.bench.count_triton import _child_main; "
                "_child_main(sys.argv[1], sys.argv[2])")
        result = subprocess.run([sys.executable, "-c", code, path_in, path_out], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"count_pass in a child process failed "
                               f"(exit {result.returncode}):\n{result.stderr[-4000:]}")
        with open(path_out, "rb") as f:
            return pickle.load(f)


def count_pass_subprocess(problem, pass_name: str, dtype, **kw) -> list:
    """:func:`count_pass` here when this process interprets Triton kernels, otherwise in
    a child process with ``TRITON_INTERPRET=1`` (e.g. on a machine with a GPU)."""
    if interpreting():
        return count_pass(problem, pass_name, dtype, **kw)
    return run_in_child(problem, pass_name, dtype, **kw)
