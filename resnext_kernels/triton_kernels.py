"""Triton kernels of the fused grouped 3x3 conv (padding 1) + BatchNorm + ReLU, NHWC.

The same fusion plan as the CUDA kernels (csrc/kernels/conv_fwd.cuh, conv_bwd.cuh),
in a direct formulation: a program computes a [BLOCK_P pixels] x [BLOCK_C channels]
tile, where the channels may span several groups, as a sum over the 9 taps and the
group's input channels of (gathered input column) x (weight row). No ``tl.dot``: at
4 or 8 channels per group its smallest tile (16 deep) would multiply mostly zeros,
and several groups per program keep the tile full (docs/kernels.md).

Kernels (the glue is ``resnext_kernels/triton_backend.py``):

* ``conv_fwd_kernel``: WRITE: y = relu(conv·scale + shift); STATS: per-program
  (count, mean, M2) partials per channel (merged in program order, fp64, by the glue);
* ``bwd_reduce_kernel``: per-program partial Σdz and Σdz·x̂ (c recomputed, never
  saved; dz = dy·[y > 0]);
* ``bwd_dc_kernel``: dc = dz_scale·dz − dc_shift − dc_xhat·x̂ (training);
* ``bwd_dgrad_kernel``: dx, the transposed grouped conv of dc (FROM_DY: dc formed
  from dy and y while loading, eval);
* ``bwd_wgrad_kernel``: dw = Σ_pixels x ⋆ dc per chunk of pixel tiles, added with
  ``tl.atomic_add`` or written as per-chunk partials (DETERMINISTIC).

Every load is converted to fp32 right after it (the interpreter's bf16 loads are
broken, triton#11584); accumulation is fp32.
"""

import triton
import triton.language as tl


@triton.jit
def _relu(v):
    # NaN-propagating, like torch.relu (max(NaN, 0) would give 0).
    return tl.where((v > 0) | (v != v), v, 0.0)


