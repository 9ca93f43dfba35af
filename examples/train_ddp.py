"""Train a small ResNeXt with DistributedDataParallel and synchronised fused BatchNorm.

    torchrun --standalone --nproc_per_node 2 examples/train_ddp.py            # CPU, gloo
    torchrun --standalone --nproc_per_node 8 examples/train_ddp.py --steps 200  # GPUs, NCCL

Each process takes its share of scikit-learn's digits (upsampled to 32×32); the
model is torchvision's ``ResNet(Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4)``
converted with ``resnext_kernels.convert(model, process_group=WORLD)``, so every
fused grouped conv + BN + ReLU normalises with the statistics of the whole global
batch, as ``nn.SyncBatchNorm`` would. On GPUs the remaining BatchNorm layers are
synchronised with ``nn.SyncBatchNorm.convert_sync_batchnorm`` (GPU-only in PyTorch);
on the CPU they stay per-process.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

import resnext_kernels


def load_shard(rank, world, device):
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = images.expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target)
    return images[rank::world].to(device), labels[rank::world].to(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=0.01)
    opts = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts them)
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, groups=8, width_per_group=4)
    report = resnext_kernels.convert(model, process_group=dist.group.WORLD)
    if use_cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model.to(device))
    model = model.to(device, memory_format=torch.channels_last)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=opts.lr, momentum=0.9)
    x, y = load_shard(rank, world, device)
    if rank == 0:
        print(f"{world} processes ({'nccl' if use_cuda else 'gloo'}), "
              f"backends {resnext_kernels.available_backends()}; {report}")

    gen = torch.Generator().manual_seed(rank)
    for step in range(opts.steps):
        idx = torch.randint(len(y), (opts.batch,), generator=gen).to(device)
        loss = F.cross_entropy(ddp(x[idx].contiguous(memory_format=torch.channels_last)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss = loss.detach()
        dist.all_reduce(loss)  # sum over processes (gloo has no average)
        if rank == 0 and (step % max(1, opts.steps // 10) == 0 or step == opts.steps - 1):
            print(f"step {step:4d}  loss {loss.item() / world:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
