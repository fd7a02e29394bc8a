"""The head-parallel design's model (sim.published.fcp_head_parallel) and FCP's FA3 backward under GQA."""

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


def test_one_node_and_several_are_one_formula_the_node_part_plus_fcp_on_node_sized_ranks():
    """On one node as on several: the all-to-alls and their copies, plus FCP's plan of node-sized ranks on 1/8 of the
    heads (every link across nodes). On one node that is Ulysses' exchange with FCP's own call: faster than the
    benchmark's Ulysses by about the unpad/pad copies that benchmark makes around its FA3 call."""
    hw, x = load_hardware(HARDWARE), P.Extras()
    shard = dataclasses.replace(hw, num_heads=8, num_kv_heads=1, gpus_per_node=1)
    for cp, mask in ((8, "causal"), (16, "full")):
        (lens,) = pack_batches(load_distribution("magi_hist"), cp * 4096, 1, seed=0)
        step = P.fcp_head_parallel(hw, x, lens, cp, mask, 4096)
        fwd, bwd = P.p2p_pass_times(shard, x, plan_fcp(lens, cp // 8, 8 * 4096, mask), None, "auto", x.nccl_sms,
                                    kernel="fa3")
        a2a, copies, _ = P.node_heads(hw, x, lens, cp)
        assert step["fwd"] == pytest.approx(a2a + copies + fwd, rel=1e-12)
        assert step["bwd"] == pytest.approx(a2a + copies + bwd, rel=1e-12)
        if cp == 8:
            rows = float(lens.sum()) / cp
            for p in ("fwd", "bwd"):
                wrapper = float(x.hbm_s(P.wrapper_bytes(hw, p, rows, rows)))
                gap = P.ulysses(hw, x, lens, cp, mask, p) - step[p]
                assert wrapper <= gap <= 1.25 * wrapper, (p, gap, wrapper)
    with pytest.raises(InputError, match="multiples of the GPUs per node"):
        P.fcp_head_parallel(hw, x, np.array([12 * 4096]), 12, "full", 4096)


def test_fcp_pays_fa3s_gqa_backward_as_the_baselines_do():
    """FCP's calls are FA3 calls in the comparison: their backward under GQA adds the fp32 dK/dV accumulator bytes
    (fa3_gqa_bwd_bytes), per own-key call and per stage call; nothing with one key/value head per query head, and
    nothing in the base model."""
    hw, x = load_hardware(HARDWARE), P.Extras()
    (lens,) = pack_batches(load_distribution("magi_hist"), 16 * 4096, 1, seed=0)
    plan = P.fcp_plan(hw, lens, 16, "full", 4096)
    local, staged = P.dkv_accum_bwd_s(hw, x, plan, 4096)
    assert local.shape == (16,) and np.all(local > 0) and staged.max() > 0
    # one stage call of k keys in one segment: the formula of fa3_gqa_bwd_bytes
    expect = float(x.hbm_s(P.fa3_gqa_bwd_bytes(hw, np.array([4096.0]), np.array([1.0]))))
    one = plan_fcp(np.array([4096]), 1, 4096, "full")
    got, _ = P.dkv_accum_bwd_s(hw, x, dataclasses.replace(one, cp_node=None), 4096)
    assert got[0] == pytest.approx(expect, rel=1e-12)
    mha = dataclasses.replace(hw, num_kv_heads=hw.num_heads)
    assert not P.dkv_accum_bwd_s(mha, x, plan, 4096)[0].any()
    assert not P.dkv_accum_bwd_s(hw, P.BASE, plan, 4096)[1].any()
    with_gqa = P.strategy_seconds("fcp", hw, x, lens, 16, "full", 4096)
    without = P.p2p_pass_times(hw, x, plan, None, "auto", x.nccl_sms)
    assert with_gqa["fwd"] == pytest.approx(without[0], rel=1e-12) and with_gqa["bwd"] > without[1]
