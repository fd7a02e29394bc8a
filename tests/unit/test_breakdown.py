"""The modeled step time split into parts (megatron_fcp/sim/breakdown.py, scripts/time_breakdown.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_fcp.data.lengths import load_distribution, pack_batches
from megatron_fcp.planner.api import make_plan
from megatron_fcp.sim.breakdown import PARTS, step_breakdown
from megatron_fcp.sim.model import evaluate, load_hardware, mfu


@pytest.mark.parametrize("hardware", ["h100_node", "h100_node_fa2_published"])
@pytest.mark.parametrize("mask", ["causal", "full"])
def test_parts_are_never_negative_and_useful_is_mfu(hardware, mask):
    hw = load_hardware(hardware)
    batch = pack_batches(load_distribution("spamassassin"), 16 * 4096, 1, 3)[0]
    for strategy in ("fcp", "ring", "hybrid", "magi"):
        plan = make_plan(batch, 16, 4096, mask, strategy)
        parts = step_breakdown(plan, hw)
        assert min(parts[p] for p in PARTS) >= -1e-12 * parts["step_s"], (strategy, parts)
        assert parts["useful"] / parts["step_s"] == pytest.approx(mfu(plan, hw, evaluate(plan, hw)), rel=1e-9)
        if hw.laws is None:
            assert parts["row_overhead"] == 0.0


def test_a_lone_causal_document_splits_as_worked_by_hand():
    """One rank, one causal document of n tokens, fixed efficiencies (h100_node): one diagonal kernel call forward
    and one backward. Worked by hand from the profile's numbers: exact pairs n(n+1)/2 at peak are useful; at the
    efficiencies they cost the kernel ceiling too; the call's partly filled edge tiles add tile/2 per query and per
    key and a quarter tile; two launches; nothing else."""
    hw = load_hardware("h100_node")
    n, tile = 4096, hw.tile_size
    flops_per_pair = 4 * hw.num_heads * hw.head_dim
    peak = hw.peak_bf16_dense_tflops * 1e12
    at_peak = flops_per_pair * (1 + hw.bwd_flops_factor) / peak
    at_kernel = flops_per_pair * (1 / hw.attention_fwd_efficiency
                                  + hw.bwd_flops_factor / hw.attention_bwd_efficiency) / peak
    pairs, edge = n * (n + 1) / 2, tile / 2 * (n + n) + tile * tile / 4
    want = {"useful": pairs * at_peak, "kernel_ceiling": pairs * (at_kernel - at_peak), "edge_tiles": edge * at_kernel,
            "row_overhead": 0.0, "launches": 2 * hw.kernel_launch_us * 1e-6, "exposed_nvlink": 0.0,
            "exposed_ib": 0.0, "wait_slowest": 0.0}
    parts = step_breakdown(make_plan(np.array([n]), 1, n, "causal", "fcp"), hw)
    for name, value in want.items():
        assert parts[name] == pytest.approx(value, rel=1e-9, abs=1e-15), name
    assert parts["step_s"] == pytest.approx(sum(want.values()), rel=1e-9)


def test_one_node_has_no_infiniband_and_a_lone_rank_no_communication():
    hw = load_hardware("h100_node_fa2_published")
    batch = pack_batches(load_distribution("linux_files"), 8 * 4096, 1, 0)[0]
    parts = step_breakdown(make_plan(batch, 8, 4096, "causal", "fcp"), hw)
    assert parts["exposed_ib"] == 0.0
    lone = step_breakdown(make_plan(np.array([1000, 3000]), 1, 4096, "causal", "fcp"), hw)
    assert lone["exposed_ib"] == lone["exposed_nvlink"] == lone["wait_slowest"] == 0.0


def test_script_writes_table_json_and_plot(tmp_path, load_script):
    script = load_script("time_breakdown")
    script.main(["--lengths", "magi_hist", "--cp", "8", "--tokens-per-rank", "2048", "--num-batches", "1",
                 "--out", str(tmp_path / "tb")])
    rows = json.loads((tmp_path / "tb.json").read_text())["rows"]
    assert [r["strategy"] for r in rows] == ["fcp", "ring", "hybrid", "magi"]
    assert all(sum(r["share"].values()) == pytest.approx(1.0) for r in rows)
    table = (tmp_path / "tb.md").read_text()
    assert "| 8 | fcp |" in table and "waiting for slowest rank" in table
    assert (tmp_path / "tb.png").stat().st_size > 10_000
