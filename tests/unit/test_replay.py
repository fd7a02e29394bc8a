"""Replay of the runtime's kernel calls (megatron_fcp.bench.replay) and scripts/gpu_perf.py's CPU mode.

The key check: the calls listed from a plan (what scripts/gpu_perf.py times) are, rank by rank and in order,
the calls the real runtime issues: ``fcp_attention`` and ``ring_attention`` run rank by rank with an exchange that
moves nothing, and the in-process executor, each with a backend that records every call.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from megatron_fcp.bench.replay import (
    BudgetExceeded,
    CallShape,
    KernelTimer,
    RankCalls,
    Timing,
    rank_calls,
    record_calls,
    single_call,
    summarise_cell,
)
from megatron_fcp.planner.api import make_plan
from megatron_fcp.testing.cases import batch, tiny_rank_plan
from megatron_fcp.testing.ring import ring_schedule


def _plan(name: str, cp: int, tokens_per_rank: int, mask: str, strategy: str):
    if name == "tiny_rank":
        return tiny_rank_plan(cp, tokens_per_rank, mask)
    return make_plan(np.asarray(batch(name, cp, tokens_per_rank)), cp, tokens_per_rank, mask, strategy)


@pytest.mark.parametrize("mask", ["causal", "full"])
@pytest.mark.parametrize("strategy", ["fcp", "ring", "hybrid", "magi"])
@pytest.mark.parametrize("name", ["linux_files", "spanning", "magi_hist"])
def test_listed_calls_are_the_calls_the_runtime_issues(name, strategy, mask):
    plan = _plan(name, 4, 256, mask, strategy)
    budgets = ["auto"] if strategy == "ring" else ["auto", None, 40]  # 40: many stages
    for budget in budgets:
        listed = rank_calls(plan, budget)
        assert listed == record_calls(plan, budget, path="engine"), f"budget {budget}"
        if plan.exchange != "ring":
            assert listed == record_calls(plan, budget, path="executor"), f"budget {budget}"
        for rc in listed:
            assert rc.forward, "every rank with tokens issues calls"
    ideal = single_call(plan.doc_lens, mask)
    assert sum(s.pairs for rc in listed for s in rc.forward) == ideal.pairs, "each visible pair computed once"
    assert sum(s.pairs for rc in listed for s in rc.backward) == ideal.pairs


@pytest.mark.parametrize("mask", ["causal", "full"])
def test_listed_calls_of_a_rank_with_only_tiny_documents(mask):
    plan = tiny_rank_plan(4, 64, mask)
    assert rank_calls(plan, 16) == record_calls(plan, 16) == record_calls(plan, 16, path="executor")


@pytest.mark.parametrize("mask", ["causal", "full"])
@pytest.mark.parametrize("name", ["spamassassin", "linux_files"])
def test_ring_calls_equal_ring_schedule_on_many_documents(name, mask):
    """The sorted-array ring derivation against ring_attention's own schedule, at CP 8 with over 150 rows."""
    plan = _plan(name, 8, 2048, mask, "ring")
    assert len(plan.q) > 150
    for rc in rank_calls(plan):
        sched = ring_schedule(plan, rc.cp_rank, "cpu")
        local = tuple(CallShape.of(c.call) for c in sched.local_calls)
        steps = tuple(CallShape.of(stage.call.call) for stage in sched.stages if stage.call is not None)
        assert rc.forward == local + steps and rc.backward == steps[::-1] + local


def test_call_shape_pairs_and_flops():
    causal = CallShape((4, 1), (4, 1), True)
    full = CallShape((3, 2), (5, 7), False)
    assert causal.pairs == 10 + 1 and full.pairs == 15 + 14
    assert full.flops(32, 128) == 4 * 29 * 32 * 128
    assert full.flops(32, 128, "bwd") == 2.5 * full.flops(32, 128)
    assert CallShape.uniform(3, 8, causal=True) == CallShape((8, 8, 8), (8, 8, 8), True)
    assert single_call(np.array([5, 0, 3]), "full") == CallShape((5, 3), (5, 3), False)
    with pytest.raises(ValueError, match="causal segments"):
        CallShape((2,), (3,), True)
    with pytest.raises(ValueError, match="at least one"):
        CallShape((0,), (3,), False)


def test_cell_figures_on_a_hand_made_example():
    a, b = CallShape((4,), (4,), True), CallShape((2, 2), (8, 8), False)
    ideal = CallShape((8,), (8,), True)  # 36 pairs
    calls = [RankCalls(0, (a, b), (b, a)), RankCalls(1, (a,), (a,))]
    timings = {a: Timing(1.0, 2.0, 3, 3), b: Timing(0.5, 1.5, 3, 3), ideal: Timing(2.0, 6.0, 1, 1)}
    got = summarise_cell(calls, timings, ideal, q_heads=2, head_dim=4, peak_flops=1e6)
    assert got["rank_ms"] == [1.0 + 0.5 + 1.5 + 2.0, 1.0 + 2.0]
    assert got["rank_fwd_ms"] == [1.5, 1.0] and got["rank_bwd_ms"] == [3.5, 2.0]
    assert got["slowest_ms"] == 5.0 and got["slowest_rank"] == 0
    assert got["mean_ms"] == 4.0 and got["imbalance"] == 1.25
    assert got["single_gpu_ms"] == 8.0 and got["ideal_ms"] == 4.0 and got["slowest_vs_ideal"] == 1.25
    useful = 4 * 36 * 2 * 4 * 3.5
    assert got["useful_flops"] == useful
    assert got["mfu"] == pytest.approx(useful / (2 * 5e-3 * 1e6))
    assert got["ideal_mfu"] == pytest.approx(useful / (8e-3 * 1e6))
    assert got["max_calls_per_rank"] == 2 and got["distinct_shapes"] == 2


