"""The H200 performance model of ``resnext-bench predict``: ceilings over the counted
launches (counters.py), the reference bytes of each pass, and the rows of the JSON.
Every figure it gives is *modelled (CPU counters), not measured*
(docs/performance-model.md has the method and what it cannot see)."""

from dataclasses import dataclass

import torch

from .. import testing
from .counters import Launch, l2_model

LABEL = "modelled (CPU counters), not measured"
MIB = 1 << 20


@dataclass(frozen=True)
class Constant:
    value: float
    unit: str
    source: str


# The H200 (SXM, 132 SMs) in one place, each figure with where it comes from.
H200 = {
    "dram_bandwidth": Constant(4.3e12, "B/s", "measured: device-to-device copy, read + write "
                               "(shared/NOTES.md §4); `resnext-bench device` re-measures it"),
    "l2_bandwidth": Constant(10e12, "B/s", "assumption: L2 -> SM, as in the counter study "
                             "(NOTES §7); calibrate on a GPU"),
    "l2_windows": Constant(50 * MIB, "B", "about 50 MB of L2 enabled, in two partitions "
                           "(NOTES §4); the 25 MiB figure is reported beside it"),
    "sms": Constant(132, "SMs", "datasheet"),
    "clock": Constant(1.83e9, "Hz", "assumption: sustained SM clock under load (boost 1.98 GHz)"),
    "l1_wavefronts_per_clock": Constant(1, "per SM", "the L1/shared data pipe: one wavefront "
                                        "(shared) or one 128-byte line (global) per clock"),
    "issue_per_clock": Constant(4, "warp instructions per SM", "4 schedulers, 1 each per clock"),
    "fp32_fma_rate": Constant(33.5e12, "FMA/s", "datasheet: 67 TFLOP/s fp32"),
    "mma_sync_rate": Constant(0.6 * 989e12 / 2, "MAC/s", "assumption: mma.sync at ~60 % of the "
                              "989 TFLOP/s dense bf16/fp16 peak (public Hopper benchmarks: "
                              "50-65 %)"),
    "wgmma_rate": Constant(989e12 / 2, "MAC/s", "datasheet: dense bf16/fp16 peak (wgmma, "
                           "Triton's tl.dot on sm_90)"),
    "launch_overhead": Constant(2.5e-6, "s", "assumption: per kernel launch, back to back in a "
                                "stream; `resnext-bench device` measures the launch interval"),
}

CEILINGS = ("dram", "l2", "l1", "tensor", "fma", "issue")

# Reference bytes of each pass, in units of (input bytes, output bytes): yardsticks,
# not lower bounds (a clever pass may go below them).
REFERENCE = {
    "eval": (1, 1),
    "train_fwd": (2, 1),
    "train_bwd": (3, 4),
    "eval_bwd": (2, 2),
}
REFERENCE_NOTE = ("eval in+out, train_fwd 2in+out, train_bwd 3in+4out, eval_bwd 2in+2out, "
                  "train_step train_fwd+train_bwd")
PASSES = ("eval", "train_fwd", "train_bwd", "eval_bwd", "train_step")
STEP = ("train_fwd", "train_bwd")  # train_step = their sum


def constants() -> dict:
    return {name: {"value": c.value, "unit": c.unit, "source": c.source}
            for name, c in H200.items()}


def reference_bytes(problem: testing.Problem, dtype: torch.dtype, pass_name: str) -> int:
    """The pass's reference bytes (``floor_bytes`` in the JSON)."""
    size = torch.empty(0, dtype=dtype).element_size()
    n, c_out, h_out, w_out = problem.output_shape
    inp = problem.n * problem.c_in * problem.h * problem.w * size
    out = n * c_out * h_out * w_out * size
    if pass_name == "train_step":
        return sum(reference_bytes(problem, dtype, p) for p in STEP)
    a, b = REFERENCE[pass_name]
    return a * inp + b * out


def useful_conv_macs(problem: testing.Problem) -> int:
    n, c_out, h_out, w_out = problem.output_shape
    return n * h_out * w_out * c_out * 9 * problem.c_in // problem.groups


