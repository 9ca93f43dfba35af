"""``resnext-bench [check]``: checks every available backend against the float64
reference on a ResNeXt layer and times it beside PyTorch's own Conv2d +
BatchNorm2d + ReLU (cuDNN on a GPU). Exits 1 when any backend's error exceeds the
tolerance for its dtype.
"""

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from .. import available_backends, build_info, fused_group_conv_bn_relu
from ..backends import resolve, usable_backends
from ..testing import REL_TOLERANCE, Problem, make_arguments, rel_error, resnext_layers

# Grouped 3x3 layers of ResNeXt-50 32x4d (torchvision resnext50_32x4d) at 224x224:
# name -> (channels, input size, stride). groups = 32 everywhere.
RESNEXT50_LAYERS = resnext_layers(32, 4)
GROUPS = 32
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GRAD_NAMES = ("input", "weight", "bn_weight", "bn_bias")


@dataclass
class Result:
    provider: str
    mode: str
    device: str
    dtype: str
    shape: str
    time_ms: float
    rel_error: float
    worst: str
    tolerance: float

    @property
    def ok(self) -> bool:
        """PyTorch's own row is the baseline, reported but not judged."""
        return self.provider == "pytorch" or self.rel_error <= self.tolerance


def pytorch_forward(x, w, g, b, rm, rv, stride, training):
    """The unfused modules users have today: Conv2d + BatchNorm2d + ReLU."""
    conv = nn.Conv2d(x.shape[1], w.shape[0], 3, stride, 1, groups=GROUPS, bias=False,
                     device=x.device, dtype=x.dtype)
    bn = nn.BatchNorm2d(w.shape[0], device=x.device, dtype=g.dtype)
    with torch.no_grad():
        conv.weight.copy_(w)
        bn.weight.copy_(g), bn.bias.copy_(b), bn.running_mean.copy_(rm), bn.running_var.copy_(rv)
    conv.weight.requires_grad_(w.requires_grad)
    bn.train(training)
    return torch.relu(bn(conv(x))), bn, (conv.weight, bn.weight, bn.bias)


def run_once(provider, args, stride, training, grad_out):
    """One forward (+ backward in training) of ``provider``; returns the tensors to check."""
    x, w, g, b, rm, rv = [t.clone() for t in args]
    leaves = (x, w, g, b)
    for t in leaves:
        t.requires_grad_(training)
    if provider == "pytorch":
        out, bn, params = pytorch_forward(x, w, g, b, rm, rv, stride, training)
        rm, rv = bn.running_mean, bn.running_var
        leaves = (x,) + params
    else:
        out = fused_group_conv_bn_relu(x, w, g, b, rm, rv, stride=stride, groups=GROUPS,
                                       training=training, backend=provider)
    checked = {"output": out.detach()}
    if training:
        out.backward(grad_out)
        checked.update({f"grad_{n}": t.grad for n, t in zip(GRAD_NAMES, leaves)})
        checked.update(running_mean=rm, running_var=rv)
    return checked


def timed(fn, device, repeats):
    """Median wall time of ``fn`` in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def check(providers, problem, dtype, device, modes, repeats):
    gen = torch.Generator().manual_seed(0)
    args = make_arguments(problem, dtype, device, channels_last=True, generator=gen)
    args64 = [t.double() for t in args]
    grad_out = torch.randn(problem.output_shape, generator=gen).to(device, dtype)
    grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    results = []
    for mode in modes:
        training = mode == "train"
        expected = run_once("reference", args64, problem.stride, training, grad_out.double())
        for provider in providers:
            got = run_once(provider, args, problem.stride, training, grad_out)
            errors = {k: rel_error(got[k], expected[k]) for k in expected}
            worst = max(errors, key=errors.get)
            # The emulator's time says nothing about a GPU: one run, not a benchmark.
            ms = timed(lambda: run_once(provider, args, problem.stride, training, grad_out),
                       device, repeats) if provider != "cuda_emulated" else float("nan")
            results.append(Result(provider, mode,
                                  str(device), str(dtype).removeprefix("torch."),
                                  "x".join(map(str, problem.output_shape)), ms, errors[worst],
                                  worst, REL_TOLERANCE[dtype]))
    return results


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="resnext-bench check", description=__doc__)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when a GPU is visible, else cpu")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--layer", default="s2", choices=list(RESNEXT50_LAYERS),
                        help="ResNeXt-50 32x4d grouped-conv layer (default s2: 128 ch, 56x56)")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 on cuda, 2 on cpu")
    parser.add_argument("--modes", default="eval,train", help="comma list of eval,train")
    parser.add_argument("--backends", default=None,
                        help="comma list of providers (default: pytorch and every available backend)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("resnext-bench: --device cuda, but no CUDA device is visible")
    device = torch.device("cuda" if opts.device == "auto" and torch.cuda.is_available()
                          else "cpu" if opts.device == "auto" else opts.device)
    dtype = DTYPES[opts.dtype] if opts.dtype else (torch.float16 if device.type == "cuda"
                                                   else torch.float32)
    batch = opts.batch or (32 if device.type == "cuda" else 2)
    channels, size, stride = RESNEXT50_LAYERS[opts.layer]
    problem = Problem(batch, channels, channels, size, size, GROUPS, stride)
    modes = opts.modes.split(",")
    if set(modes) - {"eval", "train"}:
        raise SystemExit(f"resnext-bench: --modes takes eval and/or train; got {opts.modes}")
    probe = torch.empty(0, 0, 0, 0, device=device, dtype=dtype)
    if opts.backends:
        providers = opts.backends.split(",")
    else:
        providers = ["pytorch"] + usable_backends(probe)
    for name in providers:
        if name != "pytorch":
            try:
                resolve(name, probe)
            except (ValueError, RuntimeError) as exc:
                raise SystemExit(f"resnext-bench: error: {exc}") from None

    console = Console()
    info = build_info()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    console.print(f"resnext_kernels on {device_name}: torch {torch.__version__}, "
                  f"_C {'built' if info['native'] else 'missing'}"
                  f"{' with CUDA ' + info['cuda_version'] if info['with_cuda'] else ''}; "
                  f"available backends: {', '.join(available_backends())}")
    console.print(f"layer {opts.layer} of resnext50_32x4d: N={batch}, C={channels}, "
                  f"{size}x{size}, stride {stride}, groups {GROUPS}, {dtype}, channels_last")
    results = check(providers, problem, dtype, device, modes, opts.repeats)

    console.print(f"eval: forward; train: forward + backward. Error: ‖out − ref‖ / ‖ref‖ "
                  f"against float64, worst of the output, the 4 gradients and the running "
                  f"statistics; tolerance {REL_TOLERANCE[dtype]:.0e} ({dtype}).")
    table = Table()
    for col in ("provider", "mode", "ms", "error", "worst", "check"):
        table.add_column(col, justify="right" if col in ("ms", "error") else "left")
    for r in results:
        verdict = "baseline" if r.provider == "pytorch" else "[green]ok[/]" if r.ok else "[red]FAIL[/]"
        ms = "emulated" if r.time_ms != r.time_ms else f"{r.time_ms:.3f}"
        table.add_row(r.provider, r.mode, ms, f"{r.rel_error:.2e}", r.worst, verdict)
    console.print(table)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"build_info": info, "device": device_name,
                       "results": [asdict(r) | {"ok": r.ok, "time_ms": None if r.time_ms != r.time_ms
                                                else r.time_ms} for r in results]}, f, indent=2)
    failed = [r for r in results if not r.ok]
    if failed:
        console.print(f"[red]{len(failed)} check(s) failed[/]")
        return 1
    return 0
