"""``resnext-bench table``: the settings the ResNeXt paper compares (Xie et al. 2017,
"Aggregated Residual Transformations for Deep Neural Networks"), with parameters
and multiply-adds measured here beside the paper's figures where it gives them.

Parameters are counted on the fused model and equal torchvision's
``ResNet(Bottleneck, layers, groups=C, width_per_group=d)``; multiply-adds are
``torch.utils.flop_counter`` FLOPs / 2 for one 224×224 image (the fused op
registers its convolution's count), on the meta device so nothing is computed.
"""

import json
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from ..models import resnext
from .common import Parser


@dataclass(frozen=True)
class Setting:
    group: str
    name: str
    depth: int
    cardinality: int
    width: int
    paper_params_m: Optional[float] = None  # the paper's figure, millions
    paper_gmacs: Optional[float] = None  # the paper's figure, GFLOPs (multiply-adds)


D50, D101, X2 = "depth 50, 1× complexity", "depth 101, 1× complexity", "2× ResNet-101's complexity"
SETTINGS = (
    Setting(D50, "ResNet-50", 50, 1, 64, 25.5, 4.1),
    Setting(D50, "ResNeXt-50", 50, 2, 40),
    Setting(D50, "ResNeXt-50", 50, 4, 24),
    Setting(D50, "ResNeXt-50", 50, 8, 14),
    Setting(D50, "ResNeXt-50", 50, 32, 4, 25.0, 4.2),
    Setting(D101, "ResNet-101", 101, 1, 64),
    Setting(D101, "ResNeXt-101", 101, 2, 40),
    Setting(D101, "ResNeXt-101", 101, 4, 24),
    Setting(D101, "ResNeXt-101", 101, 8, 14),
    Setting(D101, "ResNeXt-101", 101, 32, 4),
    Setting(X2, "ResNet-200", 200, 1, 64),
    Setting(X2, "ResNet-101 wider", 101, 1, 100),
    Setting(X2, "ResNeXt-101", 101, 2, 64),
    Setting(X2, "ResNeXt-101", 101, 64, 4),
)


def measure(setting: Setting, image_size: int = 224) -> tuple[int, int]:
    """(parameters, multiply-adds for one image) of the fused model of ``setting``."""
    with torch.device("meta"):
        model = resnext(setting.depth, setting.cardinality, setting.width).eval()
        params = sum(p.numel() for p in model.parameters())
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.empty(1, 3, image_size, image_size))
    return params, counter.get_total_flops() // 2


def main(argv=None) -> int:
    parser = Parser(prog="resnext-bench table", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="accepted like every command's; this one is always quick")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    opts = parser.parse_args(argv)

    table = Table(title="ResNeXt paper settings: measured here vs the paper (224×224, 1 image)")
    for col in ("model", "C×d", "params (M)", "paper", "mult-adds (G)", "paper"):
        table.add_column(col, justify="left" if col in ("model", "C×d") else "right")
    rows, group = [], None
    for s in SETTINGS:
        params, macs = measure(s)
        rows.append(asdict(s) | {"params": params, "macs": macs})
        if s.group != group:
            group = s.group
            table.add_section()
            table.add_row(f"[bold]{group}[/]", "", "", "", "", "")
        table.add_row(s.name, f"{s.cardinality}×{s.width}d", f"{params / 1e6:.2f}",
                      "—" if s.paper_params_m is None else f"{s.paper_params_m:.1f}",
                      f"{macs / 1e9:.2f}", "—" if s.paper_gmacs is None else f"{s.paper_gmacs:.1f}")
    Console().print(table)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
