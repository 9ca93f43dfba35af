"""Shared pieces of the ``resnext-bench`` subcommands: option parsing with one-line
errors, devices, layer shapes, providers, timing, bytes and FLOPs, and the
JSON / CSV / plot writers."""

import argparse
import csv
import datetime
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from .. import auto_choices, build_info, fused_group_conv_bn_relu, triton_backend
from .._files import replacing
from ..backends import BACKEND_NAMES, resolve, usable_backends
from ..testing import Problem, make_arguments, resnext_layers

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
# Model name -> (cardinality, width): torchvision's ResNeXt settings.
MODELS = {"resnext50_32x4d": (32, 4), "resnext101_32x8d": (32, 8), "resnext101_64x4d": (64, 4)}
MODES = ("eval", "train", "train-backward")
# Providers besides our backends: PyTorch's own modules (cuDNN on a GPU) and
# torch.compile of the same modules.
BASELINES = ("pytorch", "compile")
# Backends that are test vehicles: their errors are checked, their times never taken
# (the emulator; Triton under its CPU interpreter).
UNTIMED = ("cuda_emulated",) + (("triton",) if triton_backend.INTERPRET else ())

# Wide enough for the layer table when the output is a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 150)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the option and the allowed values), no usage dump."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def fail(prog: str, message: str):
    """A one-line error for an option whose value argparse cannot check."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def comma_list(prog: str, option: str, value: str, allowed) -> list[str]:
    items = [v for v in value.split(",") if v]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        fail(prog, f"{option}: invalid value {value!r}; choose from {', '.join(allowed)} "
                   "(comma-separated)")
    return items


def add_common_options(parser: Parser, *, modes_default: str = "eval") -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when a GPU is visible, else cpu")
    parser.add_argument("--model", default="resnext50_32x4d", choices=list(MODELS))
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--memory-format", default="channels_last", choices=list(MEMORY_FORMATS))
    parser.add_argument("--batch", type=int, default=None,
                        help="default: 256 on cuda, 2 on cpu")
    parser.add_argument("--image", type=int, default=None,
                        help="image size the layer shapes follow (default 224; 64 with --quick "
                             "on cpu)")
    parser.add_argument("--mode", default=modes_default,
                        help=f"comma list of {', '.join(MODES)} (default {modes_default})")
    parser.add_argument("--backends", default=None,
                        help="comma list of providers: pytorch, compile and backends "
                             "(default: pytorch, compile on cuda, every usable backend)")
    parser.add_argument("--layers", default=None, help="comma list of layer names (default all)")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and few repeats: under a minute on a 2-core CPU")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--csv", default=None, metavar="PATH", help="write the rows as CSV")


@dataclass
class Setup:
    """What the common options resolve to."""

    device: torch.device
    dtype: torch.dtype
    memory_format: torch.memory_format
    batch: int
    image: int
    modes: list
    providers: list
    layers: dict  # name -> Problem
    model: str
    quick: bool


def device_option(prog: str, value: str) -> torch.device:
    """The device of ``--device`` (auto: cuda when a GPU is visible, else cpu)."""
    if value == "cuda" and not torch.cuda.is_available():
        fail(prog, "--device cuda: no CUDA device is visible")
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(value)


def resolve_options(prog: str, opts, *, default_providers: Optional[Callable] = None) -> Setup:
    device = device_option(prog, opts.device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[opts.dtype] if opts.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    batch = opts.batch or (256 if on_gpu else 2)
    image = opts.image or (64 if opts.quick and not on_gpu else 224)
    for option, value, low in (("--batch", batch, 1), ("--image", image, 32)):
        if value < low:
            fail(prog, f"{option} must be at least {low}; got {value}")
    modes = comma_list(prog, "--mode", opts.mode, MODES)
    probe = torch.empty(0, 0, 0, 0, device=device, dtype=dtype)
    if opts.backends:
        providers = comma_list(prog, "--backends", opts.backends, BASELINES + BACKEND_NAMES)
        for name in providers:
            if name not in BASELINES:
                try:
                    resolve(name, probe)
                except (ValueError, RuntimeError) as exc:
                    fail(prog, f"--backends: {exc}")
    elif default_providers is not None:
        providers = default_providers(device, probe)
    else:
        providers = ["pytorch"] + (["compile", "auto"] if on_gpu else []) + usable_backends(probe)
    cardinality, width = MODELS[opts.model]
    shapes = resnext_layers(cardinality, width, image)
    names = comma_list(prog, "--layers", opts.layers, list(shapes)) if opts.layers else list(shapes)
    layers = {name: Problem(batch, shapes[name][0], shapes[name][0], shapes[name][1],
                            shapes[name][1], cardinality, shapes[name][2]) for name in names}
    return Setup(device, dtype, MEMORY_FORMATS[opts.memory_format], batch, image, modes,
                 providers, layers, opts.model, opts.quick)


def environment(device: torch.device) -> dict:
    """The JSON header: what ran where."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = build_info()
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "resnext_kernels": {k: info[k] for k in ("native", "emulated", "kernel_families",
                                                 "cuda_archs") if k in info},
        "command": " ".join(["resnext-bench"] + sys.argv[1:]),
    }


