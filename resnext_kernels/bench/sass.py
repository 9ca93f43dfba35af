"""An issue-rate ceiling from the compiled code: the SASS of every kernel — the nvcc
kernels in ``resnext_kernels._C`` (``cuobjdump -sass``) and the Triton variants
compiled ahead of time (``triton_aot``, specialised like the JIT) — and, per kernel,
its hot loop: the instructions one trip through it issues and, among them, the
tensor-core mma (``HMMA``, and ``HGMMA`` for wgmma), ``FFMA`` and memory instructions.
Needs no GPU. A static count (NOTES §7): multiplied by the
mma (or FMA) count the CPU counters give, it bounds the time by the issue rate,
which the memory counters alone miss.

Definitions (on the SASS listing, whose branches name their target's byte offset):

* a *loop* is a target T with backward ``BRA`` instructions to it (T before the
  branch; a branch to itself, the ``BRA`` after the final ``EXIT``, is padding, not a
  loop); its body is T up to the last such branch, inclusive, in listing order;
* an *innermost* loop has no other loop nested inside its body;
* the *hot loop* is, among the innermost loops, the one with the most HMMA, then the
  most FFMA, then the largest body (of a Triton variant: the first in the listing that
  holds the math; of a dgrad variant at ``DIL`` 2, which walks a row tile once for its
  even and once for its odd columns, the first two such loops, one trip of each counted
  together: :func:`walk_loops`) — unless no innermost loop holds the kernel's math while
  an outer loop or the straight-line code does (:func:`hot_loop`);
* ``loop_instructions`` is the static size of its body — what one trip issues when
  every forward branch inside falls through — plus the subroutines it ``CALL``s on
  every path through the body (Triton's 64-bit integer division:
  ``loop_call_instructions``). Calls on a conditional path (nvcc's 64-bit division and
  fp32 division slow paths, beside an inline fast path) and code reached by a forward
  branch out of the body are not counted (``loop_counts["CALL"]`` counts every call
  site); a kernel without a loop reports ``loop=None``, ``loop_instructions=None`` and
  the whole kernel's counts and ratios instead;
* ``instructions`` is the whole kernel, without the ``BRA``-to-itself and ``NOP``
  padding at its end.

API: :func:`cuda_sass`, :func:`triton_sass`, :func:`report` (both, cached on disk),
:func:`table` / :func:`lookup` (a launch's figures by its symbol);
``python -m resnext_kernels.bench.sass [--match TEXT]`` prints the hot loops.
"""

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

FORMAT = 2  # of the cached report; bump when the analysis changes its figures

# loop_counts keys -> the opcodes (the mnemonic before the first '.') each counts.
CLASSES = {
    "HMMA": ("HMMA", "HGMMA"),   # tensor-core mma: mma.sync, and wgmma (HGMMA) on sm_90
    "FFMA": ("FFMA",),
    "LDG": ("LDG",),
    "STG": ("STG",),
    "LDS": ("LDS",),
    "STS": ("STS",),
    "LDSM": ("LDSM",),           # ldmatrix
    "LDGSTS": ("LDGSTS",),       # cp.async
    "ATOM": ("ATOM", "ATOMG", "ATOMS"),
    "RED": ("RED", "REDG"),      # atomics whose result is unused
    "BAR": ("BAR",),
    "CALL": ("CALL",),           # subroutine call sites
}
_CLASS_OF = {op: key for key, ops in CLASSES.items() for op in ops}
_PREDICATE = re.compile(r"^@!?U?P[T0-9]+\s+")
_TARGET = re.compile(r"0x([0-9a-fA-F]+)\s*$")


class Instruction(NamedTuple):
    address: int            # byte offset in the function
    opcode: str             # with its modifiers: "HMMA.16816.F32.BF16"
    operands: str
    predicated: bool        # an @P guard
    mnemonic: str           # the opcode before its first '.': "HMMA"
    target: Optional[int]   # the byte offset a BRA jumps to (None for anything else)

    @classmethod
    def make(cls, address: int, text: str) -> "Instruction":
        """From a listing's instruction text: "@!P0 BRA 0x1cc0"."""
        predicated = text.startswith("@")
        if predicated:
            text = _PREDICATE.sub("", text)
        opcode, _, operands = text.partition(" ")
        mnemonic = opcode.split(".", 1)[0]
        target = None
        if mnemonic == "BRA" and (m := _TARGET.search(operands)):
            target = int(m.group(1), 16)
        return cls(address, opcode, operands.strip(), predicated, mnemonic, target)


