"""The ``triton`` backend: the glue around ``resnext_kernels/triton_kernels.py``.

Same semantics as the other backends (``resnext_kernels/reference.py``). Where it runs:

* on a CUDA GPU: the ops are defined with ``torch.library.triton_op`` and the kernels
  called through ``torch.library.wrap_triton``, so ``torch.compile`` sees into them;
  the write and dgrad conv passes are autotuned over 4 and 8 warps on sm_90, keyed on
  the whole shape (the tiles themselves come from the layer: ``Plan``);
* under the Triton interpreter (``TRITON_INTERPRET=1`` set before import; tests):
  on CPU tensors, with the configuration a GPU runs without autotuning; the ops are
  defined as plain ``torch.library`` ops with fake kernels, because ``triton_op``'s
  fake-tensor path would run the interpreter on fake tensors; bf16 is refused there
  (its loads are broken in the interpreter, triton#11584) and is tested on a GPU only.

Training forward uses the "recompute" strategy (a statistics pass, then a pass that
recomputes the conv and writes the output); the backward recomputes the conv
output instead of saving it, like the CUDA kernels (docs/kernels.md).
"""

import os

import torch

from . import reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _autotune_enabled() -> bool:
    """RESNEXT_TRITON_AUTOTUNE (read at each call): "1" (default) autotunes the tiled
    passes on a GPU; "0" pins 4 warps (no autotuning compiles:
    scripts/gpu_check.sh uses it to stay within its time window)."""
    value = os.environ.get("RESNEXT_TRITON_AUTOTUNE", "1")
    if value not in ("0", "1"):
        raise ValueError(f"RESNEXT_TRITON_AUTOTUNE must be 0 or 1; got {value!r}")
    return value == "1"

try:
    import triton

    from . import triton_kernels as K
except ImportError as exc:  # triton is optional at run time
    triton = None
    IMPORT_ERROR = str(exc)
else:
    IMPORT_ERROR = None

# Warps per program with RESNEXT_TRITON_AUTOTUNE=0 and under the interpreter (what the
# AOT report compiles and the launch counters count; the conv: ``fixed_warps``), and the
# autotuned choices.
FIXED_WARPS = 4
CONFIGS = (4, 8)
# 8 warps spill 8 bytes in two ResNeXt-50 variants on sm_80 (a 64-128 register cap;
# `resnext-bench kernels`): below sm_90 the conv keeps the fixed 4 warps.
TUNE_MIN_MAJOR = 9
# The conv's and wgrad's register limit, given to ptxas: left to itself it caps some
# variants at 128 registers and spills 4-8 bytes to stay there.
MAXNREG = 255
WGRAD_WARPS = 4
STATS_R, STATS_C = 64, 64  # stats_kernel's tile of partials
# Keyed on the whole shape (the input dtype is part of every Triton autotuning key):
# the batch rounded up to a power of two, the sizes and channels of the conv.
TUNE_KEYS = ("N_BUCKET", "H_A", "W_A", "KC", "H_O", "W_O", "NC", "KG", "NG")
WGRAD_TARGET_PROGRAMS = 2048
# Row tiles per wgrad program at least: each program adds its dw once (float atomics);
# with 2 tiles a program the atomics bound s5's wgrad (modelled).
WGRAD_MIN_TILES = 8
WGRAD_PARTIAL_FLOATS = 16 << 20
# The fused dgrad + wgrad pass adds each program's weight gradient with float atomics:
# programs walk enough row tiles (RUN, a power of two) to be about this many.
FUSED_PROGRAMS = 1024
SLAB = 64  # output channels a program owns, where the layer has them


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


