"""How ``backend="auto"`` chooses when more than one backend can take a call: by
measurement, per problem, cached.

A *problem* is everything that can change which backend is fastest (``Key``): the
shapes, stride, groups, dtypes, memory format, training or eval, whether gradients
are wanted, whether statistics are synchronised over a process group, the GPU and
its SM count, the fp32 precision settings, deterministic mode and the kernels'
strategy environment variables. The first call of a new problem runs each
candidate (``make_step``: forward, plus backward when gradients are wanted, on
copies of the call's tensors) ``WARMUP`` times, then times it ``REPEATS`` times
(``cuda_event_timer``: CUDA events on the current stream) and keeps the median.
A kernel wins only when its median beats PyTorch's own path (``reference``) by
``MARGIN``; the choice is cached for the process, and with
``RESNEXT_KERNELS_CACHE_DIR`` set also on disk (``CACHE_FILE``), so a later run
skips the timing. ``auto_choices()`` lists every choice and the timings behind it.

No timing happens inside CUDA-graph capture or ``torch.compile`` tracing: there the
cached choice is used, or ``STATIC_FALLBACK`` with a warning when nothing is
cached. ``RESNEXT_AUTO=static`` turns the measuring off (the first candidate in
``backends.AUTO_ORDER`` is taken).
"""

import contextlib
import hashlib
import json
import math
import os
import statistics
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from . import reference
from ._files import replacing

MODE_VARIABLE = "RESNEXT_AUTO"
MODES = ("measure", "static")
CACHE_DIR_VARIABLE = "RESNEXT_KERNELS_CACHE_DIR"
CACHE_FILE = "auto_choices.json"
CACHE_FORMAT = 1

# A kernel replaces PyTorch's own path only when its median is at least this much
# (as a fraction of PyTorch's median) faster: within it, the two are noise apart.
MARGIN = 0.04
BASELINE = "reference"
# Where nothing can be measured (capture, compile, too little free memory, every
# candidate failed): PyTorch's own path, the one choice never slower than PyTorch.
STATIC_FALLBACK = BASELINE
WARMUP = 2
REPEATS = 5
# Timing needs about this many times the bytes of input + output free on the device
# (the output, its gradient, the input gradient and the backend's workspace).
MEMORY_FACTOR = 4
# Read by the backends at each call; each changes which passes or tiles run.
STRATEGY_VARIABLES = ("RESNEXT_TRAIN_STRATEGY", "RESNEXT_BWD_XHAT", "RESNEXT_TRITON_AUTOTUNE")
# What the timing may skip: launch errors, out-of-memory and the kernels' own
# "unsupported case" checks. Anything else is a bug and propagates.
SKIPPABLE = (RuntimeError, ValueError)
try:  # Triton's compile and resource errors (TritonError is no RuntimeError)
    from triton.errors import TritonError
except ImportError:
    pass
else:
    SKIPPABLE += (TritonError,)


def mode() -> str:
    """``RESNEXT_AUTO``: ``"measure"`` (default) or ``"static"``."""
    value = os.environ.get(MODE_VARIABLE, "measure")
    if value not in MODES:
        raise ValueError(f"{MODE_VARIABLE} must be one of {', '.join(MODES)}; got {value!r}")
    return value


@dataclass(frozen=True)
class Call:
    """The arguments of one ``fused_group_conv_bn_relu`` call, after autocast and with
    ``bn_weight`` / ``bn_bias`` materialised; ``synchronized``: training statistics
    are taken over ``process_group`` (more than one process)."""

    input: torch.Tensor
    weight: torch.Tensor
    bn_weight: torch.Tensor
    bn_bias: torch.Tensor
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    stride: int
    groups: int
    eps: float
    training: bool
    synchronized: bool = False
    process_group: object = None

    @property
    def requires_grad(self) -> bool:
        """Whether autograd will run this call's backward."""
        return torch.is_grad_enabled() and any(
            t.requires_grad for t in (self.input, self.weight, self.bn_weight, self.bn_bias))