def kernel_row(launch: Launch, dram25, dram50, sass: dict) -> dict:
    """The figures and ceilings of one launch (full grid)."""
    h = {k: c.value for k, c in H200.items()}
    s = launch.scale
    pipe = h["sms"] * h["clock"]
    info = sass.get(launch.symbol) or {}
    # The compiled code decides: its mma opcode (HGMMA is wgmma), and how many warps
    # issue each tile the counters counted once (sass.mma_replication).
    compiled_kind = info.get("hmma_kind")
    wgmma = (compiled_kind.startswith("HGMMA") if compiled_kind
             else launch.mma_kind == "tl.dot")
    mma_rate = h["wgmma_rate"] if wgmma else h["mma_sync_rate"]
    repeat = info.get("mma_replication") or 1.0
    issue = 0.0
    if launch.mma and info.get("instructions_per_mma"):
        issue = launch.mma * repeat * s * info["instructions_per_mma"]
        # A loop of an nvcc kernel whose mma ran at most once a warp is a retry
        # (the packed kernels' reruns of a block with a non-finite result), not a hot
        # loop: the code around it ran as often, so the whole kernel is charged.
        whole_hmma = (info.get("counts") or {}).get("HMMA")
        warps = launch.sampled_blocks * launch.threads / 32
        if (launch.backend == "cuda" and info.get("loop") and whole_hmma
                and launch.mma <= warps * whole_hmma):
            issue = launch.mma * s * info["instructions"] / whole_hmma
    elif launch.fma and info.get("instructions_per_fma"):
        issue = launch.fma / 32 * s * info["instructions_per_fma"]
    times = {
        "dram": dram50.total / h["dram_bandwidth"],
        "l2": launch.l2_bytes / h["l2_bandwidth"],
        "l1": (launch.global_wavefronts + launch.smem_wavefronts) * s
        / (pipe * h["l1_wavefronts_per_clock"]),
        "tensor": launch.executed_macs * repeat * s / mma_rate,
        "fma": launch.fma * s / h["fp32_fma_rate"],
        "issue": issue / (pipe * h["issue_per_clock"]),
    }
    bound = max(CEILINGS, key=lambda k: times[k])
    launches = 1
    modeled = times[bound] + launches * h["launch_overhead"]
    if times[bound] == 0.0:
        bound = "launch"  # torch glue: nothing counted but the launch
    return {
        "kernel": launch.kernel, "symbol": launch.symbol, "grid": list(launch.grid),
        "threads": launch.threads, "blocks": launch.blocks, "sampled_blocks": launch.sampled_blocks,
        "dram_bytes": dram50.total, "dram_bytes_25mib": dram25.total,
        "dram_read_bytes": dram50.read, "dram_write_bytes": dram50.write,
        "unique_bytes": dram50.unique, "l2_bytes": launch.l2_bytes,
        "global_requests": launch.global_requests * s, "coalescing": launch.coalescing,
        "global_bytes": launch.global_bytes * s, "global_sector_bytes": launch.global_sectors * 32 * s,
        "smem_wavefronts": launch.smem_wavefronts * s,
        "smem_ideal_wavefronts": launch.smem_ideal_wavefronts * s,
        "mma": launch.mma * s, "mma_kind": launch.mma_kind, "mma_replication": repeat,
        "mma_rate": "wgmma" if wgmma else "mma.sync",
        "executed_macs": launch.executed_macs * s, "useful_macs": launch.useful_macs * s,
        "fma": launch.fma * s, "atomics": launch.atomics * s,
        "issue_instructions": issue,
        "instructions_per_mma": info.get("instructions_per_mma"),
        "instructions_per_fma": info.get("instructions_per_fma"),
        "launches": launches,
        "ceilings_ms": {k: v * 1e3 for k, v in times.items()},
        "modeled_ms": modeled * 1e3, "bound": bound,
    }


SUMMED = ("dram_bytes", "dram_bytes_25mib", "unique_bytes", "l2_bytes", "smem_wavefronts",
          "smem_ideal_wavefronts", "mma", "executed_macs", "useful_macs", "fma", "atomics",
          "issue_instructions", "launches", "modeled_ms", "global_bytes", "global_sector_bytes")


def short_name(kernel: str) -> str:
    """A kernel's name without return type, namespace, template and arguments."""
    name = kernel.removeprefix("void ").removeprefix("rk::detail::")
    return name.split("<")[0].split("(")[0]


def bound_of(kernels: list[dict]) -> str:
    """The ceiling of the slowest kernel, and which kernel it is."""
    if not kernels:
        return "-"
    slowest = max(kernels, key=lambda k: k["modeled_ms"])
    return f"{slowest['bound']} ({short_name(slowest['kernel'])})"


def pass_row(layer: str, backend: str, pass_name: str, problem: testing.Problem,
             dtype: torch.dtype, kernels: list[dict]) -> dict:
    """One layer x backend x pass: the sums of its kernel rows against the reference."""
    floor = reference_bytes(problem, dtype, pass_name)
    floor_ms = floor / H200["dram_bandwidth"].value * 1e3
    row = {"layer": layer, "backend": backend, "pass": pass_name,
           "dtype": str(dtype).replace("torch.", ""), "batch": problem.n,
           "floor_bytes": floor, "floor_ms": floor_ms}
    for key in SUMMED:
        row[key] = sum(k[key] for k in kernels)
    row["coalescing"] = (row["global_bytes"] / row["global_sector_bytes"]
                         if row["global_sector_bytes"] else 1.0)
    row["ratio"] = row["modeled_ms"] / floor_ms
    row["bound"] = bound_of(kernels)
    row["label"] = LABEL
    row["kernels"] = kernels
    return row


def model_pass(launches: list[Launch], sass: dict) -> list[dict]:
    """Kernel rows of one counted pass (the L2 model runs over the whole pass)."""
    window = H200["l2_windows"].value
    dram50 = l2_model(launches, window)
    dram25 = l2_model(launches, window / 2)
    return [kernel_row(launch, d25, d50, sass)
            for launch, d25, d50 in zip(launches, dram25, dram50)]


def step_row(fwd: dict, bwd: dict) -> dict:
    """train_step: the sum of the train_fwd and train_bwd rows."""
    row = {k: v for k, v in fwd.items() if not k.startswith("measured") and k != "count_seconds"}
    row["pass"] = "train_step"
    for key in SUMMED + ("floor_bytes", "floor_ms"):
        row[key] = fwd[key] + bwd[key]
    if "measured_ms" in fwd and "measured_ms" in bwd:
        row["measured_ms"] = fwd["measured_ms"] + bwd["measured_ms"]
        row["measured_over_modeled"] = row["measured_ms"] / row["modeled_ms"]
    row["coalescing"] = (row["global_bytes"] / row["global_sector_bytes"]
                         if row["global_sector_bytes"] else 1.0)
    row["ratio"] = row["modeled_ms"] / row["floor_ms"]
    row["kernels"] = fwd["kernels"] + bwd["kernels"]
    row["bound"] = bound_of(row["kernels"])
    return row
