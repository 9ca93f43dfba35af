"""``resnext-bench [layers]``: every grouped-conv layer of a ResNeXt, each provider
side by side — PyTorch's Conv2d + BatchNorm2d + ReLU (cuDNN on a GPU),
``torch.compile`` of the same modules, and each of our backends. Per row: median
time and quartiles, the floor's bytes, GB/s and % of the memory floor (against the
copy bandwidth measured in the same run), TFLOP/s, speedup over PyTorch, and the
error against the float64 reference. Exits 1 when one of our backends is outside
its tolerance (see ``resnext-bench validate`` for the full check).
"""

import torch
from rich.progress import Progress
from rich.table import Table

from ..testing import REL_TOLERANCE, rel_error
from . import common
from .plots import plot_layers


def parse_args(argv):
    parser = common.Parser(prog="resnext-bench layers", description=__doc__)
    common.add_common_options(parser)
    parser.add_argument("--compile-mode", default=None,
                        choices=["default", "reduce-overhead", "max-autotune",
                                 "max-autotune-no-cudagraphs"],
                        help="torch.compile mode of the 'compile' provider (default "
                             "max-autotune; 'default' with --quick, which must stay short)")
    parser.add_argument("--plot", default=None, metavar="PREFIX",
                        help="write PREFIX-speedup.png and PREFIX-roofline.png")
    return parser.parse_args(argv)


def errors_against(got: dict, expected: dict) -> tuple[float, str]:
    errors = {k: rel_error(got[k], expected[k]) for k in expected}
    worst = max(errors, key=errors.get)
    return errors[worst], worst


def run(setup: common.Setup, compile_mode: str, bandwidth: float,
        writer: common.RowWriter) -> list[dict]:
    rows = []
    total = len(setup.layers) * len(setup.modes) * len(setup.providers)
    with Progress(console=common.console, transient=True) as progress:
        task = progress.add_task("layers", total=total)
        for layer, problem in setup.layers.items():
            count = common.rotation(problem, setup.dtype, setup.device)
            sets = common.argument_sets(problem, setup.dtype, setup.device, setup.memory_format,
                                        count)
            gen = torch.Generator().manual_seed(1)
            grad = torch.randn(problem.output_shape, generator=gen, dtype=torch.float64)
            grad = grad.to(setup.device).contiguous(memory_format=setup.memory_format)
            for mode in setup.modes:
                reference = common.Provider("reference", problem, None, mode, setup.device, grad)
                expected = reference.run([t.double() for t in sets[0]])
                floor = common.floor_bytes(problem, setup.dtype, mode)
                baseline_ms, pytorch_error = None, None
                for name in setup.providers:
                    progress.update(task, description=f"{layer} {mode} {name}")
                    provider = common.Provider(name, problem, sets[0], mode, setup.device,
                                               grad.to(setup.dtype), compile_mode)
                    error, worst = errors_against(provider.run(sets[0]), expected)
                    row = dict(layer=layer, provider=name, mode=mode,
                               dtype=str(setup.dtype).removeprefix("torch."),
                               memory_format="channels_last"
                               if setup.memory_format == torch.channels_last else "contiguous",
                               batch=problem.n, input_shape=[problem.n, problem.c_in, problem.h,
                                                             problem.w],
                               stride=problem.stride, groups=problem.groups,
                               median_ms=None, q1_ms=None, q3_ms=None, floor_bytes=floor,
                               gbps=None, pct_floor=None, tflops=None, speedup=None,
                               max_error=error, worst=worst)
                    if name not in common.UNTIMED:
                        t = common.measure(lambda i: provider.run(sets[i % count]),
                                           setup.device, quick=setup.quick)
                        seconds = t.median_ms * 1e-3
                        row.update(median_ms=t.median_ms, q1_ms=t.q1_ms, q3_ms=t.q3_ms,
                                   gbps=floor / seconds / 1e9,
                                   pct_floor=100 * floor / (bandwidth * 1e9) / seconds,
                                   tflops=common.flops(problem, mode) / seconds / 1e12)
                    if name == "pytorch":
                        baseline_ms, pytorch_error = row["median_ms"], error
                    rows.append(row)
                    progress.advance(task)
                for row in rows[-len(setup.providers):]:
                    if baseline_ms and row["median_ms"]:
                        row["speedup"] = baseline_ms / row["median_ms"]
                    bound = REL_TOLERANCE[setup.dtype]
                    if pytorch_error is not None:
                        bound = max(bound, 2 * pytorch_error)
                    row["ok"] = row["provider"] in common.BASELINES or row["max_error"] <= bound
                writer.add(rows[-len(setup.providers):])
    return rows


