"""The performance model of ``resnext-bench predict``: the L2 model, the ceilings and
the reference bytes on synthetic launches with known answers, the emulator's counts
of the real CUDA kernels, and the CLI's JSON."""

import json

import numpy as np
import pytest
import torch

from resnext_kernels import build_info, testing
from resnext_kernels.bench import counters, perfmodel
from resnext_kernels.bench import main as bench_main
from resnext_kernels.bench.counters import ATOMIC, READ, SECTOR, WRITE, Launch, l2_model

needs_emulator = pytest.mark.skipif(not build_info()["emulated"],
                                    reason="resnext_kernels._C_emulated is not built")


def launch(sectors, kind=READ, *, scale=1.0, counted=None, window_start=0.0, **counts):
    sectors = np.asarray(sectors, np.int64)
    return Launch(backend="test", kernel="k", symbol="k", grid=(1, 1, 1), threads=32, blocks=1,
                  sampled_blocks=1, scale=scale, trace_sector=sectors,
                  trace_kind=np.full(len(sectors), kind, np.uint8),
                  trace_counted=np.ones(len(sectors), bool) if counted is None
                  else np.asarray(counted, bool),
                  window_start=window_start, **counts)


# ---- the L2 model -------------------------------------------------------------------

def test_first_touch_reads_from_dram_once():
    (d,) = l2_model([launch(list(range(100)) * 1)], window_bytes=1 << 20)
    assert d.read == 100 * SECTOR and d.write == 0 and d.unique == 100 * SECTOR


def test_reuse_across_launches_hits_only_within_the_window():
    first, again = launch(range(1000)), launch(range(1000))
    near = l2_model([first, again], window_bytes=1000 * SECTOR)
    assert near[1].read == 0 and near[1].unique == 0
    far = l2_model([first, again], window_bytes=999 * SECTOR)
    assert far[1].read == 1000 * SECTOR


def test_sampled_launch_spans_its_full_grid():
    """A launch counted on a tenth of its grid stands for ten times its traffic, so a
    re-read by the next launch comes that much later."""
    sampled = launch(range(100), scale=10.0, window_start=0.45)
    again = launch(range(100), scale=10.0, window_start=0.45)
    fits = l2_model([sampled, again], window_bytes=1000 * SECTOR)
    assert fits[0].read == 1000 * SECTOR and fits[1].read == 0
    too_far = l2_model([sampled, again], window_bytes=500 * SECTOR)
    assert too_far[1].read == 1000 * SECTOR


def test_writes_and_atomics():
    write, atomic = launch(range(10), WRITE), launch(range(10, 20), ATOMIC)
    d = l2_model([write, atomic], window_bytes=1 << 20)
    assert (d[0].read, d[0].write) == (0, 10 * SECTOR)
    assert (d[1].read, d[1].write) == (10 * SECTOR, 10 * SECTOR)
    # Read back by the next launch while still in L2: no DRAM read.
    d = l2_model([write, launch(range(10))], window_bytes=1 << 20)
    assert d[1].read == 0


def test_warm_up_entries_prime_but_do_not_count():
    warm = launch([1, 2, 3, 1, 2, 3], counted=[0, 0, 0, 1, 1, 1])
    (d,) = l2_model([warm], window_bytes=1 << 20)
    assert d.read == 0 and d.unique == 3 * SECTOR


# ---- ceilings, reference bytes, rows ------------------------------------------------

S2 = testing.Problem(256, 128, 128, 56, 56, 32, 1)


def test_reference_bytes():
    inp = out = 256 * 128 * 56 * 56 * 2
    assert perfmodel.reference_bytes(S2, torch.bfloat16, "eval") == inp + out
    assert perfmodel.reference_bytes(S2, torch.bfloat16, "train_fwd") == 2 * inp + out
    assert perfmodel.reference_bytes(S2, torch.bfloat16, "train_bwd") == 3 * inp + 4 * out
    assert perfmodel.reference_bytes(S2, torch.bfloat16, "eval_bwd") == 2 * inp + 2 * out
    assert perfmodel.reference_bytes(S2, torch.bfloat16, "train_step") == 5 * inp + 5 * out
    down = testing.Problem(256, 256, 256, 56, 56, 32, 2)
    assert perfmodel.reference_bytes(down, torch.float32, "eval") == 256 * 256 * 4 * (56 ** 2 +
                                                                                       28 ** 2)


