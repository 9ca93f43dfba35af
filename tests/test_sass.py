"""The SASS reader (resnext_kernels/bench/sass.py): the parser and the hot-loop finder
on hand-written listings with known answers, and one pass over the real library."""

import json
import os
import subprocess
import sys

import pytest

from resnext_kernels.bench import sass


def listing(lines, name="kernel", arch="sm_90"):
    """A cuobjdump-style listing: one instruction per 16 bytes, each followed by an
    encoding comment line as cuobjdump prints it."""
    out = [f"\tarch = {arch}", f"\t\tFunction : {name}",
           '\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"']
    for i, text in enumerate(lines):
        out.append(f"        /*{i * 16:04x}*/                   {text} ;"
                   "                 /* 0x000fe20000000f00 */")
        out.append("                                          /* 0x000fc40000000000 */")
    return "\n".join(out) + "\n"


def at(i):
    return hex(i * 16)


def padding(lines):
    """EXIT, the branch to itself and NOPs, as nvcc ends a function."""
    n = len(lines)
    return lines + ["EXIT", f"BRA {at(n + 1)}", "NOP", "NOP"]


def analyse(lines):
    (fn,) = sass.analyse_listing(listing(lines)).values()
    return fn


def test_parse_fields():
    (arch, name, instructions), = sass.parse(listing(
        ["@!P0 BRA 0x20", "HMMA.16816.F32.BF16 R4, R8, R12, R4", "BRA.U !UP0, 0x0"],
        name="_Z6kernelv"))
    assert (arch, name) == ("sm_90", "_Z6kernelv")
    assert [i.mnemonic for i in instructions] == ["BRA", "HMMA", "BRA"]
    assert instructions[0].predicated and instructions[0].target == 0x20
    assert instructions[1].opcode == "HMMA.16816.F32.BF16" and instructions[1].target is None
    assert instructions[2].target == 0 and not instructions[2].predicated
    assert [i.address for i in instructions] == [0, 16, 32]


def test_one_loop_two_hmma_in_twenty():
    # 3 setup instructions, a 20-instruction loop (2 HMMA, 3 LDG, 1 LDS, the back edge
    # last), then the store.
    body = (["LDG.E.U16 R2, desc[UR4][R6.64]"] * 3 + ["LDS R3, [R7]"]
            + ["HMMA.16816.F32.BF16 R8, R12, R16, R8"] * 2 + ["IMAD R1, R1, 0x2, RZ"] * 13)
    lines = ["S2R R0, SR_TID.X", "IMAD R1, R0, 0x4, RZ", "MOV R2, RZ"]
    lines += body + [f"@P0 BRA {at(3)}", "STG.E desc[UR4][R4.64], R8"]
    k = analyse(padding(lines))
    assert k.loop_instructions == 20
    assert k.loop_counts["HMMA"] == 2 and k.loop_counts["LDG"] == 3
    assert k.loop_counts["LDS"] == 1 and k.loop_counts["STG"] == 0
    assert k.instructions_per_mma == 10.0 and k.instructions_per_fma is None
    assert k.hmma_kind == "HMMA.16816.F32.BF16"
    assert k.loop == (3 * 16, 22 * 16) and k.loop_innermost
    assert k.instructions == len(lines) + 1  # + EXIT; the branch to itself and NOPs are padding
    assert k.counts["STG"] == 1


def test_nested_loops_give_the_inner_one():
    lines = ["MOV R0, RZ",                        # 0
             "LDG.E R2, desc[UR4][R6.64]",        # 1: outer loop top
             "FFMA R3, R2, R2, R3",               # 2: inner loop top
             "FFMA R3, R2, R3, R3",               # 3
             "LDS R4, [R5]",                      # 4
             f"@P1 BRA {at(2)}",                  # 5: inner back edge
             "FFMA R8, R3, R3, R8",               # 6
             f"@P0 BRA {at(1)}",                  # 7: outer back edge
             "STG.E desc[UR4][R6.64], R3"]
    k = analyse(padding(lines))
    assert k.loop == (2 * 16, 5 * 16) and k.loop_instructions == 4
    assert k.loop_counts["FFMA"] == 2 and k.instructions_per_fma == 2.0
    assert k.innermost_loops == 1 and k.loop_innermost
    assert sass.loops(sass.parse(listing(lines))[0][2]) == [(1, 7), (2, 5)]


