"""Triton kernels of the fused grouped 3x3 conv (padding 1) + BatchNorm + ReLU, NHWC, on
tensor cores (``tl.dot``) for every group width.

Groups packed block-diagonally. A program owns a slab of ``PIECES x SUB_N`` contiguous
output channels (64 where the layer has them: whole 128-byte lines in 16-bit types) and
multiplies each piece of ``SUB_N`` channels by the input channels of the groups in it:
``SUB_N = max(16, Cg)``, so at 4 and 8 channels per group a piece holds 4 or 2 groups and
its weight tile is block-diagonal (zeros off the groups, packed once per call by
``pack_kernel``); from 16 up a piece is (part of) one group, and wide
groups loop over ``K_STEPS`` chunks of input channels. The pieces are the batch dimension
of a 3-D ``tl.dot``: Triton places every warp of a 3-D dot on the batch dimension, and
with fewer batch entries than warps the warps would issue each other's mma tiles again
(8 warps on 4 pieces, 4 on s5's 2). So each piece is split ``MSPLIT`` ways along its
pixels where each part keeps 16 (32 pixels a row tile: [PIECES·MSPLIT, BW / MSPLIT,
SUB_N], a reshape, each input row staged once), else ``SPLIT`` ways along its output
channels ([PIECES·SPLIT, BW, SUB_N / SPLIT], each input row staged once per part:
``_rows``); the epilogue runs on [PIECES, BW, SUB_N] (``_join``).

Rows walked once. A program computes ``ROWS`` output rows x ``BW`` columns. It walks the
input rows once; each row's three column-shifted tiles (taps kw = 0, 1, 2) are loaded once
and multiplied by the weights of every kh tap that reaches an output row of the program,
into three rolling output-row accumulators (stride 1), or two (stride 2). An input row is
thus loaded (and staged as an MMA operand) once per program instead of once per tap.

Non-finite inputs. A packed product multiplies an input of one group by the zeros of
another group's weights, and 0 x Inf = NaN would leak across groups. Where a piece holds
several groups (``GUARD``) the walk adds up its output rows' accumulators elementwise
(one add per element and row); a non-finite operand makes that sum non-finite (0 x Inf
and Inf x w are), checked once per row tile. Such a tile is walked again multiplied
group by group (each product masked to its group's outputs, ``SAFE``), which gives
PyTorch's pattern: its outputs are written again and its sums replaced.

Kernels (the glue is ``resnext_kernels/triton_backend.py``):

* ``conv_rows_kernel``: the conv and an epilogue chosen by ``MODE``, its per-channel
  vectors folded in the prologue (no torch ops around it): WRITE (y = relu(c·scale +
  shift) from va..vd = γ, β, mean, var; ``SAVE`` also copies mean and var to
  ``partial_ptr``/``sv_ptr``: eval), STATS (per-program (count, mean, M2) per channel),
  REDUCE (per-program Σdz and Σdz·x̂ from va..vd = γ, β, mean, var), DC (dc =
  γ·invstd·(dz − Σdz/count − x̂·Σdz·x̂/count) from va..vd as REDUCE and sv, ve = Σdz,
  Σdz·x̂), PLAIN (store c: dgrad). REDUCE and DC recompute c, and dz = dy·[y > 0] with
  y recomputed from c exactly as WRITE rounds it (the forward's output is not read).
  dgrad is this conv on dc with each group's weights transposed and the taps flipped;
  at stride 2 on dc dilated by 2 (``DIL``), none of the dilation's zeros multiplied:
  its zero rows are skipped, and a row tile's even and odd output columns are walked
  apart, each through the taps that meet dc (``_taps``). ``FROM_DY``
  (eval backward) takes dc = γ·invstd·dy·[y > 0] as the operand dy·[y > 0], a select
  while loading, and γ·invstd folded into dgrad's weight tiles (``pack_kernel``'s
  ``FOLD``) and into the weight gradient's sums where they are added (va, vb = γ, var).
  ``WGRAD``: dgrad also sums the weight gradient x_tapᵀ · dc from the dc tiles it loads
  and the forward input at its own pixels (each read once), added to dw with float
  atomics once per program; a tile whose dc held a NaN or an infinity has its dx
  written again by the guarded walk after that.
* ``pack_kernel``: the weight tiles (block-diagonal; the forward's and/or dgrad's,
  transposed and flipped) and the zeroed weight-gradient sums, in one launch a pass.
* ``stats_kernel``: the batch mean and variance from the statistics pass's partials
  (fp64, fixed order).
* ``sums_kernel``: Σdz and Σdz·x̂ from the reduce pass's partials (fp64, fixed order).
* ``wgrad_kernel``: the weight gradient where dgrad does not add it (deterministic
  mode, no dx wanted, 12 or >= 32 channels per group): dw = Σ_pixels dcᵀ · x_tap per
  (channel slab, input-channel step),
  all nine taps, over the row tiles chunk, chunk + CHUNKS, ... (rows walked as in the
  conv: each dc row and each x row loaded once per tile); added with ``tl.atomic_add``
  or written as per-chunk partials (DETERMINISTIC), only the entries inside the groups.

Operands reach ``tl.dot`` in the input dtype (fp32 with ``PRECISION`` "tf32" or "ieee");
accumulation and epilogues are fp32.
"""

import os

import triton
import triton.language as tl
from triton.language.target_info import cuda_capability_geq

WRITE, STATS, REDUCE, DC, PLAIN = 0, 1, 2, 3, 4
# Compiled for a GPU (not run by the interpreter, which has no inline assembly).
COMPILED = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def _relu(v):
    # NaN-propagating, like torch.relu (max(NaN, 0) would give 0).
    return tl.where((v > 0) | (v != v), v, 0.0)


@triton.jit
def _gamma_invstd(gamma_ptr, var_ptr, c, mask, eps):
    """γ·invstd = γ / √(var + eps) of channels ``c`` (0 where not ``mask``): the eval
    backward's dc = γ·invstd·dy·[y > 0] scale."""
    return tl.load(gamma_ptr + c, mask=mask, other=0.0) / tl.sqrt_rn(
        tl.load(var_ptr + c, mask=mask, other=1.0) + eps)


@triton.jit
def _where_positive(a, y):
    """a where y > 0, else +0 (a NaN y gives 0, as torch's ReLU backward). Compiled for
    16-bit operands: two lanes a register, ``set.gt.u32`` (0xFFFF a lane where y > 0)
    and an AND, where the comparison, two selects and the repacking cost five
    instructions (bf16 pairs need sm_90); else a select. Declared impure so that the
    compiler keeps it where it is: else it recomputes it in each layout its result is
    used in (dgrad's dot and the weight gradient's), converting dy and y through shared
    memory instead of the result once."""
    if COMPILED and ((a.dtype == tl.float16) | ((a.dtype == tl.bfloat16)
                                                 & cuda_capability_geq(9, 0))):
        kind: tl.constexpr = "f16x2" if a.dtype == tl.float16 else "bf16x2"
        return tl.inline_asm_elementwise(
            "{ .reg .b32 z, m; mov.b32 z, 0; set.gt.u32." + kind + " m, $2, z; "
            "and.b32 $0, $1, m; }", "=r,r,r", [a, y], dtype=a.dtype, is_pure=False, pack=2)
    return tl.where(y > 0, a, tl.zeros_like(a))


@triton.jit
def _load_a(a_ptr, ys_ptr, pix, col, lane_ok, kw: tl.constexpr, kglob, kmask, W_A, KC,
            DIL: tl.constexpr, FROM_DY: tl.constexpr):
    """The [PIECES, BW, SUB_K] operand of tap ``kw`` of the row whose pixel ``col`` the
    lanes' ``pix`` (element offsets, ``_taps``) address: zeros outside the image, past
    KC and in lanes without an image (``lane_ok``). At ``DIL`` 1 tap kw reads column
    col - 1 + kw; at ``DIL`` 2 (``col`` = ow // 2, the lanes' columns of one phase) the
    even columns' kw = 1 and the odd ones' kw = 0 read dc column col, kw = 2 col + 1.
    ``FROM_DY`` (eval backward): ``a_ptr`` is dy and the operand dy·[y > 0], a select in
    the input dtype (dc = γ·invstd·dy·[y > 0] without its scale, which is folded into
    dgrad's weight tiles and the weight gradient's sums)."""
    if DIL == 1:
        step: tl.constexpr = kw - 1
        ok_col = (col + step >= 0) & (col + step < W_A)
    else:
        step: tl.constexpr = kw // 2
        ok_col = col + step < W_A
    offs = (pix + step * KC)[:, None, None] + kglob[None, :, :]
    mask = (ok_col & lane_ok)[:, None, None] & kmask[None, :, :]
    a = tl.load(a_ptr + offs, mask=mask, other=0.0)
    if FROM_DY:
        a = _where_positive(a, tl.load(ys_ptr + offs, mask=mask, other=0.0))
    return tl.permute(a, (1, 0, 2))


