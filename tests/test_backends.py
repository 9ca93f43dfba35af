"""Backend registry: names, availability, "auto" and the errors for missing backends."""

import pytest
import torch

import resnext_kernels
from resnext_kernels import FusedGroupConv, available_backends, build_info, fused_group_conv_bn_relu
from resnext_kernels.backends import BACKEND_NAMES, resolve
from resnext_kernels.testing import Problem, make_arguments


def test_reference_is_always_available():
    names = available_backends()
    assert "reference" in names and "auto" not in names
    assert set(names) <= set(BACKEND_NAMES)


def test_auto_picks_reference_on_cpu():
    assert resolve("auto", torch.empty(1, 1, 1, 1)).name == "reference"


@pytest.mark.parametrize("bad", ["cudnn", "", "Reference", None, 3])
def test_unknown_backend_lists_valid_names(bad):
    args = make_arguments(Problem(2, 4, 4, 3, 3, 2, 1), torch.float32)
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'reference', 'cuda'"):
        fused_group_conv_bn_relu(*args, groups=2, backend=bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        FusedGroupConv(4, 4, groups=2, backend=bad)


@pytest.mark.parametrize("name", [n for n in BACKEND_NAMES
                                  if n not in ("auto", "reference")])
def test_missing_backend_says_what_is_missing(name):
    if name in available_backends():
        pytest.skip(f"{name} is available in this build")
    args = make_arguments(Problem(2, 4, 4, 3, 3, 2, 1), torch.float32)
    with pytest.raises(RuntimeError, match=f"backend '{name}' (is not available: |runs on )"):
        fused_group_conv_bn_relu(*args, groups=2, backend=name)


def test_cuda_reason_follows_build_info():
    info = build_info()
    with pytest.raises(RuntimeError) as err:
        resolve("cuda", torch.empty(1, 1, 1, 1))  # a CPU tensor: never for "cuda"
    if not info["native"]:
        assert "could not be imported" in str(err.value)
    elif not info["with_cuda"]:
        assert "built without CUDA" in str(err.value)
    else:  # the kernels are built: the error is about the device
        assert "backend 'cuda' runs on cuda tensors, but input is on cpu" in str(err.value)


def test_float64_is_refused_by_the_kernel_backends():
    if "cuda_emulated" not in available_backends():
        pytest.skip("cuda_emulated is not built")
    with pytest.raises(RuntimeError, match="supports dtypes bfloat16, float16, float32, but input "
                                           "is torch.float64"):
        resolve("cuda_emulated", torch.empty(1, 1, 1, 1, dtype=torch.float64))
    assert resolve("auto", torch.empty(1, 1, 1, 1)).name == "reference"  # never emulated


def test_build_info_fields():
    info = resnext_kernels.build_info()
    assert set(info) == {"native", "import_error", "torch_version", "compiler", "with_cuda",
                         "cuda_version", "nvcc_version", "cuda_archs", "kernel_families",
                         "emulated", "emulated_error"}
    if info["native"]:
        assert info["torch_version"] == torch.__version__.split("+")[0]
    if info["with_cuda"]:
        assert info["cuda_archs"] and all(a >= 500 and a % 10 == 0 for a in info["cuda_archs"])
    else:
        assert info["cuda_archs"] == []


@pytest.mark.gpu
def test_reference_on_cuda_matches_cpu():
    problem = Problem(2, 64, 64, 8, 8, 32, 2)
    args = make_arguments(problem, torch.float64)
    cuda_args = [t.cuda() for t in args]
    for training in (True, False):
        out = fused_group_conv_bn_relu(*args, stride=2, groups=32, training=training,
                                       backend="reference")
        out_cuda = fused_group_conv_bn_relu(*cuda_args, stride=2, groups=32, training=training,
                                            backend="reference")
        torch.testing.assert_close(out_cuda.cpu(), out, atol=1e-12, rtol=1e-11)
        torch.testing.assert_close(cuda_args[4].cpu(), args[4], atol=1e-12, rtol=1e-11)
