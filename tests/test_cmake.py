"""The secondary CMake build compiles the same sources into an importable _C."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_the_extension(tmp_path):
    ninja = shutil.which("ninja") or str(Path(sys.executable).parent / "ninja")
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-G", "Ninja",
                    f"-DCMAKE_MAKE_PROGRAM={ninja}", f"-DPython3_EXECUTABLE={sys.executable}"],
                   check=True, capture_output=True, env=env, timeout=300)
    subprocess.run(["cmake", "--build", str(tmp_path)], check=True, capture_output=True,
                   env=env, timeout=900)
    probe = ("import json, sys, torch; sys.path.insert(0, sys.argv[1]); import _C; "
             "print(json.dumps(_C.build_info()))")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], check=True,
                         capture_output=True, text=True, cwd=tmp_path, timeout=120).stdout
    info = json.loads(out)
    import resnext_kernels

    expected = resnext_kernels.build_info()
    for key in ("torch_version", "with_cuda", "cuda_version", "kernel_families"):
        assert info[key] == expected[key], key
