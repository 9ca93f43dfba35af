"""The Triton launch counters (resnext_kernels/bench/count_triton.py): known answers on
tiny synthetic kernels, the window sampling, the glue detection, and one real pass of
the backend per pass name on a small problem. Counting needs the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 without a GPU); on a machine that compiles
Triton kernels only the child-process test runs here."""

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from resnext_kernels.bench import count_triton as ct  # noqa: E402
from resnext_kernels.bench.counters import ATOMIC, READ, WRITE  # noqa: E402
from resnext_kernels.testing import Problem  # noqa: E402

interpreted = pytest.mark.skipif(
    not ct.interpreting(),
    reason="counts in-process through the Triton interpreter: run with TRITON_INTERPRET=1")

SMALL = Problem(2, 32, 32, 8, 8, 8, 1)  # one conv program per image


@triton.jit
def copy_kernel(src, dst, n, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if MASKED:
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)
    else:
        tl.store(dst + offs, tl.load(src + offs))


@triton.jit
def gather_sum_kernel(src, dst, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + tl.program_id(0), tl.sum(tl.load(src + offs * STRIDE), axis=0))


@triton.jit
def atomic_kernel(dst, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    total = tl.sum(tl.load(dst + offs % 8), axis=0)
    tl.atomic_add(dst + offs % 8, total * 0 + 1.0, mask=offs < n)


@triton.jit
def dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m = tl.arange(0, M)
    n = tl.arange(0, N)
    k = tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))


@triton.jit
def shared_operand_kernel(a_ptr, b_ptr, c_ptr, ROUNDS: tl.constexpr):
    """A batched [2, 16, 16] operand used by three dots a round, the same B each time."""
    i = tl.arange(0, 16)
    batch = tl.arange(0, 2)
    offs = batch[:, None, None] * 256 + i[None, :, None] * 16 + i[None, None, :]
    b = tl.load(b_ptr + offs)
    acc = tl.zeros((2, 16, 16), dtype=tl.float32)
    for r in range(ROUNDS):
        a = tl.load(a_ptr + offs)
        acc = tl.dot(a, b, acc)
        acc = tl.dot(a, b, acc)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + offs, acc)


@triton.jit
def fma_kernel(x_ptr, w_ptr, out_ptr, half_ptr, STEPS: tl.constexpr):
    r = tl.arange(0, 32)
    acc = tl.zeros((32, 32), dtype=tl.float32)
    for i in range(STEPS):
        x = tl.load(x_ptr + r * STEPS + i)
        w = tl.load(w_ptr + r * STEPS + i)
        acc += x[:, None] * w[None, :]
    h = tl.load(half_ptr + r)
    tl.store(half_ptr + r, h * h)  # fp16: not an FMA
    tl.store(out_ptr + r[:, None] * 32 + r[None, :], acc)


@triton.jit
def id_kernel(dst):
    linear = tl.program_id(0) + tl.num_programs(0) * tl.program_id(1)
    tl.store(dst + linear, linear.to(tl.float32))


def one_launch(run):
    with ct.hooked() as recorder:
        run()
    (launch,) = recorder.launches
    return launch


def test_variant_name():
    name = ct.variant_name("conv_fwd_kernel", dict(STRIDE=1, STATS=False, BLOCK_P=32,
                                                   BLOCK_C=32), 4)
    assert name == "conv_fwd_kernel(STRIDE=1,STATS=0,BLOCK_P=32,BLOCK_C=32,warps=4)"
    from resnext_kernels.bench import triton_aot
    if hasattr(triton_aot, "variant_name"):  # the AOT/SASS reports' key: the same format
        assert triton_aot.variant_name("k", dict(A=True, B=2), 8) == ct.variant_name(
            "k", dict(A=True, B=2), 8)


