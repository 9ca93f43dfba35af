"""The ``triton`` backend: the glue around ``resnext_kernels/triton_kernels.py``.

Same semantics as the other backends (``resnext_kernels/reference.py``). Where it runs:

* on a CUDA GPU: the ops are defined with ``torch.library.triton_op`` and the kernels
  called through ``torch.library.wrap_triton``, so ``torch.compile`` sees into them;
  the kernels are autotuned over a few tile shapes keyed on the layer's shape;
* under the Triton interpreter (``TRITON_INTERPRET=1`` set before import; tests):
  on CPU tensors, with one fixed configuration; the ops are defined as plain
  ``torch.library`` ops with fake kernels, because ``triton_op``'s fake-tensor path
  would run the interpreter on fake tensors; bf16 is refused there (its loads are
  broken in the interpreter, triton#11584) and is tested on a GPU only.

Training forward uses the "recompute" strategy (a statistics pass, then a pass that
recomputes the conv and writes the output); the backward recomputes the conv
output instead of saving it, like the CUDA kernels (docs/kernels.md).
"""

import os

import torch

from . import reference
from .distributed import merge_moments

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _autotune_enabled() -> bool:
    """RESNEXT_TRITON_AUTOTUNE (read at each call): "1" (default) autotunes the tiled
    passes on a GPU; "0" pins the fixed tile (no autotuning compiles:
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

# The fixed tiles: of the statistics and reduce passes, of wgrad (whose float atomics
# must not run once per autotuning trial), and of every pass under the interpreter,
# where large tiles mean fewer programs (its cost is per operation, not per element).
FIXED = {"BLOCK_P": 64, "BLOCK_C": 64} if INTERPRET else {"BLOCK_P": 32, "BLOCK_C": 32}
WGRAD_FIXED = {"BLOCK_P": 64, "BLOCK_E": 512} if INTERPRET else {"BLOCK_P": 32, "BLOCK_E": 64}
WGRAD_WARPS = 8  # eight tile elements per thread (see _tuned)
# The statistics pass: four warps spill 16 bytes at 128 registers in bf16 once the
# kernel is specialised as the JIT does (resnext-bench kernels); eight do not.
STATS_WARPS = 8
WGRAD_TARGET_PROGRAMS = 2048
WGRAD_PARTIAL_FLOATS = 16 << 20


# The autotuned passes' tiles: (BLOCK_P, BLOCK_C, num_warps); the AOT report
# (resnext-bench kernels) compiles each.
TILES = ((32, 32, 4), (64, 32, 8), (32, 64, 8))

# What the best tile depends on besides the pixel and channel counts: the input size
# and the stride (s3-down and s3 have the same channels and pixel count).
TUNE_KEYS = ("H", "W", "STRIDE")


def _tuned(kernel, keys=("P", "C_out", "CG_IN")):
    """``kernel`` autotuned over a few tiles on a GPU, keyed on TUNE_KEYS + ``keys``;
    itself under the interpreter."""
    if INTERPRET:
        return kernel
    # Eight tile elements per thread and at most 256 threads: every gathered element
    # costs registers (its 64-bit address); 16 elements per thread spilled up to
    # 2.4 KB, and 512 threads (a 128-register cap) spilled too (`resnext-bench
    # kernels`, docs/kernels.md).
    configs = [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w) for p, c, w in TILES]
    return triton.autotune(configs=configs, key=[*TUNE_KEYS, *keys])(kernel)


# Passes that only store their tile are autotuned; the statistics and reduce passes
# write one partial row per BLOCK_P pixels, so they keep the fixed tile.
if triton is not None:
    CONV_FWD = _tuned(K.conv_fwd_kernel)
    DC = _tuned(K.bwd_dc_kernel)
    DGRAD = _tuned(K.bwd_dgrad_kernel, keys=("P_in", "C_in", "CG_OUT"))


def _launch(kernel, rows, cols, *args, **meta):
    """Launch over a (rows / BLOCK_P, cols / BLOCK_C) grid: the fixed tile for a plain
    kernel (everything under the interpreter, and with RESNEXT_TRITON_AUTOTUNE=0),
    the autotuner's choice otherwise."""
    if isinstance(kernel, triton.runtime.Autotuner) and not _autotune_enabled():
        kernel = kernel.fn
    if not isinstance(kernel, triton.runtime.Autotuner):
        grid = (triton.cdiv(rows, FIXED["BLOCK_P"]), triton.cdiv(cols, FIXED["BLOCK_C"]))
        torch.library.wrap_triton(kernel)[grid](*args, **meta, **FIXED)
    else:
        def grid(m):
            return (triton.cdiv(rows, m["BLOCK_P"]), triton.cdiv(cols, m["BLOCK_C"]))
        torch.library.wrap_triton(kernel)[grid](*args, **meta)


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
        self.wt = weight.permute(0, 2, 3, 1).contiguous()  # [C_out, 3, 3, C_in/groups]
        self.pixels = self.n * self.h_out * self.w_out
        self.shape = (self.h, self.w, self.c_in, self.c_out, self.h_out, self.w_out,
                      self.cg_in, self.cg_out)

    def empty(self, like, input_side=False):
        """An NHWC tensor shaped like the output (or, ``input_side``, like the input)."""
        size = ((self.n, self.c_in, self.h, self.w) if input_side
                else (self.n, self.c_out, self.h_out, self.w_out))
        return torch.empty(size, dtype=like.dtype, device=like.device,
                           memory_format=torch.channels_last)


