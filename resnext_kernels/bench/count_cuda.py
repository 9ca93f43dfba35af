"""Counting the CUDA kernels of one pass through the host SIMT emulator
(``resnext_kernels._C_emulated``, csrc/emu/count.h): the real launchers run at the
full problem size, every kernel on a contiguous window of its grid (counters.py),
and the torch glue between the kernels is listed as launches of its own.
Modelled (CPU counters), not measured."""

from types import SimpleNamespace

import torch

from .. import testing
from .counters import Launch, glue_launches, window_blocks

EPS = 1e-5
PASSES = ("eval", "train_fwd", "train_bwd", "eval_bwd")


def _inputs(problem: testing.Problem, dtype: torch.dtype, seed: int, device):
    """Random arguments of both directions, drawn on ``device`` in float32 (only the
    kernels' accesses and their data-dependent masks matter here)."""
    gen = torch.Generator(device).manual_seed(seed)
    p = problem
    n, c_out, h_out, w_out = p.output_shape
    param = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def randn(*shape, dt=dtype, nhwc=False):
        t = torch.randn(*shape, generator=gen, device=device).to(dt)
        return t.contiguous(memory_format=torch.channels_last) if nhwc else t

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=device).to(param) + 0.5

    x = randn(p.n, p.c_in, p.h, p.w, nhwc=True)
    w = (randn(p.c_out, p.c_in // p.groups, 3, 3, dt=torch.float32) /
         (9 * p.c_in // p.groups) ** 0.5).to(dtype)
    g, rv = rand(p.c_out), rand(p.c_out)
    b, rm = randn(p.c_out, dt=param), randn(p.c_out, dt=param) * 0.1
    dy = randn(n, c_out, h_out, w_out, nhwc=True)
    y = randn(n, c_out, h_out, w_out, nhwc=True).relu_()
    mean = randn(c_out, dt=torch.float32) * 0.1
    var = rand(c_out).float()
    return (x, w, g, b, rm, rv), (dy, y, mean, var)


def backend_ops(backend: str) -> SimpleNamespace:
    """The forward and backward ops registered for ``backend`` (e.g. "cuda_emulated")."""
    from .. import backends  # noqa: F401  (defines the ops)

    namespace = torch.ops.resnext_kernels
    return SimpleNamespace(forward=getattr(namespace, f"conv_bn_relu_{backend}").default,
                           backward=getattr(namespace, f"conv_bn_relu_{backend}_backward").default)


def pass_call(ops, problem: testing.Problem, pass_name: str, dtype: torch.dtype, seed: int = 0,
              device="cpu"):
    """A closure running ``pass_name`` of ``ops`` (a backend's registered ops) once."""
    if pass_name not in PASSES:
        raise ValueError(f"pass must be one of {', '.join(PASSES)}; got {pass_name!r}")
    (x, w, g, b, rm, rv), (dy, y, mean, var) = _inputs(problem, dtype, seed, device)
    stride, groups = problem.stride, problem.groups
    if pass_name in ("eval", "train_fwd"):
        training = pass_name == "train_fwd"
        return lambda: ops.forward(x, w, g, b, rm, rv, stride, groups, EPS, training)
    training = pass_name == "train_bwd"
    mask = [True] * 4 if training else [True, True, False, False]
    return lambda: ops.backward(dy, x, w, g, b, y, mean, var, stride, groups, EPS, training,
                                mask)


def count_pass(problem: testing.Problem, pass_name: str, dtype: torch.dtype = torch.bfloat16,
               *, waves: float = 2.0, warmup_waves: float = 0.5, max_iterations: int = 2,
               seed: int = 0) -> list[Launch]:
    """Every launch of ``pass_name`` (see PASSES) of the CUDA kernels on ``problem``, in
    launch order, then the glue ops; ``waves`` of blocks counted per kernel after
    ``warmup_waves``, persistent loops cut to ``max_iterations`` iterations."""
    from .._native import _C_emulated, build_info

    if _C_emulated is None:
        raise RuntimeError("counting the CUDA kernels needs resnext_kernels._C_emulated: "
                           f"{build_info()['emulated_error']}")
    call = pass_call(backend_ops("cuda_emulated"), problem, pass_name, dtype, seed)
    _C_emulated.count_begin(window_blocks(waves), window_blocks(warmup_waves), max_iterations)
    try:
        glue = glue_launches(call, "cuda")
    finally:
        records = _C_emulated.count_end()
    return [Launch.from_emulator(r) for r in records] + glue
