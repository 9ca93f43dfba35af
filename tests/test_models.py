"""ResNeXt models, the paper's table, and conversion of torchvision / timm models."""

import copy
import os

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

torchvision = pytest.importorskip("torchvision")
from torchvision.models.resnet import Bottleneck, ResNet  # noqa: E402

import resnext_kernels  # noqa: E402
from resnext_kernels import available_backends, convert, unconvert  # noqa: E402
from resnext_kernels.bench.table import SETTINGS, measure  # noqa: E402
from resnext_kernels.models import LAYERS, resnext  # noqa: E402
from resnext_kernels.testing import rel_error  # noqa: E402

# Parameter counts and multiply-adds (224x224, one image) of the paper's settings,
# measured by `resnext-bench table`; parameters equal torchvision's ResNet exactly.
PINNED = {
    (50, 1, 64): (25_557_032, 4_089_184_256),
    (50, 2, 40): (25_425_000, 4_124_508_160),
    (50, 4, 24): (25_292_968, 4_159_832_064),
    (50, 8, 14): (25_603_016, 4_267_409_408),
    (50, 32, 4): (25_028_904, 4_230_479_872),
    (101, 1, 64): (44_549_160, 7_801_405_440),
    (101, 2, 40): (44_456_296, 7_843_553_280),
    (101, 4, 24): (44_363_432, 7_885_701_120),
    (101, 8, 14): (45_104_328, 8_076_871_680),
    (101, 32, 4): (44_177_704, 7_969_996_800),
    (200, 1, 64): (64_673_832, 15_007_481_856),
    (101, 1, 100): (85_611_336, 15_272_862_720),
    (101, 2, 64): (84_198_184, 15_123_087_360),
    (101, 64, 4): (83_455_272, 15_460_270_080),
}


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s.depth}-{s.cardinality}x{s.width}d")
def test_paper_settings_parameters_and_macs(setting):
    params, macs = measure(setting)
    key = (setting.depth, setting.cardinality, setting.width)
    assert (params, macs) == PINNED[key]
    with torch.device("meta"):
        reference = ResNet(Bottleneck, list(LAYERS[setting.depth]), groups=setting.cardinality,
                           width_per_group=setting.width)
    assert params == count(reference)
    # Where the paper gives figures (ResNet-50, ResNeXt-50 32x4d), ours agree to its
    # one decimal (it truncates: 25.557 M is its "25.5 M").
    if setting.paper_params_m is not None:
        assert abs(params / 1e6 - setting.paper_params_m) < 0.1
        assert abs(macs / 1e9 - setting.paper_gmacs) < 0.1


def test_fused_model_counts_the_same_macs_as_unfused():
    from torch.utils.flop_counter import FlopCounterMode

    totals = []
    for fused in (True, False):
        with torch.device("meta"):
            model = resnext(50, 32, 4, fused=fused)
            with FlopCounterMode(display=False) as counter:
                model(torch.empty(1, 3, 224, 224))
        totals.append(counter.get_total_flops())
    assert totals[0] == totals[1]


@pytest.mark.parametrize("factory,tv_name", [
    ("resnext50_32x4d", "resnext50_32x4d"), ("resnext101_32x8d", "resnext101_32x8d"),
    ("resnext101_64x4d", "resnext101_64x4d"), ("resnext101_32x4d", None)])
def test_named_models_match_torchvision_structure(factory, tv_name):
    with torch.device("meta"):
        ours = getattr(resnext_kernels.models, factory)(num_classes=10)
        theirs = (getattr(torchvision.models, tv_name)(num_classes=10) if tv_name else
                  ResNet(Bottleneck, [3, 4, 23, 3], num_classes=10, groups=32, width_per_group=4))
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
           [(k, v.shape) for k, v in theirs.state_dict().items()]


def test_checkpoint_round_trip_with_torchvision_strict():
    ours = resnext_kernels.models.resnext50_32x4d()
    theirs = torchvision.models.resnext50_32x4d()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    back = torchvision.models.resnext50_32x4d()
    back.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("args,match", [((34, 32, 4), "depth must be one of"),
                                        ((50, 0, 4), "cardinality must be a positive int"),
                                        ((50, 32, 4.0), "width must be a positive int")])
def test_resnext_rejects_bad_settings(args, match):
    with pytest.raises(ValueError, match=match):
        resnext(*args)


def randomize_batchnorm(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, lo in ((m.weight, 0.5), (m.running_var, 0.5)):
                    t.copy_(torch.rand(t.shape, generator=gen) + lo)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
    return model


class CountFusedCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "resnext_kernels" and not func.__name__.endswith("_backward.default"):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def assert_converted_equals_original(original, image_size=64):
    original = randomize_batchnorm(original.double())
    converted = copy.deepcopy(original)
    report = convert(converted, backend="reference")
    assert len(report.converted) == 16 and not report.skipped
    assert list(converted.state_dict()) == list(original.state_dict())
    for training in (True, False):
        original.train(training), converted.train(training)
        x = torch.randn(4, 3, image_size, image_size, dtype=torch.float64)
        expected = original(x)
        with CountFusedCalls() as mode:
            got = converted(x)
        assert mode.calls == 16
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-9)
        grad = torch.randn_like(expected)
        expected.backward(grad), got.backward(grad)
        for (name, a), (_, b) in zip(original.named_parameters(), converted.named_parameters()):
            torch.testing.assert_close(b.grad, a.grad, atol=1e-10, rtol=1e-8, msg=name)
            a.grad = b.grad = None
        for (name, a), (_, b) in zip(original.named_buffers(), converted.named_buffers()):
            torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10, msg=name)
    return converted