class Key(NamedTuple):
    """What a choice is cached under (JSON-serialisable values)."""

    device: str             # GPU name ("cpu" for CPU tensors)
    sm_count: Optional[int]
    batch: Optional[int]    # None when synchronized: ranks' batches may differ in size
    in_channels: int
    out_channels: int
    height: int
    width: int
    stride: int
    groups: int
    dtype: str              # after autocast: the dtype the backends run in
    bn_dtype: str
    memory_format: str
    training: bool
    requires_grad: bool
    synchronized: bool
    deterministic: bool
    cudnn_allow_tf32: bool
    cudnn_benchmark: bool
    float32_matmul_precision: str
    strategy: tuple         # values of STRATEGY_VARIABLES (None: unset)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@lru_cache(maxsize=None)
def _device_facts(device: torch.device) -> tuple[str, Optional[int]]:
    """(name, SM count) of a CUDA device; ("cpu", None) otherwise."""
    if device.type != "cuda":
        return device.type, None
    props = torch.cuda.get_device_properties(device)
    return props.name, props.multi_processor_count


def _global_settings() -> tuple:
    """The key's last fields: process-wide settings, not the call's."""
    return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(),
            tuple(os.environ.get(name) for name in STRATEGY_VARIABLES))


def _setting_fields(key: "Key") -> tuple:
    """The fields of ``key`` that are not the call's own (device and settings)."""
    return (key.device, key.sm_count, key.deterministic, key.cudnn_allow_tf32,
            key.cudnn_benchmark, key.float32_matmul_precision, key.strategy)


def problem_key(call: Call) -> Key:
    """The cache key of ``call``."""
    x = call.input
    n, c_in, h, w = x.shape
    channels_last = reference.memory_format_of(x) == torch.channels_last
    return Key(*_device_facts(x.device), None if call.synchronized else n, c_in,
               call.weight.shape[0], h, w, call.stride, call.groups, _dtype_name(x.dtype),
               _dtype_name(call.bn_weight.dtype),
               "channels_last" if channels_last else "contiguous", call.training,
               call.requires_grad, call.synchronized, *_global_settings())


def environment() -> dict:
    """Versions a disk-cached choice is valid for (the GPU is in the key)."""
    from . import __version__, triton_backend

    triton = triton_backend.triton
    return {"resnext_kernels": __version__, "torch": torch.__version__,
            "triton": None if triton is None else triton.__version__,
            "cuda": torch.version.cuda}


def make_step(backend, call: Call) -> Callable[[], None]:
    """One run of ``backend`` on ``call``'s problem: the forward op, then, when the call
    wants gradients, its backward through ``torch.autograd.grad``.

    The user's state is never touched: tensors are detached (the op is functional, so
    they are only read), the running statistics are copies, gradients are returned
    instead of accumulated into ``.grad``, and no random numbers are drawn. With a
    process group the local (unsynchronised) op is run.
    """
    leaves = [t.detach().requires_grad_(t.requires_grad)
              for t in (call.input, call.weight, call.bn_weight, call.bn_bias)]
    running = [None if t is None else t.clone() for t in (call.running_mean, call.running_var)]
    wanted = [t for t in leaves if t.requires_grad] if call.requires_grad else []

    def step():
        # The user's saved-tensor hooks (checkpointing, offloading) stay out of it.
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            out, _, _ = backend.ops.forward(*leaves, *running, call.stride, call.groups,
                                            call.eps, call.training)
            if wanted:
                torch.autograd.grad(out, wanted, torch.ones_like(out))

    return step


def cuda_event_timer(step: Callable[[], None]) -> list[float]:
    """Milliseconds of ``REPEATS`` runs of ``step`` after ``WARMUP`` runs, from CUDA
    events recorded on the current stream (of the current device, which the selector
    sets to the input's)."""
    for _ in range(WARMUP):
        step()
    stream = torch.cuda.current_stream()
    events = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        step()
        end.record(stream)
        events.append((start, end))
    events[-1][1].synchronize()
    return [start.elapsed_time(end) for start, end in events]