@dataclass
class KernelSass:
    symbol: str                          # mangled name (nvcc) / variant name (Triton)
    arch: str                            # "sm_90"
    instructions: int                    # the whole kernel, static
    loop_instructions: Optional[int]     # one trip through the hot loop; None: no loop
    loop_counts: dict                    # CLASSES key -> count in the hot loop (whole kernel
                                         # when there is no loop)
    instructions_per_mma: Optional[float]
    instructions_per_fma: Optional[float]
    hmma_kind: Optional[str]             # the commonest mma opcode of the loop (kernel)
    loop: Optional[tuple] = None         # (first, last) byte offset of the hot loop
    loop_innermost: Optional[bool] = None  # False: an outer loop (see hot_loop)
    loop_call_instructions: int = 0      # of loop_instructions: subroutines called every trip
    innermost_loops: int = 0
    counts: dict = field(default_factory=dict)  # CLASSES key -> count in the whole kernel
    mma_replication: float = 1.0         # warps issuing each mma tile (Triton: see
                                         # :func:`mma_replication`; nvcc kernels: 1)

    @classmethod
    def from_dict(cls, d: dict) -> "KernelSass":
        d = dict(d)
        if d.get("loop") is not None:
            d["loop"] = tuple(d["loop"])
        return cls(**d)


# --------------------------------------------------------------------------- parsing

_LISTING = re.compile(r"/\*([0-9a-fA-F]{4,})\*/[ \t]+([^;\n]*?)[ \t]*;"  # /*0a40*/ ... ;
                      r"|Function[ \t]*:[ \t]*(\S+)"
                      r"|arch[ \t]*=[ \t]*(sm_\w+)")


def parse(listing: str) -> list:
    """``cuobjdump -sass`` text -> [(arch, function, [Instruction])], in listing order
    (instructions before any ``Function :`` line, as ``nvdisasm`` prints a lone
    function, go to a function named "")."""
    functions, arch, current = [], None, None
    for m in _LISTING.finditer(listing):
        address, text, name, new_arch = m.groups()
        if text is not None:
            if current is None:
                current = []
                functions.append((arch, "", current))
            current.append(Instruction.make(int(address, 16), text))
        elif name is not None:
            current = []
            functions.append((arch, name, current))
        else:
            arch = new_arch
    return functions


def _trimmed(instructions: list) -> list:
    """Without the padding after the last ``EXIT``: ``BRA`` to itself and ``NOP``s."""
    end = len(instructions)
    while end and (instructions[end - 1].mnemonic == "NOP"
                   or instructions[end - 1].target == instructions[end - 1].address):
        end -= 1
    return instructions[:end]


def loops(instructions: list) -> list:
    """Every loop as (first index, last index) into ``instructions``: a target with
    backward branches, up to the last of them; sorted."""
    index = {ins.address: i for i, ins in enumerate(instructions)}
    last = {}
    for i, ins in enumerate(instructions):
        t = ins.target
        if t is not None and t < ins.address and t in index:
            last[index[t]] = i
    return sorted(last.items())


def innermost(spans: list) -> list:
    """The loops with no other loop nested inside them."""
    return [(a, b) for a, b in spans
            if not any((c, d) != (a, b) and a <= c and d <= b for c, d in spans)]


def count(instructions) -> dict:
    counts = Counter(_CLASS_OF.get(ins.mnemonic) for ins in instructions)
    return {key: counts.get(key, 0) for key in CLASSES}


def _mma_kind(instructions) -> Optional[str]:
    kinds = Counter(ins.opcode for ins in instructions if _CLASS_OF.get(ins.mnemonic) == "HMMA")
    return kinds.most_common(1)[0][0] if kinds else None


