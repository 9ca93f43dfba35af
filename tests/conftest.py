import os

# Without a GPU the Triton kernels run through the interpreter on CPU tensors; it must
# be chosen before resnext_kernels (and so the kernels) is imported.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    # Queried only after collection, never at import: test modules load on any machine.
    if any("gpu" in item.keywords for item in items) and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device; none is visible")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
