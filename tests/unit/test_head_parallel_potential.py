"""The head-parallel design's model (sim.published.fcp_head_parallel) and its table
(scripts/head_parallel_potential.py) on a small case."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from megatron_fcp.data.lengths import load_distribution, pack_batches
from megatron_fcp.errors import InputError
from megatron_fcp.planner.fcp import plan_fcp
from megatron_fcp.sim import published as P
from megatron_fcp.sim.model import load_hardware

HARDWARE = "h100_node_fa3_published"


def test_on_one_node_the_design_is_ulysses_and_across_nodes_fcp_on_node_sized_ranks():
    hw, x = load_hardware(HARDWARE), P.Extras()
    (lens,) = pack_batches(load_distribution("magi_hist"), 8 * 4096, 1, seed=0)
    one = P.fcp_head_parallel(hw, x, lens, 8, "causal", 4096)
    assert one == {p: P.ulysses(hw, x, lens, 8, "causal", p) for p in ("fwd", "bwd")}
    (lens,) = pack_batches(load_distribution("magi_hist"), 16 * 4096, 1, seed=0)
    two = P.fcp_head_parallel(hw, x, lens, 16, "full", 4096)
    # the node part (all-to-alls and their copies) plus FCP of 2 node-sized ranks on 1/8 of the heads, all across
    shard = dataclasses.replace(hw, num_heads=8, num_kv_heads=1, gpus_per_node=1)
    fwd, bwd = P.p2p_pass_times(shard, x, plan_fcp(lens, 2, 8 * 4096, "full"), None, "auto", x.nccl_sms, gqa=True)
    node_part = two["fwd"] - fwd
    assert node_part > 0 and two["bwd"] - bwd == pytest.approx(node_part, rel=1e-12)
    with pytest.raises(InputError, match="multiples of the GPUs per node"):
        P.fcp_head_parallel(hw, x, np.array([12 * 4096]), 12, "full", 4096)


def test_the_table_takes_the_shorter_step_per_batch(load_script, tmp_path):
    script = load_script("head_parallel_potential")
    out = tmp_path / "hp.md"
    script.main(["--lengths", "magi_hist", "--cp", "8,16", "--num-batches", "1", "--jobs", "1", "--out", str(out)])
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| magi_hist |")
            and len(line.split("|")) > 9]
    assert len(rows) == 4
    for row in rows:
        p2p, heads, either = (float(v) for v in row[3:6])
        assert either == pytest.approx(min(p2p, heads), abs=0.051)
        assert float(row[8]) == pytest.approx(either / float(row[7]), abs=0.002)


def test_fcp_pays_fa3s_gqa_backward_as_the_baselines_do():
    """FCP's calls are FA3 calls in the comparison: their backward under GQA adds the fp32 dK/dV accumulator bytes
    (fa3_gqa_bwd_bytes), per own-key call and per stage call; nothing with one key/value head per query head, and
    nothing in the base model."""
    hw, x = load_hardware(HARDWARE), P.Extras()
    (lens,) = pack_batches(load_distribution("magi_hist"), 16 * 4096, 1, seed=0)
    plan = P.fcp_plan(hw, lens, 16, "full", 4096)
    local, staged = P.fcp_gqa_bwd_s(hw, x, plan, 4096)
    assert local.shape == (16,) and np.all(local > 0) and staged.max() > 0
    # one stage call of k keys in one segment: the formula of fa3_gqa_bwd_bytes
    expect = float(x.hbm_s(P.fa3_gqa_bwd_bytes(hw, np.array([4096.0]), np.array([1.0]))))
    one = plan_fcp(np.array([4096]), 1, 4096, "full")
    got, _ = P.fcp_gqa_bwd_s(hw, x, dataclasses.replace(one, cp_node=None), 4096)
    assert got[0] == pytest.approx(expect, rel=1e-12)
    mha = dataclasses.replace(hw, num_kv_heads=hw.num_heads)
    assert not P.fcp_gqa_bwd_s(mha, x, plan, 4096)[0].any()
    assert not P.fcp_gqa_bwd_s(hw, P.BASE, plan, 4096)[1].any()
    with_gqa = P.strategy_seconds("fcp", hw, x, lens, 16, "full", 4096)
    without = P.p2p_pass_times(hw, x, plan, None, "auto", x.nccl_sms)
    assert with_gqa["fwd"] == pytest.approx(without[0], rel=1e-12) and with_gqa["bwd"] > without[1]
