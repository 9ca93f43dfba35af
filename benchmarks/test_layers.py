"""pytest-benchmark suite over the same providers and layers as ``resnext-bench layers``
(not part of the default test run; see docs/benchmarks.md):

    .venv/bin/python -m pytest benchmarks --benchmark-autosave
    .venv/bin/python -m pytest benchmarks --benchmark-compare

RESNEXT_BENCH_DEVICE (cpu | cuda, default: cuda when visible), RESNEXT_BENCH_BATCH
and RESNEXT_BENCH_IMAGE choose the shapes (defaults as resnext-bench: 256 / 224 on a
GPU, 2 / 64 on the CPU). CUDA timings synchronise inside the timed call."""

import os

import pytest
import torch

from resnext_kernels.backends import usable_backends
from resnext_kernels.bench import common
from resnext_kernels.testing import Problem, resnext_layers

DEVICE = torch.device(os.environ.get("RESNEXT_BENCH_DEVICE",
                                     "cuda" if torch.cuda.is_available() else "cpu"))
ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
BATCH = int(os.environ.get("RESNEXT_BENCH_BATCH", 256 if ON_GPU else 2))
IMAGE = int(os.environ.get("RESNEXT_BENCH_IMAGE", 224 if ON_GPU else 64))
PROVIDERS = ["pytorch"] + (["compile"] if ON_GPU else []) + [
    b for b in usable_backends(torch.empty(0, 0, 0, 0, device=DEVICE, dtype=DTYPE))
    if b not in common.UNTIMED]
LAYERS = resnext_layers(32, 4, IMAGE)


@pytest.mark.parametrize("mode", common.MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_layer(benchmark, layer, provider, mode):
    channels, size, stride = LAYERS[layer]
    problem = Problem(BATCH, channels, channels, size, size, 32, stride)
    args = common.argument_sets(problem, DTYPE, DEVICE, torch.channels_last, 1)[0]
    grad = torch.randn(problem.output_shape, device=DEVICE, dtype=DTYPE)
    runner = common.Provider(provider, problem, args, mode, DEVICE, grad,
                             compile_mode="max-autotune")

    def call():
        runner.run(args)
        if ON_GPU:
            torch.cuda.synchronize(DEVICE)

    call()  # warm-up (and compilation for "compile")
    benchmark.extra_info.update(floor_bytes=common.floor_bytes(problem, DTYPE, mode),
                                flops=common.flops(problem, mode), device=str(DEVICE))
    benchmark(call)