def hot_loop(instructions: list, spans: Optional[list] = None,
             first: bool = False) -> Optional[tuple]:
    """(first, last) index of the hot loop of ``instructions`` (trimmed), or None.

    Among the innermost loops, the one with the most HMMA, then FFMA, then the largest
    body; ``first`` (the Triton variants): the first of those that hold the kernel's
    math, in listing order — Triton lays a kernel's loops out in source order, and the
    conv's row walk comes before the guarded walk of the tiles with a non-finite value,
    which issues more HMMA a trip (a product per group slot) but runs only for them.
    When none of them holds the kernel's math (its HMMA, or without any its FFMA) but
    an outer loop does (a loop over taps around a staging loop), the loop
    that holds the most of it with no such loop inside; when the math is straight-line
    code outside every loop (a fully unrolled tile), None: the whole kernel is the
    region to judge, not a staging loop beside it."""
    spans = loops(instructions) if spans is None else spans
    counts = {span: count(instructions[span[0]:span[1] + 1]) for span in spans}
    whole = count(instructions)
    op = "HMMA" if whole["HMMA"] else "FFMA" if whole["FFMA"] else None

    def weight(span):
        c = counts[span]
        return c["HMMA"], c["FFMA"], span[1] - span[0]

    inner = innermost(spans)
    if op is None or any(counts[span][op] for span in inner):
        if first and op is not None:
            return min(span for span in inner if counts[span][op])
        return max(inner, key=weight) if inner else None
    holding = [span for span in spans if counts[span][op]]
    if not holding:
        return None
    return max(innermost(holding), key=weight)


def _successors(instructions: list, index: dict, i: int) -> list:
    """Indices control can reach from instruction i (a CALL returns to the next)."""
    ins = instructions[i]
    out = []
    if ins.target is not None and ins.target in index:
        out.append(index[ins.target])
    # An unguarded BRA (with no uniform-predicate operand), EXIT or RET never falls through.
    ends = ins.mnemonic in ("EXIT", "RET", "BRX", "JMX", "JMP") or (
        ins.mnemonic == "BRA" and "," not in ins.operands)
    if not (ends and not ins.predicated) and i + 1 < len(instructions):
        out.append(i + 1)
    return out


def every_trip(instructions: list, first: int, last: int, k: int) -> bool:
    """Whether instruction k of the loop first..last lies on every path from the loop's
    top to its back edge (a path that leaves the loop does not count)."""
    if instructions[k].predicated:
        return False
    if k in (first, last):
        return True
    index = {ins.address: i for i, ins in enumerate(instructions)}
    seen, stack = {first}, [first]
    while stack:
        i = stack.pop()
        if i == last:
            return False
        for j in _successors(instructions, index, i):
            if first <= j <= last and j != k and j not in seen:
                seen.add(j)
                stack.append(j)
    return True


def subroutine(instructions: list, entry: int) -> list:
    """The instructions of the subroutine a CALL enters at byte offset ``entry``: up to
    its first RET, in listing order."""
    start = next((i for i, ins in enumerate(instructions) if ins.address == entry), None)
    if start is None:
        return []
    end = next((i for i in range(start, len(instructions))
                if instructions[i].mnemonic == "RET"), len(instructions) - 1)
    return instructions[start:end + 1]


def walk_loops(instructions: list, spans: list, walks: int) -> list:
    """The first ``walks`` innermost loops holding HMMA, in listing order: a Triton
    variant that walks each row tile once per column phase (dgrad at ``DIL`` 2) lays out
    one such loop a phase, each taking one trip per input row."""
    inner = [span for span in innermost(spans)
             if count(instructions[span[0]:span[1] + 1])["HMMA"]]
    return sorted(inner)[:walks]