@triton.jit
def _nonfinite(t):
    """Whether the 3-D tensor ``t`` holds a NaN or an infinity."""
    bad = t - t != 0  # Inf - Inf and NaN are NaN
    return tl.max(tl.max(tl.max(bad.to(tl.int32), 2), 1), 0) > 0


@triton.jit
def _weights(wp_ptr, wbase, tap, ks, K_STEPS: tl.constexpr, SUB_K: tl.constexpr,
             SUB_N: tl.constexpr, SPLIT: tl.constexpr):
    """The packed weight tile of ``tap``, input-channel step ``ks``, as the dots take it:
    [PIECES·SPLIT, SUB_K, SUB_N / SPLIT], entry e the outputs [(e % SPLIT)·SUB_N / SPLIT,
    ...) of piece ``wbase[e]``."""
    NS: tl.constexpr = SUB_N // SPLIT
    k = tl.arange(0, SUB_K)
    part = tl.arange(0, wbase.shape[0]) % SPLIT
    nn = (part * NS)[:, None, None] + tl.arange(0, NS)[None, None, :]
    offs = (wbase[:, None, None] * 9 + tap) * K_STEPS + ks
    return tl.load(wp_ptr + offs * (SUB_K * SUB_N) + k[None, :, None] * SUB_N + nn)


@triton.jit
def _spread(a, SPLIT: tl.constexpr):
    """A [PIECES, M, K] operand as the split dots take it: [PIECES·SPLIT, M, K], each
    piece's rows once per part of the other operand (``_part``) or of the sums."""
    if SPLIT > 1:
        a = tl.reshape(tl.broadcast_to(a[:, None, :, :], (a.shape[0], SPLIT, a.shape[1],
                                                          a.shape[2])),
                       (a.shape[0] * SPLIT, a.shape[1], a.shape[2]))
    return a