def test_timer_on_cpu_caches_adapts_and_stops_at_its_deadline():
    timer = KernelTimer("cpu", "cpu", 2, 1, 8, warmup=2, min_reps=2, max_reps=4, target_ms=1.0, long_ms=50.0)
    assert timer.runs(100.0) == (1, 1)
    assert timer.runs(0.01) == (1 + 1 + 4, 4) and timer.runs(0.6) == (1 + 1 + 2, 2)
    shape = CallShape((3, 5), (7, 2), False)
    t = timer.time(shape)
    assert t.fwd_ms > 0 and t.bwd_ms > 0 and timer.time(shape) is t
    assert timer.try_time(CallShape((1,), (1,), True)) is not None
    timer.deadline = time.monotonic() - 1
    assert timer.time(shape) is t  # cached shapes need no time
    with pytest.raises(BudgetExceeded):
        timer.time(CallShape((9,), (9,), True))


def test_timer_records_calls_the_backend_cannot_run():
    timer = KernelTimer("torch-flash", "cpu", 2, 1, 8, dtype=torch.float32)
    assert timer.try_time(CallShape((4,), (4,), True)) is None
    assert len(timer.failed) == 1


def test_script_quick_cpu_mode_writes_its_three_files(tmp_path, capsys, load_script):
    script = load_script("gpu_perf")
    start = time.monotonic()
    rc = script.main(["--quick", "--device", "cpu", "--backend", "cpu", "--out-dir", str(tmp_path), "--prefix", "t"])
    took = time.monotonic() - start
    assert rc == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["t_kernels.json", "t_perf.json", "t_perf.md", "t_perf.png"]
    perf = json.loads((tmp_path / "t_perf.json").read_text())
    assert {c["status"] for c in perf["cells"]} == {"done"} and len(perf["cells"]) == 8
    for cell in perf["cells"]:
        for strategy, r in cell["strategies"].items():
            assert r["pairs_match_single_call"], strategy
            assert len(r["rank_ms"]) == cell["cp"] and r["imbalance"] >= 1.0
            assert r["slowest_ms"] == pytest.approx(max(r["rank_ms"]))
    kernels = json.loads((tmp_path / "t_kernels.json").read_text())
    assert kernels["calibration"] and all("median_ms" in r for r in kernels["calibration"])
    assert {r["pass"] for r in kernels["calibration"]} == {"fwd", "bwd"}
    assert len(kernels["replay"][0]) == len(kernels["replay_columns"])
    md = (tmp_path / "t_perf.md").read_text()
    assert "| cp | strategy | slowest ms |" in md and "sum of its calls' medians" in md
    assert (tmp_path / "t_perf.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "every plan's calls equal the calls recorded from the runtime" in out and "8 of 8 cells" in out
    print(f"quick mode took {took:.1f}s")

    (tmp_path / "t_perf.md").unlink()
    assert script.main(["--from-json", str(tmp_path / "t_perf.json")]) == 0
    assert (tmp_path / "t_perf.md").read_text() == md


def test_script_skips_cells_past_its_budget(tmp_path, load_script):
    script = load_script("gpu_perf")
    rc = script.main(["--quick", "--device", "cpu", "--out-dir", str(tmp_path), "--prefix", "b", "--budget-s", "0",
                      "--lengths", "spamassassin", "--cps", "2", "--no-calibration", "--hardware", ""])
    assert rc == 2
    perf = json.loads((tmp_path / "b_perf.json").read_text())
    assert [c["status"] for c in perf["cells"]] == ["skipped", "skipped"]
    assert "skipped" in (tmp_path / "b_perf.md").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_timer_on_gpu_times_torch_flash_calls():
    timer = KernelTimer("torch-flash", "cuda", 32, 8, 128, torch.bfloat16)
    timer.reserve(8192, 8192)
    for shape in (CallShape.uniform(1, 1), CallShape.uniform(1, 4096, causal=True), CallShape.uniform(64, 128, 64)):
        t = timer.time(shape)
        assert 0 < t.fwd_ms < t.bwd_ms + 1.0 and t.bwd_ms > 0
    big = timer.cache[CallShape.uniform(1, 4096, causal=True)]
    flops = CallShape.uniform(1, 4096, causal=True).flops(32, 128)
    assert 10e12 < flops / (big.fwd_ms * 1e-3) < 989.4e12, "forward rate outside 10 TFLOP/s .. peak"