def _f32(t):
    return t.to(torch.float32).contiguous()


def _as_input_format(t, input):
    return t.contiguous(memory_format=reference.memory_format_of(input))


def _conv_pass(layer, out, scale, shift, partial, stats):
    _launch(K.conv_fwd_kernel if stats else CONV_FWD, layer.pixels, layer.c_out, layer.x,
            layer.wt, out, scale, shift, partial, layer.pixels, *layer.shape,
            STRIDE=layer.stride, STATS=stats, **({"num_warps": STATS_WARPS} if stats else {}))


def _partial(layer, fields, device):
    """Per-program partials of the fixed-tile passes (one row per BLOCK_P pixels)."""
    blocks = triton.cdiv(layer.pixels, FIXED["BLOCK_P"])
    return torch.empty(blocks, layer.c_out, fields, dtype=torch.float32, device=device)


def forward(input, weight, bn_weight, bn_bias, running_mean, running_var, stride, groups, eps,
            training):
    layer = _Layer(input, weight, stride, groups)
    gamma, beta = _f32(bn_weight), _f32(bn_bias)
    out = layer.empty(input)
    dummy = gamma  # pointer arguments a pass does not use
    if training:
        if layer.pixels == 0:
            mean, var = gamma.new_zeros(layer.c_out), gamma.new_ones(layer.c_out)
        else:
            partial = _partial(layer, 3, input.device)
            _conv_pass(layer, out, dummy, dummy, partial, stats=True)
            # Per-program (count, mean, M2) merged in program order, fp64 (Chan).
            count, mean_b, m2_b = partial.double().unbind(-1)
            total, mean, m2 = merge_moments(count[:, 0], mean_b, m2_b)
            mean, var = mean.float(), (m2 / total).float()
    else:
        mean, var = running_mean.to(torch.float32, copy=True), running_var.to(torch.float32,
                                                                                copy=True)
    scale = (gamma * torch.rsqrt(var + eps)).contiguous()
    shift = (beta - mean * scale).contiguous()
    if layer.pixels:
        _conv_pass(layer, out, scale, shift, dummy, stats=False)
    return _as_input_format(out, input), mean, var


