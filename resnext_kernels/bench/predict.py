"""``resnext-bench predict``: the modelled H200 time of every kernel of every pass of
each ResNeXt-50 layer, from what the kernels were counted doing on the CPU — the CUDA
kernels through the host SIMT emulator (backend ``cuda``), the Triton kernels through
the interpreter (backend ``triton``) — and the ceilings of docs/performance-model.md.
Modelled (CPU counters), not measured. On a GPU ``--measure`` also times each pass
and kernel and prints measured / modelled.
"""

import json
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .. import testing
from .._files import replacing
from . import counters, perfmodel
from .common import DTYPES, Parser, comma_list, environment, fail

PROG = "resnext-bench predict"
# The modelled figures of the kernels in this tree, as `resnext-bench predict --json`
# wrote them (regenerated with the kernels; docs/kernels.md shows them).
MODELLED = Path(__file__).with_name("modelled_h200.json")
BACKENDS = ("cuda", "triton")
COUNTED = ("eval", "train_fwd", "train_bwd", "eval_bwd")
QUICK_LAYERS = ("s3",)
# The Triton interpreter runs each program's row walk in Python: ~0.2 s a program at
# s2 (0.2 waves of one pass: ~25 s), and each wgrad program walks two or more row tiles
# with nine products per row. So Triton is counted on fewer programs than the CUDA
# kernels (docs/performance-model.md).
TRITON_WAVES = 0.2
TRITON_KERNEL_WAVES = {"wgrad_kernel": 0.1}


def default_backends() -> list[str]:
    """Kernel backends this build can count on the CPU."""
    import importlib.util

    from .._native import build_info

    found = []
    if build_info()["emulated"]:
        found.append("cuda")
    if importlib.util.find_spec("triton") is not None:
        found.append("triton")
    return found


def parse_args(argv):
    layers = testing.resnext_layers()
    parser = Parser(prog=PROG, description=__doc__)
    parser.add_argument("--backends", default=None,
                        help=f"comma list of {', '.join(BACKENDS)} (default: those this build "
                             "can count)")
    parser.add_argument("--layers", default=None,
                        help=f"comma list of {', '.join(layers)} (default: all; --quick: "
                             f"{', '.join(QUICK_LAYERS)})")
    parser.add_argument("--passes", default=",".join(perfmodel.PASSES),
                        help=f"comma list of {', '.join(perfmodel.PASSES)}")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="input dtype (the Triton interpreter counts float16 for bfloat16: "
                             "the same bytes)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--waves", type=float, default=2.0,
                        help="waves of blocks counted per kernel (a wave: "
                             f"{counters.SMS} SMs x {counters.BLOCKS_PER_SM} blocks)")
    parser.add_argument("--triton-waves", type=float, default=TRITON_WAVES,
                        help="waves of programs counted per Triton kernel (wgrad: "
                             f"{TRITON_KERNEL_WAVES['wgrad_kernel']})")
    parser.add_argument("--quick", action="store_true",
                        help=f"layer {', '.join(QUICK_LAYERS)} only, one wave (CUDA) and half "
                             "the Triton programs: about 2 minutes on 2 cores")
    parser.add_argument("--measure", action="store_true",
                        help="on a GPU: also time every pass and kernel (measured / modelled)")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file")
    parser.add_argument("--modelled", default=None, metavar="JSON",
                        help="take the modelled rows from this JSON (an earlier --json) instead "
                             f"of counting; e.g. {MODELLED.relative_to(MODELLED.parents[2])}")
    parser.add_argument("--markdown", default=None, metavar="PATH",
                        help="also write the table as Markdown (for docs/kernels.md)")
    parser.add_argument("--no-sass", dest="sass", action="store_false",
                        help="leave out the issue ceiling (no compiled code read)")
    opts = parser.parse_args(argv)
    opts.argv = list(sys.argv[2:] if argv is None else argv)
    opts.backends = comma_list(PROG, "--backends", opts.backends, BACKENDS) \
        if opts.backends else default_backends()
    if not opts.backends:
        fail(PROG, "no kernel backend to count: build resnext_kernels._C_emulated or install "
                   "triton")
    default_layers = QUICK_LAYERS if opts.quick else tuple(layers)
    opts.layers = comma_list(PROG, "--layers", opts.layers, layers) \
        if opts.layers else list(default_layers)
    opts.passes = comma_list(PROG, "--passes", opts.passes, perfmodel.PASSES)
    if opts.batch < 1:
        fail(PROG, f"--batch must be at least 1; got {opts.batch}")
    if opts.waves <= 0 or opts.triton_waves <= 0:
        fail(PROG, f"--waves and --triton-waves must be positive; got {opts.waves} and "
                   f"{opts.triton_waves}")
    if opts.quick:
        opts.waves, opts.triton_waves = min(opts.waves, 1.0), opts.triton_waves / 2
    if opts.measure and not torch.cuda.is_available():
        fail(PROG, "--measure needs a CUDA GPU; without one predict models only")
    opts.dtype = DTYPES[opts.dtype]
    return opts