def test_sample_window():
    w = ct.sample_window(2000)  # 2 waves of 528 counted after 0.5 wave of warm-up
    assert (w.warm_start, w.count_start, w.count_end) == (680, 944, 2000)  # clamped at the end
    assert w.counted == 1056 and w.scale == pytest.approx(2000 / 1056)
    assert w.window_start == pytest.approx(944 / 2000)
    w = ct.sample_window(10_000)
    assert (w.warm_start, w.count_start, w.count_end) == (4736, 5000, 6056)  # the middle
    w = ct.sample_window(1320)  # warm-up + window: the whole grid, all counted
    assert (w.warm_start, w.count_start, w.count_end, w.scale) == (0, 0, 1320, 1.0)
    w = ct.sample_window(700, waves=0.25, warmup_waves=1.0)  # after its warm-up
    assert (w.warm_start, w.count_start, w.count_end) == (0, 528, 660)


def test_vector_width():
    base = np.uint64(1 << 20)
    row = base + 4 * np.arange(64, dtype=np.uint64)
    assert ct.vector_width(np.stack([row, row + 4096]), 4) == 4  # 16 bytes of fp32
    assert ct.vector_width(base + 2 * np.arange(64, dtype=np.uint64), 2) == 8
    assert ct.vector_width(base + 8 * np.arange(64, dtype=np.uint64), 4) == 1
    groups = base + 2 * ((np.arange(64) // 4) * 16 + np.arange(64) % 4).astype(np.uint64)
    assert ct.vector_width(groups, 2) == 4  # runs of 4 consecutive channels
    assert ct.vector_width(np.array([base]), 4) == 1


@interpreted
def test_coalesced_copy():
    src, dst = torch.zeros(1024), torch.zeros(1024)
    src.copy_(torch.arange(1024.0))
    launch = one_launch(lambda: copy_kernel[(4,)](src, dst, 1024, BLOCK=256, MASKED=False))
    assert torch.equal(dst, src)
    # 4 programs x (load + store) x 2 instructions of 32 lanes x 4 floats
    assert launch.global_requests == 16
    assert launch.global_bytes == 2 * 4096
    assert launch.global_sectors == 2 * 4096 // 32 and launch.coalescing == 1.0
    assert launch.global_wavefronts == 2 * 4096 // 128
    assert (launch.kernel, launch.symbol) == ("copy_kernel",
                                              "copy_kernel(BLOCK=256,MASKED=0,warps=4)")
    assert (launch.grid, launch.blocks, launch.sampled_blocks, launch.scale,
            launch.window_start, launch.threads) == ((4, 1, 1), 4, 4, 1.0, 0.0, 128)
    assert launch.fma == launch.mma == launch.atomics == launch.smem_wavefronts == 0
    # trace: per program its 32 source sectors (read) then 32 destination sectors, each
    # tensor at its own 512-byte aligned (virtual) address
    sectors = launch.trace_sector
    assert sectors.dtype == np.int64 and sectors.size == 256 and launch.trace_counted.all()
    src0, dst0 = sectors[0], sectors[32]
    assert src0 % 16 == 0 and dst0 % 16 == 0 and dst0 >= src0 + 4096 // 32
    assert np.array_equal(sectors[:32], src0 + np.arange(32))
    assert np.array_equal(sectors[32:64], dst0 + np.arange(32))
    assert np.array_equal(sectors[64:96], src0 + 32 + np.arange(32))
    assert (launch.trace_kind[:32] == READ).all() and (launch.trace_kind[32:64] == WRITE).all()
    assert launch.l2_bytes == 2 * 4096


@interpreted
def test_masked_tail():
    src, dst = torch.zeros(1024), torch.full((1024,), -1.0)
    launch = one_launch(lambda: copy_kernel[(4,)](src, dst, 784, BLOCK=256, MASKED=True))
    assert (dst[784:] == -1).all()
    # the last program: one instruction with 16 active lanes' elements, one without
    assert launch.global_requests == 2 * (3 * 2 + 1)
    assert launch.global_bytes == 2 * 784 * 4
    assert launch.global_sectors == 2 * (3 * 32 + 2) and launch.coalescing == 1.0
    assert launch.global_wavefronts == 2 * (3 * 8 + 1)
    assert launch.trace_sector.size == 2 * (3 * 32 + 2)


@interpreted
def test_strided_gather():
    src, dst = torch.zeros(4 * 128 * 32), torch.zeros(4)
    launch = one_launch(lambda: gather_sum_kernel[(4,)](src, dst, STRIDE=32, BLOCK=128))
    # gather: vec 1, 32 lanes 128 bytes apart: a sector and a line per element; plus
    # one scalar store (4 bytes of 1 sector) per program
    assert launch.global_requests == 4 * (128 // 32 + 1)
    assert launch.global_sectors == 4 * (128 + 1)
    assert launch.global_wavefronts == 4 * (128 + 1)
    assert launch.global_bytes == 4 * (128 + 1) * 4
    assert launch.coalescing == 4 / 32


@interpreted
def test_atomic_add():
    dst = torch.zeros(8)
    launch = one_launch(lambda: atomic_kernel[(1,)](dst, 50, BLOCK=64))
    assert torch.equal(dst, torch.tensor([7.0, 7, 6, 6, 6, 6, 6, 6]))  # 50 lanes on 8 floats
    assert launch.atomics == 50
    # load: offs % 8 runs of 4 consecutive floats: vec 4, one instruction on the 8
    # floats (1 sector); atomic: vec 1, instructions of 32 and 18 active lanes, each on
    # the 8 floats
    assert launch.global_requests == 1 + 2
    assert launch.global_sectors == 3 and launch.global_bytes == 3 * 32
    assert launch.trace_sector.size == 1
    assert launch.trace_kind.tolist() == [READ | ATOMIC]


@interpreted
@pytest.mark.parametrize("m,n,k,valid_k", [(16, 16, 16, 9), (8, 8, 8, 8)])
def test_padded_dot(m, n, k, valid_k):
    a = torch.rand(m, k, dtype=torch.float16) + 0.5
    a[:, valid_k:] = 0  # K = 9 zero-padded to the 16-deep tile
    b = torch.rand(k, n, dtype=torch.float16) + 0.5
    c = torch.empty(m, n)
    launch = one_launch(lambda: dot_kernel[(1,)](a, b, c, M=m, N=n, K=k))
    torch.testing.assert_close(c, a.float() @ b.float())
    assert launch.mma_kind == "tl.dot"
    assert launch.executed_macs == 16 * max(n, 8) * 16  # padded to 16 x 8 x 16 steps
    assert launch.mma == (16 // 16) * (max(n, 8) // 8) * (16 // 16)
    assert launch.useful_macs == m * n * valid_k
    assert launch.smem_wavefronts == launch.smem_ideal_wavefronts == (m * k + k * n) * 2 * 2 // 128
    assert launch.fma == 0


@interpreted
@interpreted
def test_operand_used_by_several_dots_is_staged_once():
    """Three dots of one round share A; B is loaded once: 1 + ROUNDS operands of 1 KB
    each go through shared memory (stored and read: 2 KB = 16 wavefronts each), and a
    3-D dot is reported as batched (mma.sync, not wgmma)."""
    a = torch.randn(2, 16, 16).half()
    b = torch.randn(2, 16, 16).half()
    c = torch.empty(2, 16, 16)
    launch = one_launch(lambda: shared_operand_kernel[(1,)](a, b, c, ROUNDS=3))
    assert launch.smem_wavefronts == (1 + 3) * 16
    assert launch.mma == 3 * 3 * 2 * 2 and launch.mma_kind == "tl.dot batched"
    torch.testing.assert_close(c, 9 * (a.float() @ b.float()), rtol=1e-2, atol=1e-2)


def test_fma_count():
    x, w, out = torch.randn(32 * 5), torch.randn(32 * 5), torch.empty(32, 32)
    half = torch.ones(32, dtype=torch.float16)
    launch = one_launch(lambda: fma_kernel[(3,)](x, w, out, half, STEPS=5))
    torch.testing.assert_close(out, x.view(32, 5) @ w.view(32, 5).T)
    assert launch.fma == 3 * 5 * 32 * 32  # the fp32 multiplies, not the fp16 one


@interpreted
def test_window_sampling_1d():
    dst = torch.full((2000,), -1.0)
    launch = one_launch(lambda: id_kernel[(2000,)](dst))
    ran = np.flatnonzero(dst.numpy() >= 0)
    assert ran.tolist() == list(range(680, 2000))  # warm-up + counted; the rest skipped
    assert np.array_equal(dst[680:].numpy(), np.arange(680, 2000, dtype=np.float32))
    assert (launch.blocks, launch.sampled_blocks) == (2000, 1056)
    assert launch.scale == pytest.approx(2000 / 1056)
    assert launch.window_start == pytest.approx(944 / 2000)
    assert launch.global_requests == 1056 and launch.global_bytes == 4 * 1056
    # one sector per program, in launch order, warm-up first
    assert launch.trace_counted.tolist() == [False] * 264 + [True] * 1056
    assert np.array_equal(launch.trace_sector - launch.trace_sector[0], 4 * ran // 32 - 680 // 8)


@interpreted
def test_window_sampling_launch_order():
    # grid (3, 700): program id x fastest in launch order (the interpreter runs y fastest)
    dst = torch.full((2100,), -1.0)
    launch = one_launch(lambda: id_kernel[(3, 700)](dst))
    window = ct.sample_window(2100)
    ran = np.flatnonzero(dst.numpy() >= 0)
    assert ran.tolist() == list(range(window.warm_start, window.count_end))
    assert launch.grid == (3, 700, 1) and launch.sampled_blocks == window.counted
    first = window.warm_start * 4 // 32
    assert np.array_equal(launch.trace_sector - launch.trace_sector[0], 4 * ran // 32 - first)
    assert launch.trace_counted.sum() == window.counted


@interpreted
def test_glue_detection():
    recorder = ct._Recorder(2.0, 0.5)
    x = torch.randn(4, 6)
    with ct._glue_mode(recorder):
        x.contiguous()
        x.to(torch.float32)
        x.t()
        x.view(6, 4).permute(1, 0)
        x[:, 0].unsqueeze(0)
        torch.empty(3)
        x.sum().item()  # the sum is a kernel; item is a host read
        x.double()
        x.t().contiguous()
        torch.rsqrt(x.abs() + 1)
        torch.zeros(3).add_(1)
    assert [r.kernel for r in recorder.launches] == [
        f"torch aten::{op}" for op in ("sum", "_to_copy", "clone", "abs", "add", "rsqrt",
                                       "zeros", "add_")]
    glue = recorder.launches[0]
    assert (glue.grid, glue.blocks, glue.sampled_blocks, glue.scale, glue.global_bytes,
            glue.trace_sector.size) == ((1, 1, 1), 1, 1, 1.0, 0, 0)


# The Triton launches of each pass on SMALL (4 channels per group: 2 pieces of 16
# channels, each 4 groups packed block-diagonally; rows of 8 pixels: the 16 lanes of a
# program hold the same row of both images, one program in all).
TILE = "GUARD=1,SLOTS=4,K_STEPS=1,PIECES=2,SUB_K=16,SUB_N=16,BW=16,ROWS=8,IMGS=2,RUN=4,ALIGNED=1"


def rows(mode, stride=1, dil=1, from_dy=0, save=0, wgrad=0):
    # rows of 16 pixels: 4 warps in every pass (triton_backend.fixed_warps); the walk
    # takes 3 rows a trip but in the fused pass
    warps = 4  # SMALL: UNROLL=3
    return (f"conv_rows_kernel(MODE={mode},STRIDE={stride},DIL={dil},FROM_DY={from_dy},"
            f"HOLD=1,{TILE},SAVE={save},WGRAD={wgrad},UNROLL={1 if wgrad else 3},"
            f"PRECISION=tf32,WARPS={warps},warps={warps})")


def pack(fold=0):
    return ("pack_kernel(F_K_STEPS=1,F_SUB_K=16,F_SUB_N=16,D_K_STEPS=1,D_SUB_K=16,D_SUB_N=16,"
            f"FOLD={fold},BLOCK=1024,warps=4)")


MERGE = "BLOCK_R=64,BLOCK_C=64,warps=4)"
# One pack launch a pass: the forward's weight tiles and/or dgrad's transposed ones, and
# the weight gradient's sums zeroed; dgrad adds the weight gradient on the way.
TRITON_KERNELS = {
    "eval": [pack(), rows(0, save=1)],
    "train_fwd": [pack(), rows(1), f"stats_kernel({MERGE}", rows(0)],
    "train_bwd": [pack(), rows(2), f"sums_kernel({MERGE}", rows(3), rows(4, wgrad=1)],
    # eval: dgrad's tiles times γ·invstd (its operand is dy·[y > 0])
    "eval_bwd": [pack(fold=1), rows(4, from_dy=1, wgrad=1)],
}


@interpreted
@pytest.mark.parametrize("pass_name", ct.PASSES)
def test_real_pass(pass_name):
    launches = ct.count_pass(SMALL, pass_name, torch.float16)
    kernels = [r for r in launches if not r.kernel.startswith("torch ")]
    glue = [r for r in launches if r.kernel.startswith("torch ")]
    assert [r.symbol for r in kernels] == TRITON_KERNELS[pass_name]
    for r in kernels:
        assert r.backend == "triton" and r.scale == 1.0 and r.sampled_blocks == r.blocks > 0
        assert r.global_requests > 0 and r.global_sectors > 0
        assert 0 < r.global_bytes <= r.global_sectors * 32
        assert r.trace_sector.size == r.trace_kind.size == r.trace_counted.size > 0
        assert r.trace_counted.all()
        if r.kernel == "conv_rows_kernel":
            assert r.mma > 0 and r.mma_kind == "tl.dot batched"
            assert r.useful_macs < r.executed_macs  # block-diagonal: zeros off the groups
    assert all(r.global_bytes == 0 and r.grid == (1, 1, 1) for r in glue)
    names = [r.kernel for r in launches]
    (pack,) = [r for r in kernels if r.kernel == "pack_kernel"]
    # every entry of the packed tiles written (fp16): the forward's (eval, train_fwd,
    # and train_bwd's reduce and dc passes), dgrad's (both backwards), and the weight
    # gradient's fp32 sums zeroed (the backwards)
    entries = 2 * 9 * 16 * 16  # 2 pieces x 9 taps x [16 x 16]
    tiles = {"eval": 1, "train_fwd": 1, "train_bwd": 2, "eval_bwd": 1}[pass_name]
    zeros = 32 * 9 * 4 if pass_name in ("train_bwd", "eval_bwd") else 0
    written = np.count_nonzero(pack.trace_kind & WRITE) * 32
    assert written == tiles * entries * 2 + zeros * 4
    programs = tiles * -(-entries // 1024) + -(-zeros // 1024)  # 1,024 entries a program
    assert pack.threads == 128 and pack.grid == (programs, 1, 1)
    if pass_name == "eval":
        assert names == ["pack_kernel", "conv_rows_kernel"]  # no torch op around the pass
        conv = kernels[-1]
        again = [r for r in ct.count_pass(SMALL, pass_name, torch.float16)
                 if r.kernel == "conv_rows_kernel"][0]  # independent of the CPU's addresses
        assert (again.global_wavefronts, again.global_sectors) == (conv.global_wavefronts,
                                                                    conv.global_sectors)
        assert np.array_equal(again.trace_sector, conv.trace_sector)
        # 1 program: 8 input rows x 9 taps of [2 x 16 x 16] x [16 x 16], as 4 warps run
        # them: each piece's 16 outputs split in two, [4 x 16 x 16] x [4 x 16 x 8]
        assert conv.executed_macs == 8 * 9 * 2 * 16 ** 3
        assert conv.mma == 8 * 9 * 4 * 1 * 1 * 1
        # operands staged once, stored and read: 8 rows x 3 input tiles (each piece's
        # rows once per half: 2 KB) and 9 weight tiles (1 KB)
        assert conv.smem_wavefronts == (8 * 3 * 2 + 9) * 1024 * 2 // 128
        # the output, 2 x 8 x 8 pixels x 32 fp16 channels, and the saved mean and var
        assert np.count_nonzero(conv.trace_kind & WRITE) == 2 * 64 * 32 * 2 // 32 + 2 * 4
        assert conv.threads == 128 and conv.grid == (1, 1, 1)
    if pass_name == "train_fwd":  # statistics merged by a kernel between the conv passes
        assert names[names.index("conv_rows_kernel"):] == ["conv_rows_kernel", "stats_kernel",
                                                           "conv_rows_kernel"]
    if pass_name in ("train_bwd", "eval_bwd"):
        fused = kernels[-1]  # dgrad + wgrad
        assert fused.grid == (1, 1, 1) and fused.threads == 128  # 4 warps (fixed_warps)
        assert fused.atomics == 32 * 9 * 4  # every dw entry, once per program


@interpreted
def test_stride_2_dgrad_multiplies_no_dilation_zeros():
    """dgrad of a stride-2 conv walks a row tile's even and odd columns apart, each
    through the taps that meet dc: with dense dc (the training backward) and 16 channels
    per group (no block-diagonal zeros) nearly every multiply-add is useful, where the
    dilated walk's zero columns made half of them zeros."""
    problem = Problem(2, 32, 32, 16, 16, 2, 2)
    (dgrad,) = [r for r in ct.count_pass(problem, "train_bwd", torch.float16)
                if r.kernel == "conv_rows_kernel" and "DIL=2" in r.symbol]
    assert dgrad.useful_macs > 0.85 * dgrad.executed_macs


@interpreted
def test_wgrad_adds_dw_in_address_order():
    """32 channels per group: the separate weight-gradient pass, one program a group
    (one 32-wide input-channel step, its sums split in 4 along the input channels). It
    adds each dw entry once with its input channels, contiguous in dw, along the lanes
    (the order the compiled atomics take): every request whole 32-byte sectors."""
    problem = Problem(1, 64, 64, 7, 7, 2, 1)
    (wgrad,) = [r for r in ct.count_pass(problem, "train_bwd", torch.float16)
                if r.kernel == "wgrad_kernel"]
    assert "PIECES=1,SUB_K=32,SUB_N=32,SPLIT=4" in wgrad.symbol
    assert wgrad.grid == (2, 1, 1)  # one program a group, each dc row read once
    assert wgrad.atomics == 64 * 9 * 32  # every dw entry once
    assert wgrad.coalescing == 1.0


@interpreted
def test_counted_variants_are_compiled_by_the_aot_report():
    """A ResNeXt-50 layer's launches are keys of the AOT/SASS reports (s5: 7 x 7, one
    image keeps the interpreter quick)."""
    from resnext_kernels.bench import triton_aot

    compiled = {ct.variant_name(*v) for v in triton_aot.variants(quick=False)}
    s5 = Problem(1, 1024, 1024, 7, 7, 32, 1)
    for pass_name in ct.PASSES:
        symbols = {r.symbol for r in ct.count_pass(s5, pass_name, torch.float16)
                   if not r.kernel.startswith("torch ")}
        assert symbols and symbols <= compiled, symbols - compiled


def test_count_in_child_process():
    launches = ct.run_in_child(SMALL, "eval", torch.float16)
    assert [r.symbol for r in launches] == TRITON_KERNELS["eval"]
    conv = launches[-1]
    assert conv.executed_macs == 8 * 9 * 2 * 16 ** 3 and conv.trace_sector.size > 0