def test_the_loop_with_the_most_hmma_wins():
    lines = ["MOV R0, RZ",
             "LDG.E R2, desc[UR4][R6.64]", "STS [R1], R2", f"@P0 BRA {at(1)}",  # staging, 3
             "HMMA.16816.F32 R8, R12, R16, R8", "IADD3 R0, R0, 0x1, RZ",
             f"@P1 BRA {at(4)}"]                                             # mma, 3
    k = analyse(padding(lines))
    assert k.loop == (4 * 16, 6 * 16) and k.instructions_per_mma == 3.0
    assert k.innermost_loops == 2


def test_first_takes_the_first_loop_holding_the_math():
    """Triton's row walk (1 HMMA a trip here) before its guarded walk (2 a trip)."""
    lines = ["MOV R0, RZ",
             "LDG.E R2, desc[UR4][R6.64]", "STS [R1], R2", f"@P0 BRA {at(1)}",  # no math
             "HMMA.16816.F32 R8, R12, R16, R8", f"@P1 BRA {at(4)}",           # row walk
             "HMMA.16816.F32 R8, R12, R16, R8", "HMMA.16816.F32 R8, R12, R16, R8",
             f"@P2 BRA {at(6)}"]                                             # guarded
    body = sass._trimmed(sass.parse(listing(padding(lines)))[0][2])
    assert sass.hot_loop(body) == (6, 8)
    assert sass.hot_loop(body, first=True) == (4, 5)


def test_walks_take_one_trip_of_each_phase_loop():
    """dgrad at DIL 2 walks a row tile once per column phase: two walk loops (1 HMMA in 3
    instructions, then 2 in 4) before the guarded walk; one trip of each counted
    together."""
    lines = ["MOV R0, RZ",
             "HMMA.16816.F32 R8, R12, R16, R8", "IADD3 R0, R0, 0x1, RZ",
             f"@P1 BRA {at(1)}",                                                  # even
             "HMMA.16816.F32 R8, R12, R16, R8", "HMMA.16816.F32 R8, R12, R16, R8",
             "IADD3 R0, R0, 0x1, RZ", f"@P1 BRA {at(4)}",                         # odd
             "HMMA.16816.F32 R8, R12, R16, R8", "HMMA.16816.F32 R8, R12, R16, R8",
             "HMMA.16816.F32 R8, R12, R16, R8", f"@P2 BRA {at(8)}"]               # guarded
    body = sass._trimmed(sass.parse(listing(padding(lines)))[0][2])
    assert sass.walk_loops(body, sass.loops(body), 2) == [(1, 3), (4, 7)]
    k = sass.analyse("kernel", "sm_90", sass.parse(listing(padding(lines)))[0][2], first=True,
                     walks=2)
    assert k.loop_instructions == 7 and k.loop_counts["HMMA"] == 3
    assert k.instructions_per_mma == 7 / 3 and k.loop == (16, 112)
    one = sass.analyse("kernel", "sm_90", sass.parse(listing(padding(lines)))[0][2],
                       first=True)
    assert one.loop_instructions == 3 and one.instructions_per_mma == 3


def test_no_loop_reports_the_whole_kernel():
    lines = ["S2R R0, SR_TID.X", "@P0 BRA 0x40", "FFMA R1, R0, R0, R1", "FFMA R1, R1, R0, R1",
             "STG.E desc[UR4][R2.64], R1"]
    k = analyse(padding(lines))
    assert k.loop is None and k.loop_instructions is None and k.loop_innermost is None
    assert k.instructions == 6  # with EXIT, without the padding
    assert k.loop_counts["FFMA"] == 2 and k.instructions_per_fma == 3.0
    assert k.instructions_per_mma is None and k.hmma_kind is None


def test_straight_line_math_beside_a_staging_loop_is_the_whole_kernel():
    # A fully unrolled FMA tile after a staging loop: the loop holds none of the math.
    lines = ["MOV R0, RZ", "LDG.E R2, desc[UR4][R6.64]", "STS [R1], R2", f"@P0 BRA {at(1)}",
             "FFMA R1, R0, R0, R1", "FFMA R1, R1, R0, R1", "STG.E desc[UR4][R2.64], R1"]
    k = analyse(padding(lines))
    assert k.loop is None and k.loop_counts["FFMA"] == 2 and k.instructions == 8