def test_convert_torchvision_resnext50_matches_original():
    converted = assert_converted_equals_original(torchvision.models.resnext50_32x4d())
    assert unconvert(converted) == [f"layer{s}.{i}" for s, n in zip(range(1, 5), (3, 4, 6, 3))
                                    for i in range(n)]
    assert type(converted.layer1[0]) is Bottleneck


def test_convert_timm_resnext50_matches_original():
    timm = pytest.importorskip("timm")
    assert_converted_equals_original(timm.create_model("resnext50_32x4d", pretrained=False))


def test_conversion_keeps_optimizer_state_and_checkpoints():
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, groups=8, width_per_group=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    params_before = [id(p) for p in model.parameters()]
    state = copy.deepcopy(model.state_dict())
    convert(model)
    assert [id(p) for p in model.parameters()] == params_before
    model.load_state_dict(state, strict=True)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # momentum buffers keyed by the same parameters
    assert all(opt.state[p]["momentum_buffer"] is not None for p in model.parameters())


def test_conversion_report_says_what_was_left_alone():
    dilated = torchvision.models.resnext50_32x4d(replace_stride_with_dilation=[False, True, True])
    report = convert(dilated)
    assert report.converted == ["layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1",
                                "layer2.2", "layer2.3", "layer3.0"]
    assert set(report.skipped) == ({f"layer3.{i}" for i in range(1, 6)}
                                   | {f"layer4.{i}" for i in range(3)})
    assert all("conv.dilation must be (1, 1)" in why or "conv.padding" in why
               for why in report.skipped.values())
    assert "left alone layer3.1: conv." in str(report)

    class MyBottleneck(Bottleneck):
        def forward(self, x):
            return super().forward(x)

    model = ResNet(MyBottleneck, [1, 1, 1, 1])
    report = convert(model)
    assert report.converted == [] and "subclasses torchvision.models.resnet.Bottleneck" in \
        report.skipped["layer1.0"]


def test_conversion_skips_timm_drop_block():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnext50_32x4d", pretrained=False, drop_block_rate=0.1)
    report = convert(model)
    assert report.skipped and all("drop_block" in why for why in report.skipped.values())
    assert len(report.converted) + len(report.skipped) == 16


def test_convert_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        convert(nn.Sequential(), backend="cudnn")


# The ResNeXt-50 settings of the paper's Table 3 (C x d): 1x64d is ResNet-50 (up to
# 512 channels per group), 2x40d up to 320.
PAPER_RESNEXT50 = [(1, 64), (2, 40), (4, 24), (8, 14), (32, 4)]


# The Triton interpreter takes ~4 minutes for 32x4d and far longer for the wide
# settings with today's gather kernels (a Python-level loop over each group's
# channels): those runs are opt-in, RESNEXT_LONG_TESTS=1.
LONG = os.environ.get("RESNEXT_LONG_TESTS") == "1"
KERNEL_BACKENDS = [pytest.param(b, marks=[] if b != "triton" or LONG else pytest.mark.skip(
    reason="the Triton interpreter's whole-model runs need RESNEXT_LONG_TESTS=1"))
    for b in ("cuda_emulated", "triton") if b in available_backends()]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("cardinality,width", PAPER_RESNEXT50,
                         ids=[f"{c}x{d}d" for c, d in PAPER_RESNEXT50])
def test_paper_settings_run_through_the_kernel_backends(backend, cardinality, width):
    """Every ResNeXt-50 setting of the paper, converted to a kernel backend, on 32x32
    images: a training forward (output, running statistics), then an eval forward
    and backward (every parameter's gradient), each within 2x the float32 error of
    the unfused model against its float64 copy. (The training backward of a whole
    model is not judged here: with 4 values per channel at stage 5 its float32
    gradients are 1-10 % off float64 for PyTorch's own layers too; the kernels'
    training gradients are judged per layer, wide groups included, in
    tests/test_cuda_backward.py, tests/test_kernel_smoke.py and test_validation.py.)"""
    torch.manual_seed(cardinality)
    unfused = randomize_batchnorm(resnext(50, cardinality, width, fused=False, num_classes=10))
    fused = copy.deepcopy(unfused)
    assert len(convert(fused, backend=backend).converted) == 16
    truth = copy.deepcopy(unfused).double()
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64)
    grad = torch.randn(4, 10, generator=gen, dtype=torch.float64)

    def run(model):
        dtype = next(model.parameters()).dtype
        with torch.no_grad():
            trained = [model.train()(x.to(dtype)), *model.buffers()]
        out = model.eval()(x.to(dtype))
        out.backward(grad.to(dtype))
        return [t.double() for t in [*trained, out, *(p.grad for p in model.parameters())]]

    names = (["train output"] + [n for n, _ in unfused.named_buffers()] + ["eval output"]
             + [n for n, _ in unfused.named_parameters()])
    want, pytorch, got = run(truth), run(unfused), run(fused)
    for name, g, p, w in zip(names, got, pytorch, want, strict=True):
        bound = max(2 * rel_error(p, w), 1e-5)
        assert rel_error(g, w) <= bound, (name, rel_error(g, w), bound)
