"""Synchronised statistics over torch.distributed: two gloo processes on the CPU, each with
part of a batch, must reproduce one process on the whole batch (nn.SyncBatchNorm's
semantics). Workers are spawned by the tests and bounded by a timeout."""

import copy
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from resnext_kernels import FusedGroupConv, fused_group_conv_bn_relu
from resnext_kernels.backends import usable_backends
from resnext_kernels.distributed import merge_moments

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

WORLD = 2
TIMEOUT_S = 180
CPU_BACKENDS = usable_backends(torch.empty(0, 0, 0, 0))


def _entry(rank, fn, tmp, args):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        fn(rank, tmp, *args)
    finally:
        dist.destroy_process_group()


def run_workers(fn, tmp_path, *args):
    """Run ``fn(rank, tmp, *args)`` in WORLD spawned processes; fail on error or timeout."""
    context = mp.start_processes(_entry, args=(fn, str(tmp_path), args), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish in {TIMEOUT_S} s")
    return [torch.load(f"{tmp_path}/rank{r}.pt") for r in range(WORLD)]


def dtype_and_tolerance(backend):
    """float64 where the backend takes it (exact to rounding), else float32."""
    if backend == "reference":
        return torch.float64, dict(atol=1e-10, rtol=1e-9)
    return torch.float32, dict(atol=2e-4, rtol=2e-4)


def make_layer(backend, momentum, process_group=None):
    torch.manual_seed(0)
    layer = FusedGroupConv(16, 32, groups=4, stride=2, momentum=momentum, backend=backend,
                           process_group=process_group, dtype=dtype_and_tolerance(backend)[0])
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.normal_()
    return layer


def make_batch(n, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, 9, 7, generator=gen, dtype=torch.float64) + 100.0  # |mean| >> std
    grad = torch.randn(n, 32, 5, 4, generator=gen, dtype=torch.float64)
    return x.contiguous(memory_format=torch.channels_last).to(dtype), grad.to(dtype)


def run_layer(layer, x, grad, steps=2):
    """Training steps (forward + backward), then one eval forward; what to compare."""
    outs, grads_in = [], []
    layer.train()
    for _ in range(steps):
        x_ = x.clone().requires_grad_()
        out = layer(x_)
        out.backward(grad)
        outs.append(out.detach())
        grads_in.append(x_.grad)
    layer.eval()
    return {"out": outs, "grad_input": grads_in, "eval_out": layer(x).detach(),
            "params": {k: p.grad for k, p in layer.named_parameters()},
            "buffers": {k: b.clone() for k, b in layer.named_buffers()}}


def _layer_worker(rank, tmp, backend, momentum, sizes):
    x, grad = make_batch(sum(sizes), dtype_and_tolerance(backend)[0])
    start = sum(sizes[:rank])
    part = slice(start, start + sizes[rank])
    layer = make_layer(backend, momentum, dist.group.WORLD)
    torch.save(run_layer(layer, x[part], grad[part]), f"{tmp}/rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sizes", [(4, 4), (3, 5), (0, 6)], ids=["even", "uneven", "empty-rank"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_two_processes_equal_one_process(tmp_path, backend, sizes, momentum):
    ranks = run_workers(_layer_worker, tmp_path, backend, momentum, sizes)
    dtype, tol = dtype_and_tolerance(backend)
    x, grad = make_batch(sum(sizes), dtype)
    whole = run_layer(make_layer(backend, momentum), x, grad)
    for step in range(2):
        torch.testing.assert_close(torch.cat([r["out"][step] for r in ranks]), whole["out"][step], **tol)
        torch.testing.assert_close(torch.cat([r["grad_input"][step] for r in ranks]),
                                   whole["grad_input"][step], **tol)
    for r in ranks:
        for name, buf in whole["buffers"].items():
            torch.testing.assert_close(r["buffers"][name], buf, **tol, msg=name)
    # Eval uses the (synchronised) running statistics and no communication.
    torch.testing.assert_close(torch.cat([r["eval_out"] for r in ranks]), whole["eval_out"], **tol)
    # Parameter gradients stay local; their sum over ranks is the whole batch's.
    for name, g in whole["params"].items():
        torch.testing.assert_close(sum(r["params"][name] for r in ranks), g, **tol, msg=name)


def make_model():
    """A small network of fused layers, converted from Conv2d + BatchNorm2d pairs."""
    torch.manual_seed(0)
    pairs = [(nn.Conv2d(16, 32, 3, 2, 1, groups=4, bias=False), nn.BatchNorm2d(32)),
             (nn.Conv2d(32, 32, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(32))]
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         *[FusedGroupConv.from_modules(c, b, backend="reference") for c, b in pairs],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).double()


def make_data(n=8):
    gen = torch.Generator().manual_seed(2)
    return (torch.randn(n, 3, 12, 12, generator=gen, dtype=torch.float64),
            torch.randint(10, (n,), generator=gen))


def sgd_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def _ddp_worker(rank, tmp):
    model = make_model()
    for m in model.modules():
        if isinstance(m, FusedGroupConv):
            m.process_group = dist.group.WORLD
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = make_data()
    part = slice(rank * 4, rank * 4 + 4)
    loss = sgd_step(ddp, x[part], y[part])
    torch.save({"loss": loss, "state": copy.deepcopy(model.state_dict())}, f"{tmp}/rank{rank}.pt")


@pytest.mark.slow
def test_ddp_step_equals_single_process_step(tmp_path):
    ranks = run_workers(_ddp_worker, tmp_path)
    model = make_model()
    x, y = make_data()
    loss = sgd_step(model, x, y)
    # DDP averages the gradients of the two half-batch mean losses: the whole-batch gradient.
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss, atol=1e-12, rtol=1e-10)
    for r in ranks:
        for name, value in model.state_dict().items():
            torch.testing.assert_close(r["state"][name], value, atol=1e-10, rtol=1e-9, msg=name)


def test_merge_moments_is_stable_and_exact():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(11, 4, generator=gen, dtype=torch.float64) * 1e-3 + 1e4
    parts = [x[:0], x[:3], x[3:]]
    counts = torch.tensor([float(len(p)) for p in parts], dtype=torch.float64)
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(4, dtype=torch.float64) for p in parts])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(4, dtype=torch.float64)
                       for p in parts])
    total, mean, m2 = merge_moments(counts, means, m2s)
    assert total.item() == 11
    torch.testing.assert_close(mean, x.mean(0), atol=0, rtol=1e-15)
    exact = x.var(0, correction=0)  # two-pass, ~1e-6 around a mean of 1e4
    torch.testing.assert_close(m2 / 11, exact, atol=0, rtol=1e-7)
    naive = (x * x).mean(0) - x.mean(0) ** 2  # what raw sums would give: far off
    assert ((naive - exact).abs() / exact).max() > 1e-3


def test_process_group_needs_initialized_distributed():
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        fused_group_conv_bn_relu(x, w, None, None, None, None, groups=2, training=True,
                                 process_group=object())


def test_convert_passes_the_process_group_to_every_fused_block():
    torchvision = pytest.importorskip("torchvision")
    from resnext_kernels import convert

    model = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1],
                                             groups=8, width_per_group=4)
    group = object()  # a stand-in: torch.distributed is not initialised in this process
    report = convert(model, process_group=group)
    assert len(report.converted) == 4
    assert all(model.get_submodule(name).fused_process_group is group for name in report.converted)
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        model(torch.randn(2, 3, 32, 32))
    model.eval()(torch.randn(2, 3, 32, 32))  # eval: no communication, works


@pytest.mark.slow
def test_train_ddp_example_runs_under_torchrun(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("sklearn")
    example = Path(__file__).resolve().parents[1] / "examples" / "train_ddp.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", str(example), "--steps", "3"],
                            capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes (gloo)" in result.stdout and "converted 4 block(s)" in result.stdout
    assert "step    2  loss" in result.stdout