class _Backward:
    def __init__(self, grad_out, input, weight, bn_weight, bn_bias, out, mean, var, stride,
                 groups, eps):
        self.layer = _Layer(input, weight, stride, groups)
        self.dy = grad_out.contiguous(memory_format=torch.channels_last)
        self.y = out.contiguous(memory_format=torch.channels_last)
        self.gamma, self.mean = _f32(bn_weight), _f32(mean)
        self.invstd = torch.rsqrt(var.double() + eps).float()
        self.input, self.weight = input, weight

    def reduce(self):
        layer = self.layer
        if layer.pixels == 0:
            zeros = self.gamma.new_zeros(layer.c_out)
            return zeros, zeros.clone()
        partial = _partial(layer, 2, self.dy.device)
        _launch(K.bwd_reduce_kernel, layer.pixels, layer.c_out, layer.x, layer.wt, self.dy, self.y,
                self.mean, self.invstd, partial, layer.pixels, *layer.shape, STRIDE=layer.stride)
        sums = partial.double().sum(0).float()
        return sums[:, 0].contiguous(), sums[:, 1].contiguous()

    def apply(self, sums, count, want_input, want_weight):
        """(grad_input, grad_weight): with sums, dc is written by the dc pass (training);
        without, dgrad and wgrad form it from dy and y (eval)."""
        layer = self.layer
        dz_scale = (self.gamma * self.invstd).contiguous()
        dc = dz_scale  # unused pointer when dc is formed while loading
        from_dy = sums is None
        if not from_dy and layer.pixels:
            dc_shift = (dz_scale * sums[0].float() / count).contiguous()
            dc_xhat = (dz_scale * sums[1].float() / count).contiguous()
            dc = layer.empty(self.dy)
            _launch(DC, layer.pixels, layer.c_out, layer.x, layer.wt, self.dy, self.y,
                    self.mean, self.invstd, dz_scale, dc_shift, dc_xhat, dc, layer.pixels,
                    *layer.shape, STRIDE=layer.stride)
        grad_input, grad_weight = self.input.new_empty(0), self.weight.new_empty(0)
        if want_input:
            dx = layer.empty(self.input, input_side=True)
            if layer.pixels:
                pixels_in = layer.n * layer.h * layer.w
                _launch(DGRAD, pixels_in, layer.c_in, layer.wt, dc, self.dy, self.y, dz_scale,
                        dx, pixels_in, *layer.shape, STRIDE=layer.stride, FROM_DY=from_dy)
            else:
                dx.zero_()
            grad_input = _as_input_format(dx, self.input)
        if want_weight:
            grad_weight = self._wgrad(dc, dz_scale, from_dy)
        return grad_input, grad_weight

    def _wgrad(self, dc, dz_scale, from_dy):
        layer = self.layer
        entries = layer.c_out * 9 * layer.cg_in
        if layer.pixels == 0:
            dw = torch.zeros(entries, dtype=torch.float32, device=self.dy.device)
        else:
            blocks = triton.cdiv(entries, WGRAD_FIXED["BLOCK_E"])
            tiles = triton.cdiv(layer.pixels, WGRAD_FIXED["BLOCK_P"])
            chunks = max(1, min(tiles, triton.cdiv(WGRAD_TARGET_PROGRAMS, blocks),
                                WGRAD_PARTIAL_FLOATS // entries))
            deterministic = torch.are_deterministic_algorithms_enabled()
            shape = (chunks, entries) if deterministic else (entries,)
            dw = torch.zeros(shape, dtype=torch.float32, device=self.dy.device)
            torch.library.wrap_triton(K.bwd_wgrad_kernel)[(blocks, chunks)](
                layer.x, dc, self.dy, self.y, dz_scale, dw, layer.pixels, *layer.shape, chunks,
                STRIDE=layer.stride, FROM_DY=from_dy, DETERMINISTIC=deterministic,
                num_warps=WGRAD_WARPS, **WGRAD_FIXED)
            if deterministic:
                dw = dw.sum(0)  # chunk order: fixed
        return (dw.view(layer.c_out, 3, 3, layer.cg_in).permute(0, 3, 1, 2)
                .to(self.weight.dtype).contiguous())


def backward_reduce(grad_out, input, weight, bn_weight, bn_bias, out, mean, var, stride,
                    groups, eps):
    return _Backward(grad_out, input, weight, bn_weight, bn_bias, out, mean, var, stride,
                     groups, eps).reduce()


def backward_apply(grad_out, input, weight, bn_weight, bn_bias, out, mean, var, sum_dz,
                   sum_dz_xhat, count, stride, groups, eps, output_mask):
    bw = _Backward(grad_out, input, weight, bn_weight, bn_bias, out, mean, var, stride, groups,
                   eps)
    return bw.apply((sum_dz, sum_dz_xhat), count, output_mask[0], output_mask[1])


def backward(grad_out, input, weight, bn_weight, bn_bias, out, mean, var, stride, groups, eps,
             training, output_mask):
    bw = _Backward(grad_out, input, weight, bn_weight, bn_bias, out, mean, var, stride, groups,
                   eps)
    want_conv = output_mask[0] or output_mask[1]
    sums = None
    if output_mask[2] or output_mask[3] or (training and want_conv):
        sums = bw.reduce()
    grad_input, grad_weight = input.new_empty(0), weight.new_empty(0)
    if want_conv:
        count = max(bw.layer.pixels, 1)
        grad_input, grad_weight = bw.apply(sums if training else None, count, output_mask[0],
                                           output_mask[1])
    grad_bn_weight = sums[1].to(bn_weight.dtype) if output_mask[2] else bn_weight.new_empty(0)
    grad_bn_bias = sums[0].to(bn_bias.dtype) if output_mask[3] else bn_bias.new_empty(0)
    return grad_input, grad_weight, grad_bn_weight, grad_bn_bias