def analyse(symbol: str, arch: str, instructions: list, first: bool = False,
            walks: int = 1) -> KernelSass:
    """The hot loop of one function (see the module docstring and :func:`hot_loop`,
    which takes ``first``); ``walks`` > 1 (with ``first``): the bodies of the first
    ``walks`` loops of :func:`walk_loops` together, one trip of each."""
    body = _trimmed(instructions)
    spans = loops(body)
    inner = innermost(spans)
    span = hot_loop(body, spans, first)
    parts = [span] if span is not None else []
    if first and walks > 1 and span is not None:
        parts = walk_loops(body, spans, walks)
    called = []
    if parts:
        region = [ins for a, b in parts for ins in body[a:b + 1]]
        loop = (body[parts[0][0]].address, body[parts[-1][1]].address)
        # A subroutine every trip calls (Triton's 64-bit division) is issued every trip;
        # nvcc's calls sit on slow paths beside an inline fast path, and are not.
        for a, b in parts:
            for k in range(a, b + 1):
                if body[k].mnemonic == "CALL" and every_trip(body, a, b, k):
                    m = _TARGET.search(body[k].operands)
                    if m:
                        called += subroutine(body, int(m.group(1), 16))
    else:
        region, loop = body, None
    counts = count(region + called)
    n = len(region) + len(called)
    return KernelSass(
        symbol=symbol, arch=arch, instructions=len(body),
        loop_instructions=n if loop else None, loop_counts=counts,
        instructions_per_mma=n / counts["HMMA"] if counts["HMMA"] else None,
        instructions_per_fma=n / counts["FFMA"] if counts["FFMA"] else None,
        hmma_kind=_mma_kind(region) or _mma_kind(body), loop=loop,
        loop_innermost=None if span is None else span in inner,
        loop_call_instructions=len(called), innermost_loops=len(inner), counts=count(body))


def analyse_listing(listing: str, arch: Optional[str] = None) -> dict:
    """{function name: KernelSass} of a whole listing (the first of duplicates)."""
    out = {}
    for fn_arch, name, instructions in parse(listing):
        if name not in out:
            out[name] = analyse(name, fn_arch or arch or "", instructions)
    return out


def _cuobjdump() -> str:
    from .kernels import find_cuobjdump

    tool = find_cuobjdump()
    if tool is None:
        raise FileNotFoundError("no cuobjdump found (CUDA toolkit or triton's wheel)")
    return tool


def disassemble(path, arch: Optional[str] = None) -> str:
    """``cuobjdump -sass`` of a library or cubin (only ``arch``'s code when given)."""
    command = [_cuobjdump(), "-sass"] + (["-arch", arch] if arch else []) + [str(path)]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def _cubin_sass(job) -> dict:
    """{function: KernelSass} of one cubin (runs in a worker)."""
    path, arch = job
    return analyse_listing(disassemble(path), arch)


# ------------------------------------------------------------------------- the nvcc kernels

def _library() -> Optional[Path]:
    """resnext_kernels._C when it was built with CUDA kernels, else None."""
    from .._native import build_info
    from .kernels import library_path

    info = build_info()
    library = library_path()
    return library if info["with_cuda"] and library is not None else None


def library_sass(library, arch: str = "sm_90") -> dict:
    """{function: KernelSass} of every ``arch`` kernel in a library: its cubins
    extracted (``cuobjdump -xelf``), then disassembled and read side by side, one
    worker each (a library's listing is ~100 MB of text, mostly instruction
    encodings). The first of functions with the same name wins."""
    tool = _cuobjdump()
    listed = subprocess.run([tool, "-lelf", "-arch", arch, str(library)], capture_output=True,
                            text=True, check=True).stdout
    cubins = re.findall(r"ELF file\s+\d+:\s*(\S+\.cubin)", listed)
    if not cubins:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([tool, "-xelf", "all", str(Path(library).resolve())], cwd=tmp,
                       capture_output=True, check=True)
        jobs = [(os.path.join(tmp, name), arch) for name in cubins]
        workers = min(len(jobs), os.cpu_count() or 1)
        if workers <= 1:
            parts = [_cubin_sass(job) for job in jobs]
        else:
            # Largest first: the longest listing starts at once.
            jobs.sort(key=lambda job: -os.path.getsize(job[0]))
            with ProcessPoolExecutor(max_workers=workers) as pool:
                parts = list(pool.map(_cubin_sass, jobs))
    out = {}
    for part in parts:
        for name, kernel in part.items():
            out.setdefault(name, kernel)
    return out


