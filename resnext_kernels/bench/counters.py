"""What one kernel launch moves and issues, counted on the CPU: the CUDA kernels
through the host SIMT emulator (``resnext_kernels/bench/count_cuda.py``), the Triton
kernels through the interpreter (``count_triton.py``). Both give :class:`Launch`
records; :func:`l2_model` turns the sector traces of a pass's launches into DRAM
bytes. Everything here is *modelled (CPU counters), not measured*
(docs/performance-model.md).

A launch is counted on a contiguous window of its grid (warm-up blocks first, whose
accesses only prime the L2 model, then the counted blocks); every aggregate below
is over the counted blocks and ``scale`` turns it into the full grid's figure.
"""

import contextlib
import os
import sys
from dataclasses import dataclass, field

import numpy as np

SECTOR = 32  # bytes: the unit of L1/L2/DRAM transfers
LINE = 128   # bytes: an L1 cache line (one data-pipe wavefront per line a request touches)

# A wave of blocks: the H200's SMs times the blocks each holds at once. 4 is the
# minimum the CUDA kernels ask for (__launch_bounds__(128, 4)) — an assumption, not
# the occupancy of every kernel.
SMS = 132
BLOCKS_PER_SM = 4


def window_blocks(waves: float) -> int:
    """Blocks in ``waves`` waves."""
    return max(1, round(waves * SMS * BLOCKS_PER_SM))

READ, WRITE, ATOMIC = 1, 2, 4  # trace_kind bits


@dataclass
class Launch:
    backend: str                 # "cuda" (emulator) or "triton" (interpreter)
    kernel: str                  # readable name
    symbol: str                  # key into the compiled-code report (mangled name / Triton variant)
    grid: tuple                  # (x, y, z) of the full launch
    threads: int                 # threads per block (Triton: num_warps * 32)
    blocks: int                  # blocks (programs) of the full grid
    sampled_blocks: int          # blocks counted (warm-up excluded)
    scale: float                 # full-grid work / counted work: multiplies every count below
    global_requests: int = 0     # warp-level global loads/stores/atomics with >= 1 active lane
    global_sectors: int = 0      # per request, distinct 32-byte sectors, summed
    global_bytes: int = 0        # per request, distinct bytes asked for, summed
    global_wavefronts: int = 0   # per request, distinct 128-byte lines, summed (L1 pipe)
    smem_wavefronts: int = 0     # shared-memory wavefronts by the per-phase bank rules
    smem_ideal_wavefronts: int = 0  # the same accesses without bank conflicts
    mma: int = 0                 # warp-level mma instructions (Triton: 16x8x16 steps of tl.dot)
    mma_kind: str = ""           # "mma.sync" / "tl.dot" / "" (none)
    executed_macs: int = 0       # multiply-adds the tensor cores execute (padding included)
    useful_macs: int = 0         # of which both operands are non-zero
    fma: int = 0                 # scalar fp32 FMAs on CUDA cores (per lane)
    atomics: int = 0             # per-lane atomic operations
    # The per-block L1 model's output, in launch order: each block's distinct sectors
    # (first touch), warm-up blocks first.
    trace_sector: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    trace_kind: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    trace_counted: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    window_start: float = 0.0    # fraction of the grid's work before the counted window

    trace_weight: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    @classmethod
    def from_emulator(cls, r: dict) -> "Launch":
        """A record of ``resnext_kernels._C_emulated.count_end()``."""
        from .kernels import demangle

        counted = max(r["counted_blocks"], 1)
        return cls(
            backend="cuda", kernel=demangle([r["kernel"]])[0] if r["kernel"] else "?",
            symbol=r["kernel"], grid=tuple(r["grid"]), threads=r["threads"], blocks=r["blocks"],
            sampled_blocks=r["counted_blocks"], scale=r["blocks"] / counted,
            global_requests=r["global_requests"], global_sectors=r["global_sectors"],
            global_bytes=r["global_bytes"], global_wavefronts=r["global_wavefronts"],
            smem_wavefronts=r["smem_wavefronts"], smem_ideal_wavefronts=r["smem_ideal_wavefronts"],
            mma=r["mma"], mma_kind="mma.sync" if r["mma"] else "",
            executed_macs=r["executed_macs"], useful_macs=r["useful_macs"], fma=r["fma"],
            atomics=r["atomics"],
            trace_sector=np.frombuffer(r["sector"], np.int64),
            trace_kind=np.frombuffer(r["kind"], np.uint8),
            trace_counted=np.frombuffer(r["counted"], np.uint8).astype(bool),
            trace_weight=np.frombuffer(r["weight"], np.float32),
            window_start=r["window_start"])

    @property
    def weights(self) -> np.ndarray:
        """Each trace entry's multiplicity (persistent loops run cut short)."""
        if len(self.trace_weight) == len(self.trace_sector):
            return self.trace_weight.astype(np.float64)
        return np.ones(len(self.trace_sector))

    @property
    def coalescing(self) -> float:
        """Bytes asked for / bytes of the sectors fetched, over the global requests."""
        return self.global_bytes / (self.global_sectors * SECTOR) if self.global_sectors else 1.0

    @property
    def l2_bytes(self) -> float:
        """Bytes between L1 and L2 (the per-block L1 model's misses), full grid."""
        return float(self.weights[self.trace_counted].sum()) * SECTOR * self.scale


# ---- torch glue between the kernels ------------------------------------------------