def all_reduce_timings(medians: list[float], call: Call, digest: int) -> list[float]:
    """The mean over ``call.process_group`` of every rank's medians (``inf`` where a
    rank could not run a candidate), so every rank takes the same argmin. ``digest``
    names the problem: ranks that reach this with different problems raise instead of
    pairing them up (and hanging later, when their caches disagree)."""
    ends = torch.tensor([digest, -digest], dtype=torch.int64, device=call.input.device)
    dist.all_reduce(ends, op=dist.ReduceOp.MAX, group=call.process_group)
    if ends[0].item() != -ends[1].item():
        raise RuntimeError(
            "resnext_kernels: backend='auto' met different problems on the ranks of "
            "process_group at the same point (every rank must reach the same synchronised "
            "layer shapes in the same order); set RESNEXT_AUTO=static or pass an explicit "
            "backend")
    table = torch.tensor(medians, dtype=torch.float64, device=call.input.device)
    dist.all_reduce(table, group=call.process_group)
    return (table / dist.get_world_size(call.process_group)).tolist()


def free_device_memory(device: torch.device) -> Optional[int]:
    """Free bytes on a CUDA device, counting what the caching allocator holds unused;
    None (unknown, not checked) elsewhere."""
    if device.type != "cuda":
        return None
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return torch.cuda.mem_get_info(device)[0] + cached


def _is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _needed_bytes(call: Call) -> int:
    n, _, h, w = call.input.shape
    out = (n * call.weight.shape[0] * reference.output_size(h, call.stride)
           * reference.output_size(w, call.stride))
    return MEMORY_FACTOR * (call.input.numel() + out) * call.input.element_size()


def _fallback(names: list) -> str:
    return STATIC_FALLBACK if STATIC_FALLBACK in names else names[0]


def pick(timings: dict[str, Optional[float]], margin: float = MARGIN) -> Optional[str]:
    """The winner of ``timings`` (name → median ms, None or inf: not run; in candidate
    order): PyTorch's path unless a kernel is faster by ``margin``, and among the
    kernels the first in candidate order within ``margin`` of the fastest (so noise
    between two close kernels does not flip the choice). None when nothing ran."""
    ran = {name: t for name, t in timings.items() if t is not None and math.isfinite(t)}
    if not ran:
        return None
    fastest = min(ran.values())
    base = ran.get(BASELINE)
    if base is not None and fastest > base * (1 - margin):
        return BASELINE
    return next(name for name, t in ran.items() if t <= fastest * (1 + margin))


@dataclass
class Entry:
    choice: str
    source: str                                   # "measured", "disk" or "static"
    timings_ms: dict = field(default_factory=dict)  # name -> median ms (None: not run)
    skipped: dict = field(default_factory=dict)     # name -> why


