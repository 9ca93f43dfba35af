"""Train a small ResNeXt on real data on the CPU, fused and unfused, and compare.

Data: scikit-learn's bundled ``load_digits`` (1,797 8×8 handwritten digits, no
download), upsampled to 32×32 and split 80/20 with a fixed permutation. Model:
torchvision's ``ResNet(Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4)``
with 10 classes — one ResNeXt bottleneck per stage — trained once as it is and
once converted with ``resnext_kernels.convert``, from the same initial weights
and the same batches. The loss curves must agree within ``--tolerance``.

    python examples/digits.py --steps 300

Training runs in float64 by default: this small network at batch 64 amplifies
rounding differences by orders of magnitude within tens of steps, so in float32
any two implementations (two cuDNN algorithms as much as fused vs unfused) drift
apart to different but equally good curves; float64 keeps the comparison exact.
"""

import argparse
import copy
import sys

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torchvision.models.resnet import Bottleneck, ResNet

import resnext_kernels


def load_data(dtype=torch.float32, size=32):
    """(x_train, y_train, x_test, y_test): images [n, 3, size, size] in [0, 1]."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float64)[:, None] / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.expand(-1, 3, -1, -1).to(dtype).contiguous()
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(labels))
    train, test = order[:cut], order[cut:]
    return images[train], labels[train], images[test], labels[test]


def make_models(seed=0, dtype=torch.float32, backend="auto"):
    """(unfused, fused) copies of one randomly initialised small ResNeXt."""
    torch.manual_seed(seed)
    unfused = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, groups=8, width_per_group=4)
    unfused = unfused.to(dtype)
    fused = copy.deepcopy(unfused)
    report = resnext_kernels.convert(fused, backend=backend)
    assert len(report.converted) == 4, report
    return unfused, fused


def train(model, x, y, steps, batch=64, lr=0.01, seed=0):
    """SGD with momentum on random batches (the same ones for the same seed); losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(y), (batch,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return (model(x).argmax(1) == y).double().mean().item()


def run(steps=300, batch=64, dtype=torch.float64, seed=0, backend="auto"):
    """Train both models; returns their loss curves and test accuracies."""
    x_train, y_train, x_test, y_test = load_data(dtype)
    unfused, fused = make_models(seed, dtype, backend)
    result = {}
    for name, model in (("unfused", unfused), ("fused", fused)):
        result[f"losses_{name}"] = train(model, x_train, y_train, steps, batch, seed=seed)
        result[f"accuracy_{name}"] = accuracy(model, x_test, y_test)
    result["max_loss_difference"] = max(
        abs(a - b) for a, b in zip(result["losses_fused"], result["losses_unfused"]))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"],
                        help="float64 (default) makes the comparison exact to rounding; see below")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--tolerance", type=float, default=1e-6,
                        help="largest allowed |loss_fused - loss_unfused| at any step")
    opts = parser.parse_args(argv)
    r = run(opts.steps, opts.batch, getattr(torch, opts.dtype), backend=opts.backend)
    every = max(1, opts.steps // 10)
    print("step  loss unfused  loss fused")
    for i in range(0, opts.steps, every):
        print(f"{i:4d}  {r['losses_unfused'][i]:12.6f}  {r['losses_fused'][i]:10.6f}")
    print(f"final loss: unfused {r['losses_unfused'][-1]:.6f}, fused {r['losses_fused'][-1]:.6f}; "
          f"largest difference over {opts.steps} steps: {r['max_loss_difference']:.2e}")
    print(f"test accuracy: unfused {r['accuracy_unfused']:.3f}, fused {r['accuracy_fused']:.3f}")
    return 0 if r["max_loss_difference"] <= opts.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