def test_a_call_on_every_trip_counts_its_subroutine():
    lines = ["MOV R0, RZ",                                   # 0
             "FFMA R1, R0, R0, R1",                          # 1: loop top
             f"CALL.REL.NOINC {at(8)}",                      # 2: every trip
             f"@P2 BRA {at(5)}",                             # 3
             f"CALL.REL.NOINC {at(8)}",                      # 4: skipped when P2
             f"@P0 BRA {at(1)}",                             # 5: back edge
             "EXIT",                                         # 6
             f"BRA {at(7)}",                                 # 7
             "IADD3 R2, R2, 0x1, RZ", "IMAD R2, R2, R2, RZ", "RET.REL.NODEC R16 0x0"]  # 8-10
    k = analyse(lines + ["BRA 0xb0"])
    assert k.loop == (16, 5 * 16)
    assert k.loop_call_instructions == 3 and k.loop_instructions == 5 + 3
    assert k.loop_counts["CALL"] == 2


def test_lookup_and_json_round_trip():
    k = analyse(padding(["FFMA R1, R0, R0, R1"]))
    t = analyse(padding(["FFMA R1, R0, R0, R1", "FFMA R1, R0, R0, R1"]))
    rep = {"cuda": {"_Z1kv": sass.asdict(k)}, "triton": {"v(warps=4)": sass.asdict(k)},
           "triton_dtypes": {"fp16": {"v(warps=4)": sass.asdict(k)},
                             "fp32": {"v(warps=4)": sass.asdict(t)}}}
    rep = json.loads(json.dumps(rep))
    assert sass.lookup(rep, "_Z1kv") == k
    assert sass.lookup(rep, "v(warps=4)") == k
    assert sass.lookup(rep, "v(warps=4)", "fp32") == t
    assert sass.lookup(rep, "v(warps=4)", "bf16") == k  # no bf16 table: the default
    assert sass.lookup(rep, "missing") is None


def ttgir(layout, shape, rank_fields):
    """A TTGIR fragment: one mma layout and one dot whose result uses it."""
    return (f"#mma = #ttg.nvidia_mma<{{{rank_fields}}}>\n"
            f"#blocked = #ttg.blocked<{{sizePerThread = [1, 1], warpsPerCTA = [4, 1]}}>\n"
            f"  %5 = tt.dot %3, %4, %2, inputPrecision = tf32 : tensor<...> * tensor<...> "
            f"-> tensor<{shape}xf32, {layout}>\n")


@pytest.mark.parametrize("shape, fields, expected", [
    # 3-D: Triton puts every warp on the batch; 8 warps on 4 entries repeat each tile twice
    ("4x32x16", "versionMajor = 2, warpsPerCTA = [8, 1, 1], instrShape = [1, 16, 8]", 2.0),
    ("4x32x16", "versionMajor = 2, warpsPerCTA = [4, 1, 1], instrShape = [1, 16, 8]", 1.0),
    ("2x16x32", "versionMajor = 2, warpsPerCTA = [4, 1, 1], instrShape = [1, 16, 8]", 2.0),
    # 2-D mma.sync: 16 rows on 2 warps along M
    ("16x64", "versionMajor = 2, warpsPerCTA = [2, 2], instrShape = [16, 8]", 2.0),
    # wgmma: a warp group of 4 warps on 64 rows, instrShape's K left out
    ("64x64", "versionMajor = 3, warpsPerCTA = [4, 1], instrShape = [16, 64, 16]", 1.0),
])
def test_mma_replication_from_the_ttgir(shape, fields, expected):
    assert sass.mma_replication(ttgir("#mma", shape, fields)) == expected


def test_mma_replication_ignores_fma_dots_and_takes_the_largest():
    fields = "versionMajor = 2, warpsPerCTA = [8, 1, 1], instrShape = [1, 16, 8]"
    assert sass.mma_replication(ttgir("#blocked", "4x32x16", fields)) == 1.0
    both = (ttgir("#mma", "8x32x16", fields)
            + "  %9 = tt.dot %7, %8, %6 : tensor<...> -> tensor<2x32x16xf32, #mma>\n")
    assert sass.mma_replication(both) == 4.0
    assert sass.mma_replication("") == 1.0


