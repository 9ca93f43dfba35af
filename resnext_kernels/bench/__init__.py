"""``resnext-bench``: the benchmark and validation CLI (also ``python -m resnext_kernels.bench``).

Commands:

* ``layers`` (the default): every grouped-conv layer of a ResNeXt, PyTorch
  (cuDNN), ``torch.compile`` and each backend side by side: time, GB/s, % of the
  memory floor, TFLOP/s, speedup and error against float64;
* ``model``: images/s of ResNet-50, ResNeXt-50 and ResNeXt-50 on each backend,
  forward and training step;
* ``validate``: every backend against float64 on every layer (forward and
  gradients) and over SGD steps of a whole model; exits 1 on any failure;
* ``kernels``: registers, shared memory and spills of every compiled CUDA kernel;
* ``device``: the device's facts and measured rates (copy bandwidth, launch
  interval, mma.sync and cuBLAS GEMM rates) for the performance model;
* ``table``: the ResNeXt paper's settings, parameters and multiply-adds;
* ``predict``: the modelled H200 time of every kernel of every pass, counted on the
  CPU (emulator and Triton interpreter); ``--measure`` on a GPU.

``resnext-bench COMMAND --help`` lists each command's options; ``--quick`` makes
any of them finish in under a minute on a 2-core CPU.
"""

import importlib
import sys

COMMANDS = ("layers", "model", "validate", "kernels", "table", "device", "predict")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "layers"
    if command not in COMMANDS:
        print(f"resnext-bench: error: unknown command {command!r}; choose from "
              f"{', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(f".{command}", __name__).main(argv)
