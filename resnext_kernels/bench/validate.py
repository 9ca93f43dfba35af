"""``resnext-bench validate``: every available backend on every grouped-conv layer of
a ResNeXt, forward and the four gradients, against the float64 reference, judged
against PyTorch's own error in the same dtype (cuDNN on a GPU): a backend passes a
layer when its relative error is within the dtype's tolerance or 2× PyTorch's.
Then a few SGD steps of a whole ResNeXt-50 along PyTorch's float64 trajectory: at
each step the loss of the model converted to each backend (float32; TF32 off on a
GPU) against float64, within 2× the error of PyTorch's own float32 model. Exits 1
on any failure.
"""

import copy
import dataclasses

import torch
import torch.nn.functional as F
from rich.table import Table

from .. import triton_backend
from ..backends import usable_backends
from ..convert import convert
from ..testing import REL_TOLERANCE, rel_error
from . import common

def parse_args(argv):
    parser = common.Parser(prog="resnext-bench validate", description=__doc__)
    common.add_common_options(parser, modes_default="eval,train-backward")
    parser.add_argument("--steps", type=int, default=None,
                        help="SGD steps of the whole model (default 4; 0 skips)")
    return parser.parse_args(argv)


def default_backends(device, probe):
    return usable_backends(probe)


def validate_layers(setup: common.Setup, writer: common.RowWriter) -> list[dict]:
    rows = []
    for layer, problem in setup.layers.items():
        args = common.argument_sets(problem, setup.dtype, setup.device, setup.memory_format, 1)[0]
        gen = torch.Generator().manual_seed(2)
        grad = torch.randn(problem.output_shape, generator=gen, dtype=torch.float64)
        grad = grad.to(setup.device).contiguous(memory_format=setup.memory_format)
        for mode in setup.modes:
            expected = common.Provider("reference", problem, None, mode, setup.device,
                                       grad).run([t.double() for t in args])
            theirs = common.Provider("pytorch", problem, args, mode, setup.device,
                                     grad.to(setup.dtype)).run([t.clone() for t in args])
            pytorch_errors = {k: rel_error(theirs[k], expected[k]) for k in expected}
            for name in setup.providers:
                got = common.Provider(name, problem, args, mode, setup.device,
                                      grad.to(setup.dtype)).run([t.clone() for t in args])
                for key in expected:
                    err = rel_error(got[key], expected[key])
                    bound = max(REL_TOLERANCE[setup.dtype], 2 * pytorch_errors[key])
                    rows.append(dict(
                        layer=layer, provider=name, mode=mode,
                        dtype=str(setup.dtype).removeprefix("torch."), tensor=key,
                        median_ms=None, rel_error=err,
                        max_abs_error=(got[key].double() - expected[key]).abs().max().item(),
                        pytorch_rel_error=pytorch_errors[key], bound=bound, ok=err <= bound))
            writer.add(rows[len(writer.rows):])
    return rows


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.double().flatten() for _, g in sorted(grads.items())])