class Selector:
    """The choices of one process. The timer, the candidate runner, the distributed
    agreement and the capture / compile predicates are arguments, so the selection
    logic can be tested on the CPU with timings the test controls."""

    def __init__(self, *, timer=cuda_event_timer, make_step=make_step,
                 agree=all_reduce_timings, free_memory=free_device_memory,
                 is_capturing=_is_capturing, is_compiling=torch.compiler.is_compiling):
        self.timer = timer
        self.make_step = make_step
        self.agree = agree
        self.free_memory = free_memory
        self.is_capturing = is_capturing
        self.is_compiling = is_compiling
        self.entries: dict[Key, Entry] = {}
        self._warned: set = set()

        def traced_choice(*layer):
            return self._layer_choice(*layer)

        # Run by torch.compile at trace time on constant arguments; the result is baked
        # into the graph (no timing, no graph break).
        self._traced_choice = torch.compiler.assume_constant_result(traced_choice)

    def choose(self, candidates: Sequence, call: Call):
        """The backend among ``candidates`` (in static order, at least one) for ``call``."""
        if len(candidates) == 1:
            return candidates[0]
        by_name = {b.name: b for b in candidates}
        if self.is_compiling():
            return by_name[self._traced_choice(
                ",".join(by_name), call.input.device, _dtype_name(call.input.dtype),
                _dtype_name(call.bn_weight.dtype), call.weight.shape[0], call.weight.shape[1],
                call.stride, call.groups, call.training, call.requires_grad,
                call.synchronized)]
        key = problem_key(call)
        if mode() == "static":
            return by_name[self._record(key, Entry(candidates[0].name, "static")).choice]
        entry = self.entries.get(key)
        if entry is not None and entry.source != "static":
            return by_name[entry.choice]
        if self.is_capturing(call.input.device):
            choice = self._unmeasured(list(by_name), "inside CUDA-graph capture")
            return by_name[self._record(key, Entry(choice, "static")).choice]
        return by_name[self._record(key, self._decide(key, candidates, call)).choice]

    def _record(self, key: Key, entry: Entry) -> Entry:
        self.entries[key] = entry
        return entry

    def _warn_once(self, tag, message: str) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            warnings.warn(message, stacklevel=2)

    def _unmeasured(self, names: list, where: str) -> str:
        """The choice where timing is not allowed and nothing is cached (warned once)."""
        choice = _fallback(names)
        self._warn_once("unmeasured", (
            f"resnext_kernels: backend='auto' has no measured choice for a problem {where}, "
            f"so it uses {choice!r} there; run one eager step (forward and backward, outside "
            f"capture and torch.compile) first to measure and cache the choice, or set "
            f"{CACHE_DIR_VARIABLE} to reuse an earlier run's"))
        return choice

    def _layer_choice(self, names: str, device, dtype, bn_dtype, out_channels, in_per_group,
                      stride, groups, training, requires_grad, synchronized) -> str:
        """The choice under torch.compile, where batch and image size may be symbolic:
        the one every measured problem of this layer agrees on, else the fallback."""
        names = names.split(",")
        if mode() == "static":
            return names[0]
        settings = _device_facts(device) + _global_settings()
        layer = (dtype, bn_dtype, out_channels, in_per_group * groups, stride, groups,
                 training, requires_grad, synchronized)
        found = {entry.choice for key, entry in self.entries.items()
                 if entry.source != "static" and entry.choice in names
                 and (key.dtype, key.bn_dtype, key.out_channels, key.in_channels, key.stride,
                      key.groups, key.training, key.requires_grad, key.synchronized) == layer
                 and _setting_fields(key) == settings}
        if len(found) == 1:
            return found.pop()
        return self._unmeasured(names, "while torch.compile traces")

    def _decide(self, key: Key, candidates: Sequence, call: Call) -> Entry:
        names = [b.name for b in candidates]
        stored = load_disk_entry(key, self._warn_once)
        if stored is not None and set(stored.timings_ms) != set(names):
            stored = None
        entry = stored or self._measure(candidates, call)
        if call.synchronized:
            medians = [math.inf if entry.timings_ms.get(n) is None else entry.timings_ms[n]
                       for n in names]
            digest = int.from_bytes(hashlib.sha256(
                json.dumps(key._asdict()).encode()).digest()[:7], "big")
            agreed = self.agree(medians, call, digest)
            entry.timings_ms = {n: t if math.isfinite(t) else None for n, t in zip(names, agreed)}
        choice = pick(entry.timings_ms)
        if choice is None:
            choice = _fallback(names)
            self._warn_once("none ran", (
                f"resnext_kernels: backend='auto' could time no candidate for a problem "
                f"({entry.skipped}), so it uses {choice!r} there"))
            # Retried on a later call where only memory was short (not under a process
            # group: there every rank must keep the same cache to stay in step).
            source = "static" if entry.source == "static" and not call.synchronized else "measured"
            return Entry(choice, source, entry.timings_ms, entry.skipped)
        entry.choice = choice
        if entry.source == "measured":
            store_disk_entry(key, entry, self._warn_once)
        return entry

    def _measure(self, candidates: Sequence, call: Call) -> Entry:
        entry = Entry("", "measured", {b.name: None for b in candidates})
        free = self.free_memory(call.input.device)
        if free is not None and free < _needed_bytes(call):
            entry.skipped = {b.name: f"{free} bytes free on the device" for b in candidates}
            entry.source = "static"
            return entry
        on = (torch.cuda.device(call.input.device) if call.input.device.type == "cuda"
              else contextlib.nullcontext())
        for backend in candidates:
            try:
                with on:
                    entry.timings_ms[backend.name] = statistics.median(
                        self.timer(self.make_step(backend, call)))
            except SKIPPABLE as error:
                entry.skipped[backend.name] = f"{type(error).__name__}: {error}"
                self._warn_once(("failed", backend.name), (
                    f"resnext_kernels: backend='auto' skipped {backend.name!r}, which failed "
                    f"while being timed ({type(error).__name__}: {error}); later failures of "
                    f"it are listed in resnext_kernels.auto_choices() only"))
        return entry

    def choices(self) -> list[dict]:
        """Every cached choice as a plain, JSON-serialisable dict."""
        return [{**key._asdict(), "strategy": dict(zip(STRATEGY_VARIABLES, key.strategy)),
                 "choice": entry.choice, "source": entry.source,
                 "timings_ms": dict(entry.timings_ms), "skipped": dict(entry.skipped)}
                for key, entry in self.entries.items()]


