"""The package imports and works without its compiled library."""

import subprocess
import sys
import textwrap


def test_imports_and_runs_without_native_library():
    script = textwrap.dedent("""
        import sys

        class HideNative:
            def find_spec(self, name, path=None, target=None):
                if name == "resnext_kernels._C":
                    raise ImportError("hidden by the test")

        sys.meta_path.insert(0, HideNative())
        import torch
        import resnext_kernels as rk

        info = rk.build_info()
        assert info["native"] is False and "hidden by the test" in info["import_error"], info
        assert "cuda" not in rk.available_backends(), rk.available_backends()
        try:
            rk.fused_group_conv_bn_relu(torch.randn(2, 4, 3, 3), torch.randn(4, 2, 3, 3),
                                        None, None, None, None, groups=2, training=True,
                                        backend="cuda")
        except RuntimeError as exc:
            assert "could not be imported" in str(exc), exc
        else:
            raise AssertionError("backend='cuda' ran without _C")
        m = rk.FusedGroupConv(4, 4, groups=2)
        assert m(torch.randn(2, 4, 5, 5)).shape == (2, 4, 5, 5)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_library_built_for_another_torch_is_refused():
    from resnext_kernels._native import torch_mismatch

    assert torch_mismatch("2.14.1", "2.14.1+cu130") is None
    assert "built against torch 2.14.1 but torch 2.13.0+cpu" in torch_mismatch("2.14.1", "2.13.0+cpu")
    assert torch_mismatch("2.10.0", "2.9.0") is not None  # not a string comparison
