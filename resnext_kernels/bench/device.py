"""``resnext-bench device``: what the device is, and the rates the performance model
needs, measured on it: copy bandwidth (read + write), the interval between
back-to-back kernel launches, the tensor-core rate of ``mma.sync`` (the project's
probe kernel: register operands, no memory traffic) and of a large bf16 GEMM
through cuBLAS (``wgmma`` on sm_90). About 30 s on a GPU.

On the CPU (``--device cpu``, the rehearsal of ``scripts/gpu_check.sh``) the same
steps run with the CPU stand-ins: the probe through the emulator with a tiny count,
a small GEMM; those figures prove the plumbing and are no rates of any GPU.
"""

import os
import platform

import torch

from .. import build_info
from ..backends import available_backends
from ..ops import PROBE_THREADS
from . import common


def parse_args(argv):
    parser = common.Parser(prog="resnext-bench device", description=__doc__)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda when a GPU is visible, else cpu")
    parser.add_argument("--quick", action="store_true", help="fewer and smaller samples")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the record as JSON")
    return parser.parse_args(argv)


def facts(device: torch.device) -> dict:
    """Name, SM count, L2, shared-memory limits, clocks and versions."""
    out = {"python": platform.python_version(), "build": build_info()}
    if device.type != "cuda":
        return {**out, "name": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    props = torch.cuda.get_device_properties(device)
    out.update(name=props.name, capability=f"{props.major}.{props.minor}",
               sm_count=props.multi_processor_count, memory_bytes=props.total_memory,
               l2_bytes=getattr(props, "L2_cache_size", None),
               shared_per_block_optin=getattr(props, "shared_memory_per_block_optin", None),
               shared_per_sm=getattr(props, "shared_memory_per_multiprocessor", None),
               registers_per_sm=getattr(props, "regs_per_multiprocessor", None),
               clock_khz=getattr(props, "clock_rate", None),
               memory_clock_khz=getattr(props, "memory_clock_rate", None),
               memory_bus_bits=getattr(props, "memory_bus_width", None),
               cudnn=torch.backends.cudnn.version())
    return out


def launch_interval_us(device: torch.device, quick: bool) -> float:
    """Microseconds per launch of a one-element kernel, many issued back to back."""
    t = torch.zeros(1, device=device)
    count = 200 if quick else 2000
    timing = common.measure(lambda i: [t.add_(1.0) for _ in range(count)], device, quick=quick)
    return timing.median_ms * 1e3 / count


def mma_sync_tflops(device: torch.device, quick: bool) -> dict:
    """The probe kernel's dense bf16 rate (2 FLOP per multiply-add)."""
    if device.type == "cuda":
        backend = "cuda"
        blocks = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        iterations = 4096 if quick else 16384
    else:
        backend = "cuda_emulated"
        blocks, iterations = 2, 2
    if backend not in available_backends():
        return {"skipped": f"backend {backend!r} is not built"}
    out = torch.empty(blocks * PROBE_THREADS, dtype=torch.float32, device=device)
    op = torch.ops.resnext_kernels.mma_probe
    macs = op(out, blocks, iterations)
    timing = common.measure(lambda i: op(out, blocks, iterations), device, quick=True)
    if not torch.isfinite(out).all():
        raise RuntimeError("the mma.sync probe wrote non-finite values")
    return {"tflops": 2 * macs / (timing.median_ms * 1e-3) / 1e12, "blocks": blocks,
            "iterations": iterations, "median_ms": timing.median_ms, "via": backend}


def gemm_tflops(device: torch.device, quick: bool) -> dict:
    """A square bf16 GEMM through torch.matmul (cuBLAS; wgmma on sm_90)."""
    size = (4096 if quick else 8192) if device.type == "cuda" else 256
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    timing = common.measure(lambda i: a @ b, device, quick=quick)
    return {"tflops": 2 * size ** 3 / (timing.median_ms * 1e-3) / 1e12, "size": size,
            "dtype": str(dtype).removeprefix("torch."), "median_ms": timing.median_ms}


def main(argv=None) -> int:
    opts = parse_args(argv)
    device = common.device_option("resnext-bench device", opts.device)
    record = {**common.environment(device), "facts": facts(device)}
    writer = common.RowWriter(record, opts.json)
    writer.flush()
    common.console.print(f"device: {record['facts']['name']}")
    measures = (("copy_gbps", lambda: common.copy_bandwidth(device, opts.quick)),
                ("launch_interval_us", lambda: launch_interval_us(device, opts.quick)),
                ("mma_sync", lambda: mma_sync_tflops(device, opts.quick)),
                ("gemm", lambda: gemm_tflops(device, opts.quick)))
    for name, fn in measures:
        value = fn()
        writer.add([{"measure": name, "value": value}])
        common.console.print(f"  {name}: {value}")
    if device.type != "cuda":
        common.console.print("(CPU stand-ins: these figures are no rates of any GPU)")
    return 0
