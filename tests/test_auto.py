"""backend="auto": the choice by measurement (resnext_kernels/auto.py), tested on the CPU
with candidates and timings the tests control; the GPU section at the end measures
for real."""

import dataclasses
import json
import time
import warnings

import pytest
import torch

import resnext_kernels
from resnext_kernels import FusedGroupConv, auto, backends
from resnext_kernels.testing import Problem, make_arguments


@dataclasses.dataclass(frozen=True)
class FakeBackend:
    name: str


CUDA, TRITON, REFERENCE = FakeBackend("cuda"), FakeBackend("triton"), FakeBackend("reference")
CANDIDATES = [CUDA, TRITON, REFERENCE]


class Clock:
    """A timer whose medians the test sets: ``ms[name]`` per candidate; a candidate's
    step returns its name (or raises ``fail[name]``). Counts timer calls."""

    def __init__(self, **ms):
        self.ms = ms
        self.fail = {}
        self.calls = 0

    def make_step(self, backend, call):
        def step():
            if backend.name in self.fail:
                raise self.fail[backend.name]
            return backend.name
        return step

    def timer(self, step):
        self.calls += 1
        name = step()
        return [self.ms[name]] * auto.REPEATS

    def selector(self, **kwargs):
        return auto.Selector(timer=self.timer, make_step=self.make_step, **kwargs)


def make_call(n=2, training=True, requires_grad=False, synchronized=False, c=8):
    x, w, g, b, rm, rv = make_arguments(Problem(n, c, c, 5, 5, 2, 1), torch.float32)
    if requires_grad:
        w.requires_grad_()
    return auto.Call(x, w, g, b, rm, rv, 1, 2, 1e-5, training, synchronized)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for name in (auto.MODE_VARIABLE, auto.CACHE_DIR_VARIABLE, *auto.STRATEGY_VARIABLES):
        monkeypatch.delenv(name, raising=False)


def test_a_tie_stays_on_reference():
    clock = Clock(cuda=1.0, triton=1.0, reference=1.0)
    assert clock.selector().choose(CANDIDATES, make_call()) is REFERENCE


@pytest.mark.parametrize("factor,expected", [(0.97, REFERENCE), (1 - auto.MARGIN * 1.25, CUDA)])
def test_a_kernel_wins_only_by_the_margin(factor, expected):
    clock = Clock(cuda=factor, triton=2.0, reference=1.0)
    selector = clock.selector()
    assert selector.choose(CANDIDATES, make_call()) is expected
    [entry] = selector.choices()
    assert entry["timings_ms"] == {"cuda": factor, "triton": 2.0, "reference": 1.0}
    assert entry["choice"] == expected.name and entry["source"] == "measured"


def test_without_reference_the_fastest_wins():
    assert auto.pick({"cuda": 2.0, "triton": 1.0}) == "triton"
    assert auto.pick({"cuda": 1.0, "triton": 1.0}) == "cuda"  # candidate order on ties
    assert auto.pick({"cuda": None, "reference": float("inf")}) is None


def test_failing_candidates_are_skipped_with_one_warning():
    clock = Clock(cuda=0.1, triton=0.5, reference=1.0)
    clock.fail["cuda"] = RuntimeError("CUDA error: too many resources requested for launch")
    selector = clock.selector()
    with pytest.warns(UserWarning, match="skipped 'cuda'.*too many resources") as record:
        assert selector.choose(CANDIDATES, make_call(n=2)) is TRITON
        assert selector.choose(CANDIDATES, make_call(n=3)) is TRITON  # a new problem
    assert len([r for r in record if "skipped" in str(r.message)]) == 1
    for entry in selector.choices():
        assert entry["timings_ms"]["cuda"] is None
        assert "too many resources" in entry["skipped"]["cuda"]


def test_a_bug_in_a_candidate_is_not_hidden():
    clock = Clock(cuda=0.1, triton=0.5, reference=1.0)
    clock.fail["triton"] = TypeError("unexpected keyword")
    with pytest.raises(TypeError, match="unexpected keyword"):
        clock.selector().choose(CANDIDATES, make_call())