def test_triton_variants_cover_every_pass_of_every_layer():
    pytest.importorskip("triton")
    from resnext_kernels import triton_backend as tb
    from resnext_kernels.bench import triton_aot

    assert (triton_aot.variant_name("k", {"STRIDE": 2, "STATS": True, "BW": 32}, 4)
            == "k(STRIDE=2,STATS=1,BW=32,warps=4)")
    variants = sass._default_variants()
    names = {triton_aot.variant_name(*v) for v in variants}
    assert len(names) == len(variants)
    # s2 (4 channels per group, 56 x 56): four groups a piece, 14 rows of 32 pixels
    s2 = ("HOLD=1,GUARD=1,SLOTS=4,K_STEPS=1,PIECES=4,SUB_K=16,SUB_N=16,BW=32,ROWS=14,IMGS=1,"
          "RUN=1,ALIGNED=1")
    warps = tb.FIXED_WARPS
    for mode, save in ((0, 0), (0, 1), (1, 0), (2, 0), (3, 0)):
        assert (f"conv_rows_kernel(MODE={mode},STRIDE=1,DIL=1,FROM_DY=0,{s2},SAVE={save},"
                f"WGRAD=0,UNROLL=3,PRECISION=tf32,WARPS={tb.fixed_warps(mode)},"
                f"warps={tb.fixed_warps(mode)})") in names
    for from_dy in (0, 1):  # dgrad, and dgrad + wgrad (4 row tiles a program at batch 256)
        assert (f"conv_rows_kernel(MODE=4,STRIDE=1,DIL=1,FROM_DY={from_dy},{s2},SAVE=0,"
                f"WGRAD=0,UNROLL=3,PRECISION=tf32,WARPS={warps},warps={warps})") in names
        assert (f"conv_rows_kernel(MODE=4,STRIDE=1,DIL=1,FROM_DY={from_dy},"
                f"{s2.replace('RUN=1', 'RUN=4')},SAVE=0,WGRAD=1,UNROLL=1,PRECISION=tf32,"
                f"WARPS={tb.fixed_warps(4, True)},warps={tb.fixed_warps(4, True)})") in names
    assert ("wgrad_kernel(FROM_DY=0,STRIDE=1,DETERMINISTIC=0,K_STEPS=1,PIECES=4,SUB_K=16,"
            f"SUB_N=16,SPLIT=1,BW=32,ROWS=14,IMGS=1,ALIGNED=1,PRECISION=tf32,warps={tb.WGRAD_WARPS})"
            ) in names
    # s3-down's dgrad runs on the dilated grid
    assert any("MODE=4,STRIDE=1,DIL=2" in name for name in names)


def test_the_triton_conv_hot_loop_is_the_row_walk_not_the_non_finite_redo():
    """s2's passes hold two walks: the row walk and, after it, for a tile that held a NaN
    or an infinity, the guarded one (a product per group slot: more HMMA a trip). The
    issue ceiling must come from the row walk: 3 input rows a trip, their loads and
    stores; and no warp issues another's mma tiles (the dots' SPLIT)."""
    pytest.importorskip("triton")
    from resnext_kernels.bench.kernels import find_cuobjdump

    from resnext_kernels.bench import triton_aot

    if find_cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton)")
    wanted = [v for v in sass._default_variants()
              if v[0] == "conv_rows_kernel" and v[1]["GUARD"] and v[1]["STRIDE"] == 1
              and v[1]["SLOTS"] == 4 and v[1]["MODE"] in (0, 1) and not v[1]["SAVE"]
              and v[2] == (8 if v[1]["MODE"] == 1 else 4)]
    assert len(wanted) == 2
    # s5's write pass (2 pieces of 32 channels, 4 warps: split in two as well)
    s5 = [v for v in sass._default_variants()
          if v[0] == "conv_rows_kernel" and v[1]["PIECES"] == 2 and v[1]["MODE"] == 0
          and v[1]["STRIDE"] == 1 and not v[1]["SAVE"] and v[2] == 4]
    assert len(s5) == 1
    found = sass.triton_sass(wanted + s5)
    assert found[triton_aot.variant_name(*s5[0])].mma_replication == 1.0
    found.pop(triton_aot.variant_name(*s5[0]))
    for k in found.values():
        # 9 taps x [4 pieces, 32 pixels, 16] x [16, 16] per row is 36 HMMA a warp at 4
        # warps; at 8 (the statistics pass) each piece's 16 outputs are split in two
        # batch entries (SPLIT), 18 a warp, each tile issued once
        per_row = 18 if "warps=8" in k.symbol else 36
        assert k.loop_counts["HMMA"] == 3 * per_row, k.symbol
        assert k.mma_replication == 1.0, k.symbol
        assert k.loop_counts["LDG"] > 0 and k.loop_innermost, k.symbol
        if "MODE=0" in k.symbol:  # the write pass stores its rows
            assert k.loop_counts["STG"] > 0, k.symbol