def show(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("layer", "mode", "provider", "ms", "q1–q3", "GB/s", "% floor", "TFLOP/s",
                "speedup", "error", "check"):
        table.add_column(col, justify="left" if col in ("layer", "mode", "provider") else "right")

    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    for r in rows:
        spread = "—" if r["q1_ms"] is None else f"{r['q1_ms']:.3f}–{r['q3_ms']:.3f}"
        verdict = ("baseline" if r["provider"] in common.BASELINES
                   else "[green]ok[/]" if r["ok"] else "[red]FAIL[/]")
        table.add_row(r["layer"], r["mode"], r["provider"],
                      "not timed" if r["provider"] in common.UNTIMED else fmt(r["median_ms"], ".3f"),
                      spread, fmt(r["gbps"], ".1f"), fmt(r["pct_floor"], ".1f"),
                      fmt(r["tflops"], ".2f"), fmt(r["speedup"], ".2f"),
                      f"{r['max_error']:.1e}", verdict)
    common.console.print(table)


def show_modelled(setup) -> None:
    """On a CPU: the H200 time of the kernel backends for the same layers, modelled by
    ``resnext-bench predict`` for the kernels in this tree (batch 256, bfloat16)."""
    from . import predict

    if setup.model != "resnext50_32x4d" or not predict.MODELLED.exists():
        return
    rows = predict.load_modelled(predict.MODELLED, list(setup.layers), predict.BACKENDS,
                                 ("eval", "train_fwd", "train_bwd"), torch.bfloat16, 256)
    if rows:
        common.console.print("The kernel backends on an H200, batch 256, bfloat16 — "
                             "modelled (CPU counters), not measured "
                             "(`resnext-bench predict`; docs/performance-model.md):",
                             soft_wrap=True)
        predict.show(common.console, rows, "modelled H200 time per pass")


def main(argv=None) -> int:
    opts = parse_args(argv)
    setup = common.resolve_options("resnext-bench layers", opts)
    header = common.environment(setup.device)
    bandwidth = common.copy_bandwidth(setup.device, setup.quick)
    header.update(model=setup.model, copy_gbps=bandwidth)
    common.console.print(
        f"{setup.model} grouped-conv layers on {header['device']}: batch {setup.batch}, "
        f"{setup.image}² images, {str(setup.dtype).removeprefix('torch.')}, "
        f"{opts.memory_format}; copy bandwidth {bandwidth:.0f} GB/s; torch {header['torch']}")
    compile_mode = opts.compile_mode or ("default" if setup.quick else "max-autotune")
    header.update(compile_mode=compile_mode)
    writer = common.RowWriter(header, opts.json, opts.csv)
    rows = run(setup, compile_mode, bandwidth, writer)
    show(rows, "time: median of CUDA-event (GPU) or wall-clock (CPU) samples; floor: the "
               "bytes a fused kernel must move; error: ‖out − ref‖/‖ref‖ vs float64, worst "
               "of output and gradients")
    header["auto_choices"] = common.show_auto_choices()
    if setup.device.type == "cpu":
        show_modelled(setup)
    writer.flush()
    if opts.plot:
        for path in plot_layers(rows, opts.plot, title=f"{setup.model} on {header['device']}"):
            common.console.print(f"wrote {path}")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        common.console.print(f"[red]{len(failed)} row(s) outside the tolerance[/]")
        return 1
    return 0