def test_binding_ceiling():
    h = {k: c.value for k, c in perfmodel.H200.items()}
    pipe = h["sms"] * h["clock"]
    smem = launch(range(10), smem_wavefronts=pipe * 1e-3, smem_ideal_wavefronts=pipe * 1e-4)
    (row,) = perfmodel.model_pass([smem], {})
    assert row["bound"] == "l1"
    assert row["modeled_ms"] == pytest.approx(1.0 + h["launch_overhead"] * 1e3)
    fma = launch(range(10), fma=h["fp32_fma_rate"] * 2e-3)
    (row,) = perfmodel.model_pass([fma], {})
    assert row["bound"] == "fma" and row["ceilings_ms"]["fma"] == pytest.approx(2.0)
    # 1e6 mma at 300 instructions each: the issue ceiling binds.
    mma = launch(range(10), mma=1e6, executed_macs=2048e6, mma_kind="mma.sync")
    (row,) = perfmodel.model_pass([mma], {"k": {"instructions_per_mma": 300}})
    assert row["bound"] == "issue"
    assert row["issue_instructions"] == 3e8
    assert row["ceilings_ms"]["issue"] == pytest.approx(3e8 / (pipe * 4) * 1e3)
    assert row["ceilings_ms"]["tensor"] == pytest.approx(2048e6 / h["mma_sync_rate"] * 1e3)
    # Each tile issued by two warps (sass.mma_replication) doubles both ceilings; the
    # compiled opcode picks the rate, whatever the counters called the dot.
    doubled = {"k": {"instructions_per_mma": 300, "mma_replication": 2.0,
                     "hmma_kind": "HMMA.16816.F32.BF16"}}
    dot = launch(range(10), mma=1e6, executed_macs=2048e6, mma_kind="tl.dot")
    (row,) = perfmodel.model_pass([dot], doubled)
    assert row["issue_instructions"] == 6e8 and row["mma_rate"] == "mma.sync"
    assert row["ceilings_ms"]["tensor"] == pytest.approx(2 * 2048e6 / h["mma_sync_rate"] * 1e3)
    (row,) = perfmodel.model_pass([dot], {"k": {"hmma_kind": "HGMMA.64x64x16.F32.BF16"}})
    assert row["mma_rate"] == "wgmma"
    assert row["ceilings_ms"]["tensor"] == pytest.approx(2048e6 / h["wgmma_rate"] * 1e3)
    (row,) = perfmodel.model_pass([dot], {})  # no compiled code: the counters' kind
    assert row["mma_rate"] == "wgmma" and row["mma_replication"] == 1.0
    # An nvcc kernel's loop whose mma ran once a warp (a retry loop, 8 HMMA a trip, a
    # 500-instruction kernel around it) charges the whole kernel; one that ran twice
    # a warp is a hot loop, charged per trip.
    retry = {"k": {"instructions_per_mma": 30, "instructions": 500, "loop": (16, 256),
                   "counts": {"HMMA": 8}}}
    once = launch(range(10), mma=8, executed_macs=8 * 2048, mma_kind="mma.sync")
    once.backend = "cuda"
    (row,) = perfmodel.model_pass([once], retry)
    assert row["issue_instructions"] == 500
    twice = launch(range(10), mma=16, executed_macs=16 * 2048, mma_kind="mma.sync")
    twice.backend = "cuda"
    (row,) = perfmodel.model_pass([twice], retry)
    assert row["issue_instructions"] == 16 * 30
    glue = launch([])
    (row,) = perfmodel.model_pass([glue], {})
    assert row["bound"] == "launch" and row["modeled_ms"] == h["launch_overhead"] * 1e3


def test_pass_row_is_the_sum_of_its_kernels():
    kernels = perfmodel.model_pass([launch(range(100), global_bytes=64, global_sectors=4),
                                    launch(range(50, 200), WRITE, global_bytes=32,
                                           global_sectors=2)], {})
    row = perfmodel.pass_row("s2", "cuda", "eval", S2, torch.bfloat16, kernels)
    for key in perfmodel.SUMMED:
        assert row[key] == pytest.approx(sum(k[key] for k in kernels))
    assert row["coalescing"] == pytest.approx(96 / (6 * 32))
    assert row["ratio"] == pytest.approx(row["modeled_ms"] / row["floor_ms"])
    assert row["label"] == perfmodel.LABEL


# ---- the emulator's counts of the real kernels --------------------------------------