# ---- problems, bytes, FLOPs ---------------------------------------------------

def tensor_bytes(problem: Problem, dtype: torch.dtype) -> tuple[int, int]:
    """(input bytes, output bytes) of one call."""
    size = torch.empty(0, dtype=dtype).element_size()
    n, c_out, h_out, w_out = problem.output_shape
    return problem.n * problem.c_in * problem.h * problem.w * size, n * c_out * h_out * w_out * size


def floor_bytes(problem: Problem, dtype: torch.dtype, mode: str) -> int:
    """The fewest bytes a fused implementation must move (docs/benchmarks.md):
    eval in + out; training forward min(in + 3·out, 2·in + out) (the two strategies:
    raw output then normalise, or statistics then recompute); backward 2·in + 4·out
    (dy and y for the sums; dy, y and x again for dx and dw; dx written)."""
    inp, out = tensor_bytes(problem, dtype)
    if mode == "eval":
        return inp + out
    forward = min(inp + 3 * out, 2 * inp + out)
    return forward if mode == "train" else forward + 2 * inp + 4 * out


def flops(problem: Problem, mode: str) -> int:
    """2·MACs of the conv; training backward adds dgrad and wgrad (3× in all)."""
    n, c_out, h_out, w_out = problem.output_shape
    conv = 2 * n * h_out * w_out * c_out * 9 * problem.c_in // problem.groups
    return 3 * conv if mode == "train-backward" else conv


# ---- providers -----------------------------------------------------------------

GRAD_NAMES = ("input", "weight", "bn_weight", "bn_bias")


def pytorch_modules(problem: Problem, args, device) -> nn.Module:
    """Conv2d + BatchNorm2d + ReLU holding ``args``' parameters (BN in the parameters' dtype)."""
    x, w, g, b, rm, rv = args
    conv = nn.Conv2d(problem.c_in, problem.c_out, 3, problem.stride, 1, groups=problem.groups,
                     bias=False, device=device, dtype=x.dtype)
    bn = nn.BatchNorm2d(problem.c_out, device=device, dtype=g.dtype)
    with torch.no_grad():
        conv.weight.copy_(w)
        bn.weight.copy_(g), bn.bias.copy_(b), bn.running_mean.copy_(rm), bn.running_var.copy_(rv)
    return nn.Sequential(conv, bn, nn.ReLU())


class Provider:
    """One implementation of the layer for one mode: ``run(args)`` does the work being
    timed and returns the tensors to check (output, and gradients in train-backward)."""

    def __init__(self, name: str, problem: Problem, args, mode: str, device, grad_out,
                 compile_mode: str = "max-autotune"):
        self.name, self.problem, self.mode, self.grad_out = name, problem, mode, grad_out
        self.training = mode != "eval"
        self.modules = None
        if name in BASELINES:
            self.modules = pytorch_modules(problem, args, device).train(self.training)
            if name == "compile":
                self.modules = torch.compile(self.modules, mode=compile_mode)

    def run(self, args):
        x, w, g, b, rm, rv = args
        backward = self.mode == "train-backward"
        with torch.set_grad_enabled(backward):
            if self.modules is not None:
                leaves = [x.detach().requires_grad_(backward)]
                out = self.modules(leaves[0])
                leaves += list(self.modules.parameters())  # conv weight, bn weight, bn bias
            else:
                leaves = [t.detach().requires_grad_(backward) for t in (x, w, g, b)]
                out = fused_group_conv_bn_relu(*leaves, rm, rv, stride=self.problem.stride,
                                               groups=self.problem.groups,
                                               training=self.training, backend=self.name)
            if not backward:
                return {"output": out}
            for t in leaves:
                t.grad = None
            out.backward(self.grad_out)
        return {"output": out.detach(),
                **{f"grad_{n}": t.grad for n, t in zip(GRAD_NAMES, leaves)}}