class Plan:
    """The tiling of one grouped conv orientation: ``kc`` input channels in groups of
    ``kg``, ``nc`` output channels in groups of ``ng``, an output ``h_out`` x ``w_out``,
    on a GPU of compute capability ``major`` (9: the H200 the model counts). ``cols``:
    dgrad of a stride-2 conv (2), whose lanes take every other output column (a row tile
    walked once a column phase: ``conv_rows_kernel``'s ``DIL``). ``itemsize``: of the
    input dtype; fp32's (4) operands take twice the registers of 16-bit ones (the TF32
    mma holds an element a register), and get smaller tiles where they would spill."""

    def __init__(self, kc, nc, kg, ng, h_out, w_out, major=9, cols=1, itemsize=2):
        self.kc, self.nc, self.kg, self.ng = kc, nc, kg, ng
        self.major, self.itemsize = major, itemsize
        self.sub_n = 16 if ng < 16 else min(SLAB, _next_pow2(ng))
        self.pieces = max(1, min(SLAB, _next_pow2(nc)) // self.sub_n)
        slab = self.pieces * self.sub_n
        self.slabs = -(-nc // slab)
        # The input channels of the groups a piece's output channels belong to.
        spans = []
        for n0 in range(0, nc, self.sub_n):
            last = min(n0 + self.sub_n, nc) - 1
            spans.append(last // ng - n0 // ng + 1)
        self.slots = max(spans)
        span = self.slots * kg
        # Input-channel steps of up to 64; 32 for fp32 and for pieces of 64 output channels
        # (groups of 40 or more): [64, 64] weight tiles, not held, spilled 8-496 bytes there
        # (fp32 at 64 channels a group: ResNeXt-101 32x8d's s5; 1x64d in both dtypes)
        wide = itemsize == 4 or self.sub_n == SLAB
        self.sub_k = min(32 if wide else SLAB, max(16, _next_pow2(span)))
        self.k_steps = -(-span // self.sub_k)
        self.w_out, self.cols = w_out, cols
        lanes = -(-w_out // cols)  # the columns of a row a walk computes
        # Pixels along a row: M of the dots. ptxas for sm_80 (``major`` 8) spills 24-168
        # bytes with 32 and the guarded product of 4 groups a piece (s2): 16 there.
        widest = 32 if major >= 9 or self.slots < 4 else 16
        self.bw = min(widest, max(16, _next_pow2(lanes)))
        # Short rows (7 at s5) share the 16 lanes with the same row of other images.
        self.imgs = self.bw // _next_pow2(lanes) if lanes < 16 else 1
        self.h_out = h_out
        # Output rows per program: a divisor of the height from 8 to 16 where there is
        # one (56, 28, 14 -> 14; 7 -> 7): each program re-reads 2 halo rows.
        divisors = [d for d in range(16, 7, -1) if h_out % d == 0]
        self.rows = divisors[0] if divisors else max(1, min(h_out, 8))
        # ``wgrad_kernel``'s row tile: the conv's, at most 16 pixels for fp32 and pieces of
        # 64 output channels (its nine x tiles of 32 pixels beside the nine sums spill
        # 8-232 bytes: fp32 at s2 and s3, 1x64d). Short rows keep their images a tile
        # (``imgs``): they are 16 already.
        self.w_bw = min(self.bw, 16) if wide else self.bw
        # wgrad holds nine [PIECES, SUB_N, SUB_K] fp32 sums of at most 1,024 elements each
        # (2 x 32 x 32 compiled to 2-4 KB of spills). Its input-channel steps are as wide
        # as that allows (32 at s5: each dc row read by one program instead of two) where
        # they do not pad a piece's channels past a multiple of 16 (24 a group: 3 x 16,
        # not 2 x 32).
        rounded = -(-span // 16) * 16
        self.w_sub_k = max(w for w in (16, 32, 64)
                           if w == 16 or (w * self.sub_n <= 1024 and rounded % w == 0))
        self.w_pieces = max(1, min(self.pieces, 1024 // (self.w_sub_k * self.sub_n)))
        self.w_k_steps = -(-span // self.w_sub_k)
        self.w_slabs = -(-nc // (self.w_pieces * self.sub_n))
        # Its sums split along their input channels (8 at least: mma's N) so that the 3-D
        # dots have as many batch entries as wgrad has warps where they can (not at 40
        # or more channels a group: 1 piece of 64 in 2 parts, each tile issued twice).
        self.w_split = max(1, min(WGRAD_WARPS // self.w_pieces, self.w_sub_k // 8))
        self.aligned = all((n0 // ng) * kg % 16 == 0 for n0 in range(0, nc, self.sub_n))
        # The nine weight tiles are held in registers when there is one input-channel
        # step and they are small (<= 2,048 elements each: 4-32 channels per group): each
        # program loads and stages them once for RUN consecutive row tiles of together
        # ~512 lane-rows (s5's 7 x 16 lanes: 4 tiles; s4's 14 x 16: 2).
        self.hold = self.k_steps == 1 and self.pieces * self.sub_k * self.sub_n <= 2048
        self.run = max(1, min(4, 512 // (self.rows * self.bw))) if self.hold else 1
        # dgrad adds the weight gradient on the way where its nine [PIECES, SUB_N, SUB_K]
        # fp32 sums are <= 1,024 elements each (4-16 channels per group; at 32 the pass
        # compiles without spills but is modelled slower: docs/kernels.md).
        self.fuse_wgrad = self.k_steps == 1 and self.pieces * self.sub_k * self.sub_n <= 1024
        # The stride-1 walk takes 3 input rows a trip where the held weight tiles are small
        # (4-16 channels per group): about 40 % fewer instructions a row at s2 (register
        # moves); with [2, 32, 32] tiles (s5), or the fused pass's sums, it spills.
        self.unroll = 3 if self.pieces * self.sub_k * self.sub_n <= 1024 else 1

    def constexprs(self, run=None, wgrad=False):
        """The tiling constexprs; ``wgrad``: of the fused dgrad + wgrad pass, ``run`` row
        tiles a program."""
        return dict(HOLD=self.hold, GUARD=self.slots > 1, ALIGNED=self.aligned, ROWS=self.rows,
                    IMGS=self.imgs, RUN=self.run if run is None else run,
                    SLOTS=self.slots, K_STEPS=self.k_steps,
                    PIECES=self.pieces, SUB_K=self.sub_k, SUB_N=self.sub_n,
                    UNROLL=1 if wgrad else self.unroll)

    def fused_run(self, n):
        """RUN of the fused dgrad + wgrad pass (this plan: dgrad's) at batch ``n``: enough
        row tiles a program for about ``FUSED_PROGRAMS`` programs, each adding its weight
        gradient once (a power of two: few variants)."""
        return min(32, max(self.run, _next_pow2(triton.cdiv(_row_tiles(self, n) * self.slabs,
                                                            FUSED_PROGRAMS))))


PACK_BLOCK = 1024


def _prepare(weight, fwd: Plan, dgrad: Plan, *, want_fwd=False, want_dgrad=False,
             zeros=None, fold=None):
    """The packed weight tiles of ``conv_rows_kernel`` — the forward's (``want_fwd``:
    [slabs·PIECES, 9 taps, K_STEPS, SUB_K, SUB_N], zeros off the groups) and dgrad's
    (``want_dgrad``: input and output channels swapped, taps flipped; ``fold`` = (γ,
    var, eps): each weight times γ·invstd of its output channel, for the eval backward)
    — and ``zeros`` (an fp32 tensor) zeroed: one ``pack_kernel`` launch. Returns
    (forward tiles, dgrad tiles), None where not wanted."""
    def tiles(plan, wanted):
        return weight.new_empty(plan.slabs * plan.pieces * 9 * plan.k_steps * plan.sub_k
                                * plan.sub_n if wanted else 0)

    wp, wp_dgrad = tiles(fwd, want_fwd), tiles(dgrad, want_dgrad)
    zero = zeros.view(-1) if zeros is not None else wp.new_empty(0, dtype=torch.float32)
    programs = sum(triton.cdiv(t.numel(), PACK_BLOCK) for t in (wp, wp_dgrad, zero))
    gamma, var, eps = fold if fold is not None else (zero, zero, 0.0)
    torch.library.wrap_triton(K.pack_kernel)[(programs,)](
        weight.contiguous(), wp, wp.numel(), wp_dgrad, wp_dgrad.numel(), zero, zero.numel(),
        gamma, var, eps, fwd.kc, fwd.nc, fwd.kg, fwd.ng, F_K_STEPS=fwd.k_steps,
        F_SUB_K=fwd.sub_k, F_SUB_N=fwd.sub_n, D_K_STEPS=dgrad.k_steps, D_SUB_K=dgrad.sub_k,
        D_SUB_N=dgrad.sub_n, FOLD=fold is not None, BLOCK=PACK_BLOCK)
    return (wp if want_fwd else None), (wp_dgrad if want_dgrad else None)


def _precision(dtype):
    """TF32 where PyTorch's conv would use it (``cudnn.allow_tf32``), else exact fp32."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


if triton is not None:
    ROWS_KERNEL = K.conv_rows_kernel if INTERPRET else triton.autotune(
        configs=[triton.Config({"WARPS": w}, num_warps=w, maxnreg=MAXNREG) for w in CONFIGS],
        key=list(TUNE_KEYS))(K.conv_rows_kernel)


def fixed_warps(mode, wgrad=False, unroll=3, bw=32, stride=1, major=9, itemsize=2):
    """The conv's warps where it is not autotuned: 8 for the reduce and dc passes (never
    autotuned) on rows of 32 pixels (``bw``; the forward's folded scale and shift held
    for the ReLU mask besides their own vectors: 4 warps spill 57-121 bytes at s2, s3
    and s3-down), for the statistics pass where its stride-1 walk takes 3 rows a trip of
    32 pixels (``unroll``, ``Plan.unroll``: 4 warps spill 48-112 bytes at s2 and s3; 8
    warps spill 8 bytes at s5, which takes 1), and for the fused dgrad + wgrad pass (its
    nine weight-gradient sums) on rows of 32 pixels below sm_90 (``major``: 4 warps
    spill there) and for fp32 (``itemsize`` 4: 4 warps spill 200-440 bytes on sm_90);
    else FIXED_WARPS. At 8 warps on 4 pieces the split dots stage each
    input row twice (L1), and the reduce, dc and fused passes issue 30-50 % more
    instructions an HMMA than at 4, with no more warps an SM (one program of ~200
    registers a thread instead of two)."""
    if mode == K.STATS:
        return 8 if unroll == 3 and bw == 32 and stride == 1 else FIXED_WARPS
    if wgrad:
        return 8 if (major < 9 or itemsize == 4) and bw == 32 else FIXED_WARPS
    return 8 if mode in (K.REDUCE, K.DC) and bw == 32 else FIXED_WARPS


def _conv_rows(plan, n, a, wp, out, partial, va, vb, vc, dy, ys, in_hw, out_hw, *, mode,
               stride=1, from_dy=False, tune=True, vd=None, sv=None, ve=None, eps=0.0,
               count=1.0, save=False, x=None, dw=None):
    """One ``conv_rows_kernel`` launch; ``tune``: autotuned on a GPU (the statistics and
    reduce passes keep the fixed warps: their partials are merged in program order; dc
    keeps them: 4 warps spill). ``dw`` (dgrad): also add the weight gradient, from the
    forward input ``x``, to ``dw`` (float atomics: never autotuned, which would add it
    once per trial)."""
    (h_a, w_a), (h_o, w_o) = in_hw, out_hw
    wgrad = dw is not None
    args = (a, wp, out, partial, va, vb, vc, *(va if v is None else v for v in (vd, sv, ve)),
            dy, ys, a if x is None else x, va if dw is None else dw, eps, float(count), n,
            _next_pow2(n), h_a, w_a, plan.kc, h_o, w_o, plan.nc, plan.kg, plan.ng)
    run = plan.fused_run(n) if wgrad else plan.run
    meta = dict(MODE=mode, STRIDE=stride, DIL=plan.cols, FROM_DY=from_dy, BW=plan.bw, SAVE=save,
                WGRAD=wgrad, PRECISION=_precision(a.dtype), **plan.constexprs(run, wgrad))
    kernel = ROWS_KERNEL
    if isinstance(kernel, triton.runtime.Autotuner) and (
            not tune or wgrad or not _autotune_enabled()
            or torch.cuda.get_device_capability(a.device)[0] < TUNE_MIN_MAJOR):
        kernel = kernel.fn
    if not isinstance(kernel, triton.runtime.Autotuner):
        warps = fixed_warps(mode, wgrad, meta["UNROLL"], plan.bw, stride, plan.major,
                            plan.itemsize)
        meta.update(WARPS=warps, num_warps=warps, maxnreg=MAXNREG)
    grid = (_row_programs(plan, n, run), plan.slabs)
    torch.library.wrap_triton(kernel)[grid](*args, **meta)


def _row_programs(plan, n, run=None):
    """Programs along the pixels: RUN row tiles each, of the row tiles x column tiles of
    every group of images."""
    return triton.cdiv(_row_tiles(plan, n), plan.run if run is None else run)


def _row_tiles(plan, n, bw=None):
    """Row tiles of one launch (at stride-2 dgrad, each of both column phases) of ``bw``
    lanes (the plan's)."""
    return (triton.cdiv(n, plan.imgs) * triton.cdiv(plan.h_out, plan.rows)
            * triton.cdiv(plan.w_out, (bw or plan.bw) // plan.imgs * plan.cols))


class _Layer:
    """Shapes and NHWC views of one call."""

    def __init__(self, input, weight, stride, groups):
        self.n, self.c_in, self.h, self.w = input.shape
        self.c_out = weight.shape[0]
        self.h_out = reference.output_size(self.h, stride)
        self.w_out = reference.output_size(self.w, stride)
        self.stride, self.groups = stride, groups
        self.cg_in, self.cg_out = self.c_in // groups, self.c_out // groups
        self.x = input.contiguous(memory_format=torch.channels_last)
        self.weight = weight
        self.pixels = self.n * self.h_out * self.w_out
        major = torch.cuda.get_device_capability(input.device)[0] if input.is_cuda else 9
        itemsize = input.element_size()
        self.plan = Plan(self.c_in, self.c_out, self.cg_in, self.cg_out, self.h_out,
                         self.w_out, major, itemsize=itemsize)
        # dgrad's: the conv on dc, input and output channels swapped, to the input's size
        self.dgrad = Plan(self.c_out, self.c_in, self.cg_out, self.cg_in, self.h, self.w, major,
                          cols=stride, itemsize=itemsize)

    def empty(self, like, input_side=False):
        """An NHWC tensor shaped like the output (or, ``input_side``, like the input)."""
        size = ((self.n, self.c_in, self.h, self.w) if input_side
                else (self.n, self.c_out, self.h_out, self.w_out))
        return torch.empty(size, dtype=like.dtype, device=like.device,
                           memory_format=torch.channels_last)

    def conv(self, wp, out, partial, va, vb, vc, dy, ys, *, mode, tune=True, **extra):
        _conv_rows(self.plan, self.n, self.x, wp, out, partial, va, vb, vc, dy, ys,
                   (self.h, self.w), (self.h_out, self.w_out), mode=mode, stride=self.stride,
                   tune=tune, **extra)

    def partial(self, fields, device):
        """Per-program partials of the fixed-row passes."""
        rows = _row_programs(self.plan, self.n)
        return torch.empty(rows, self.c_out, fields, dtype=torch.float32, device=device)


def _f32(t):
    return t.to(torch.float32).contiguous()


def _as_input_format(t, input):
    return t.contiguous(memory_format=reference.memory_format_of(input))


def forward(input, weight, bn_weight, bn_bias, running_mean, running_var, stride, groups, eps,
            training):
    layer = _Layer(input, weight, stride, groups)
    gamma, beta = _f32(bn_weight), _f32(bn_bias)
    out = layer.empty(input)
    dummy = gamma  # pointer arguments a pass does not use
    wp = _prepare(weight, layer.plan, layer.dgrad, want_fwd=True)[0] if layer.pixels else None
    if training:
        if layer.pixels == 0:
            mean, var = gamma.new_zeros(layer.c_out), gamma.new_ones(layer.c_out)
        else:
            partial = layer.partial(3, input.device)
            layer.conv(wp, out, partial, dummy, dummy, dummy, dummy, dummy, mode=K.STATS,
                       tune=False)
            # Per-program (count, mean, M2) merged in a fixed order, fp64.
            mean = torch.empty(layer.c_out, dtype=torch.float32, device=input.device)
            var = torch.empty_like(mean)
            torch.library.wrap_triton(K.stats_kernel)[(triton.cdiv(layer.c_out, STATS_C),)](
                partial, mean, var, partial.shape[0], layer.c_out, BLOCK_R=STATS_R,
                BLOCK_C=STATS_C)
    else:  # the kernel folds scale and shift and copies the running statistics
        mean = torch.empty(layer.c_out, dtype=torch.float32, device=input.device)
        var = torch.empty_like(mean)
        if layer.pixels:
            layer.conv(wp, out, mean, gamma, beta, _f32(running_mean), dummy, dummy, mode=K.WRITE,
                       vd=_f32(running_var), sv=var, eps=eps, save=True)
        else:
            mean.copy_(running_mean)
            var.copy_(running_var)
        return _as_input_format(out, input), mean, var
    if layer.pixels:
        layer.conv(wp, out, dummy, gamma, beta, mean, dummy, dummy, mode=K.WRITE, vd=var,
                   eps=eps)
    return _as_input_format(out, input), mean, var


class _Backward:
    def __init__(self, grad_out, input, weight, bn_weight, bn_bias, out, mean, var, stride,
                 groups, eps):
        self.layer = _Layer(input, weight, stride, groups)
        self.dy = grad_out.contiguous(memory_format=torch.channels_last)
        self.out = out  # read only by the eval backward (dc formed from dy and y)
        self.gamma, self.beta = _f32(bn_weight), _f32(bn_bias)
        self.mean, self.var = _f32(mean), _f32(var)
        self.eps = eps
        self.input, self.weight = input, weight
        self.wp = self.wp_dgrad = self.dw = None
        self.fused = False
        self.deterministic = torch.are_deterministic_algorithms_enabled()

    def prepare(self, fwd, dx, dw, fold=False):
        """The one ``pack_kernel`` launch before the passes: the forward's weight tiles
        for the reduce and dc passes (``fwd``), dgrad's (``dx``; ``fold``, the eval
        backward: with γ·invstd folded in, as dgrad's operand is then dy·[y > 0]) and the
        weight gradient's fp32 sums zeroed (``dw``). dgrad adds the weight gradient on the way (dc and x
        each read once) where both gradients are wanted, its plan allows
        (``fuse_wgrad``) and float atomics are allowed; else the wgrad pass does."""
        layer = self.layer
        if layer.pixels == 0:
            if dw:
                self.dw = torch.zeros(1, layer.c_out * 9 * layer.cg_in, dtype=torch.float32,
                                      device=self.dy.device)
            return
        self.fused = dx and dw and layer.dgrad.fuse_wgrad and not self.deterministic
        if dw:  # [1, entries], or the wgrad pass's per-chunk partials (deterministic)
            self.dw = torch.empty(self._chunks() if self.deterministic else 1,
                                  layer.c_out * 9 * layer.cg_in, dtype=torch.float32,
                                  device=self.dy.device)
        self.wp, self.wp_dgrad = _prepare(
            self.weight, layer.plan, layer.dgrad, want_fwd=fwd, want_dgrad=dx, zeros=self.dw,
            fold=(self.gamma, self.var, self.eps) if fold else None)

    def reduce(self):
        layer = self.layer
        if layer.pixels == 0:
            zeros = self.gamma.new_zeros(layer.c_out)
            return zeros, zeros.clone()
        sums = [torch.empty(layer.c_out, dtype=torch.float32, device=self.dy.device)
                for _ in range(2)]
        partial = layer.partial(2, self.dy.device)
        layer.conv(self.wp, self.dy, partial, self.gamma, self.beta, self.mean,
                   self.dy, self.dy, mode=K.REDUCE, tune=False, vd=self.var, eps=self.eps)
        torch.library.wrap_triton(K.sums_kernel)[(triton.cdiv(layer.c_out, STATS_C),)](
            partial, *sums, partial.shape[0], layer.c_out, BLOCK_R=STATS_R, BLOCK_C=STATS_C)
        return tuple(sums)

    def apply(self, sums, count, want_input, want_weight):
        """(grad_input, grad_weight), after :meth:`prepare`: with sums, dc is written by
        the dc pass (training); without, dgrad and wgrad form it from dy and y (eval).
        The per-channel vectors are folded inside the kernels."""
        layer = self.layer
        from_dy = sums is None
        dc = self.dy  # eval: dgrad and wgrad read dy (and y) and form dc
        ys = self.out.contiguous(memory_format=torch.channels_last) if from_dy else self.dy
        if not from_dy and layer.pixels:
            dc = layer.empty(self.dy)
            layer.conv(self.wp, dc, self.gamma, self.gamma, self.beta, self.mean,
                       self.dy, self.dy, mode=K.DC, tune=False, vd=self.var, sv=_f32(sums[0]),
                       ve=_f32(sums[1]), eps=self.eps, count=count)
        grad_input, grad_weight = self.input.new_empty(0), self.weight.new_empty(0)
        if want_input:
            dx = layer.empty(self.input, input_side=True)
            if layer.pixels:
                _conv_rows(layer.dgrad, layer.n, dc, self.wp_dgrad, dx, self.gamma, self.gamma,
                           self.var, self.gamma, self.gamma, ys, (layer.h_out, layer.w_out),
                           (layer.h, layer.w), mode=K.PLAIN, from_dy=from_dy,
                           eps=self.eps, x=layer.x, dw=self.dw if self.fused else None)
            else:
                dx.zero_()
            grad_input = _as_input_format(dx, self.input)
        if want_weight:
            if not self.fused and layer.pixels:
                self._wgrad(dc, ys, from_dy)
            grad_weight = self._dw()
        return grad_input, grad_weight

    def _dw(self):
        """The weight gradient in the weight's dtype and layout from its OHWI fp32 sums
        (the wgrad pass's per-chunk partials in deterministic mode: summed in chunk order,
        a fixed order)."""
        layer = self.layer
        dw = self.dw.sum(0) if self.dw.shape[0] > 1 else self.dw[0]
        return dw.view(layer.c_out, 3, 3, layer.cg_in).permute(0, 3, 1, 2).to(
            self.weight.dtype, memory_format=torch.contiguous_format)

    def _chunks(self):
        """The wgrad pass's pixel chunks (its grid's third dimension)."""
        layer, plan = self.layer, self.layer.plan
        tiles = _row_tiles(plan, layer.n, plan.w_bw)
        return max(1, min(tiles // WGRAD_MIN_TILES,
                          triton.cdiv(WGRAD_TARGET_PROGRAMS, plan.w_slabs * plan.w_k_steps),
                          WGRAD_PARTIAL_FLOATS // (layer.c_out * 9 * layer.cg_in)))

    def _wgrad(self, dc, ys, from_dy):
        """The wgrad pass into the zeroed ``self.dw`` (float atomics, or per-chunk partials
        in deterministic mode)."""
        layer, plan = self.layer, self.layer.plan
        chunks = self._chunks()
        torch.library.wrap_triton(K.wgrad_kernel)[(plan.w_slabs, plan.w_k_steps, chunks)](
            layer.x, dc, ys, self.gamma, self.var, self.dw, self.eps, layer.n, layer.h,
            layer.w, layer.c_in, layer.h_out, layer.w_out, layer.c_out, layer.cg_in,
            layer.cg_out, _row_tiles(plan, layer.n, plan.w_bw), chunks, FROM_DY=from_dy,
            STRIDE=layer.stride, DETERMINISTIC=self.deterministic, K_STEPS=plan.w_k_steps,
            PIECES=plan.w_pieces, SUB_K=plan.w_sub_k, SUB_N=plan.sub_n, SPLIT=plan.w_split,
            BW=plan.w_bw, ROWS=plan.rows, IMGS=plan.imgs, ALIGNED=plan.aligned,
            PRECISION=_precision(layer.x.dtype), num_warps=WGRAD_WARPS, maxnreg=MAXNREG)


def backward_reduce(grad_out, input, weight, bn_weight, bn_bias, out, mean, var, stride,
                    groups, eps):
    bw = _Backward(grad_out, input, weight, bn_weight, bn_bias, out, mean, var, stride, groups,
                   eps)
    bw.prepare(fwd=True, dx=False, dw=False)
    return bw.reduce()


def backward_apply(grad_out, input, weight, bn_weight, bn_bias, out, mean, var, sum_dz,
                   sum_dz_xhat, count, stride, groups, eps, output_mask):
    bw = _Backward(grad_out, input, weight, bn_weight, bn_bias, out, mean, var, stride, groups,
                   eps)
    bw.prepare(fwd=True, dx=output_mask[0], dw=output_mask[1])
    return bw.apply((sum_dz, sum_dz_xhat), count, output_mask[0], output_mask[1])


def backward(grad_out, input, weight, bn_weight, bn_bias, out, mean, var, stride, groups, eps,
             training, output_mask):
    bw = _Backward(grad_out, input, weight, bn_weight, bn_bias, out, mean, var, stride, groups,
                   eps)
    want_conv = output_mask[0] or output_mask[1]
    want_sums = output_mask[2] or output_mask[3] or (training and want_conv)
    bw.prepare(fwd=want_sums, dx=output_mask[0], dw=output_mask[1], fold=not training)
    sums = bw.reduce() if want_sums else None
    grad_input, grad_weight = input.new_empty(0), weight.new_empty(0)
    if want_conv:
        count = max(bw.layer.pixels, 1)
        grad_input, grad_weight = bw.apply(sums if training else None, count, output_mask[0],
                                           output_mask[1])
    grad_bn_weight = sums[1].to(bn_weight.dtype) if output_mask[2] else bn_weight.new_empty(0)
    grad_bn_bias = sums[0].to(bn_bias.dtype) if output_mask[3] else bn_bias.new_empty(0)
    return grad_input, grad_weight, grad_bn_weight, grad_bn_bias
