"""``resnext-bench model``: end-to-end images/s of a forward pass and of a training
step (forward + backward + SGD step) for torchvision's ``resnet50`` and
``resnext50_32x4d`` with PyTorch's own layers (cuDNN on a GPU), and
``resnext50_32x4d`` converted to each of our backends. The headline is the ratio of
our ResNeXt-50 to PyTorch's ResNet-50 on the same device: the ResNeXt paper's
promise (same FLOPs, better accuracy) only pays off if that ratio reaches 1.
"""

import copy

import torch
import torch.nn.functional as F
from rich.table import Table

from ..backends import usable_backends
from ..convert import convert
from . import common

PHASES = ("forward", "train-step")


def parse_args(argv):
    parser = common.Parser(prog="resnext-bench model", description=__doc__)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=list(common.DTYPES),
                        help="the models' dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--memory-format", default="channels_last",
                        choices=list(common.MEMORY_FORMATS))
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on cuda, 2 on cpu")
    parser.add_argument("--image", type=int, default=None,
                        help="default 224 (64 with --quick on cpu)")
    parser.add_argument("--backends", default=None,
                        help="comma list of our backends to convert ResNeXt-50 to "
                             "(default: every usable one that is timed)")
    parser.add_argument("--quick", action="store_true", help="under a minute on a 2-core CPU")
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--csv", default=None, metavar="PATH")
    return parser.parse_args(argv)


def build_models(backends, device, dtype, memory_format):
    """(model name, provider, module) for each configuration, on ``device``."""
    from torchvision.models import resnet50, resnext50_32x4d

    torch.manual_seed(0)
    base = resnext50_32x4d(weights=None)
    models = [("resnet50", "pytorch", resnet50(weights=None)), ("resnext50_32x4d", "pytorch", base)]
    for backend in backends:
        fused = copy.deepcopy(base)
        convert(fused, backend=backend)
        models.append(("resnext50_32x4d", backend, fused))
    return [(name, provider, m.to(device=device, dtype=dtype, memory_format=memory_format))
            for name, provider, m in models]


def main(argv=None) -> int:
    prog = "resnext-bench model"
    opts = parse_args(argv)
    device = common.device_option(prog, opts.device)
    on_gpu = device.type == "cuda"
    dtype = common.DTYPES[opts.dtype] if opts.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    batch = opts.batch or (128 if on_gpu else 2)
    image = opts.image or (64 if opts.quick and not on_gpu else 224)
    if batch < 2 or image < 32:
        common.fail(prog, f"--batch must be at least 2 and --image at least 32; got {batch}, {image}")
    probe = torch.empty(0, 0, 0, 0, device=device, dtype=dtype)
    usable = ((["auto"] if on_gpu else []) +
              [b for b in usable_backends(probe) if b not in common.UNTIMED])
    backends = (common.comma_list(prog, "--backends", opts.backends, usable) if opts.backends
                else usable)
    memory_format = common.MEMORY_FORMATS[opts.memory_format]
    header = common.environment(device)
    common.console.print(f"models on {header['device']}: batch {batch}, {image}² images, "
                         f"{str(dtype).removeprefix('torch.')}, {opts.memory_format}")

    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(batch, 3, image, image, generator=gen).to(device, dtype)
              .contiguous(memory_format=memory_format) for _ in range(2)]
    labels = [torch.randint(0, 1000, (batch,), generator=gen).to(device) for _ in range(2)]
    writer = common.RowWriter(header, opts.json, opts.csv)
    rows = []
    for name, provider, model in build_models(backends, device, dtype, memory_format):
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def forward(i):
            with torch.no_grad():
                model.eval()(inputs[i % 2])

        def train_step(i):
            model.train()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs[i % 2]), labels[i % 2]).backward()
            optimizer.step()

        for phase, fn in zip(PHASES, (forward, train_step)):
            common.console.print(f"  {name} ({provider}): {phase}")
            t = common.measure(fn, device, quick=opts.quick)
            rows.append(dict(layer=name, provider=provider, mode=phase,
                             dtype=str(dtype).removeprefix("torch."), batch=batch, image=image,
                             median_ms=t.median_ms, q1_ms=t.q1_ms, q3_ms=t.q3_ms,
                             images_per_s=batch / (t.median_ms * 1e-3)))
            writer.add(rows[-1:])
        del model, optimizer

    resnet = {r["mode"]: r["images_per_s"] for r in rows if r["layer"] == "resnet50"}
    for r in rows:
        r["vs_resnet50"] = r["images_per_s"] / resnet[r["mode"]]
    writer.flush()
    table = Table(title="images/s; vs resnet50: images/s over PyTorch's ResNet-50 "
                        "on this device (the headline)")
    for col in ("model", "provider", "phase", "ms", "q1–q3", "images/s", "vs resnet50"):
        table.add_column(col, justify="left" if col in ("model", "provider", "phase") else "right")
    for r in rows:
        table.add_row(r["layer"], r["provider"], r["mode"], f"{r['median_ms']:.2f}",
                      f"{r['q1_ms']:.2f}–{r['q3_ms']:.2f}", f"{r['images_per_s']:.1f}",
                      f"{r['vs_resnet50']:.2f}")
    common.console.print(table)
    header["auto_choices"] = common.show_auto_choices()
    writer.flush()
    return 0