# aten ops that launch nothing on a GPU by themselves (metadata, allocation, views).
_NO_LAUNCH = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "as_strided",
    "permute", "reshape", "_reshape_alias", "expand", "detach", "alias", "unbind", "select",
    "slice", "t", "transpose", "unsqueeze", "squeeze", "narrow", "contiguous", "to", "lift_fresh",
    "resolve_conj", "resolve_neg", "view_as", "split", "chunk", "flatten", "unflatten",
    "_unsafe_view", "set_", "resize_", "result_type", "is_nonzero", "size", "stride", "numel",
}


# The profiler scope of the emulated build's NaN poisoning of the buffers its kernels
# must write (csrc/conv_bn_relu.cpp): tests only, a GPU build launches nothing there.
POISON_SCOPE = "resnext_kernels::poison"


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null (C++ code writes there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def glue_launches(call, backend: str) -> list[Launch]:
    """Run ``call()`` under the profiler and return one Launch (no traffic counted, a
    launch to pay) per top-level aten op inside it that would launch a GPU kernel:
    the torch glue between a backend's kernels (not the test build's poisoning)."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])
    with _quiet_stderr():  # the profiler's own start/stop chatter
        prof.start()
    try:
        call()
    finally:
        with _quiet_stderr():
            prof.stop()
            events = prof.events()

    def base(name: str) -> str:
        return name.split("::", 1)[-1]

    def launches(event) -> bool:
        if base(event.name) not in _NO_LAUNCH:
            return True
        return any(launches(child) for child in event.cpu_children)

    out = []
    for event in events:
        parent = event.cpu_parent
        if not event.name.startswith("aten::"):
            continue
        if parent is not None and parent.name.startswith("aten::"):
            continue  # nested inside another aten op: counted with it
        if parent is not None and parent.name == POISON_SCOPE:
            continue
        if launches(event):
            out.append(Launch(backend=backend, kernel=f"torch {event.name}",
                              symbol=event.name, grid=(1, 1, 1), threads=0, blocks=1,
                              sampled_blocks=1, scale=1.0))
    return out


# ---- the L2 model ------------------------------------------------------------------

@dataclass
class Dram:
    """DRAM traffic of one launch in a pass, full grid (bytes)."""

    read: float
    write: float
    unique: float  # distinct sectors first touched by this launch in the pass: no L2 could do better

    @property
    def total(self) -> float:
        return self.read + self.write


def l2_model(launches: list, window_bytes: float) -> list:
    """The DRAM bytes of each launch of one pass, in launch order (a :class:`Dram` each).

    The launches' traces (each block's distinct sectors after the per-block L1 model)
    are laid on one clock that counts L2 traffic in bytes: a launch occupies its full
    grid's L2 traffic, and its counted window sits where it lies in the grid (the
    warm-up blocks just before it). A sector touched again within ``window_bytes`` of
    its previous touch is an L2 hit, otherwise a DRAM read; a written sector costs
    one DRAM write per ``window_bytes`` it stays unwritten (write-back). Touches by
    earlier launches of the pass count, so reuse across launches (a second pass over
    the input, the output read back by the next kernel) is seen when it is close
    enough. The first touch in a pass is a miss: other layers run in between.
    """
    sectors, clocks, kinds, weights, owner, counted = [], [], [], [], [], []
    start = 0.0
    for k, launch in enumerate(launches):
        w = launch.weights
        if len(w) == 0:
            continue
        size = SECTOR * w
        c = launch.trace_counted
        full = float(size[c].sum()) * launch.scale
        warm = float(size[~c].sum())
        local = np.cumsum(size) - size
        sectors.append(launch.trace_sector)
        clocks.append(start + launch.window_start * full - warm + local)
        kinds.append(launch.trace_kind)
        weights.append(w)
        owner.append(np.full(len(w), k))
        counted.append(c)
        start += max(full, launch.window_start * full + float(size[c].sum()))
    result = [Dram(0.0, 0.0, 0.0) for _ in launches]
    if not sectors:
        return result
    sector, clock, kind = np.concatenate(sectors), np.concatenate(clocks), np.concatenate(kinds)
    weight, owner, counted = np.concatenate(weights), np.concatenate(owner), np.concatenate(counted)
    scale = np.array([launch.scale for launch in launches])[owner]

    def misses(mask):
        """Entries (of `mask`) whose previous touch (among `mask`) is absent or too far."""
        idx = np.flatnonzero(mask)
        order = idx[np.lexsort((clock[idx], sector[idx]))]
        miss = np.ones(len(order), bool)
        same = sector[order[1:]] == sector[order[:-1]]
        near = clock[order[1:]] - clock[order[:-1]] <= window_bytes
        miss[1:] = ~(same & near)
        out = np.zeros(len(sector), bool)
        out[order] = miss
        return out

    touched = np.ones(len(sector), bool)
    read_miss = misses(touched) & ((kind & (READ | ATOMIC)) != 0)
    written = (kind & (WRITE | ATOMIC)) != 0
    write_back = misses(written) & written
    bytes_ = SECTOR * weight * scale * counted
    reads = np.bincount(owner, bytes_ * read_miss, minlength=len(launches))
    writes = np.bincount(owner, bytes_ * write_back, minlength=len(launches))
    # Unique: counted touches of sectors no earlier counted touch in the pass had.
    idx = np.flatnonzero(counted)
    order = idx[np.lexsort((clock[idx], sector[idx]))]
    first = np.ones(len(order), bool)
    first[1:] = sector[order[1:]] != sector[order[:-1]]
    unique = np.bincount(owner[order], bytes_[order] * first, minlength=len(launches))
    return [Dram(float(r), float(w), float(u)) for r, w, u in zip(reads, writes, unique)]