def _cache_path() -> Optional[str]:
    directory = os.environ.get(CACHE_DIR_VARIABLE)
    return os.path.join(directory, CACHE_FILE) if directory else None


def _disk_key(key: Key) -> dict:
    return {"key": json.loads(json.dumps(key._asdict())), "environment": environment()}


def _read_disk(path: str, warn) -> list:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:
        warn(("disk", path), f"resnext_kernels: ignoring the auto cache {path} ({error})")
        return []
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        warn(("disk", path), f"resnext_kernels: ignoring the auto cache {path} (not format "
                             f"{CACHE_FORMAT})")
        return []
    return data.get("entries", [])


def load_disk_entry(key: Key, warn) -> Optional[Entry]:
    """The entry stored for ``key`` under the running versions, or None."""
    path = _cache_path()
    if path is None:
        return None
    wanted = _disk_key(key)
    for item in _read_disk(path, warn):
        if {k: item.get(k) for k in wanted} == wanted:
            return Entry(item["choice"], "disk", dict(item["timings_ms"]))
    return None


def store_disk_entry(key: Key, entry: Entry, warn) -> None:
    """Add ``entry`` to the disk cache, replacing the file atomically."""
    path = _cache_path()
    if path is None:
        return
    wanted = _disk_key(key)
    kept = [item for item in _read_disk(path, warn)
            if {k: item.get(k) for k in wanted} != wanted]
    kept.append({**wanted, "choice": entry.choice, "timings_ms": entry.timings_ms})
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        with replacing(path) as f:
            json.dump({"format": CACHE_FORMAT, "entries": kept}, f, indent=1)
    except OSError as error:
        warn(("disk-write", path), f"resnext_kernels: cannot write the auto cache {path} "
                                   f"({error}); choices stay in memory")


SELECTOR = Selector()


def auto_choices() -> list[dict]:
    """What ``backend="auto"`` chose per problem in this process, with the timings
    behind it: one dict per problem with the key's fields, ``choice``, ``source``
    (``"measured"``, ``"disk"`` or ``"static"``), ``timings_ms`` (candidate → median
    milliseconds, None where it did not run) and ``skipped`` (candidate → why).
    Choices made while ``torch.compile`` traced are in the compiled graph, not here."""
    return SELECTOR.choices()