@triton.jit
def _part(a, SPLIT: tl.constexpr):
    """A [PIECES, BW, K] operand as [PIECES·SPLIT, BW, K / SPLIT], entry e the channels
    [(e % SPLIT)·K / SPLIT, ...) of piece e // SPLIT (the inverse of ``_join``)."""
    if SPLIT > 1:
        a = tl.reshape(tl.permute(tl.reshape(a, (a.shape[0], a.shape[1], SPLIT,
                                                 a.shape[2] // SPLIT)), (0, 2, 1, 3)),
                       (a.shape[0] * SPLIT, a.shape[1], a.shape[2] // SPLIT))
    return a


@triton.jit
def _rows(a, SPLIT: tl.constexpr, MSPLIT: tl.constexpr, USE: tl.constexpr):
    """A [PIECES, BW, K] operand as the split dots take it: [PIECES·MSPLIT, BW / MSPLIT,
    K], entry e the pixels [(e % MSPLIT)·BW / MSPLIT, ...) of piece e // MSPLIT (a
    reshape: each row staged once), or spread for the split along the output channels
    (``_spread``); ``a`` as it is where its tap is not taken (``USE``: ``_taps``)."""
    if USE:
        if MSPLIT > 1:
            a = tl.reshape(a, (a.shape[0] * MSPLIT, a.shape[1] // MSPLIT, a.shape[2]))
        else:
            a = _spread(a, SPLIT)
    return a


@triton.jit
def _join(acc, SPLIT: tl.constexpr, MSPLIT: tl.constexpr):
    """Split accumulators [PIECES·SPLIT·MSPLIT, BW / MSPLIT, SUB_N / SPLIT] as [PIECES, BW,
    SUB_N]."""
    if MSPLIT > 1:
        acc = tl.reshape(acc, (acc.shape[0] // MSPLIT, acc.shape[1] * MSPLIT, acc.shape[2]))
    elif SPLIT > 1:
        acc = tl.reshape(tl.permute(tl.reshape(acc, (acc.shape[0] // SPLIT, SPLIT,
                                                     acc.shape[1], acc.shape[2])),
                                    (0, 2, 1, 3)),
                         (acc.shape[0] // SPLIT, acc.shape[1], acc.shape[2] * SPLIT))
    return acc


@triton.jit
def _kh(acc, a0, a1, a2, h0, h1, h2, wp_ptr, wbase, kh: tl.constexpr, ks, HOLD: tl.constexpr,
        K_STEPS: tl.constexpr, SUB_K: tl.constexpr, SUB_N: tl.constexpr, SPLIT: tl.constexpr,
        KW1: tl.constexpr, KW02: tl.constexpr, PRECISION: tl.constexpr):
    """acc + Σ_kw a_kw · w(kh, kw) over the taps kw the lanes' columns take (``KW1``: 1,
    ``KW02``: 0 and 2; ``_taps``): the weights ``h0..h2`` held in registers (``HOLD``) or
    loaded here for input-channel step ``ks``."""
    if KW02:
        acc = _tap(acc, a0, h0, wp_ptr, wbase, 3 * kh, ks, HOLD, K_STEPS, SUB_K, SUB_N, SPLIT,
                   PRECISION)
    if KW1:
        acc = _tap(acc, a1, h1, wp_ptr, wbase, 3 * kh + 1, ks, HOLD, K_STEPS, SUB_K, SUB_N,
                   SPLIT, PRECISION)
    if KW02:
        acc = _tap(acc, a2, h2, wp_ptr, wbase, 3 * kh + 2, ks, HOLD, K_STEPS, SUB_K, SUB_N,
                   SPLIT, PRECISION)
    return acc


@triton.jit
def _tap(acc, a, held, wp_ptr, wbase, tap: tl.constexpr, ks, HOLD: tl.constexpr,
         K_STEPS: tl.constexpr, SUB_K: tl.constexpr, SUB_N: tl.constexpr, SPLIT: tl.constexpr,
         PRECISION: tl.constexpr):
    """acc + a · w(tap): the weights ``held`` or loaded for input-channel step ``ks``."""
    b = held
    if not HOLD:
        b = _weights(wp_ptr, wbase, tap, ks, K_STEPS, SUB_K, SUB_N, SPLIT)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _taps(a_ptr, ys_ptr, n, lane_ok, ir, ow, kglob, kmask, H_A, W_A, KC, STRIDE: tl.constexpr,
          DIL: tl.constexpr, FROM_DY: tl.constexpr, KW1: tl.constexpr, KW02: tl.constexpr):
    """The operands a0, a1, a2 of row ``ir``'s taps kw = 0, 1, 2 (``_load_a``), those the
    lanes' columns take: all three at ``DIL`` 1; on dc dilated by 2 the lanes hold one
    column phase (``PHASE``), even columns meeting dc through kw = 1 alone (``KW1``), odd
    ones through kw = 0 and 2 (``KW02``): the others would be dilation holes, zeros; 0
    in their place, never multiplied. The lanes' pixel offsets computed once for the
    three."""
    if DIL == 1:
        col = ow * STRIDE
        row = ir
    else:
        col = ow // DIL
        row = ir // DIL
    pix = ((n * H_A + row) * W_A + col).to(tl.int64) * KC
    a0 = 0
    a1 = 0
    a2 = 0
    if KW02:
        a0 = _load_a(a_ptr, ys_ptr, pix, col, lane_ok, 0, kglob, kmask, W_A, KC, DIL, FROM_DY)
    if KW1:
        a1 = _load_a(a_ptr, ys_ptr, pix, col, lane_ok, 1, kglob, kmask, W_A, KC, DIL, FROM_DY)
    if KW02:
        a2 = _load_a(a_ptr, ys_ptr, pix, col, lane_ok, 2, kglob, kmask, W_A, KC, DIL, FROM_DY)
    return a0, a1, a2


@triton.jit
def _slot_rows(a, keep, SPLIT: tl.constexpr, MSPLIT: tl.constexpr, USE: tl.constexpr):
    """``a`` kept where ``keep`` (zeros elsewhere) as the split dots take it (``_rows``),
    where the tap is taken (``USE``)."""
    if USE:
        a = _rows(tl.where(keep, a, tl.zeros_like(a)), SPLIT, MSPLIT, True)
    return a


@triton.jit
def _row(t0, t1, t2, g, xr, a_ptr, ys_ptr, wp_ptr, w0, w1, w2, w3, w4, w5,
         w6, w7, w8, wbase, n, lane_ok, ir, ow, first_group, nslot, H_A, W_A, KC, KG,
         USE0: tl.constexpr, USE1: tl.constexpr, USE2: tl.constexpr,
         STRIDE: tl.constexpr, DIL: tl.constexpr, PHASE: tl.constexpr, FROM_DY: tl.constexpr,
         HOLD: tl.constexpr, SAFE: tl.constexpr, SLOTS: tl.constexpr, K_STEPS: tl.constexpr,
         SUB_K: tl.constexpr, SUB_N: tl.constexpr, SPLIT: tl.constexpr, MSPLIT: tl.constexpr,
         ALIGNED: tl.constexpr, WGRAD: tl.constexpr, PRECISION: tl.constexpr):
    """Adds what input row ``ir`` gives through taps kh = 0, 1, 2 (``USEkh``) to the split
    [PIECES·SPLIT·MSPLIT, BW / MSPLIT, SUB_N / SPLIT] accumulators t0, t1, t2 (summed over
    kw and the input-channel steps); nothing for a row outside the image or in a dilation
    hole, not loaded. ``nslot``: the group slot of each accumulator channel,
    [PIECES·SPLIT·MSPLIT, SUB_N / SPLIT].

    ``SAFE`` (a tile that held a NaN or an infinity, walked again): the row is
    multiplied one group slot at a time (the operand masked to the slot's input
    channels, the sum kept for its outputs only), so that no packed zero meets a
    non-finite value.

    ``WGRAD`` (dgrad, one input-channel step): also adds the row's share of the weight
    gradient to the nine split [PIECES·WSPLIT, SUB_N, SUB_K / WSPLIT] sums ``g``
    (tap-major; ``_wgrad_row``), from ``xr``, the forward input's rows ir - 1, ir, ir + 1
    at the program's own pixels."""
    KW1: tl.constexpr = (DIL == 1) | (PHASE == 0)  # the taps kw the lanes take (``_taps``)
    KW02: tl.constexpr = (DIL == 1) | (PHASE == 1)
    if (ir >= 0) & (ir % DIL == 0) & (ir // DIL < H_A):
        for ks in range(K_STEPS):
            kstart = first_group * KG
            if ALIGNED:  # every piece's first input channel is a multiple of 16
                kstart = tl.multiple_of(kstart, 16)
            kglob = kstart[:, None] + ks * SUB_K + tl.arange(0, SUB_K)[None, :]
            kmask = kglob < KC
            a0, a1, a2 = _taps(a_ptr, ys_ptr, n, lane_ok, ir, ow, kglob, kmask, H_A, W_A, KC,
                               STRIDE, DIL, FROM_DY, KW1, KW02)
            if WGRAD:
                g = _wgrad_row(g, xr, a0, a1, a2, DIL, KW1, KW02, PRECISION)
            if SAFE:
                kslot = (kglob // KG - first_group[:, None])[:, None, :]
                for j in range(SLOTS):
                    on = nslot[:, None, :] == j
                    b0 = _slot_rows(a0, kslot == j, SPLIT, MSPLIT, KW02)
                    b1 = _slot_rows(a1, kslot == j, SPLIT, MSPLIT, KW1)
                    b2 = _slot_rows(a2, kslot == j, SPLIT, MSPLIT, KW02)
                    if USE0:
                        t0 = tl.where(on, _kh(t0, b0, b1, b2, w0, w1, w2, wp_ptr, wbase, 0, ks,
                                              HOLD, K_STEPS, SUB_K, SUB_N, SPLIT, KW1, KW02,
                                              PRECISION),
                                        t0)
                    if USE1:
                        t1 = tl.where(on, _kh(t1, b0, b1, b2, w3, w4, w5, wp_ptr, wbase, 1, ks,
                                              HOLD, K_STEPS, SUB_K, SUB_N, SPLIT, KW1, KW02,
                                              PRECISION),
                                        t1)
                    if USE2:
                        t2 = tl.where(on, _kh(t2, b0, b1, b2, w6, w7, w8, wp_ptr, wbase, 2, ks,
                                              HOLD, K_STEPS, SUB_K, SUB_N, SPLIT, KW1, KW02,
                                              PRECISION),
                                        t2)
            else:
                s0 = _rows(a0, SPLIT, MSPLIT, KW02)
                s1 = _rows(a1, SPLIT, MSPLIT, KW1)
                s2 = _rows(a2, SPLIT, MSPLIT, KW02)
                if USE0:
                    t0 = _kh(t0, s0, s1, s2, w0, w1, w2, wp_ptr, wbase, 0, ks, HOLD, K_STEPS,
                             SUB_K, SUB_N, SPLIT, KW1, KW02, PRECISION)
                if USE1:
                    t1 = _kh(t1, s0, s1, s2, w3, w4, w5, wp_ptr, wbase, 1, ks, HOLD, K_STEPS,
                             SUB_K, SUB_N, SPLIT, KW1, KW02, PRECISION)
                if USE2:
                    t2 = _kh(t2, s0, s1, s2, w6, w7, w8, wp_ptr, wbase, 2, ks, HOLD, K_STEPS,
                             SUB_K, SUB_N, SPLIT, KW1, KW02, PRECISION)
    return t0, t1, t2, g


@triton.jit
def _wgrad_row(g, xr, a0, a1, a2, DIL: tl.constexpr, KW1: tl.constexpr, KW02: tl.constexpr,
               PRECISION: tl.constexpr):
    """dW(kh, kw) += x(row ir - 1 + kh)ᵀ · a_(2 - kw): the operand a_j holds dc at columns
    ow - 1 + j, which meets the input pixel ow through tap kw = 2 - j (the contraction
    runs over the pixels, so the packed zeros never meet another group's values).

    Exactly PyTorch's products, so that its NaN/Inf pattern comes out: an input row takes
    part (``xr[3 + kh]``) where the program owns it or it is the zero padding above or
    below the image (a halo row belongs to another program). The zero padding left of
    column 0 and right of column W - 1 has no lane: its product with dc (0 · dc, NaN
    where dc is not finite) is added to the neighbouring lane's dc, at lane 0 of kw = 0
    (lanes ``xr[6]``) and lane W - 1 of kw = 2 (``xr[7]``). On dc dilated by 2 (one
    column phase: ``_taps``) the padding's dc column 0 is a0 at column 1, added there to
    kw = 0; right of the image a lane of the odd phase always holds the padding (or no
    dc column meets it).

    The sums ``g`` are split along their dc channels as the conv's accumulators are along
    theirs ([PIECES·SPLIT, SUB_N, SUB_K / SPLIT]: ``_part``), so that no warp repeats
    another's mma tiles; the x rows ``xr[0..2]`` come spread for it (``_spread``, once
    per row where it is loaded: each row meets three dc rows)."""
    b0 = a0
    b1 = a1
    b2 = a2
    if KW1:
        SPLIT: tl.constexpr = g[0].shape[0] // a1.shape[0]
        if DIL == 1:
            zero = tl.zeros_like(a1)
            b2 = _part((a2 + tl.where(xr[6][None, :, None], a1 * 0.0, zero)).to(a2.dtype),
                       SPLIT)
            b0 = _part((a0 + tl.where(xr[7][None, :, None], a1 * 0.0, zero)).to(a0.dtype),
                       SPLIT)
        b1 = _part(a1, SPLIT)
    elif KW02:
        SPLIT: tl.constexpr = g[0].shape[0] // a0.shape[0]
        zero = tl.zeros_like(a0)
        b2 = _part((a2 + tl.where(xr[6][None, :, None], a0 * 0.0, zero)).to(a2.dtype), SPLIT)
        b0 = _part(a0, SPLIT)
    s0, s1, s2 = _wgrad_kh(g[0], g[1], g[2], xr[0], xr[3], b0, b1, b2, KW1, KW02, PRECISION)
    s3, s4, s5 = _wgrad_kh(g[3], g[4], g[5], xr[1], xr[4], b0, b1, b2, KW1, KW02, PRECISION)
    s6, s7, s8 = _wgrad_kh(g[6], g[7], g[8], xr[2], xr[5], b0, b1, b2, KW1, KW02, PRECISION)
    return s0, s1, s2, s3, s4, s5, s6, s7, s8


@triton.jit
def _wgrad_kh(s0, s1, s2, x, on, a0, a1, a2, KW1: tl.constexpr, KW02: tl.constexpr,
              PRECISION: tl.constexpr):
    """The taps of one kh the lanes take (``_taps``) where input row ``x`` takes part
    (``on``)."""
    if on:
        if KW02:
            s0 = tl.dot(x, a2, s0, input_precision=PRECISION)
        if KW1:
            s1 = tl.dot(x, a1, s1, input_precision=PRECISION)
        if KW02:
            s2 = tl.dot(x, a0, s2, input_precision=PRECISION)
    return s0, s1, s2


@triton.jit
def _takes_part(row, oh0, H_O, ROWS: tl.constexpr):
    """Whether the forward input's ``row`` takes part in the program's weight gradient: a
    row of the program's own, or the zero padding above or below the image."""
    return ((row >= oh0) & (row < oh0 + ROWS) & (row < H_O)) | (row == -1) | (row == H_O)


@triton.jit
def _x_tile(x_ptr, n, lane_ok, row, oh0, ow, nglob, nmask, H_O, W_O, NC, ROWS: tl.constexpr):
    """The forward input (dgrad's output side) at ``row``, the program's columns ``ow`` and
    channels ``nglob``, as the [PIECES, SUB_N, BW] operand of the weight gradient: zeros
    outside the image and outside the program's rows [oh0, oh0 + ROWS), so that each
    (input pixel, dc pixel) pair is counted by one program."""
    ok = (ow < W_O) & (row >= oh0) & (row < oh0 + ROWS) & (row >= 0) & (row < H_O) & lane_ok
    offs = ((n * H_O + row) * W_O + ow).to(tl.int64)[:, None, None] * NC + nglob[None, :, :]
    x = tl.load(x_ptr + offs, mask=ok[:, None, None] & nmask[None, :, :], other=0.0)
    return tl.permute(x, (1, 2, 0))


@triton.jit
def _emit(acc, oh, oh0, l0, l1, l2, out_ptr, dy_ptr, n, lane_ok, ow, nglob, nmask, va, vb,
          vc, scale, shift, H_O, W_O, NC, MODE: tl.constexpr):
    """The epilogue of output row ``oh`` of the tile from row ``oh0``; returns the
    per-lane sums ``l0..l2`` (added up across the lanes once a tile: ``_tile_sums``;
    STATS: the shift [PIECES, 1, SUB_N] and [PIECES, BW, SUB_N] as the accumulator,
    REDUCE: [BW, PIECES, SUB_N]).
    ``scale`` and ``shift``: the forward's folded BatchNorm (REDUCE, DC: the ReLU
    mask)."""
    c = tl.permute(acc, (1, 0, 2))  # [BW, PIECES, SUB_N]: 64 channels a pixel, in a row
    pmask = (ow < W_O) & (oh < H_O) & lane_ok
    offs = ((n * H_O + oh) * W_O + ow).to(tl.int64)[:, None, None] * NC + nglob[None, :, :]
    mask = pmask[:, None, None] & nmask[None, :, :]
    if MODE == 0:  # WRITE
        out = _relu(c * scale[None, :, :] + shift[None, :, :])
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    elif MODE == 4:  # PLAIN
        tl.store(out_ptr + offs, c.to(out_ptr.dtype.element_ty), mask=mask)
    elif MODE == 1:  # STATS: Σd and Σd² of d = c − l0, l0 the mean of the first row if finite
        amask = pmask[None, :, None] & nmask[:, None, :]
        if oh == oh0:
            first = tl.sum(tl.where(amask, acc, 0.0), axis=1, keep_dims=True) / tl.maximum(
                tl.sum(pmask.to(tl.float32), axis=0), 1.0)
            l0 = tl.where(first - first == 0, first, 0.0)
        d = tl.where(amask, acc - l0, 0.0)
        l1 += d
        l2 += d * d
    else:  # REDUCE, DC: c recomputed, dz = dy·[y > 0] with y as WRITE rounds it (y not read)
        y = (c * scale[None, :, :] + shift[None, :, :]).to(dy_ptr.dtype.element_ty)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dz = tl.where(y > 0, dy, 0.0)
        if MODE == 2:
            xhat = (c - va[None, :, :]) * vb[None, :, :]
            l0 += dz
            l1 += tl.where(mask, dz * xhat, 0.0)
        else:
            dc = va[None, :, :] * dz - vb[None, :, :] - vc[None, :, :] * c
            tl.store(out_ptr + offs, dc.to(out_ptr.dtype.element_ty), mask=mask)
    return l0, l1, l2


@triton.jit
def _tile_sums(l0, l1, l2, lane_ok, oh0, ow, H_O, W_O, ROWS: tl.constexpr, MODE: tl.constexpr):
    """The tile's per-channel sums from its per-lane ones: STATS (count, mean, M2) from
    the sums shifted by the first row's mean (a lane holds the tile's rows down to the
    image's bottom); REDUCE Σdz and Σdz·x̂."""
    if MODE == 1:
        rows = tl.minimum(H_O - oh0, ROWS)
        total = tl.sum(tl.where((ow < W_O) & lane_ok, rows, 0).to(tl.float32), axis=0)
        inv = 1.0 / tl.maximum(total, 1.0)
        d1 = tl.sum(l1, axis=1)
        s1 = tl.sum(l0, axis=1) + d1 * inv
        s2 = tl.sum(l2, axis=1) - d1 * d1 * inv
        s0 = total + tl.zeros_like(s1)
    else:
        s0 = tl.sum(l0, axis=0)
        s1 = tl.sum(l1, axis=0)
        s2 = s1
    return s0, s1, s2


@triton.jit
def _chan(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan's merge of two (count, mean, M2)."""
    total = count_a + count_b
    delta = mean_b - mean_a
    weight = count_b / tl.maximum(total, 1.0)
    return total, mean_a + delta * weight, m2_a + m2_b + delta * delta * count_a * weight


@triton.jit
def _merge(s0, s1, s2, r0, r1, r2, MODE: tl.constexpr):
    """The program's running sums with a tile's: STATS by Chan's merge, REDUCE added."""
    if MODE == 1:
        s0, s1, s2 = _chan(s0, s1, s2, r0, r1, r2)
    elif MODE == 2:
        s0 += r0
        s1 += r1
    return s0, s1, s2


@triton.jit
def _tile_at(t, lane, N, row_tiles, col_tiles, width: tl.constexpr, IMGS: tl.constexpr,
             ROWS: tl.constexpr, DIL: tl.constexpr):
    """Row tile ``t``: the lanes' images and whether they exist, its first output row, the
    lanes' output columns: consecutive, or on dc dilated by ``DIL`` 2 every other column
    (the even ones; a tile spans 2·width columns, walked once a column phase:
    ``_taps``)."""
    n = t // (row_tiles * col_tiles) * IMGS + lane // width
    ow = (t % col_tiles) * (width * DIL) + lane % width * DIL
    return n, n < N, (t // col_tiles) % row_tiles * ROWS, ow


@triton.jit
def _tile(g, zeros, xzero, a_ptr, wp_ptr, out_ptr, dy_ptr, ys_ptr, x_ptr, w0, w1, w2, w3,
          w4, w5, w6, w7, w8, wbase, n, lane_ok, oh0, ow,
          first_group, nslot, nglob, nmask, va, vb, vc, scale, shift, H_A, W_A, KC, KG, H_O,
          W_O, NC, MODE: tl.constexpr, STRIDE: tl.constexpr, DIL: tl.constexpr,
          FROM_DY: tl.constexpr, HOLD: tl.constexpr, GUARD: tl.constexpr, SLOTS: tl.constexpr,
          K_STEPS: tl.constexpr, SUB_K: tl.constexpr, SUB_N: tl.constexpr, SPLIT: tl.constexpr,
          MSPLIT: tl.constexpr, ROWS: tl.constexpr, BW: tl.constexpr, IMGS: tl.constexpr,
          ALIGNED: tl.constexpr, WGRAD: tl.constexpr, SAFE: tl.constexpr, UNROLL: tl.constexpr,
          PRECISION: tl.constexpr):
    """One row tile: its input rows walked once, each output row's epilogue; returns the
    tile's per-channel sums (``_tile_sums``), the weight gradient's sums ``g``
    (``WGRAD``) and, where a piece packs several groups (``GUARD``), the elementwise sum
    of the output rows' conv accumulators: non-finite where an operand of the tile was
    (0 x Inf and Inf x w are not finite), and then the packed product may have carried
    it to another group. The statistics and reduce passes need no such sum: a
    non-finite conv output at a pixel of the tile makes their sums non-finite (the
    mean; Σdz·x̂, with 0 x NaN = NaN).
    ``SAFE``: the guarded walk (``_row``). ``zeros``: of the split accumulators'
    shape."""
    chk = zeros
    flat = _join(zeros, SPLIT, MSPLIT)
    if MODE == 1:
        l0 = tl.sum(flat, axis=1, keep_dims=True)
        l1 = flat
        l2 = flat
    else:
        l0 = tl.permute(flat, (1, 0, 2))
        l1 = l0
        l2 = l0
    if STRIDE == 1:
        # dgrad on dc dilated by 2: the tile's two column phases one after the other
        # (``_taps``), each dc row read once from DRAM (the second phase finds it in
        # the cache)
        width: tl.constexpr = BW // IMGS
        for ph in tl.static_range(DIL):
            owp = ow + ph
            # acc_prev: output row ir - 1 (complete after input row ir); acc_cur: row ir.
            acc_prev = zeros
            acc_cur = zeros
            # WGRAD: the forward input's rows ir - 1 and ir (each loaded and spread once,
            # at ir - 2, ir - 1)
            x_prev = xzero
            x_cur = xzero
            # WGRAD: the lanes next to the padding columns left of 0 and right of W - 1
            # (the latter where column W has no lane; ``_wgrad_row``)
            left = (owp == DIL - 1) & lane_ok
            right = (owp == W_O - 1) & (owp % width == width - 1) & lane_ok
            # UNROLL rows a trip: with 3 the accumulators rotate by renaming, not by
            # register moves
            for r0 in range(0, ROWS + 2, UNROLL):
                for j in tl.static_range(UNROLL):
                    r = r0 + j
                    if r < ROWS + 2:
                        ir = oh0 - 1 + r
                        x_next = xzero
                        if WGRAD:
                            x_next = _spread(_x_tile(x_ptr, n, lane_ok, ir + 1, oh0, owp,
                                                     nglob, nmask, H_O, W_O, NC, ROWS),
                                             xzero.shape[0] // first_group.shape[0])
                        xr = (x_prev, x_cur, x_next, _takes_part(ir - 1, oh0, H_O, ROWS),
                              _takes_part(ir, oh0, H_O, ROWS),
                              _takes_part(ir + 1, oh0, H_O, ROWS), left, right)
                        acc_next, acc_cur, acc_prev, g = _row(
                            zeros, acc_cur, acc_prev, g, xr, a_ptr, ys_ptr, wp_ptr, w0, w1, w2,
                            w3, w4, w5, w6, w7, w8, wbase, n, lane_ok, ir, owp, first_group, nslot,
                            H_A, W_A, KC, KG, True, True, True, 1, DIL, ph, FROM_DY, HOLD, SAFE,
                            SLOTS, K_STEPS, SUB_K, SUB_N, SPLIT, MSPLIT, ALIGNED, WGRAD, PRECISION)
                        if r >= 2:
                            if GUARD & (MODE != 1) & (MODE != 2):
                                chk += acc_prev
                            l0, l1, l2 = _emit(_join(acc_prev, SPLIT, MSPLIT), ir - 1, oh0, l0,
                                               l1, l2, out_ptr, dy_ptr, n, lane_ok, owp, nglob,
                                               nmask, va, vb, vc, scale, shift, H_O, W_O, NC,
                                               MODE)
                        acc_prev = acc_cur
                        acc_cur = acc_next
                        x_prev = x_cur
                        x_cur = x_next
    else:
        # Output row oh reads input rows 2oh - 1 (kh 0), 2oh (kh 1), 2oh + 1 (kh 2); the
        # odd row 2oh + 1 is also row 2(oh + 1) - 1 of the next output row.
        # (no weight gradient here: dgrad runs at stride 1)
        no_x = (xzero, xzero, xzero)
        acc, unused1, unused2, g = _row(
            zeros, zeros, zeros, g, no_x, a_ptr, ys_ptr, wp_ptr, w0, w1, w2, w3, w4, w5, w6, w7,
            w8, wbase, n, lane_ok, 2 * oh0 - 1, ow, first_group, nslot, H_A, W_A, KC, KG, True,
            False, False, STRIDE, DIL, 0, FROM_DY, HOLD, SAFE, SLOTS, K_STEPS, SUB_K, SUB_N,
            SPLIT, MSPLIT, ALIGNED, False, PRECISION)
        for j in range(ROWS):
            oh = oh0 + j
            unused0, acc, unused2, g = _row(
                zeros, acc, zeros, g, no_x, a_ptr, ys_ptr, wp_ptr, w0, w1, w2, w3, w4, w5, w6, w7,
                w8, wbase, n, lane_ok, 2 * oh, ow, first_group, nslot, H_A, W_A, KC, KG, False,
                True, False, STRIDE, DIL, 0, FROM_DY, HOLD, SAFE, SLOTS, K_STEPS, SUB_K, SUB_N,
                SPLIT, MSPLIT, ALIGNED, False, PRECISION)
            acc_next, unused1, acc, g = _row(
                zeros, zeros, acc, g, no_x, a_ptr, ys_ptr, wp_ptr, w0, w1, w2, w3, w4, w5, w6, w7,
                w8, wbase, n, lane_ok, 2 * oh + 1, ow, first_group, nslot, H_A, W_A, KC, KG, True,
                False, True, STRIDE, DIL, 0, FROM_DY, HOLD, SAFE, SLOTS, K_STEPS, SUB_K, SUB_N,
                SPLIT, MSPLIT, ALIGNED, False, PRECISION)
            if GUARD & (MODE != 1) & (MODE != 2):
                chk += acc
            l0, l1, l2 = _emit(_join(acc, SPLIT, MSPLIT), oh, oh0, l0, l1, l2, out_ptr, dy_ptr, n,
                               lane_ok, ow, nglob, nmask, va, vb, vc, scale, shift, H_O, W_O,
                               NC, MODE)
            acc = acc_next
    s0, s1, s2 = _tile_sums(l0, l1, l2, lane_ok, oh0, ow, H_O, W_O, ROWS, MODE)
    return s0, s1, s2, g, chk


@triton.jit
def conv_rows_kernel(a_ptr, wp_ptr, out_ptr, partial_ptr, va_ptr, vb_ptr, vc_ptr, vd_ptr,
                     sv_ptr, ve_ptr, dy_ptr, ys_ptr, x_ptr, dw_ptr, eps, count, N, N_BUCKET, H_A,
                     W_A, KC, H_O, W_O, NC, KG, NG, MODE: tl.constexpr, STRIDE: tl.constexpr,
                     DIL: tl.constexpr, FROM_DY: tl.constexpr, HOLD: tl.constexpr,
                     GUARD: tl.constexpr, SLOTS: tl.constexpr, K_STEPS: tl.constexpr,
                     PIECES: tl.constexpr, SUB_K: tl.constexpr, SUB_N: tl.constexpr,
                     BW: tl.constexpr, ROWS: tl.constexpr, IMGS: tl.constexpr, RUN: tl.constexpr,
                     ALIGNED: tl.constexpr, SAVE: tl.constexpr, WGRAD: tl.constexpr,
                     UNROLL: tl.constexpr, PRECISION: tl.constexpr, WARPS: tl.constexpr):
    """Program (row tiles, channel slab): RUN consecutive row tiles, each output rows
    [oh0, oh0 + ROWS) x columns [ow0, ow0 + BW / IMGS) of IMGS images (several where the
    rows are short; dgrad at ``DIL`` 2: [ow0, ow0 + 2·BW / IMGS), its two column phases
    one after the other), channels [c0, c0 + PIECES·SUB_N): the weight tiles (packed by
    ``pack_kernel``) are read and staged once for the RUN tiles where they are held
    (``HOLD``). ``N_BUCKET`` is only an autotuning key (the batch size rounded up to a
    power of two). ``WGRAD`` (dgrad with one input-channel step): the program also sums
    the weight gradient of its pixels from the forward input ``x_ptr`` and adds it to
    ``dw_ptr`` (float atomics; [C_out, 3, 3, Cg_in] fp32, the forward's channels: KC, NC).
    ``UNROLL``: input rows a trip of the stride-1 walk (3: the three accumulators rotate
    by renaming instead of register moves; 1 where the registers do not allow it).
    ``WARPS``: the launch's ``num_warps``; the dots are split into at least as many batch
    entries where each part keeps 16 pixels (the mma's M) or else 8 output channels (its
    N)."""
    # The BW lanes (the M of the dots) hold IMGS images' columns side by side.
    width: tl.constexpr = BW // IMGS
    row_tiles = tl.cdiv(H_O, ROWS)
    col_tiles = tl.cdiv(W_O, width * DIL)
    pid = tl.program_id(0)
    lane = tl.arange(0, BW)
    c0 = tl.program_id(1) * (PIECES * SUB_N)
    piece = tl.arange(0, PIECES)
    nglob = c0 + piece[:, None] * SUB_N + tl.arange(0, SUB_N)[None, :]
    nmask = nglob < NC
    first_group = (c0 + piece * SUB_N) // NG
    PARTS: tl.constexpr = (WARPS + PIECES - 1) // PIECES
    # Split along the pixels where each part keeps 16 (the mma's M): each input row is
    # staged once, the held weight tiles once per part; else along the output channels
    MSPLIT: tl.constexpr = PARTS if BW // PARTS >= 16 else 1
    SPLIT: tl.constexpr = 1 if MSPLIT > 1 else (PARTS if PARTS < SUB_N // 8 else SUB_N // 8)
    NS: tl.constexpr = SUB_N // SPLIT
    ENTRIES: tl.constexpr = SPLIT * MSPLIT  # dot entries a piece
    # group slot of each accumulator channel, and the piece of each dot entry
    slot = nglob // NG - first_group[:, None]
    if MSPLIT > 1:
        nslot = tl.reshape(tl.broadcast_to(slot[:, None, :], (PIECES, MSPLIT, SUB_N)),
                           (PIECES * MSPLIT, SUB_N))
    else:
        nslot = tl.reshape(slot, (PIECES * SPLIT, NS))
    wbase = c0 // SUB_N + tl.arange(0, PIECES * ENTRIES) // ENTRIES
    va = tl.load(va_ptr + nglob, mask=nmask, other=0.0)
    vb = tl.load(vb_ptr + nglob, mask=nmask, other=0.0)
    vc = tl.load(vc_ptr + nglob, mask=nmask, other=0.0)
    scale = va
    shift = vb
    if (MODE == 0) | (MODE == 2) | (MODE == 3):
        # va, vb, vc, vd = γ, β, mean, var: WRITE's folded scale and shift (REDUCE and DC
        # recompute WRITE's output from them for the ReLU mask, bit for bit)
        vd = tl.load(vd_ptr + nglob, mask=nmask, other=1.0)
        if SAVE:  # the statistics the backward reads, copied by the first program
            tl.store(partial_ptr + nglob, vc, mask=nmask & (pid == 0))
            tl.store(sv_ptr + nglob, vd, mask=nmask & (pid == 0))
        scale = va / tl.sqrt_rn(vd + eps)
        shift = vb - vc * scale
        invstd = 1.0 / tl.sqrt_rn(vd + eps)
        if MODE == 2:  # x̂ = (c − mean)·invstd: va, vb = mean, invstd
            va = vc
            vb = invstd
        elif MODE == 3:  # sv, ve = Σdz, Σdz·x̂ over ``count`` pixels
            # dc = g·dz − g·Σdz/count − g·Σdz·x̂/count·x̂ with g = γ·invstd: va, vb, vc =
            # g, the offset, the slope
            g = va * invstd
            slope = g * tl.load(ve_ptr + nglob, mask=nmask, other=0.0) / count * invstd
            vb = g * tl.load(sv_ptr + nglob, mask=nmask, other=0.0) / count - slope * vc
            va = g
            vc = slope
    s0 = tl.zeros((PIECES, SUB_N), dtype=tl.float32)
    s1 = tl.zeros((PIECES, SUB_N), dtype=tl.float32)
    s2 = tl.zeros((PIECES, SUB_N), dtype=tl.float32)
    if HOLD:  # the nine weight tiles, loaded once per program and held in registers
        w0 = _weights(wp_ptr, wbase, 0, 0, K_STEPS, SUB_K, SUB_N, SPLIT)
        w1 = _weights(wp_ptr, wbase, 1, 0, K_STEPS, SUB_K, SUB_N, SPLIT)
        w2 = _weights(wp_ptr, wbase, 2, 0, K_STEPS, SUB_K, SUB_N, SPLIT)
        w3 = _weights(wp_ptr, wbase, 3, 0, K_STEPS, SUB_K, SUB_N, SPLIT)
        w4 = _weights(wp_ptr, wbase, 4, 0, K_STEPS, SUB_K, SUB_N, SPLIT)
        w5 = _weights(wp_ptr, wbase, 5, 0, K_STEPS, SUB_K, SUB_N, SPLIT)
        w6 = _weights(wp_ptr, wbase, 6, 0, K_STEPS, SUB_K, SUB_N, SPLIT)
        w7 = _weights(wp_ptr, wbase, 7, 0, K_STEPS, SUB_K, SUB_N, SPLIT)
        w8 = _weights(wp_ptr, wbase, 8, 0, K_STEPS, SUB_K, SUB_N, SPLIT)
    else:
        w0, w1, w2, w3, w4, w5, w6, w7, w8 = 0, 0, 0, 0, 0, 0, 0, 0, 0
    zeros = tl.zeros((PIECES * ENTRIES, BW // MSPLIT, NS), dtype=tl.float32)
    # WGRAD: the weight gradient's dots split along dc's channels (SUB_K) as the conv's
    # are along SUB_N
    WSPLIT: tl.constexpr = PARTS if PARTS < SUB_K // 8 else SUB_K // 8
    if WGRAD:
        gz = tl.zeros((PIECES * WSPLIT, SUB_N, SUB_K // WSPLIT), dtype=tl.float32)
        xzero = tl.zeros((PIECES * WSPLIT, SUB_N, BW), dtype=x_ptr.dtype.element_ty)
        # Entry (co, kh, kw, ci) of dw, co = the dc channel (K side), ci = the program's
        # output channel, where both are in one group: [PIECES, SUB_K, SUB_N], ci along
        # the last dimension (consecutive addresses)
        co = (first_group * KG)[:, None] + tl.arange(0, SUB_K)[None, :]
        ci_group = nglob // NG
        inside = ((co // KG)[:, :, None] == ci_group[:, None, :]) & (co < KC)[:, :, None] \
            & nmask[:, None, :]
        entry = co[:, :, None] * (9 * NG) + (nglob - ci_group * NG)[:, None, :]
        # FROM_DY: the sums are over the operand dy·[y > 0] (``_load_a``); dc's are
        # γ·invstd (va, vb = γ, var) of the dc channel times them
        wscale = 1.0
        if FROM_DY:
            wscale = _gamma_invstd(va_ptr, vb_ptr, co, co < KC, eps)[:, :, None]
    else:
        gz = 0.0
        xzero = 0.0
        inside = False
        entry = 0
        wscale = 1.0
    g0 = (gz, gz, gz, gz, gz, gz, gz, gz, gz)  # the weight gradient's nine sums (WGRAD)
    g = g0
    tiles = tl.cdiv(N, IMGS) * row_tiles * col_tiles
    redo = 0  # GUARD: bit i set where tile i of the run is walked again
    for i in range(RUN):
        t = pid * RUN + i
        n, lane_ok, oh0, ow = _tile_at(t, lane, N, row_tiles, col_tiles, width, IMGS, ROWS, DIL)
        if t < tiles:  # the last program's run may end past the batch
            r0, r1, r2, g, chk = _tile(g, zeros, xzero, a_ptr, wp_ptr, out_ptr, dy_ptr,
                                       ys_ptr, x_ptr, w0, w1, w2, w3, w4, w5, w6, w7, w8,
                                       wbase, n, lane_ok, oh0, ow, first_group, nslot, nglob,
                                       nmask, va, vb, vc, scale, shift, H_A, W_A, KC, KG, H_O,
                                       W_O, NC, MODE, STRIDE, DIL, FROM_DY, HOLD, GUARD, SLOTS,
                                       K_STEPS, SUB_K, SUB_N, SPLIT, MSPLIT, ROWS, BW, IMGS,
                                       ALIGNED, WGRAD, False, UNROLL, PRECISION)
            if GUARD:
                # A NaN or an infinity among the tile's operands may have reached other
                # groups' outputs through the packed zeros: the tile is walked again after
                # the run (below); its sums are left out until then
                if (MODE == 1) | (MODE == 2):  # non-finite sums tell it (``_tile``)
                    bad = _nonfinite((r1 + r2)[:, :, None])
                else:
                    bad = _nonfinite(chk)
                redo = redo | (bad.to(tl.int32) << i)
                r0 = tl.where(bad, 0.0, r0)  # a count of 0 (STATS) merges as nothing
                r1 = tl.where(bad, 0.0, r1)
                r2 = tl.where(bad, 0.0, r2)
            s0, s1, s2 = _merge(s0, s1, s2, r0, r1, r2, MODE)
    if WGRAD:
        _add_dw(dw_ptr, entry, inside, g, wscale, NG)
    if GUARD:
        if redo != 0:
            # The flagged tiles walked guarded (one group at a time), after the run, whose
            # registers are free by then: their outputs written again (after a barrier),
            # their sums merged; dgrad alone (the weight gradient needs no guard)
            tl.debug_barrier()
            for i in range(RUN):
                t = pid * RUN + i
                n, lane_ok, oh0, ow = _tile_at(t, lane, N, row_tiles, col_tiles, width, IMGS,
                                               ROWS, DIL)
                if (redo >> i) & 1:
                    r0, r1, r2, unused, chk = _tile(
                        g0, zeros, xzero, a_ptr, wp_ptr, out_ptr, dy_ptr, ys_ptr, x_ptr, w0,
                        w1, w2, w3, w4, w5, w6, w7, w8, wbase, n, lane_ok, oh0, ow, first_group,
                        nslot, nglob, nmask, va, vb, vc, scale, shift, H_A, W_A, KC, KG, H_O,
                        W_O, NC, MODE, STRIDE, DIL, FROM_DY, HOLD, GUARD, SLOTS, K_STEPS, SUB_K,
                        SUB_N, SPLIT, MSPLIT, ROWS, BW, IMGS, ALIGNED, False, True, 1, PRECISION)
                    s0, s1, s2 = _merge(s0, s1, s2, r0, r1, r2, MODE)
    if MODE == 1:
        out = partial_ptr + (pid * NC + nglob) * 3
        tl.store(out, s0, mask=nmask)
        tl.store(out + 1, s1, mask=nmask)
        tl.store(out + 2, s2, mask=nmask)
    elif MODE == 2:
        out = partial_ptr + (pid * NC + nglob) * 2
        tl.store(out, s0, mask=nmask)
        tl.store(out + 1, s1, mask=nmask)


@triton.jit
def _add_dw(dw_ptr, entry, inside, g, scale, NG):
    """Adds the nine tap sums ``g`` of the fused dgrad + wgrad pass, times ``scale``, to dw
    (float atomics), the entries inside the groups only; ``g`` split as ``_wgrad_row``
    sums it."""
    SPLIT: tl.constexpr = g[0].shape[0] // entry.shape[0]
    for tap in tl.static_range(9):
        tl.atomic_add(dw_ptr + entry + tap * NG,
                      tl.permute(_join(g[tap], SPLIT, 1), (0, 2, 1)) * scale, mask=inside)


@triton.jit
def _x_taps(x_ptr, n, lane_ok, ir, ow, kglob, kmask, H, W, C_in, STRIDE: tl.constexpr,
            SPLIT: tl.constexpr):
    """x of input row ``ir`` at the taps kw = 0, 1, 2 (the conv's operands, ``_taps``) for
    the lanes' images ``n`` and output columns ``ow``, each as the [PIECES·SPLIT, BW,
    SUB_K / SPLIT] operand of wgrad (``_part``); zeros outside the image and in the lanes
    that are not ``lane_ok``."""
    x0, x1, x2 = _taps(x_ptr, x_ptr, n, lane_ok & (ir >= 0) & (ir < H), ir, ow, kglob, kmask,
                       H, W, C_in, STRIDE, 1, False, True, True)
    return _part(x0, SPLIT), _part(x1, SPLIT), _part(x2, SPLIT)


@triton.jit
def wgrad_kernel(x_ptr, dc_ptr, ys_ptr, va_ptr, vb_ptr, dw_ptr, eps, N, H, W, C_in, H_out, W_out,
                 C_out, CG_IN, CG_OUT, TILES, CHUNKS, FROM_DY: tl.constexpr, STRIDE: tl.constexpr,
                 DETERMINISTIC: tl.constexpr, K_STEPS: tl.constexpr, PIECES: tl.constexpr,
                 SUB_K: tl.constexpr, SUB_N: tl.constexpr, SPLIT: tl.constexpr,
                 BW: tl.constexpr, ROWS: tl.constexpr, IMGS: tl.constexpr,
                 ALIGNED: tl.constexpr, PRECISION: tl.constexpr):
    """Program (channel slab, input-channel step ks, chunk): dw of the slab's output
    channels, all nine taps, summed over the row tiles chunk, chunk + CHUNKS, ... (a row
    tile: ``ROWS`` output rows x ``BW`` columns of one image, as in ``conv_rows_kernel``).
    Each output row's dc is loaded once and each input row's three column-shifted x tiles
    once per tile: they are carried to the next output rows that read them.
    The nine sums dc(tap)ᵀ · x are split along their input channels into
    [PIECES·SPLIT, SUB_N, SUB_K / SPLIT] (x parted, dc spread: ``_part``, ``_spread``),
    so that each warp owns its batch entries of the 3-D dots (on fewer entries than
    warps, warps would repeat each other's mma tiles), and joined as [PIECES, SUB_N,
    SUB_K]: dw's input channels, contiguous in memory, last.
    ``FROM_DY``: ``dc_ptr`` is dy and dc = γ·invstd·dy·[y > 0] (va, vb = γ, var)."""
    c0 = tl.program_id(0) * (PIECES * SUB_N)
    ks = tl.program_id(1)
    chunk = tl.program_id(2)
    piece = tl.arange(0, PIECES)
    nglob = c0 + piece[:, None] * SUB_N + tl.arange(0, SUB_N)[None, :]
    nmask = nglob < C_out
    first_group = (c0 + piece * SUB_N) // CG_OUT
    kstart = first_group * CG_IN
    if ALIGNED:
        kstart = tl.multiple_of(kstart, 16)
    kglob = kstart[:, None] + ks * SUB_K + tl.arange(0, SUB_K)[None, :]
    kmask = kglob < C_in
    va = _gamma_invstd(va_ptr, vb_ptr, nglob, nmask, eps)
    width: tl.constexpr = BW // IMGS
    row_tiles = tl.cdiv(H_out, ROWS)
    col_tiles = tl.cdiv(W_out, width)
    lane = tl.arange(0, BW)
    a00 = tl.zeros((PIECES * SPLIT, SUB_N, SUB_K // SPLIT), dtype=tl.float32)
    a01 = a00
    a02 = a00
    a10 = a00
    a11 = a00
    a12 = a00
    a20 = a00
    a21 = a00
    a22 = a00
    for t in range(chunk, TILES, CHUNKS):
        n = t // (row_tiles * col_tiles) * IMGS + lane // width
        oh0 = (t // col_tiles) % row_tiles * ROWS
        ow = (t % col_tiles) * width + lane % width
        # x zero in the lanes past the row too: there dc is zero, and 0·Inf would be NaN
        lane_ok = (n < N) & (ow < W_out)
        # x rows oh·S − 1 (p*) and oh·S (q*, stride 1) carried from the previous row
        first = oh0 * STRIDE - 1
        p0, p1, p2 = _x_taps(x_ptr, n, lane_ok, first, ow, kglob, kmask, H, W, C_in, STRIDE,
                             SPLIT)
        if STRIDE == 1:
            q0, q1, q2 = _x_taps(x_ptr, n, lane_ok, oh0, ow, kglob, kmask, H, W, C_in,
                                 STRIDE, SPLIT)
        for j in range(ROWS):
            oh = oh0 + j
            if oh < H_out:
                at = ((n * H_out + oh) * W_out + ow).to(tl.int64)[:, None, None] * C_out \
                    + nglob[None, :, :]
                mask = lane_ok[:, None, None] & nmask[None, :, :]
                dc = tl.load(dc_ptr + at, mask=mask, other=0.0)
                if FROM_DY:
                    y = tl.load(ys_ptr + at, mask=mask, other=0.0)
                    dc = (tl.where(y > 0, dc.to(tl.float32), 0.0) * va[None, :, :]).to(dc.dtype)
                dc = _spread(tl.permute(dc, (1, 2, 0)), SPLIT)  # [PIECES·SPLIT, SUB_N, BW]
                if STRIDE == 1:
                    r0, r1, r2 = _x_taps(x_ptr, n, lane_ok, oh + 1, ow, kglob, kmask, H, W,
                                         C_in, STRIDE, SPLIT)
                else:
                    q0, q1, q2 = _x_taps(x_ptr, n, lane_ok, 2 * oh, ow, kglob, kmask, H, W,
                                         C_in, STRIDE, SPLIT)
                    r0, r1, r2 = _x_taps(x_ptr, n, lane_ok, 2 * oh + 1, ow, kglob, kmask, H,
                                         W, C_in, STRIDE, SPLIT)
                a00 = tl.dot(dc, p0, a00, input_precision=PRECISION)
                a01 = tl.dot(dc, p1, a01, input_precision=PRECISION)
                a02 = tl.dot(dc, p2, a02, input_precision=PRECISION)
                a10 = tl.dot(dc, q0, a10, input_precision=PRECISION)
                a11 = tl.dot(dc, q1, a11, input_precision=PRECISION)
                a12 = tl.dot(dc, q2, a12, input_precision=PRECISION)
                a20 = tl.dot(dc, r0, a20, input_precision=PRECISION)
                a21 = tl.dot(dc, r1, a21, input_precision=PRECISION)
                a22 = tl.dot(dc, r2, a22, input_precision=PRECISION)
                if STRIDE == 1:
                    p0, p1, p2 = q0, q1, q2
                    q0, q1, q2 = r0, r1, r2
                else:
                    p0, p1, p2 = r0, r1, r2
    # Entry (co, tap, ci) of dw (OHWI) exists where ci is in co's group.
    group = nglob // CG_OUT
    inside = ((kglob[:, None, :] // CG_IN) == group[:, :, None]) & kmask[:, None, :] \
        & nmask[:, :, None]
    entry = nglob[:, :, None] * (9 * CG_IN) + (kglob[:, None, :] - group[:, :, None] * CG_IN)
    if DETERMINISTIC:
        entry += chunk.to(tl.int64) * (C_out * 9 * CG_IN)
    _store_dw(dw_ptr, entry, inside, a00, a01, a02, CG_IN, 0, SPLIT, DETERMINISTIC)
    _store_dw(dw_ptr, entry, inside, a10, a11, a12, CG_IN, 1, SPLIT, DETERMINISTIC)
    _store_dw(dw_ptr, entry, inside, a20, a21, a22, CG_IN, 2, SPLIT, DETERMINISTIC)


@triton.jit
def _store_dw(dw_ptr, entry, inside, d0, d1, d2, CG_IN, kh: tl.constexpr,
              SPLIT: tl.constexpr, DETERMINISTIC: tl.constexpr):
    """The taps (kh, 0..2) of the program's dw entries, from their split sums
    (``_join``): stored (a per-chunk partial) or added (float atomics)."""
    at = dw_ptr + entry + kh * 3 * CG_IN
    d0 = _join(d0, SPLIT, 1)
    d1 = _join(d1, SPLIT, 1)
    d2 = _join(d2, SPLIT, 1)
    if DETERMINISTIC:
        tl.store(at, d0, mask=inside)
        tl.store(at + CG_IN, d1, mask=inside)
        tl.store(at + 2 * CG_IN, d2, mask=inside)
    else:
        tl.atomic_add(at, d0, mask=inside)
        tl.atomic_add(at + CG_IN, d1, mask=inside)
        tl.atomic_add(at + 2 * CG_IN, d2, mask=inside)


@triton.jit
def _pack(w_ptr, out_ptr, e, TOTAL, KC, NC, KG, NG, va_ptr, vb_ptr, eps,
          TRANSPOSED: tl.constexpr, FOLD: tl.constexpr, K_STEPS: tl.constexpr,
          SUB_K: tl.constexpr, SUB_N: tl.constexpr):
    """Entries ``e`` of one orientation's weight tiles, [pieces, 9 taps, K_STEPS, SUB_K,
    SUB_N]: entry (k, n) of a piece is the weight of input channel k to output channel n
    where both are in one group, 0 elsewhere (block-diagonal). ``TRANSPOSED``: dgrad's
    tiles (KC, NC, KG, NG: dgrad's channels, the forward's swapped; the taps flipped).
    ``FOLD`` (dgrad of the eval backward, whose operand is dy·[y > 0]): each weight times
    γ·invstd of its input channel k (va, vb = γ, var), rounded once to the tile's dtype;
    the zeros off the groups stay zeros whatever γ and var hold."""
    n = e % SUB_N
    k = e // SUB_N % SUB_K
    ks = e // (SUB_N * SUB_K) % K_STEPS
    tap = e // (SUB_N * SUB_K * K_STEPS) % 9
    piece = e // (SUB_N * SUB_K * K_STEPS * 9)
    nglob = piece * SUB_N + n
    group = nglob // NG
    kglob = piece * SUB_N // NG * KG + ks * SUB_K + k
    inside = (kglob // KG == group) & (kglob < KC) & (nglob < NC) & (e < TOTAL)
    if TRANSPOSED:  # w[co = k, ci = n − group·Cg_in, 2 − kh, 2 − kw]
        at = (kglob * NG + nglob - group * NG) * 9 + 8 - tap
    else:  # w[co = n, ci = k − group·Cg_in, kh, kw]
        at = (nglob * KG + kglob - group * KG) * 9 + tap
    w = tl.load(w_ptr + at, mask=inside, other=0.0)
    if FOLD:
        scale = _gamma_invstd(va_ptr, vb_ptr, kglob, inside, eps)
        w = tl.where(inside, w.to(tl.float32) * scale, 0.0)
    tl.store(out_ptr + e, w.to(out_ptr.dtype.element_ty), mask=e < TOTAL)


@triton.jit
def pack_kernel(w_ptr, fwd_ptr, FWD_TOTAL, dgrad_ptr, DGRAD_TOTAL, zero_ptr, ZERO_TOTAL,
                va_ptr, vb_ptr, eps, C_IN, C_OUT, CG_IN, CG_OUT, F_K_STEPS: tl.constexpr,
                F_SUB_K: tl.constexpr, F_SUB_N: tl.constexpr, D_K_STEPS: tl.constexpr,
                D_SUB_K: tl.constexpr, D_SUB_N: tl.constexpr, FOLD: tl.constexpr,
                BLOCK: tl.constexpr):
    """The one launch before a pass's convs, in three ranges of programs: the forward's
    weight tiles from the OIHW weight (``conv_rows_kernel``'s ``wp_ptr``; FWD_TOTAL
    entries), dgrad's (DGRAD_TOTAL; ``FOLD``: times γ·invstd, va, vb = γ, var: ``_pack``)
    and ZERO_TOTAL fp32 zeros at ``zero_ptr`` (the weight gradient's sums, which float
    atomics add to). A range of 0 entries has no programs."""
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    fwd_programs = tl.cdiv(FWD_TOTAL, BLOCK)
    dgrad_programs = tl.cdiv(DGRAD_TOTAL, BLOCK)
    if pid < fwd_programs:
        _pack(w_ptr, fwd_ptr, pid * BLOCK + lane, FWD_TOTAL, C_IN, C_OUT, CG_IN, CG_OUT, va_ptr,
              vb_ptr, eps, False, False, F_K_STEPS, F_SUB_K, F_SUB_N)
    elif pid < fwd_programs + dgrad_programs:
        _pack(w_ptr, dgrad_ptr, (pid - fwd_programs) * BLOCK + lane, DGRAD_TOTAL, C_OUT, C_IN,
              CG_OUT, CG_IN, va_ptr, vb_ptr, eps, True, FOLD, D_K_STEPS, D_SUB_K, D_SUB_N)
    else:
        e = (pid - fwd_programs - dgrad_programs) * BLOCK + lane
        tl.store(zero_ptr + e, tl.zeros((BLOCK,), dtype=tl.float32), mask=e < ZERO_TOTAL)


@triton.jit
def _partials(partial_ptr, r0, c, cmask, R, C, FIELDS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Pointers to field 0 of partial rows [r0, r0 + BLOCK_R) x channels ``c``, and their
    mask."""
    r = r0 + tl.arange(0, BLOCK_R)
    at = partial_ptr + (r[:, None].to(tl.int64) * C + c[None, :]) * FIELDS
    return at, (r < R)[:, None] & cmask[None, :]


@triton.jit
def _field(at, mask, i: tl.constexpr):
    return tl.load(at + i, mask=mask, other=0.0).to(tl.float64)


@triton.jit
def stats_kernel(partial_ptr, mean_ptr, var_ptr, R, C, BLOCK_R: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """The batch mean and (biased) variance of BLOCK_C channels from the R per-program
    (count, mean, M2) partials of the statistics pass: the total and the mean first,
    then M2 = Σ (M2_r + count_r·(mean_r − mean)²), in fp64, in a fixed order."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    total = tl.zeros((BLOCK_C,), dtype=tl.float64)
    weighted = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for r0 in range(0, R, BLOCK_R):
        at, mask = _partials(partial_ptr, r0, c, cmask, R, C, 3, BLOCK_R)
        count = _field(at, mask, 0)
        total += tl.sum(count, axis=0)
        weighted += tl.sum(count * _field(at, mask, 1), axis=0)
    mean = weighted / tl.maximum(total, 1.0)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for r0 in range(0, R, BLOCK_R):
        at, mask = _partials(partial_ptr, r0, c, cmask, R, C, 3, BLOCK_R)
        dev = _field(at, mask, 1) - mean[None, :]
        m2 += tl.sum(_field(at, mask, 2) + _field(at, mask, 0) * dev * dev, axis=0)
    tl.store(mean_ptr + c, mean.to(tl.float32), mask=cmask)
    tl.store(var_ptr + c, (m2 / tl.maximum(total, 1.0)).to(tl.float32), mask=cmask)


@triton.jit
def sums_kernel(partial_ptr, sum0_ptr, sum1_ptr, R, C, BLOCK_R: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """Σdz and Σdz·x̂ of BLOCK_C channels from the R per-program partials of the reduce
    pass, in fp64, in a fixed order."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    sum0 = tl.zeros((BLOCK_C,), dtype=tl.float64)
    sum1 = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for r0 in range(0, R, BLOCK_R):
        at, mask = _partials(partial_ptr, r0, c, cmask, R, C, 2, BLOCK_R)
        sum0 += tl.sum(_field(at, mask, 0), axis=0)
        sum1 += tl.sum(_field(at, mask, 1), axis=0)
    tl.store(sum0_ptr + c, sum0.to(tl.float32), mask=cmask)
    tl.store(sum1_ptr + c, sum1.to(tl.float32), mask=cmask)