def cuda_sass(arch: str = "sm_90") -> dict:
    """{mangled symbol: KernelSass} of every kernel in ``resnext_kernels._C`` for
    ``arch``; {} when the library holds no CUDA kernels."""
    library = _library()
    return {} if library is None else library_sass(library, arch)


# ------------------------------------------------------------------------ the Triton kernels

def _triton_job(job) -> KernelSass:
    """Compile one variant and read its SASS (runs in a worker)."""
    from .triton_aot import compile_variant, variant_name

    name, constexprs, warps, arch, dtype = job
    compiled = compile_variant(name, constexprs, warps, arch, dtype)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        listing = disassemble(f.name)
    functions = [f for f in parse(listing) if f[2]]
    (fn_arch, _, instructions), = functions
    row = analyse(variant_name(name, constexprs, warps), fn_arch or f"sm_{arch}", instructions,
                  first=True, walks=constexprs.get("DIL", 1))
    row.mma_replication = mma_replication(compiled.asm["ttgir"])
    return row


_MMA_LAYOUT = re.compile(r"^(#\w+)\s*=\s*#ttg\.nvidia_mma<\{([^}]*)\}>", re.M)
_DOT = re.compile(r"\b(?:tt\.dot|ttng\.warp_group_dot)\b[^\n]*->\s*tensor<([0-9x]+)x\w+,\s*(#\w+)>")


def _int_list(fields: str, name: str) -> list:
    m = re.search(name + r"\s*=\s*\[([0-9,\s]*)\]", fields)
    if m is None:
        raise ValueError(f"no {name} in the mma layout {{{fields}}}")
    return [int(v) for v in m.group(1).split(",")]


