"""``resnext-bench``: the benchmark and validation CLI (also ``python -m resnext_kernels.bench``).

Commands:

* ``check`` (the default): every available backend against the float64 reference
  on a ResNeXt-50 layer, timed beside PyTorch's Conv2d + BatchNorm2d + ReLU;
* ``table``: the ResNeXt paper's settings, parameters and multiply-adds;
* ``kernels``: registers, shared memory and spills of every compiled CUDA kernel.

``resnext-bench COMMAND --help`` lists each command's options.
"""

import sys

COMMANDS = ("check", "table", "kernels")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "check"
    if command == "table":
        from .table import main as run
    elif command == "kernels":
        from .kernels import main as run
    else:
        from .check import main as run
    return run(argv)