def loss_and_gradients(model, inputs, labels):
    model.train()
    for p in model.parameters():
        p.grad = None
    loss = F.cross_entropy(model(inputs), labels)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def validate_model(setup: common.Setup, steps: int, writer: common.RowWriter) -> list[dict]:
    """SGD steps of ResNeXt-50 along the float64 trajectory of PyTorch's own model: at
    each step the float32 models (PyTorch's layers, and converted to each backend) are
    loaded with the float64 model's parameters and their loss is compared with the
    float64 one, within 2× PyTorch's float32 error (or the float32 tolerance).

    Following the float64 trajectory keeps the check meaningful: an untrained
    ResNeXt amplifies float32 rounding ~1000× per SGD step at these sizes, so
    free-running losses differ by 10⁻² after two steps whatever the kernels do (in
    float64 the reference backend and PyTorch agree to 10⁻¹²). The whole-model
    gradients are reported, not judged: in float32 a ReLU whose input sits within
    rounding of 0 flips its mask between any two implementations, and one flip moved
    the aggregate gradient error from 10⁻⁵ to 10⁻² (docs/benchmarks.md); the
    per-layer gradient checks above are where the kernels' gradients are judged."""
    from torchvision.models import resnext50_32x4d

    device, memory_format = setup.device, setup.memory_format
    batch = min(setup.batch, 32)
    image = min(setup.image, 64 if device.type == "cpu" else 224)
    gen = torch.Generator().manual_seed(3)
    inputs = torch.randn(batch, 3, image, image, generator=gen, dtype=torch.float64).to(device)
    inputs = inputs.contiguous(memory_format=memory_format)
    labels = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    torch.manual_seed(0)
    truth = resnext50_32x4d(weights=None).to(device=device, dtype=torch.float64,
                                             memory_format=memory_format)
    optimizer = torch.optim.SGD(truth.parameters(), lr=0.01, momentum=0.9)
    models = {"pytorch": copy.deepcopy(truth).float()}
    for name in setup.providers:
        models[name] = copy.deepcopy(models["pytorch"])
        convert(models[name], backend=name)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    try:
        for step in range(steps):
            loss64, grads64 = loss_and_gradients(truth, inputs, labels)
            errors = {}
            for name, model in models.items():
                model.load_state_dict(truth.state_dict())
                loss, grads = loss_and_gradients(model, inputs.float(), labels)
                errors[name] = (rel_error(loss, loss64), rel_error(flat(grads), flat(grads64)))
            for name in setup.providers:
                bound = max(REL_TOLERANCE[torch.float32], 2 * errors["pytorch"][0])
                rows.append(dict(layer="resnext50_32x4d", provider=name, mode=f"step {step + 1}",
                                 dtype="float32", tensor="loss", median_ms=None,
                                 loss=float(loss64), rel_error=errors[name][0],
                                 pytorch_rel_error=errors["pytorch"][0], bound=bound,
                                 gradients_rel_error=errors[name][1],
                                 pytorch_gradients_rel_error=errors["pytorch"][1],
                                 ok=errors[name][0] <= bound))
            writer.add(rows[-len(setup.providers):])
            optimizer.step()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return rows


def main(argv=None) -> int:
    opts = parse_args(argv)
    setup = common.resolve_options("resnext-bench validate", opts,
                                   default_providers=default_backends)
    if "compile" in setup.providers or "pytorch" in setup.providers:
        common.fail("resnext-bench validate", "--backends: validate judges our backends; "
                    "pytorch is the baseline it compares with, not a backend")
    steps = 4 if opts.steps is None else opts.steps
    header = common.environment(setup.device)
    common.console.print(f"validating {', '.join(setup.providers)} on {header['device']}: "
                         f"{setup.model} layers, batch {setup.batch}, {setup.image}² images, "
                         f"{str(setup.dtype).removeprefix('torch.')}, {opts.memory_format}")
    writer = common.RowWriter(header, opts.json, opts.csv)
    with common.console.status("layers"):
        rows = validate_layers(setup, writer)
    if steps:
        # --quick leaves the Triton interpreter out of the model steps: it runs a whole
        # ResNeXt-50 in minutes, not seconds (its layers are validated above).
        model_setup = setup
        if setup.quick and triton_backend.INTERPRET:
            model_setup = dataclasses.replace(
                setup, providers=[p for p in setup.providers if p != "triton"])
        with common.console.status(f"{steps} training steps of resnext50_32x4d"):
            rows += validate_model(model_setup, steps, writer)

    table = Table(title="relative error vs float64, worst tensor (layers: output and gradients; "
                        "model: the loss along the float64 trajectory); bound: max(dtype "
                        "tolerance, 2× PyTorch's error)")
    for col in ("layer", "provider", "mode", "worst", "error", "PyTorch", "bound", "check"):
        table.add_column(col, justify="left" if col in ("layer", "provider", "mode", "worst")
                         else "right")
    groups = {}
    for r in rows:
        groups.setdefault((r["layer"], r["provider"], r["mode"]), []).append(r)
    for (layer, provider, mode), group in groups.items():
        worst = max(group, key=lambda r: r["rel_error"] / r["bound"])
        reference = worst.get("pytorch_rel_error")
        table.add_row(layer, provider, mode, worst["tensor"], f"{worst['rel_error']:.2e}",
                      "—" if reference is None else f"{reference:.2e}", f"{worst['bound']:.1e}",
                      "[green]ok[/]" if all(r["ok"] for r in group) else "[red]FAIL[/]")
    common.console.print(table)
    failed = [r for r in rows if not r["ok"]]
    if failed:
        common.console.print(f"[red]validate: {len(failed)} check(s) failed[/]")
        return 1
    common.console.print(f"validate: all {len(rows)} checks passed")
    return 0
