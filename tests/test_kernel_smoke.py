"""One case per CUDA kernel family, against the float64 reference: the short subset
that scripts/gpu_check.sh runs first on a lent GPU (backend "cuda"), and that runs
everywhere else through the emulator (backend "cuda_emulated") — so the selection
is proven on the CPU before GPU minutes are spent on it.

Families: the forward conv pass (eval write; training statistics with the "raw"
strategy and its normalise pass, and with "recompute"), the statistics merge, the
backward reduce, dc, dgrad and wgrad passes (training and eval, atomic and
deterministic), the channel-chunked kernels of wide groups, the float32 backward at
64 channels per group (whose reduce pass needs the shared-memory opt-in: 16 KiB
static + 36 KiB dynamic), and the calibration probe."""

import pytest
import torch

from resnext_kernels import available_backends, fused_group_conv_bn_relu
from resnext_kernels.testing import REL_TOLERANCE, Problem, make_arguments, rel_error

ON_GPU = torch.cuda.is_available() and "cuda" in available_backends()
BACKEND, DEVICE = ("cuda", "cuda") if ON_GPU else ("cuda_emulated", "cpu")

pytestmark = pytest.mark.skipif(BACKEND not in available_backends(),
                                reason=f"backend {BACKEND!r} is not built")

CASES = [  # id: (problem, dtype, training, strategy)
    pytest.param(Problem(2, 64, 64, 7, 5, 8, 1), torch.bfloat16, False, None, id="eval-mma"),
    pytest.param(Problem(2, 24, 24, 9, 7, 6, 2), torch.float16, False, None, id="eval-fma-s2"),
    pytest.param(Problem(2, 48, 48, 6, 5, 3, 1), torch.float32, True, "raw", id="train-raw"),
    pytest.param(Problem(2, 64, 64, 8, 6, 2, 2), torch.bfloat16, True, "recompute",
                 id="train-recompute-s2"),
    pytest.param(Problem(2, 128, 128, 5, 4, 2, 1), torch.float32, True, None, id="train-cg64-fp32"),
    pytest.param(Problem(1, 160, 160, 4, 5, 2, 1), torch.float32, True, None,
                 id="train-wide-chunks"),
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("problem,dtype,training,strategy", CASES)
def test_kernel_family_matches_float64(problem, dtype, training, strategy, deterministic,
                                       monkeypatch):
    if strategy:
        monkeypatch.setenv("RESNEXT_TRAIN_STRATEGY", strategy)
    gen = torch.Generator().manual_seed(problem.c_in + problem.stride)
    args = make_arguments(problem, dtype, generator=gen)
    grad = torch.randn(problem.output_shape, generator=gen, dtype=torch.float64)
    results = []
    for backend, device, dt in ((BACKEND, DEVICE, None), ("reference", "cpu", torch.float64)):
        x, w, g, b, rm, rv = [t.to(device, dt or t.dtype, copy=True) for t in args]
        leaves = [t.detach().requires_grad_() for t in (x, w, g, b)]
        torch.use_deterministic_algorithms(deterministic)
        try:
            out = fused_group_conv_bn_relu(*leaves, rm, rv, stride=problem.stride,
                                           groups=problem.groups, training=training,
                                           backend=backend)
            out.backward(grad.to(device, out.dtype))
        finally:
            torch.use_deterministic_algorithms(False)
        results.append([out, rm, rv] + [t.grad for t in leaves])
    for name, got, want in zip(("output", "running_mean", "running_var", "input", "weight",
                                "bn_weight", "bn_bias"), *results):
        assert not got.isnan().any(), f"{name}: NaN (unwritten, poisoned) elements"
        # half precision: the output is rounded, and the gradients go through it
        bound = REL_TOLERANCE[dtype] * (1 if dtype == torch.float32 else 4)
        assert rel_error(got.cpu(), want) <= bound, (name, rel_error(got.cpu(), want), bound)


def test_mma_probe_counts_its_work():
    """The calibration probe (resnext-bench device) writes finite sums in every
    thread and reports blocks x 4 warps x iterations x 4 chains x 16·8·16 MACs."""
    out = torch.full((2 * 128,), float("nan"), device=DEVICE)
    macs = torch.ops.resnext_kernels.mma_probe(out, 2, 3)
    assert macs == 2 * 4 * 3 * 4 * 16 * 8 * 16
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="out must be a contiguous float32 tensor of 256"):
        torch.ops.resnext_kernels.mma_probe(out[:10], 2, 3)