def argument_sets(problem: Problem, dtype, device, memory_format, count: int, seed: int = 0):
    """``count`` independent random argument sets (rotated so caches do not flatter)."""
    gen = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(count):
        args = list(make_arguments(problem, dtype, device, generator=gen))
        args[0] = args[0].contiguous(memory_format=memory_format)
        sets.append(args)
    return sets


def rotation(problem: Problem, dtype, device) -> int:
    """How many argument sets to rotate through so one pass over them exceeds twice
    the L2 cache (GPU); 1 on the CPU."""
    if device.type != "cuda":
        return 1
    inp, out = tensor_bytes(problem, dtype)
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(8, math.ceil(2 * l2 / (inp + out))))


@dataclass
class Timing:
    median_ms: float
    q1_ms: float
    q3_ms: float
    samples: int


def measure(fn: Callable[[int], object], device, *, quick: bool) -> Timing:
    """Times ``fn(i)`` (i counts calls, for rotating inputs): CUDA events per call on a
    GPU after a warm-up of ≥ 5 calls / 50 ms; a monotonic clock with warm-up on the CPU.
    Median and quartiles of the samples."""
    cuda = device.type == "cuda"
    warmup, budget, low, high = (2, 0.05, 3, 5) if quick else (5, 0.25, 10, 100)
    if not cuda:
        warmup, budget, low, high = (1, 0.2, 3, 3) if quick else (2, 1.0, 5, 20)
    start = time.perf_counter()
    i = 0
    while i < warmup or (cuda and time.perf_counter() - start < 0.05):
        fn(i)
        i += 1
    if cuda:
        torch.cuda.synchronize(device)
    samples, spent = [], 0.0
    while len(samples) < low or (len(samples) < high and spent < budget):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(i)
            end.record()
            end.synchronize()
            ms = begin.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn(i)
            ms = (time.perf_counter() - t0) * 1e3
        samples.append(ms)
        spent += ms / 1e3
        i += 1
    q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
    return Timing(statistics.median(samples), q1, q3, len(samples))


def copy_bandwidth(device, quick: bool) -> float:
    """Device copy bandwidth in GB/s (read + write bytes per second) measured now."""
    numel = (64 << 20 if device.type == "cuda" and not quick else 16 << 20) * (
        8 if device.type == "cuda" else 1)
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = measure(lambda i: dst.copy_(src), device, quick=quick)
    return 2 * src.numel() * 4 / (timing.median_ms * 1e-3) / 1e9


# ---- output ---------------------------------------------------------------------

def show_auto_choices() -> list[dict]:
    """Prints what ``backend="auto"`` chose per problem in this run and returns it
    (``resnext_kernels.auto_choices()``; nothing when auto did not run)."""
    choices = auto_choices()
    if not choices:
        return choices
    table = Table(title='backend="auto": the choice per problem and the median ms behind it')
    for col in ("problem", "mode", "choice", "source", "timings (ms)"):
        table.add_column(col)
    for c in choices:
        mode = ("train" if c["training"] else "eval") + ("+backward" if c["requires_grad"] else "")
        timings = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} —"
                            for k, v in c["timings_ms"].items())
        table.add_row(f"N={c['batch']} C={c['in_channels']} {c['height']}x{c['width']} "
                      f"s{c['stride']} g{c['groups']} {c['dtype']}", mode, c["choice"],
                      c["source"], timings or "—")
    console.print(table)
    return choices


class RowWriter:
    """Writes ``--json`` and ``--csv`` as the rows come: after every ``add`` both files
    hold every row so far (each rewritten whole, through a temporary file and a
    rename), so a run that is cut short still leaves the rows it finished."""

    def __init__(self, header: dict, json_path=None, csv_path=None):
        self.json_path, self.csv_path = json_path, csv_path
        self.header = header
        self.rows: list[dict] = []

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        self.flush()

    def flush(self) -> None:
        if self.json_path:
            with replacing(self.json_path) as f:
                json.dump({**self.header, "rows": self.rows}, f, indent=1)
        if self.csv_path and self.rows:
            fields = list(dict.fromkeys(k for row in self.rows for k in row))
            with replacing(self.csv_path, newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(self.rows)