def test_when_nothing_runs_reference_is_used_once_warned():
    clock = Clock(cuda=0.1, triton=0.5, reference=1.0)
    clock.fail = {name: RuntimeError("out of memory") for name in clock.ms}
    selector = clock.selector()
    with pytest.warns(UserWarning, match="could time no candidate"):
        assert selector.choose(CANDIDATES, make_call()) is REFERENCE
    calls = clock.calls
    assert selector.choose(CANDIDATES, make_call()) is REFERENCE
    assert clock.calls == calls  # not retried on every call


def test_low_free_memory_skips_the_timing():
    clock = Clock(cuda=0.1, triton=0.5, reference=1.0)
    selector = clock.selector(free_memory=lambda device: 1024)
    with pytest.warns(UserWarning, match="could time no candidate"):
        assert selector.choose(CANDIDATES, make_call()) is REFERENCE
    assert clock.calls == 0
    assert "1024 bytes free" in selector.choices()[0]["skipped"]["cuda"]


def test_a_cached_problem_is_not_timed_again():
    clock = Clock(cuda=0.5, triton=0.7, reference=1.0)
    selector = clock.selector()
    assert selector.choose(CANDIDATES, make_call()) is CUDA
    assert clock.calls == 3
    clock.ms["cuda"] = 5.0  # would lose now, but the choice is cached
    assert selector.choose(CANDIDATES, make_call()) is CUDA
    assert clock.calls == 3


@pytest.mark.parametrize("change", ["batch", "training", "requires_grad", "dtype", "strategy",
                                    "deterministic"])
def test_what_changes_the_winner_is_in_the_key(change, monkeypatch):
    clock = Clock(cuda=0.5, triton=0.7, reference=1.0)
    selector = clock.selector()
    selector.choose(CANDIDATES, make_call())
    call = make_call()
    if change == "batch":
        call = make_call(n=3)
    elif change == "training":
        call = make_call(training=False)
    elif change == "requires_grad":
        call = make_call(requires_grad=True)
    elif change == "dtype":
        half = [t.half() for t in (call.input, call.weight)]
        call = dataclasses.replace(call, input=half[0], weight=half[1])
    elif change == "strategy":
        monkeypatch.setenv("RESNEXT_BWD_XHAT", "recover")
    if change == "deterministic":
        with _deterministic():
            selector.choose(CANDIDATES, call)
    else:
        selector.choose(CANDIDATES, call)
    assert clock.calls == 6
    assert len(selector.choices()) == 2


def test_no_grad_means_no_backward_in_the_key():
    call = make_call(requires_grad=True)
    assert auto.problem_key(call).requires_grad
    with torch.no_grad():
        assert not auto.problem_key(call).requires_grad


class _deterministic:
    def __enter__(self):
        self.before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.before)