def mma_replication(ttgir: str) -> float:
    """How many of a kernel's warps issue each tensor-core tile, from its TTGIR: a dot's
    ``nvidia_mma`` layout spreads ``warpsPerCTA[d]`` warps along each dimension d of the
    result, a warp covering ``instrShape[d]`` of it (the batch: 1); where the result has
    fewer tiles along d than warps, the warps wrap round and repeat the same tiles
    (Triton puts every warp of a 3-D dot on the batch dimension: 8 warps on 4 batch
    entries issue each mma twice). Per dot: the product over d of ``warpsPerCTA[d]`` /
    min(``warpsPerCTA[d]``, ceil(shape[d] / ``instrShape[d]``)); the kernel's figure is
    the largest over its dots (1.0 without a tensor-core dot). The CPU counters count
    each tile once, so the tensor and issue ceilings are multiplied by it."""
    layouts = {name: fields for name, fields in _MMA_LAYOUT.findall(ttgir)}
    worst = 1.0
    for shape_text, layout in _DOT.findall(ttgir):
        if layout not in layouts:
            continue  # an FMA dot (blocked layout): no tensor cores
        fields = layouts[layout]
        shape = [int(v) for v in shape_text.split("x")]
        warps = _int_list(fields, "warpsPerCTA")
        instr = _int_list(fields, "instrShape")[:len(shape)]
        repeat = 1.0
        for size, w, tile in zip(shape, warps, instr):
            repeat *= w / min(w, -(-size // tile))
        worst = max(worst, repeat)
    return worst


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _default_variants() -> list:
    """Every variant ``resnext-bench kernels`` compiles (the fixed tiles of each pass —
    what the interpreter counts — and every autotuning tile)."""
    from .triton_aot import variants

    return [(name, dict(constexprs), warps) for name, constexprs, warps in variants(False)]


def triton_sass(variants=None, arch: int = 90, dtype: str = "fp16") -> dict:
    """{variant name: KernelSass} of the Triton kernels compiled ahead of time for
    ``sm_{arch}`` with ``dtype`` tensors (fp16 by default: bf16 gives the same counts),
    specialised like the JIT (``triton_aot.specialisation``). ``variants``: (kernel
    name, constexprs, num_warps) tuples, ``triton_aot.variants(False)`` by default.
    Under ``TRITON_INTERPRET=1`` (whose kernels cannot be compiled) the compiles run in
    a fresh Python process without it."""
    variants = _default_variants() if variants is None else [
        (name, dict(constexprs), warps) for name, constexprs, warps in variants]
    if _interpreting():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        with tempfile.TemporaryDirectory() as tmp:
            jobs = Path(tmp) / "jobs.json"
            result = Path(tmp) / "result.json"
            jobs.write_text(json.dumps({"variants": variants, "arch": arch, "dtype": dtype}))
            subprocess.run([sys.executable, "-m", "resnext_kernels.bench.sass",
                            "--triton-jobs", str(jobs), "--out", str(result)],
                           env=env, check=True)
            return {k: KernelSass.from_dict(v) for k, v in json.loads(result.read_text()).items()}
    jobs = [(name, constexprs, warps, arch, dtype) for name, constexprs, warps in variants]
    workers = min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        rows = [_triton_job(job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            rows = list(pool.map(_triton_job, jobs))
    return {row.symbol: row for row in rows}


# ---------------------------------------------------------------------------------- report

def default_cache_dir() -> str:
    """``$RESNEXT_KERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/resnext_kernels``, else
    ``~/.cache/resnext_kernels``."""
    if os.environ.get("RESNEXT_KERNELS_CACHE_DIR"):
        return os.environ["RESNEXT_KERNELS_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "resnext_kernels")


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            with open(part, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _cached(cache_dir: Optional[str], stem: str, key: str, build):
    """``build()`` (a JSON-serialisable value), read from ``cache_dir/stem-key.json``
    when there, written there otherwise."""
    if cache_dir is None:
        return build()
    path = os.path.join(cache_dir, f"sass-{stem}-{key}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    value = build()
    try:
        from .._files import replacing

        os.makedirs(cache_dir, exist_ok=True)
        with replacing(path) as f:
            json.dump(value, f)
    except OSError:
        pass  # an unwritable cache only costs the next run the recompile
    return value


def report(cache_dir: Optional[str] = None, arch: int = 90, dtypes=("fp16", "bf16", "fp32"),
           variants=None, use_cache: bool = True) -> dict:
    """The nvcc kernels' and the Triton variants' hot loops for ``sm_{arch}``, as plain
    JSON-serialisable dicts (``asdict(KernelSass)``)::

        {"format": 1, "arch": "sm_90",
         "cuda": {mangled symbol: {...}},                # {} without CUDA kernels
         "triton": {variant name: {...}},                # dtypes[0] (fp16), {} without triton
         "triton_dtypes": {dtype: {variant name: {...}}},  # every dtype of ``dtypes``
         "errors": {"cuda"/"triton": message}}           # what could not be read

    "cuda" and "triton" are the flat tables a launch's ``symbol`` is looked up in;
    :func:`table` and :func:`lookup` pick a dtype's Triton figures (fp16 and bf16
    differ where ptxas inlines a 64-bit division in one and calls it in the other).

    Cached in ``cache_dir`` (:func:`default_cache_dir` when None; ``use_cache=False``
    turns it off): the nvcc part keyed by the library file's hash, the Triton part by
    triton_kernels.py and triton_aot.py's source and triton's version (each also by
    this module's source), so a command that needs it does not recompile each run.
    Cold: ~10–25 s for the nvcc part, ~45 s per dtype for the Triton part (2 cores)."""
    cache = (cache_dir or default_cache_dir()) if use_cache else None
    this = Path(__file__)
    out = {"format": FORMAT, "arch": f"sm_{arch}", "cuda": {}, "triton": {},
           "triton_dtypes": {}, "errors": {}}
    try:
        library = _library()
        if library is not None:
            out["cuda"] = _cached(
                cache, "cuda", _digest(FORMAT, arch, library, this),
                lambda: {k: asdict(v) for k, v in cuda_sass(f"sm_{arch}").items()})
    except (OSError, subprocess.CalledProcessError) as exc:
        out["errors"]["cuda"] = f"{type(exc).__name__}: {exc}"
    if importlib.util.find_spec("triton") is not None:
        try:
            import triton

            from . import triton_aot
            from .. import triton_kernels

            wanted = _default_variants() if variants is None else [
                (name, dict(constexprs), warps) for name, constexprs, warps in variants]
            key = _digest(FORMAT, arch, triton.__version__, Path(triton_kernels.__file__),
                          Path(triton_aot.__file__), this, wanted)
            for dtype in dtypes:
                out["triton_dtypes"][dtype] = _cached(
                    cache, f"triton-{dtype}", key,
                    lambda: {k: asdict(v) for k, v in
                             triton_sass(wanted, arch, dtype).items()})
            if dtypes:
                out["triton"] = out["triton_dtypes"][dtypes[0]]
        except Exception as exc:  # a compile error must not take the CUDA half with it
            out["errors"]["triton"] = f"{type(exc).__name__}: {exc}"
    return out


def table(rep: dict, dtype: str = "fp16") -> dict:
    """{symbol: figures} of a :func:`report`: the nvcc kernels and the Triton variants
    compiled for ``dtype`` (the report's default Triton table when it lacks that dtype)."""
    triton = rep.get("triton_dtypes", {}).get(dtype) or rep.get("triton", {})
    return {**rep.get("cuda", {}), **triton}


def lookup(rep: dict, symbol: str, dtype: str = "fp16") -> Optional[KernelSass]:
    """The :func:`report`'s entry for a launch's ``symbol`` (mangled name or Triton
    variant; Triton figures of ``dtype``), or None."""
    entry = table(rep, dtype).get(symbol)
    return None if entry is None else KernelSass.from_dict(entry)


# ------------------------------------------------------------------------------------ CLI

def _row(k: KernelSass, name: str) -> list:
    c = k.loop_counts

    def f(v):
        return "—" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)

    return [name, str(k.instructions), f(k.loop_instructions), str(c["HMMA"]), str(c["FFMA"]),
            str(c["LDG"]), str(c["LDS"] + c["LDSM"]), str(c["STS"]), f(k.instructions_per_mma),
            f(k.instructions_per_fma), k.hmma_kind or "", f"{k.mma_replication:g}"]


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m resnext_kernels.bench.sass",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--match", default="", help="only kernels whose name contains this")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--json", default=None, help="also write the report to this file")
    parser.add_argument("--triton-jobs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.triton_jobs:  # the worker of triton_sass under TRITON_INTERPRET=1
        job = json.loads(Path(opts.triton_jobs).read_text())
        rows = triton_sass([tuple(v) for v in job["variants"]], job["arch"], job["dtype"])
        Path(opts.out).write_text(json.dumps({k: asdict(v) for k, v in rows.items()}))
        return 0
    from rich.console import Console
    from rich.table import Table

    from .kernels import demangle

    rep = report(arch=opts.arch, use_cache=not opts.no_cache)
    console = Console() if sys.stdout.isatty() else Console(width=200)
    grid = Table(title=f"hot loops of the compiled kernels, sm_{opts.arch} (static SASS)")
    for col in ("kernel", "instr", "loop", "HMMA", "FFMA", "LDG", "LDS+LDSM", "STS",
                "instr/mma", "instr/fma", "mma", "warps/tile"):
        grid.add_column(col, justify="left" if col in ("kernel", "mma") else "right")
    symbols = list(rep["cuda"])
    for symbol, name in zip(symbols, demangle(symbols)):
        name = name.replace("void ", "").replace("rk::detail::", "")
        name = name[:name.rfind("(")] if name.endswith(")") else name  # the parameter list
        if opts.match in name:
            grid.add_row(*_row(KernelSass.from_dict(rep["cuda"][symbol]), name))
    for dtype, rows in rep["triton_dtypes"].items():
        for symbol, row in rows.items():
            name = f"triton[{dtype}] {symbol}"
            if opts.match in name:
                grid.add_row(*_row(KernelSass.from_dict(row), name))
    console.print(grid)
    for part, error in rep["errors"].items():
        console.print(f"[red]{part}: {error}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rep, f, indent=1)
    return 1 if rep["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