@triton.jit
def _conv_tile(x_ptr, w_ptr, offs_p, mask_p, offs_c, mask_c, H, W, C_in, H_out, W_out,
               CG_IN, CG_OUT, STRIDE: tl.constexpr, BLOCK_P: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """conv(x) for pixels offs_p (flat N·H_out·W_out) x output channels offs_c, fp32."""
    n = offs_p // (H_out * W_out)
    rem = offs_p % (H_out * W_out)
    oh = rem // W_out
    ow = rem % W_out
    first_in = (offs_c // CG_OUT) * CG_IN  # the group's first input channel
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in range(3):
        ih = oh * STRIDE - 1 + kh
        for kw in range(3):
            iw = ow * STRIDE - 1 + kw
            valid = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            base = ((n * H + ih) * W + iw) * C_in
            load_mask = valid[:, None] & mask_c[None, :]
            for ci in range(0, CG_IN):
                xv = tl.load(x_ptr + base[:, None] + (first_in + ci)[None, :], mask=load_mask,
                             other=0.0).to(tl.float32)
                wv = tl.load(w_ptr + offs_c * (9 * CG_IN) + (kh * 3 + kw) * CG_IN + ci,
                             mask=mask_c, other=0.0).to(tl.float32)
                acc += xv * wv[None, :]
    return acc


@triton.jit
def conv_fwd_kernel(x_ptr, w_ptr, y_ptr, scale_ptr, shift_ptr, partial_ptr,
                    P, H, W, C_in, C_out, H_out, W_out, CG_IN, CG_OUT,
                    STRIDE: tl.constexpr, STATS: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < P
    mask_c = offs_c < C_out
    acc = _conv_tile(x_ptr, w_ptr, offs_p, mask_p, offs_c, mask_c, H, W, C_in, H_out, W_out,
                     CG_IN, CG_OUT, STRIDE, BLOCK_P, BLOCK_C)
    mask = mask_p[:, None] & mask_c[None, :]
    if STATS:
        count = tl.sum(mask_p.to(tl.float32), axis=0)
        mean = tl.sum(tl.where(mask, acc, 0.0), axis=0) / count
        dev = tl.where(mask, acc - mean[None, :], 0.0)
        m2 = tl.sum(dev * dev, axis=0)
        out = partial_ptr + (pid_p * C_out + offs_c) * 3
        tl.store(out, tl.zeros_like(mean) + count, mask=mask_c)
        tl.store(out + 1, mean, mask=mask_c)
        tl.store(out + 2, m2, mask=mask_c)
    else:
        scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
        shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)
        out = _relu(acc * scale[None, :] + shift[None, :])
        tl.store(y_ptr + offs_p[:, None] * C_out + offs_c[None, :],
                 out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dz_xhat_tile(x_ptr, w_ptr, dy_ptr, y_ptr, mean_ptr, invstd_ptr,
                  P, H, W, C_in, C_out, H_out, W_out, CG_IN, CG_OUT,
                  STRIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The program's tile of dz = dy·[y > 0] and x̂ = (conv(x) − mean)·invstd (c is
    recomputed, never saved), with its channels, their mask, the tile's flat NHWC
    offsets and its mask. dz is 0 outside the mask."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < P
    mask_c = offs_c < C_out
    mask = mask_p[:, None] & mask_c[None, :]
    acc = _conv_tile(x_ptr, w_ptr, offs_p, mask_p, offs_c, mask_c, H, W, C_in, H_out, W_out,
                     CG_IN, CG_OUT, STRIDE, BLOCK_P, BLOCK_C)
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
    at = offs_p[:, None] * C_out + offs_c[None, :]
    y = tl.load(y_ptr + at, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
    dz = tl.where(y > 0, dy, 0.0)
    xhat = (acc - mean[None, :]) * invstd[None, :]
    return dz, xhat, offs_c, mask_c, at, mask


@triton.jit
def bwd_reduce_kernel(x_ptr, w_ptr, dy_ptr, y_ptr, mean_ptr, invstd_ptr, partial_ptr,
                      P, H, W, C_in, C_out, H_out, W_out, CG_IN, CG_OUT,
                      STRIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    dz, xhat, offs_c, mask_c, at, mask = _dz_xhat_tile(
        x_ptr, w_ptr, dy_ptr, y_ptr, mean_ptr, invstd_ptr, P, H, W, C_in, C_out, H_out, W_out,
        CG_IN, CG_OUT, STRIDE, BLOCK_P, BLOCK_C)
    out = partial_ptr + (tl.program_id(0) * C_out + offs_c) * 2
    tl.store(out, tl.sum(dz, axis=0), mask=mask_c)
    tl.store(out + 1, tl.sum(tl.where(mask, dz * xhat, 0.0), axis=0), mask=mask_c)


@triton.jit
def bwd_dc_kernel(x_ptr, w_ptr, dy_ptr, y_ptr, mean_ptr, invstd_ptr, dz_scale_ptr,
                  dc_shift_ptr, dc_xhat_ptr, dc_ptr,
                  P, H, W, C_in, C_out, H_out, W_out, CG_IN, CG_OUT,
                  STRIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    dz, xhat, offs_c, mask_c, at, mask = _dz_xhat_tile(
        x_ptr, w_ptr, dy_ptr, y_ptr, mean_ptr, invstd_ptr, P, H, W, C_in, C_out, H_out, W_out,
        CG_IN, CG_OUT, STRIDE, BLOCK_P, BLOCK_C)
    dz_scale = tl.load(dz_scale_ptr + offs_c, mask=mask_c, other=0.0)
    dc_shift = tl.load(dc_shift_ptr + offs_c, mask=mask_c, other=0.0)
    dc_xhat = tl.load(dc_xhat_ptr + offs_c, mask=mask_c, other=0.0)
    dc = dz_scale[None, :] * dz - dc_shift[None, :] - dc_xhat[None, :] * xhat
    tl.store(dc_ptr + at, dc.to(dc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_dc(dc_ptr, dy_ptr, y_ptr, dz_scale_ptr, at, co, mask, FROM_DY: tl.constexpr):
    if FROM_DY:  # eval: dc = γ·invstd·dy·[y > 0], formed while loading
        y = tl.load(y_ptr + at, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
        dz_scale = tl.load(dz_scale_ptr + co, mask=mask, other=0.0)
        return tl.where(y > 0, dy, 0.0) * dz_scale
    else:
        return tl.load(dc_ptr + at, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def bwd_dgrad_kernel(w_ptr, dc_ptr, dy_ptr, y_ptr, dz_scale_ptr, dx_ptr,
                     P_in, H, W, C_in, C_out, H_out, W_out, CG_IN, CG_OUT,
                     STRIDE: tl.constexpr, FROM_DY: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # input channels
    mask_p = offs_p < P_in
    mask_c = offs_c < C_in
    n = offs_p // (H * W)
    ih = (offs_p // W) % H
    iw = offs_p % W
    first_out = (offs_c // CG_IN) * CG_OUT  # the group's first output channel
    ci = offs_c % CG_IN
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in range(3):
        row = ih + 1 - kh  # = oh·STRIDE when tap kh reaches output row oh
        oh = row // STRIDE
        ok_h = (row >= 0) & (row % STRIDE == 0) & (oh < H_out)
        for kw in range(3):
            col = iw + 1 - kw
            ow = col // STRIDE
            valid = mask_p & ok_h & (col >= 0) & (col % STRIDE == 0) & (ow < W_out)
            base = ((n * H_out + oh) * W_out + ow) * C_out
            load_mask = valid[:, None] & mask_c[None, :]
            for co_l in range(0, CG_OUT):
                co = first_out + co_l
                v = _load_dc(dc_ptr, dy_ptr, y_ptr, dz_scale_ptr, base[:, None] + co[None, :],
                             co[None, :], load_mask, FROM_DY)
                wv = tl.load(w_ptr + co * (9 * CG_IN) + (kh * 3 + kw) * CG_IN + ci,
                             mask=mask_c, other=0.0).to(tl.float32)
                acc += v * wv[None, :]
    tl.store(dx_ptr + offs_p[:, None] * C_in + offs_c[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def bwd_wgrad_kernel(x_ptr, dc_ptr, dy_ptr, y_ptr, dz_scale_ptr, dw_ptr,
                     P, H, W, C_in, C_out, H_out, W_out, CG_IN, CG_OUT, CHUNKS,
                     STRIDE: tl.constexpr, FROM_DY: tl.constexpr,
                     DETERMINISTIC: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program (entry block, chunk): dw entries e = co·9·CG_IN + tap·CG_IN + ci (OHWI),
    summed over the pixel tiles chunk, chunk + CHUNKS, ..."""
    K = 9 * CG_IN
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    chunk = tl.program_id(1)
    mask_e = e < C_out * K
    co = e // K
    tap = (e % K) // CG_IN
    channel = (co // CG_OUT) * CG_IN + e % CG_IN  # input channel of the entry
    kh = tap // 3
    kw = tap % 3
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    tiles = tl.cdiv(P, BLOCK_P)
    for tile in range(chunk, tiles, CHUNKS):
        offs_p = tile * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        mask_p = offs_p < P
        n = offs_p // (H_out * W_out)
        oh = (offs_p // W_out) % H_out
        ow = offs_p % W_out
        ih = oh[:, None] * STRIDE - 1 + kh[None, :]
        iw = ow[:, None] * STRIDE - 1 + kw[None, :]
        mask = mask_p[:, None] & mask_e[None, :]
        valid = mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xv = tl.load(x_ptr + ((n[:, None] * H + ih) * W + iw) * C_in + channel[None, :],
                     mask=valid, other=0.0).to(tl.float32)
        v = _load_dc(dc_ptr, dy_ptr, y_ptr, dz_scale_ptr, offs_p[:, None] * C_out + co[None, :],
                     co[None, :], mask, FROM_DY)
        acc += tl.sum(xv * v, axis=0)
    if DETERMINISTIC:
        tl.store(dw_ptr + chunk * (C_out * K) + e, acc, mask=mask_e)
    else:
        tl.atomic_add(dw_ptr + e, acc, mask=mask_e)