def test_disk_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv(auto.CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    clock = Clock(cuda=0.5, triton=0.7, reference=1.0)
    assert clock.selector().choose(CANDIDATES, make_call()) is CUDA
    data = json.loads((tmp_path / "cache" / auto.CACHE_FILE).read_text())
    assert data["format"] == auto.CACHE_FORMAT
    [item] = data["entries"]
    assert item["choice"] == "cuda" and item["environment"] == auto.environment()
    assert not list((tmp_path / "cache").glob("*.tmp"))  # the temporary file was renamed

    second = Clock(cuda=9.0, triton=9.0, reference=1.0)  # a new process: a fresh selector
    selector = second.selector()
    assert selector.choose(CANDIDATES, make_call()) is CUDA
    assert second.calls == 0
    assert selector.choices()[0]["source"] == "disk"


def test_disk_cache_of_other_versions_misses(tmp_path, monkeypatch):
    monkeypatch.setenv(auto.CACHE_DIR_VARIABLE, str(tmp_path))
    Clock(cuda=0.5, triton=0.7, reference=1.0).selector().choose(CANDIDATES, make_call())
    monkeypatch.setattr(auto, "environment", lambda: {"resnext_kernels": "9.9", "torch": "3.0",
                                                      "triton": None, "cuda": None})
    clock = Clock(cuda=2.0, triton=3.0, reference=1.0)
    assert clock.selector().choose(CANDIDATES, make_call()) is REFERENCE
    assert clock.calls == 3
    assert len(json.loads((tmp_path / auto.CACHE_FILE).read_text())["entries"]) == 2


def test_a_corrupt_disk_cache_is_ignored_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv(auto.CACHE_DIR_VARIABLE, str(tmp_path))
    (tmp_path / auto.CACHE_FILE).write_text("{not json")
    clock = Clock(cuda=0.5, triton=0.7, reference=1.0)
    with pytest.warns(UserWarning, match="ignoring the auto cache"):
        assert clock.selector().choose(CANDIDATES, make_call()) is CUDA
    assert json.loads((tmp_path / auto.CACHE_FILE).read_text())["entries"][0]["choice"] == "cuda"


@pytest.mark.parametrize("where", ["capture", "compile"])
def test_no_timing_under_capture_or_compile(where):
    clock = Clock(cuda=0.5, triton=0.7, reference=1.0)
    active = {"on": True}
    predicate = dict(is_capturing=lambda device: active["on"]) if where == "capture" else \
        dict(is_compiling=lambda: active["on"])
    selector = clock.selector(**predicate)
    with pytest.warns(UserWarning, match="run one eager step") as record:
        assert selector.choose(CANDIDATES, make_call(n=2)) is REFERENCE
        assert selector.choose(CANDIDATES, make_call(n=3)) is REFERENCE
    assert len(record) == 1 and clock.calls == 0
    active["on"] = False  # eager again: measured, and used under capture / compile after
    assert selector.choose(CANDIDATES, make_call(n=2)) is CUDA
    assert clock.calls == 3
    active["on"] = True
    assert selector.choose(CANDIDATES, make_call(n=2)) is CUDA
    assert clock.calls == 3


def test_compile_uses_a_layer_choice_only_when_its_problems_agree():
    clock = Clock(cuda=0.5, triton=0.7, reference=1.0)
    compiling = {"on": False}
    selector = clock.selector(is_compiling=lambda: compiling["on"])
    selector.choose(CANDIDATES, make_call(n=2))
    clock.ms["triton"] = 0.1
    selector.choose(CANDIDATES, make_call(n=3))  # the same layer, another batch: triton
    compiling["on"] = True
    with pytest.warns(UserWarning, match="while torch.compile traces"):
        assert selector.choose(CANDIDATES, make_call(n=4)) is REFERENCE


def test_torch_compile_traces_auto_without_a_graph_break(monkeypatch):
    if "triton" not in backends.usable_backends(torch.empty(0, 0, 0, 0)):
        pytest.skip("needs a second CPU backend (the Triton interpreter)")
    monkeypatch.setattr(backends, "AUTO_ORDER", {"cpu": ("triton", "reference")})
    monkeypatch.setattr(auto, "SELECTOR", auto.Selector(timer=lambda step: pytest.fail("timed")))
    layer = FusedGroupConv(8, 8, groups=2).eval()
    x = torch.randn(2, 8, 5, 5)
    compiled = torch.compile(layer, fullgraph=True)
    with pytest.warns(UserWarning, match="while torch.compile traces.*'reference'"):
        out = compiled(x)
    layer.backend = "reference"
    torch.testing.assert_close(out, layer(x))


def test_static_mode_takes_the_first_candidate(monkeypatch):
    monkeypatch.setenv(auto.MODE_VARIABLE, "static")
    clock = Clock(cuda=5.0, triton=0.7, reference=1.0)
    selector = clock.selector()
    assert selector.choose(CANDIDATES, make_call()) is CUDA
    assert clock.calls == 0
    assert selector.choices()[0]["source"] == "static"
    monkeypatch.setenv(auto.MODE_VARIABLE, "measure")
    assert selector.choose(CANDIDATES, make_call()) is TRITON  # a static entry is no measurement


def test_a_bad_mode_is_refused(monkeypatch):
    monkeypatch.setenv(auto.MODE_VARIABLE, "fast")
    with pytest.raises(ValueError, match="RESNEXT_AUTO must be one of measure, static; got 'fast'"):
        Clock(cuda=1.0, triton=1.0, reference=1.0).selector().choose(CANDIDATES, make_call())


def test_deterministic_mode_leaves_out_backends_without_a_deterministic_path(monkeypatch):
    reference = backends._REGISTRY["reference"]
    fast = dataclasses.replace(reference, name="cuda", device_types=frozenset({"cpu"}),
                               deterministic=False)
    monkeypatch.setitem(backends._REGISTRY, "cuda", fast)
    monkeypatch.setattr(backends, "AUTO_ORDER", {"cpu": ("cuda", "reference")})
    x = torch.empty(1, 1, 1, 1)
    assert [b.name for b in backends.auto_candidates(x)] == ["cuda", "reference"]
    with _deterministic():
        assert [b.name for b in backends.auto_candidates(x)] == ["reference"]
    assert all(backends._REGISTRY[name].deterministic
               for name in ("reference", "cuda", "triton", "cuda_emulated")
               if name in backends._REGISTRY and backends._REGISTRY[name] is not fast)


def test_on_the_cpu_auto_is_reference_without_timing(monkeypatch):
    monkeypatch.setattr(auto, "SELECTOR", auto.Selector(timer=lambda step: pytest.fail("timed")))
    args = make_arguments(Problem(2, 8, 8, 5, 5, 2, 1), torch.float32)
    resnext_kernels.fused_group_conv_bn_relu(*args, groups=2, training=True)
    assert resnext_kernels.auto_choices() == []


def test_ranks_agree_on_one_choice():
    """Two ranks that measure differently take the same choice: the fake all-reduce
    averages their timings as torch.distributed.all_reduce would."""
    local = {0: Clock(cuda=0.5, triton=0.9, reference=1.0),      # rank 0: cuda wins here
             1: Clock(cuda=2.0, triton=0.9, reference=1.0)}      # rank 1: triton wins here
    local[1].fail["triton"] = RuntimeError("launch failed")      # ... but fails on rank 1
    sent = {}

    def agree(rank):
        def all_reduce(medians, call, digest):
            sent[rank] = medians
            digests[rank] = digest
            other = sent.get(1 - rank) or run(1 - rank)
            return [(a + b) / 2 for a, b in zip(medians, other)]
        return all_reduce

    def run(rank):
        selector = local[rank].selector(agree=agree(rank))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            choices[rank] = selector.choose(CANDIDATES, make_call(n=2 + rank, synchronized=True))
        entries[rank] = selector.choices()
        return sent[rank]

    choices, entries, digests = {}, {}, {}
    run(0)
    assert digests[0] == digests[1]  # the same problem, whatever the ranks' batch sizes
    assert choices[0] is choices[1] is REFERENCE  # cuda 1.25 vs reference 1.0; triton failed
    assert entries[0][0]["timings_ms"] == entries[1][0]["timings_ms"] == \
        {"cuda": 1.25, "triton": None, "reference": 1.0}
    assert entries[0][0]["batch"] is None  # ranks' batch sizes may differ


def test_agreement_only_with_a_process_group():
    clock = Clock(cuda=0.5, triton=0.7, reference=1.0)
    selector = clock.selector(agree=lambda medians, call, digest: pytest.fail("agreed"))
    assert selector.choose(CANDIDATES, make_call()) is CUDA


def test_timing_leaves_the_users_state_alone(monkeypatch):
    """End to end on the CPU: a second backend (the reference's ops under another
    name) makes auto time both with the real runner; the training step's running
    statistics, .grad and RNG state are those of one untimed step."""
    reference = backends._REGISTRY["reference"]
    monkeypatch.setitem(backends._REGISTRY, "cuda",
                        dataclasses.replace(reference, name="cuda", device_types=frozenset({"cpu"})))
    monkeypatch.setattr(backends, "AUTO_ORDER", {"cpu": ("cuda", "reference")})

    def cpu_timer(step):
        times = []
        for _ in range(auto.REPEATS):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return times

    monkeypatch.setattr(auto, "SELECTOR", auto.Selector(timer=cpu_timer))
    layers = {}
    for backend in ("auto", "reference"):
        torch.manual_seed(0)
        layers[backend] = FusedGroupConv(8, 8, groups=2, backend=backend).train()
    x = torch.randn(2, 8, 5, 5)
    results = {}
    for backend, layer in layers.items():
        torch.manual_seed(1)
        xb = x.clone().requires_grad_()
        layer(xb).sum().backward()
        results[backend] = (layer.bn.running_mean.clone(), layer.bn.running_var.clone(),
                            layer.bn.num_batches_tracked.clone(), layer.conv.weight.grad.clone(),
                            xb.grad.clone(), torch.rand(3))
    [entry] = resnext_kernels.auto_choices()
    assert entry["source"] == "measured" and entry["requires_grad"] and entry["training"]
    assert all(t is not None and t > 0 for t in entry["timings_ms"].values())
    for got, want in zip(results["auto"], results["reference"]):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_auto_choices_are_json_serialisable(monkeypatch):
    clock = Clock(cuda=0.5, triton=0.7, reference=1.0)
    monkeypatch.setattr(auto, "SELECTOR", clock.selector())
    monkeypatch.setenv("RESNEXT_TRAIN_STRATEGY", "raw")
    auto.SELECTOR.choose(CANDIDATES, make_call())
    [entry] = json.loads(json.dumps(resnext_kernels.auto_choices()))
    assert entry["choice"] == "cuda" and entry["dtype"] == "float32"
    assert entry["strategy"]["RESNEXT_TRAIN_STRATEGY"] == "raw"
    assert entry["memory_format"] == "contiguous" and entry["batch"] == 2


# -- on a GPU ------------------------------------------------------------------------

def _images_per_s(model, x, steps=10):
    with torch.no_grad():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            model(x)
        torch.cuda.synchronize()
    return steps * x.shape[0] / (time.perf_counter() - start)


@pytest.mark.gpu
def test_converted_resnext50_in_auto_is_never_slower_than_pytorch(monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setattr(auto, "SELECTOR", auto.Selector())
    model = torchvision.models.resnext50_32x4d().cuda().half().eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, 224, 224, device="cuda", dtype=torch.half)
    x = x.contiguous(memory_format=torch.channels_last)
    unfused = _images_per_s(model, x)
    resnext_kernels.convert(model, backend="auto")
    fused = _images_per_s(model, x)  # the warm-up calls measure
    first = _choices_by_problem()
    assert first, "auto measured nothing on a GPU"
    # "Beyond noise": 5 % of a 10-step images/s figure.
    assert fused >= unfused * 0.95, (fused, unfused, resnext_kernels.auto_choices())

    monkeypatch.setattr(auto, "SELECTOR", auto.Selector())  # a second run measures again
    _images_per_s(model, x, steps=1)
    assert _choices_by_problem() == first


def _choices_by_problem():
    fields = set(auto.Key._fields)
    return {json.dumps({k: v for k, v in e.items() if k in fields}, sort_keys=True): e["choice"]
            for e in resnext_kernels.auto_choices()}


def test_close_kernels_keep_the_candidate_order():
    """Between kernels within the margin the first in candidate order stays chosen,
    so noise between two close kernels does not flip the choice run to run."""
    assert auto.pick({"cuda": 0.50, "triton": 0.49, "reference": 1.0}) == "cuda"
    assert auto.pick({"cuda": 0.60, "triton": 0.49, "reference": 1.0}) == "triton"
    assert auto.pick({"cuda": None, "triton": 0.49, "reference": 1.0}) == "triton"


def test_low_free_memory_is_retried_on_a_later_call():
    free = {"bytes": 1024}
    clock = Clock(cuda=0.1, triton=0.5, reference=1.0)
    selector = clock.selector(free_memory=lambda device: free["bytes"])
    with pytest.warns(UserWarning, match="could time no candidate"):
        assert selector.choose(CANDIDATES, make_call()) is REFERENCE
    free["bytes"] = 1 << 40
    assert selector.choose(CANDIDATES, make_call()) is CUDA
    assert selector.choices()[0]["source"] == "measured"


def test_ranks_with_different_problems_raise_instead_of_hanging(monkeypatch):
    """all_reduce_timings first compares the ranks' problem digests (MAX of d and -d):
    a rank that reached another problem makes every rank raise."""
    def other_rank_has(digest):
        def all_reduce(tensor, op=None, group=None):
            if tensor.dtype == torch.int64:
                tensor.copy_(torch.maximum(tensor, torch.tensor([digest, -digest])))
        return all_reduce

    monkeypatch.setattr(auto.dist, "get_world_size", lambda group=None: 2)
    call = make_call(synchronized=True)
    monkeypatch.setattr(auto.dist, "all_reduce", other_rank_has(123))
    assert auto.all_reduce_timings([1.0, 2.0], call, 123) == [0.5, 1.0]
    monkeypatch.setattr(auto.dist, "all_reduce", other_rank_has(124))
    with pytest.raises(RuntimeError, match="met different problems on the ranks"):
        auto.all_reduce_timings([1.0, 2.0], call, 123)