def problem_of(layer: str, batch: int) -> testing.Problem:
    channels, size, stride = testing.resnext_layers()[layer]
    return testing.Problem(batch, channels, channels, size, size, 32, stride)


def count(backend: str, problem, pass_name: str, dtype, opts) -> list:
    if backend == "cuda":
        from .count_cuda import count_pass

        return count_pass(problem, pass_name, dtype, waves=opts.waves)
    from .count_triton import count_pass_subprocess

    counted = torch.float16 if dtype == torch.bfloat16 else dtype
    return count_pass_subprocess(problem, pass_name, counted, waves=opts.triton_waves,
                                 kernel_waves=triton_kernel_waves(opts))


def triton_kernel_waves(opts) -> dict:
    """TRITON_KERNEL_WAVES scaled as --triton-waves (and --quick) scale the rest."""
    return {k: v * opts.triton_waves / TRITON_WAVES for k, v in TRITON_KERNEL_WAVES.items()}


SASS_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def compiled_code(dtype, console) -> dict:
    """Per kernel symbol, the hot-loop instruction counts of its compiled code (sm_90;
    Triton in ``dtype``, as it would run). An empty dict, with a note, when no
    compiled code can be read: the issue ceiling is then left out."""
    try:
        from . import sass

        with console.status("reading the compiled kernels (SASS; cached after the first run)"):
            report = sass.report(dtypes=(SASS_DTYPES[dtype],))
    except Exception as exc:  # noqa: BLE001  (no toolkit, no cuobjdump, no CUDA build ...)
        console.print(f"[yellow]no compiled code read ({type(exc).__name__}: {exc}): the issue "
                      "ceiling is left out[/yellow]")
        return {}
    return sass.table(report, SASS_DTYPES[dtype])


