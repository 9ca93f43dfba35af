"""``resnext-bench kernels``: the static resource report of every compiled kernel —
registers, shared memory, stack and local (spill) bytes per architecture — for the
nvcc kernels in ``resnext_kernels._C`` and for every Triton kernel variant compiled
ahead of time for sm_80 and sm_90, bf16 and fp32 inputs by default
(``resnext_kernels/bench/triton_aot.py``), read
with ``cuobjdump --dump-resource-usage`` (the toolkit's, or the copy Triton's wheel
ships). Needs no GPU. ``--check`` exits 1 when any kernel uses stack or local memory
(spills) or a kernel family could not be compiled.
"""

import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from .._native import build_info
from .common import Parser, comma_list
from .triton_aot import DTYPES, ITEMSIZE, report


@dataclass(frozen=True)
class KernelResources:
    arch: str
    name: str
    registers: int
    shared: int
    stack: int
    local: int

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


def find_cuobjdump() -> Optional[str]:
    candidates = [shutil.which("cuobjdump")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin",
                                       "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.splitlines() if out.returncode == 0 else names


def parse(report: str) -> list[KernelResources]:
    """Parse ``cuobjdump --dump-resource-usage`` output."""
    rows, arch, pending = [], None, None
    for line in report.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+a?)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            pending = m.group(1)
        elif pending and (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)):
            rows.append((arch, pending, *map(int, m.groups())))
            pending = None
    names = demangle([r[1] for r in rows])
    return [KernelResources(a, n, reg, shared, stack, local)
            for (a, _, reg, stack, shared, local), n in zip(rows, names)]


def library_path() -> Optional[Path]:
    spec = importlib.util.find_spec("resnext_kernels._C")
    return Path(spec.origin) if spec is not None and spec.origin else None


def cuda_report(console) -> Optional[list]:
    """The nvcc kernels of ``resnext_kernels._C``, or None when it holds none."""
    info = build_info()
    library = library_path()
    if not info["with_cuda"] or library is None:
        console.print("resnext_kernels._C holds no CUDA kernels "
                      f"({info['import_error'] or 'built without CUDA'})")
        return None
    report = subprocess.run([find_cuobjdump(), "--dump-resource-usage", str(library)],
                            capture_output=True, text=True, check=True).stdout
    return [k for k in parse(report) if "rk::" in k.name]


def main(argv=None) -> int:
    parser = Parser(prog="resnext-bench kernels", description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on any stack/local use, or when nothing was compiled")
    parser.add_argument("--quick", action="store_true",
                        help="Triton: sm_90 and the fixed tiles only")
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    parser.add_argument("--dtypes", default=None,
                        help="Triton: the input dtypes to compile, comma-separated, of "
                             "bf16, fp16, fp32 (default: bf16,fp32)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    opts = parser.parse_args(argv)
    dtypes = (comma_list("resnext-bench kernels", "--dtypes", opts.dtypes, list(ITEMSIZE))
              if opts.dtypes is not None else DTYPES)
    console = Console()
    if find_cuobjdump() is None:
        raise SystemExit("resnext-bench kernels: no cuobjdump found (CUDA toolkit or triton)")
    kernels, missing = [], []
    cuda = cuda_report(console)
    if cuda is None:
        missing.append("CUDA")
    else:
        kernels += cuda
    if not opts.no_triton:
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("resnext-bench kernels: TRITON_INTERPRET=1 replaces Triton's "
                             "compiler; unset it for the ahead-of-time report (or pass "
                             "--no-triton)")
        if importlib.util.find_spec("triton") is None:
            missing.append("Triton")
            console.print("triton is not installed: no Triton kernels to compile")
        else:
            with console.status("compiling the Triton kernels ahead of time"):
                kernels += report(opts.quick, dtypes=dtypes)
    table = Table(title=f"{len(kernels)} compiled kernels: nvcc ({build_info()['cuda_archs']}) "
                        "and Triton AOT (no GPU needed)")
    for col in ("arch", "kernel", "regs", "shared B", "stack B", "local B"):
        table.add_column(col, justify="left" if col in ("arch", "kernel") else "right")
    for k in sorted(kernels, key=lambda k: (k.arch, k.name)):
        style = "red" if k.spills else None
        table.add_row(k.arch, k.name.replace("void ", "").replace("rk::detail::", "")
                      .replace("(rk::ConvFwdParams)", "").replace("(rk::ConvBwdParams)", ""),
                      str(k.registers), str(k.shared), str(k.stack), str(k.local), style=style)
    console.print(table)
    spilled = [k for k in kernels if k.spills]
    console.print(f"{len(spilled)} of {len(kernels)} kernels use stack or local memory")
    if opts.json:
        import json

        with open(opts.json, "w") as f:
            json.dump([asdict(k) for k in kernels], f, indent=2)
    return 1 if opts.check and (spilled or missing) else 0