@needs_emulator
def test_counted_eval_pass_moves_input_and_output():
    """A grid small enough to run whole: the distinct bytes are exactly what the pass
    touches (input, output, weights, per-channel vectors), and every sector of the
    NHWC input and output is used by someone."""
    from resnext_kernels.bench.count_cuda import count_pass

    problem = testing.Problem(2, 64, 64, 16, 16, 8, 1)
    launches = count_pass(problem, "eval", torch.bfloat16, waves=100)
    kernels = [k for k in launches if k.backend == "cuda" and k.trace_sector.size]
    assert len(kernels) == 1 and "conv_fwd_kernel" in kernels[0].kernel
    assert kernels[0].symbol.startswith("_ZN2rk6detail15conv_fwd_kernel")
    assert kernels[0].sampled_blocks == kernels[0].blocks and kernels[0].scale == 1.0
    assert kernels[0].mma > 0 and kernels[0].useful_macs <= kernels[0].executed_macs
    glue = [k.kernel for k in launches if k.kernel.startswith("torch aten::")]
    # One glue op, the weight's OHWI copy: the test build's poison is not glue, and the
    # kernel copies the running statistics the op returns.
    assert glue == ["torch aten::contiguous"], glue
    (row,) = [r for r in perfmodel.model_pass(launches, {}) if r["l2_bytes"]]
    inp = out = 2 * 64 * 16 * 16 * 2
    weights = 64 * 8 * 9 * 2
    assert inp + out <= row["unique_bytes"] <= inp + out + weights + 4096
    assert 0 < row["coalescing"] < 1


@needs_emulator
def test_counted_window_scales_to_the_grid():
    """Counting 1/10 of the blocks gives about the same totals as counting them all."""
    from resnext_kernels.bench.count_cuda import count_pass

    problem = testing.Problem(16, 64, 64, 28, 28, 16, 1)  # 196 blocks of 32 channels
    whole = count_pass(problem, "eval", torch.float16, waves=100)[0]
    window = count_pass(problem, "eval", torch.float16, waves=0.05, warmup_waves=0.02)[0]
    assert window.sampled_blocks < whole.blocks / 5
    for field in ("global_requests", "global_sectors", "mma", "smem_wavefronts"):
        full = getattr(whole, field)
        assert getattr(window, field) * window.scale == pytest.approx(full, rel=0.1), field
    assert window.l2_bytes == pytest.approx(whole.l2_bytes, rel=0.1)


# ---- the CLI ------------------------------------------------------------------------

@needs_emulator
def test_predict_json_schema(tmp_path, capsys):
    path = tmp_path / "predict.json"
    assert bench_main(["predict", "--backends", "cuda", "--layers", "s5", "--batch", "2",
                       "--no-sass", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["label"] == perfmodel.LABEL == "modelled (CPU counters), not measured"
    assert set(doc["model"]) == set(perfmodel.H200)
    assert all(c["source"] for c in doc["model"].values())
    assert [r["pass"] for r in doc["rows"]] == list(perfmodel.PASSES)
    keys = {"layer", "backend", "pass", "dtype", "batch", "floor_bytes", "floor_ms", "dram_bytes",
            "unique_bytes", "l2_bytes", "coalescing", "smem_wavefronts", "smem_ideal_wavefronts",
            "executed_macs", "useful_macs", "issue_instructions", "launches", "modeled_ms",
            "ratio", "bound", "kernels"}
    for row in doc["rows"]:
        assert keys <= set(row), keys - set(row)
        assert row["modeled_ms"] == pytest.approx(sum(k["modeled_ms"] for k in row["kernels"]))
        assert row["launches"] == len(row["kernels"])
    fwd, bwd, step = (next(r for r in doc["rows"] if r["pass"] == p)
                      for p in ("train_fwd", "train_bwd", "train_step"))
    assert step["modeled_ms"] == pytest.approx(fwd["modeled_ms"] + bwd["modeled_ms"])
    assert "modelled (CPU counters), not measured" in capsys.readouterr().out


def test_predict_bad_options(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_main(["predict", "--layers", "s9"])
    assert exc.value.code == 2 and "--layers" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench_main(["predict", "--measure", "--backends", "cuda"])
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_measured_kernels_are_put_beside_their_model():
    from resnext_kernels.bench.predict import attach_measured

    cuda = "void rk::detail::conv_fwd_kernel<__nv_bfloat16, 16, 1, (rk::Pass)2>(rk::ConvFwdParams)"
    row = {"kernels": [{"kernel": cuda, "modeled_ms": 0.5},
                       {"kernel": "torch aten::mul", "modeled_ms": 0.0025},
                       {"kernel": "conv_rows_kernel(MODE=0,STRIDE=1,BW=32,warps=4)",
                        "modeled_ms": 0.2}],
           "measured_kernels": [("void at::native::vectorized_elementwise_kernel<4>", 0.003),
                                (cuda, 1.0), ("conv_rows_kernel", 0.1)]}
    attach_measured(row)
    assert row["kernels"][0]["measured_over_modeled"] == 2.0
    assert "measured_ms" not in row["kernels"][1]
    assert row["kernels"][2]["measured_ms"] == 0.1
    assert row["measured_other_ms"] == 0.003