def measure_pass(backend: str, problem, pass_name: str, dtype) -> dict:
    """GPU: the pass's median time (CUDA events) and each kernel's (profiler), in ms."""
    from torch.profiler import ProfilerActivity, profile

    from .count_cuda import backend_ops, pass_call

    call = pass_call(backend_ops(backend), problem, pass_name, dtype, device="cuda")
    for _ in range(3):
        call()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels = [(e.name, e.time_range.elapsed_us() / 1e3) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"measured_ms": sorted(times)[len(times) // 2], "measured_kernels": kernels}


def attach_measured(row: dict) -> None:
    """Put each measured kernel time beside the modelled kernel it belongs to, in
    launch order (CUDA: the same demangled name; Triton: the jit function's name);
    what matches no modelled kernel (the torch glue's own kernels) is summed apart."""
    pending = list(row.get("measured_kernels", []))
    for kernel in row["kernels"]:
        for i, (name, ms) in enumerate(pending):
            if name == kernel["kernel"] or kernel["kernel"].startswith(name + "("):
                kernel["measured_ms"] = ms
                kernel["measured_over_modeled"] = ms / kernel["modeled_ms"]
                del pending[i]
                break
    row["measured_other_ms"] = sum(ms for _, ms in pending)


def cells(r: dict) -> list[str]:
    smem = (f"{r['smem_wavefronts'] / r['smem_ideal_wavefronts']:.2f}x"
            if r["smem_ideal_wavefronts"] else "-")
    return [r["layer"], r["backend"], r["pass"], f"{r['floor_ms']:.3f}", f"{r['modeled_ms']:.3f}",
            f"{r['ratio']:.1f}", r["bound"],
            f"{r['dram_bytes'] / 1e6:.0f} / {r['unique_bytes'] / 1e6:.0f}",
            f"{r['coalescing']:.0%}", smem, str(r["launches"])]


COLUMNS = ("layer", "backend", "pass", "floor ms", "modelled ms", "ratio", "bound",
           "DRAM / unique MB", "coalescing", "smem wf / ideal", "launches")


def markdown(rows) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def show(console, rows, title):
    table = Table(title=title)
    for col in COLUMNS + ("measured ms",):
        table.add_column(col, justify="left" if col in ("layer", "backend", "pass", "bound")
                         else "right")
    for r in rows:
        table.add_row(*cells(r), f"{r['measured_ms']:.3f}" if "measured_ms" in r else "-")
    console.print(table)


def load_modelled(path, layers, backends, passes, dtype, batch) -> list[dict]:
    """The rows of an earlier ``--json`` matching the selection (in its order)."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    name = str(dtype).replace("torch.", "")
    return [r for r in rows if r["layer"] in layers and r["backend"] in backends and
            r["pass"] in passes and r["dtype"] == name and r["batch"] == batch]


def main(argv=None) -> int:
    opts = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    started = time.monotonic()
    if opts.modelled:
        rows = load_modelled(opts.modelled, opts.layers, opts.backends, opts.passes, opts.dtype,
                             opts.batch)
        if not rows:
            fail(PROG, f"{opts.modelled} has no rows for this selection")
        if opts.measure:
            measured = {}
            for row in rows:
                if row["pass"] == "train_step":
                    continue
                row.update(measure_pass(row["backend"], problem_of(row["layer"], opts.batch),
                                        row["pass"], opts.dtype))
                row["measured_over_modeled"] = row["measured_ms"] / row["modeled_ms"]
                attach_measured(row)
                measured[(row["layer"], row["backend"], row["pass"])] = row["measured_ms"]
            for row in rows:  # train_step: the sum of its two passes
                parts = [measured.get((row["layer"], row["backend"], p)) for p in perfmodel.STEP]
                if row["pass"] == "train_step" and None not in parts:
                    row["measured_ms"] = sum(parts)
                    row["measured_over_modeled"] = row["measured_ms"] / row["modeled_ms"]
        return report(console, opts, rows, started, "read from " + opts.modelled)
    sass = compiled_code(opts.dtype, console) if opts.sass else {}
    counted = [p for p in COUNTED if p in opts.passes or
               (p in perfmodel.STEP and "train_step" in opts.passes)]
    # The Triton counts run in child processes (the interpreter), one after another on
    # a worker thread, while this thread counts the CUDA kernels: both cores busy.
    jobs = [(layer, backend, pass_name) for layer in opts.layers for backend in opts.backends
            for pass_name in counted]

    def counted_launches(job):
        layer, backend, pass_name = job
        tic = time.monotonic()
        launches = count(backend, problem_of(layer, opts.batch), pass_name, opts.dtype, opts)
        seconds = time.monotonic() - tic
        console.print(f"counted {backend} {layer} {pass_name}: {len(launches)} launches in "
                      f"{seconds:.0f} s")
        return launches, seconds

    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = {job: worker.submit(counted_launches, job) for job in jobs
                   if job[1] == "triton"}
        results = {job: pending[job] if job in pending else counted_launches(job)
                   for job in jobs}
        results = {job: r.result() if isinstance(r, Future) else r for job, r in results.items()}
    rows = []
    for layer in opts.layers:
        problem = problem_of(layer, opts.batch)
        for backend in opts.backends:
            by_pass = {}
            for pass_name in counted:
                launches, seconds = results[(layer, backend, pass_name)]
                kernels = perfmodel.model_pass(launches, sass)
                row = perfmodel.pass_row(layer, backend, pass_name, problem, opts.dtype, kernels)
                row["count_seconds"] = seconds
                if opts.measure:
                    row.update(measure_pass(backend, problem, pass_name, opts.dtype))
                    row["measured_over_modeled"] = row["measured_ms"] / row["modeled_ms"]
                    attach_measured(row)
                by_pass[pass_name] = row
            if "train_step" in opts.passes:
                by_pass["train_step"] = perfmodel.step_row(by_pass["train_fwd"],
                                                           by_pass["train_bwd"])
            rows += [by_pass[p] for p in opts.passes if p in by_pass]
    return report(console, opts, rows, started, "counted")


def show_kernels(console, rows):
    """Measured against modelled, kernel by kernel."""
    table = Table(title="measured / modelled per kernel")
    for col in ("layer", "backend", "pass", "kernel", "bound", "modelled ms", "measured ms",
                "measured / modelled"):
        table.add_column(col, justify="right" if "ms" in col or "/" in col else "left")
    for r in rows:
        for k in r["kernels"]:
            if "measured_ms" in k:
                table.add_row(r["layer"], r["backend"], r["pass"], k["kernel"][:60], k["bound"],
                              f"{k['modeled_ms']:.4f}", f"{k['measured_ms']:.4f}",
                              f"{k['measured_over_modeled']:.2f}")
    console.print(table)


def report(console, opts, rows, started, how) -> int:
    elapsed = time.monotonic() - started
    dtype = str(opts.dtype).replace("torch.", "")
    console.print(f"Every figure below is {perfmodel.LABEL}" +
                  (", except the measured ones (this GPU)." if opts.measure else "."),
                  soft_wrap=True)
    show(console, rows, f"H200 time per pass, batch {opts.batch}, {dtype}")
    if opts.measure:
        show_kernels(console, rows)
    console.print(f"reference bytes per pass: {perfmodel.REFERENCE_NOTE}; ratio = modelled / "
                  f"reference time at {perfmodel.H200['dram_bandwidth'].value / 1e12:.1f} TB/s; "
                  f"{how} in {elapsed:.0f} s.")
    if opts.markdown:
        with replacing(opts.markdown) as f:
            f.write(markdown(rows))
    if opts.json:
        doc = {"label": perfmodel.LABEL, "command": " ".join(["resnext-bench", "predict"] +
                                                              opts.argv),
               "model": perfmodel.constants(), "waves": opts.waves,
               "triton_waves": opts.triton_waves, "triton_kernel_waves": triton_kernel_waves(opts),
               "environment": environment(torch.device("cuda" if opts.measure else "cpu")),
               "rows": rows}
        with replacing(opts.json) as f:
            json.dump(doc, f, indent=1)
    return 0