def test_wgrad_issues_each_mma_tile_once():
    """wgrad's 3-D dots have a batch entry a warp (its sums split along their input
    channels): at s5 one piece of 32 channels in 4 parts, s2's 4 pieces whole. With a
    batch entry a piece, s5's 2 pieces had each tile issued by two of the 4 warps."""
    pytest.importorskip("triton")
    from resnext_kernels.bench.kernels import find_cuobjdump

    if find_cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton)")
    wanted = [v for v in sass._default_variants()
              if v[0] == "wgrad_kernel" and not v[1]["DETERMINISTIC"] and not v[1]["FROM_DY"]
              and v[1]["STRIDE"] == 1 and (v[1]["PIECES"], v[1]["BW"]) in ((1, 16), (4, 32))]
    assert sorted((v[1]["PIECES"], v[1]["SPLIT"]) for v in wanted) == [(1, 4), (4, 1)]
    for k in sass.triton_sass(wanted).values():
        assert k.mma_replication == 1.0, k.symbol
        # an output row: 9 taps of [32 outputs, 16 pixels] x [16 pixels, 8 inputs] a warp
        # (s5: 2 HMMA each), or of [16, 32 pixels] x [32 pixels, 16] (s2: 4)
        assert k.loop_counts["HMMA"] == (18 if "PIECES=1" in k.symbol else 36), k.symbol


def test_triton_specialisation_marks_pointers_and_channel_counts():
    pytest.importorskip("triton")
    from resnext_kernels import triton_kernels
    from resnext_kernels.bench import triton_aot

    fn = triton_kernels.conv_rows_kernel
    signature, attrs = triton_aot.specialisation(fn, "fp16")
    marked = {fn.arg_names[i] for (i,) in attrs}
    assert marked == {name for name in fn.arg_names if name.endswith("_ptr")} | {
        "N", "N_BUCKET", "KC", "NC"}
    assert all(v == [["tt.divisibility", 16]] for v in attrs.values())
    assert signature["a_ptr"] == "*fp16" and signature["va_ptr"] == "*fp32"
    assert signature["H_A"] == "i32" and signature["STRIDE"] == "constexpr"
    assert signature["eps"] == "fp32"


def _cuda_kernels():
    from resnext_kernels.bench.kernels import find_cuobjdump

    if find_cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton)")
    if sass._library() is None:
        pytest.skip("resnext_kernels._C holds no CUDA kernels")
    from resnext_kernels.bench.kernels import cuda_report
    from rich.console import Console

    return cuda_report(Console(quiet=True))


def test_every_conv_kernel_of_the_library():
    resources = _cuda_kernels()
    found = sass.cuda_sass("sm_90")
    assert found, "no sm_90 SASS in resnext_kernels._C"
    # Every kernel the resource report lists for sm_90 is there, by its mangled name.
    from resnext_kernels.bench.kernels import demangle

    names = dict(zip(demangle(list(found)), found))
    conv = [r.name for r in resources if r.arch == "sm_90" and "_kernel<" in r.name]
    assert conv
    for name in conv:
        assert name in names, name
        k = found[names[name]]
        assert k.symbol.startswith("_ZN2rk6detail") and k.arch == "sm_90"
        assert k.instructions > 0
        assert k.loop_instructions is None or 0 < k.loop_instructions


COMPILE_PTX = """
import sys
from resnext_kernels.bench import sass, triton_aot
# s4's fused dgrad + wgrad pass (16 channels a group: no guarded walk)
variant = next(v for v in sass._default_variants()
               if v[0] == "conv_rows_kernel" and v[1]["FROM_DY"] and v[1]["WGRAD"]
               and v[1]["DIL"] == 1 and v[1]["BW"] == 16 and not v[1]["GUARD"])
sys.stdout.write(triton_aot.compile_variant(*variant, int(sys.argv[1]), sys.argv[2]).asm["ptx"])
"""


@pytest.mark.parametrize("arch,dtype,packed", [(90, "bf16", "set.gt.u32.bf16x2"),
                                               (80, "fp16", "set.gt.u32.f16x2"),
                                               (80, "bf16", None)])
def test_eval_backward_select_compiles_to_a_packed_compare_and_mask(arch, dtype, packed):
    """The eval backward's operand dy·[y > 0] compiles to one packed compare (0xFFFF a
    lane where y > 0) and an AND a register of two 16-bit lanes, where the GPU has that
    compare (bf16 pairs from sm_90), and to a select elsewhere: the ahead-of-time
    compile must see the target's capability, as the JIT on that GPU does. (Compiled in
    a process without TRITON_INTERPRET, as the interpreter's kernels cannot be.)"""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    ptx = subprocess.run([sys.executable, "-c", COMPILE_PTX, str(arch), dtype], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert ".target sm_%d" % arch in ptx
    if packed:
        assert ptx.count(packed) >= 3  # a row's three column-shifted loads at least
        assert "and.b32" in ptx
    else:
        assert "set.gt.u32" not in ptx and "setp.gt.f32" in ptx  # sm_80: no bf16 compare
