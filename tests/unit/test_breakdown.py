"""The modeled step time split into parts (megatron_fcp/sim/breakdown.py, scripts/time_breakdown.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from megatron_fcp.data.lengths import load_distribution, pack_batches
from megatron_fcp.planner.api import make_plan
from megatron_fcp.sim.breakdown import PARTS, step_breakdown
from megatron_fcp.sim.model import evaluate, load_hardware, mfu

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("hardware", ["h100_node", "h100_node_fa2_published"])
@pytest.mark.parametrize("mask", ["causal", "full"])
def test_parts_add_up_to_the_step_and_useful_is_mfu(hardware, mask):
    hw = load_hardware(hardware)
    batch = pack_batches(load_distribution("spamassassin"), 16 * 4096, 1, 3)[0]
    for strategy in ("fcp", "ring", "hybrid", "magi"):
        plan = make_plan(batch, 16, 4096, mask, strategy)
        parts = step_breakdown(plan, hw)
        assert sum(parts[p] for p in PARTS) == pytest.approx(parts["step_s"], rel=1e-9)
        assert parts["step_s"] == evaluate(plan, hw).step_time_s
        assert min(parts[p] for p in PARTS) >= -1e-12 * parts["step_s"], (strategy, parts)
        assert parts["useful"] / parts["step_s"] == pytest.approx(mfu(plan, hw, evaluate(plan, hw)), rel=1e-9)
        if hw.laws is None:
            assert parts["row_overhead"] == 0.0


def test_one_node_has_no_infiniband_and_a_lone_rank_no_communication():
    hw = load_hardware("h100_node_fa2_published")
    batch = pack_batches(load_distribution("linux_files"), 8 * 4096, 1, 0)[0]
    parts = step_breakdown(make_plan(batch, 8, 4096, "causal", "fcp"), hw)
    assert parts["exposed_ib"] == 0.0
    lone = step_breakdown(make_plan(np.array([1000, 3000]), 1, 4096, "causal", "fcp"), hw)
    assert lone["exposed_ib"] == lone["exposed_nvlink"] == lone["wait_slowest"] == 0.0


def test_script_writes_table_json_and_plot(tmp_path):
    spec = importlib.util.spec_from_file_location("time_breakdown", REPO / "scripts/time_breakdown.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--lengths", "magi_hist", "--cp", "8", "--tokens-per-rank", "2048", "--num-batches", "1",
                 "--out", str(tmp_path / "tb")])
    rows = json.loads((tmp_path / "tb.json").read_text())["rows"]
    assert [r["strategy"] for r in rows] == ["fcp", "ring", "hybrid", "magi"]
    assert all(sum(r["share"].values()) == pytest.approx(1.0) for r in rows)
    table = (tmp_path / "tb.md").read_text()
    assert "| 8 | fcp |" in table and "waiting for slowest rank" in table
    assert (tmp_path / "tb.png").stat().st_size > 10_000
