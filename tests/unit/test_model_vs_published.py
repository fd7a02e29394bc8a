"""The cost model against MagiAttention's published H100 CP benchmark: workload rules, FLOPs, strategies, rows
(megatron_fcp/sim/magi_workload.py, megatron_fcp/sim/published.py, scripts/model_vs_published.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from megatron_fcp.sim import magi_workload as W
from megatron_fcp.sim import published as P
from megatron_fcp.sim.model import _local_seconds, load_hardware, staged_exchange, staged_times

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hw():
    return load_hardware("h100_node_fa3_published")


@pytest.fixture(scope="module")
def script(load_script):
    return load_script("model_vs_published")


def test_histogram_bins_become_their_integer_midpoints():
    lengths, counts = W.histogram_lengths()
    assert lengths[:3].tolist() == [5, 30, 75]  # [0, 10], [11, 50], [51, 100]
    assert lengths[-1] == (131073 + 196608) // 2
    assert int(counts.sum()) == 13_463_214


def test_long_documents_are_cut_into_quarter_pieces():
    pieces = W.pieces(np.array([5, 40000, 16384]), np.array([2, 1, 3]), 16384)
    # 40000 -> 2 x 16384 + 7232; 16384 -> one whole piece, no remainder; whole pieces first
    assert sorted(pieces.tolist()) == sorted([5, 5, 16384, 16384, 7232, 16384, 16384, 16384])
    assert pieces[:5].tolist() == [16384] * 5
    assert pieces.max() <= 16384


def test_packs_are_exact_windows_of_the_shuffled_stream():
    stream = W.pack_stream(8 * W.TOKENS_PER_GPU)
    packs = [stream.pack(i) for i in range(4)]
    for pack in packs:
        assert int(pack.sum()) == 8 * W.TOKENS_PER_GPU
        assert pack.min() > 0 and pack.max() <= 8 * W.TOKENS_PER_GPU // 4  # quarter cut
    # the packs tile the stream: pack k's first piece ends where the stream's window says
    k = int(stream.order[0])
    inside = stream.starts[(stream.starts > k * stream.total) & (stream.starts < (k + 1) * stream.total)]
    assert packs[0][0] == inside[0] - k * stream.total
    assert len(set(stream.order.tolist())) == stream.order.shape[0]  # a permutation
    again = W.magi_packs(8, 4)
    assert all(np.array_equal(a, b) for a, b in zip(packs, again, strict=True))  # seed-controlled
    other = W.magi_packs(8, 4, seed=7)
    assert not all(np.array_equal(a, b) for a, b in zip(packs, other, strict=True))


def test_blog_flops_formula():
    lens = np.array([3, 4])
    assert W.mask_area(lens, "full") == 9 + 16
    assert W.mask_area(lens, "causal") == 6 + 10
    assert W.blog_flops(np.array([65536]), "causal", "fwd") == 4 * 65536 * 65537 / 2 * 64 * 128
    assert W.blog_flops(lens, "full", "bwd") == 2.5 * 4 * 25 * 64 * 128
    # throughput: FLOPs / (time x cp)
    assert W.tflops_per_gpu(lens, "full", "fwd", 8, 1e-3) == pytest.approx(4 * 25 * 64 * 128 / 8e-3 / 1e12)


def test_a_modeled_strategy_computes_exactly_the_blog_flops(hw):
    """The zigzag ring's calls cover every pair of the blog's mask area once (the model's work is pairs plus
    edge tiles on top): summed over ranks and steps."""
    lens = np.array([1000, 30000, 5000, 29536])
    for mask in ("full", "causal"):
        q, k, pairs, _, _ = P.ring_step_work(lens, 8, mask)
        assert pairs.sum() == W.mask_area(lens, mask)
    # Ulysses: one call on the whole sequence
    assert W.mask_area(lens, "causal") == (lens * (lens + 1) // 2).sum()


def test_the_p2p_recurrence_without_added_costs_is_the_models(hw):
    from megatron_fcp.planner.fcp import plan_fcp

    lens = W.magi_packs(8, 1)[0]
    plan = plan_fcp(lens, 8, W.TOKENS_PER_GPU, "causal")
    ex = staged_exchange(plan, hw, "auto")
    lf, lb = _local_seconds(plan, hw)
    fwd, bwd, _ = staged_times(ex, lf, lb, hw)
    f2, b2 = P.staged_pass_times(hw, P.BASE, ex, lf, lb, 0.0)
    assert np.allclose(fwd, f2) and np.allclose(bwd, b2)


def test_added_costs_only_slow_things_down(hw):
    lens = W.magi_packs(8, 1)[0]
    for strategy in ("ulysses", "ring_p2p", "ring_allgather", "magi_attn-native"):
        with_costs = P.strategy_seconds(strategy, hw, P.Extras(), lens, 8, "causal", W.TOKENS_PER_GPU)
        base = P.strategy_seconds(strategy, hw, P.BASE, lens, 8, "causal", W.TOKENS_PER_GPU)
        assert with_costs["fwd"] >= base["fwd"] and with_costs["bwd"] >= base["bwd"], strategy


def test_collectives_follow_the_bus_bandwidth_formulas(hw):
    nvl = hw.nvlink_gbps_per_direction * hw.nvlink_efficiency * 1e9
    ib = hw.ib_gbps_per_direction * hw.ib_efficiency * 1e9
    lat = hw.p2p_latency_us * 1e-6
    assert P.all_to_all_s(hw, 8e8, 8) == pytest.approx(8e8 * 7 / 8 / nvl + lat)
    assert P.all_to_all_s(hw, 8e8, 16) == pytest.approx(8e8 * 8 / 16 / ib + lat)
    assert P.all_gather_s(hw, 1e8, 8) == pytest.approx(1e8 * 7 / nvl + 7 * lat / 8)
    assert P.all_gather_s(hw, 1e8, 64) == pytest.approx(max(1e8 * 63 / nvl, 1e8 * 63 / 8 / ib) + 63 * lat / 8)


def test_ring_flash_attention_anchor_moves_toward_the_published_ratio():
    from megatron_fcp.sim.calibration import fit_kernel, load_published

    laws = fit_kernel(load_published(), "fa2", 989.4, 10e-6, 128)
    before = P.ring_flash_attention_anchor_costed(laws, 989.4, 10e-6, 128, P.BASE)
    after = P.ring_flash_attention_anchor_costed(laws, 989.4, 10e-6, 128)
    assert before["ratio"] == pytest.approx(before["ratio_kernels"])
    assert 0.759 < after["ratio"] < before["ratio"]


def test_anchor_counts_host_syncs_and_the_fa2_gqa_sums(monkeypatch):
    from megatron_fcp.sim.calibration import fit_kernel, load_published

    laws = fit_kernel(load_published(), "fa2", 989.4, 10e-6, 128)
    with_syncs = P.ring_flash_attention_anchor_costed(laws, 989.4, 10e-6, 128)
    monkeypatch.setattr(P, "SYNC_IDLE_LAUNCHES", 0)
    without = P.ring_flash_attention_anchor_costed(laws, 989.4, 10e-6, 128)
    # the syncs only slow the ring (the single-GPU call has none)
    assert with_syncs["ring_iter_s"] < without["ring_iter_s"]
    assert with_syncs["single_iter_s_costed"] == pytest.approx(without["single_iter_s_costed"])
    # FlashAttention-2's GQA backward sums cost the single GPU time too
    assert with_syncs["single_iter_s_costed"] < with_syncs["single_iter_s"]


def test_fa3_gqa_backward_bytes(hw):
    # one document of 1000 keys with work, one of 100 without: 8 blocks of 128 keys get atomics; the fp32
    # accumulators span 1100 keys + 2 documents x 128
    k, pairs = np.array([1000.0, 100.0]), np.array([5.0, 0.0])
    d = hw.head_dim
    expected = (64 * 1024 * d * 2 * 2 + 2 * 8 * 1356 * d * 4 * 2 + 2 * 8 * 1100 * d * 2)
    assert float(P.fa3_gqa_bwd_bytes(hw, k, pairs, 64, 8)) == pytest.approx(expected)
    assert float(P.fa3_gqa_bwd_bytes(hw, k, pairs, 8, 8)) == 0.0  # multi-head: the calibration shapes' case
    # more documents in the call's batch pad the accumulators
    assert float(P.fa3_gqa_bwd_bytes(hw, np.array([550.0, 550.0, 0.0]), np.array([5.0, 5.0, 0.0]), 64, 8)) > \
        float(P.fa3_gqa_bwd_bytes(hw, np.array([1100.0]), np.array([5.0]), 64, 8))


def test_gqa_accumulators_slow_the_backward_only(hw, monkeypatch):
    lens = np.array([3000, 700, 500, 300] * 40)
    lens = lens[: np.searchsorted(np.cumsum(lens), 8 * W.TOKENS_PER_GPU)]
    x = P.Extras()
    with_gqa = {s: P.strategy_seconds(s, hw, x, lens, 8, "full", W.TOKENS_PER_GPU)
                for s in ("ring_p2p", "ring_allgather", "ulysses")}
    monkeypatch.setattr(P, "fa3_gqa_bwd_bytes", lambda hw_, k, pairs, *a: np.zeros(np.shape(k)[:-1]))
    for s, t in with_gqa.items():
        without = P.strategy_seconds(s, hw, x, lens, 8, "full", W.TOKENS_PER_GPU)
        assert t["fwd"] == pytest.approx(without["fwd"]), s
        assert t["bwd"] > without["bwd"] * 1.01, s


def test_magi_attentions_ffa_backward_accumulates_dkv_in_fp32(hw):
    """MagiAttention's runtime zero-fills fp32 partial dK/dV per call, every query head's tile adds into it in fp32,
    and it is cast down after: FA3's GQA bytes without its padding block per document, with or without GQA. Only the
    backward grows, and MagiAttention's strategies pay it."""
    from megatron_fcp.planner.baselines import plan_magi
    from megatron_fcp.planner.fcp import plan_fcp

    x = P.Extras()
    lens = np.array([3000, 700, 500, 300] * 40)
    lens = lens[: np.searchsorted(np.cumsum(lens), 8 * W.TOKENS_PER_GPU)]
    plan = plan_magi(lens, 8, W.TOKENS_PER_GPU, "causal")
    budget = P.magi_budget(plan)
    fa3_local, fa3_staged = P.dkv_accum_bwd_s(hw, x, plan, budget, "fa3")
    ffa_local, ffa_staged = P.dkv_accum_bwd_s(hw, x, plan, budget, "ffa")
    assert np.all(ffa_local > 0) and np.all(ffa_local < fa3_local) and np.all(ffa_staged <= fa3_staged)
    # one call of 1000 keys in one segment: the fp32 accumulators span exactly its keys
    one = plan_fcp(np.array([1000]), 1, 1000, "full")
    d = hw.head_dim
    expected = 64 * 1024 * d * 2 * 2 + 2 * 8 * 1000 * d * 4 * 2 + 2 * 8 * 1000 * d * 2
    assert P.dkv_accum_bwd_s(hw, x, one, None, "ffa")[0][0] == pytest.approx(float(x.hbm_s(expected)), rel=1e-12)
    mha = dataclasses.replace(hw, num_kv_heads=hw.num_heads)
    assert P.dkv_accum_bwd_s(mha, x, plan, budget, "ffa")[0].all()
    assert not P.dkv_accum_bwd_s(mha, x, plan, budget, "fa3")[0].any()
    assert not P.dkv_accum_bwd_s(hw, P.BASE, plan, budget, "ffa")[0].any()
    with pytest.raises(ValueError, match="unknown kernel"):
        P.dkv_accum_bwd_s(hw, x, plan, budget, "fa2")
    for how in ("a2av", "native"):
        sms = x.grpcoll_sms if how == "native" else x.nccl_sms
        without = P.p2p_pass_times(hw, x, plan, how, budget, sms)
        with_ffa = P.strategy_seconds(f"magi_attn-{how}", hw, x, lens, 8, "causal", W.TOKENS_PER_GPU)
        assert with_ffa["fwd"] == pytest.approx(without[0], rel=1e-12) and with_ffa["bwd"] > without[1]


def test_rows_have_the_fields_and_agree_on_a_small_subset(script, hw):
    """A small case through the script's own functions: CP 8, one pack, three strategies; JSON fields; the
    full and causal cells of Ulysses and Ring All-Gather within 20% (they were within 6% when written)."""
    cells = {}
    for strategy in ("ulysses", "ring_allgather", "fcp"):
        for mask in ("full", "causal", "varlen_causal"):
            cells[strategy, mask, 8] = script._cell((mask, 8, strategy, 1))
    rows = script.build_rows(cells, [8])
    fields = {"source", "strategy", "mask", "pass", "cp", "published_tflops_per_gpu", "modeled_tflops_per_gpu",
              "within_20pct", "reason"}
    assert rows and all(fields <= set(r) for r in rows)
    assert {r["pass"] for r in rows} == {"fwd", "bwd"}
    assert len([r for r in rows if r["strategy"] != "fcp"]) == 4 * 2 * 8  # every published bar at CP 8
    fcp = [r for r in rows if r["strategy"] == "fcp"]
    assert len(fcp) == 6 and all(r["modeled_tflops_per_gpu"] > 0 and r["magi_native_published_tflops_per_gpu"]
                                 for r in fcp)
    for r in rows:
        if r["strategy"] in ("ulysses", "ring_allgather") and r["mask"] in ("full", "causal"):
            assert r["within_20pct"], r
        if r["modeled_tflops_per_gpu"] is None:
            assert r["reason"]


def test_shipped_fa3_derived_laws_are_current():
    """h100_published_fa3_derived.yaml is what scripts/calibrate_published.py writes: the fitted FA3 laws plus
    the causal backward law derived with FA2's ratios."""
    import yaml

    from megatron_fcp.sim import calibration as cal

    data = cal.load_published()
    fa3 = cal.fit_kernel(data, "fa3", 989.4, 10e-6, 128)
    fa2 = cal.fit_kernel(data, "fa2", 989.4, 10e-6, 128)
    derived = cal.derive_causal_backward(fa3, fa2)
    assert derived.max_efficiency == pytest.approx(
        fa3["bwd", "full"].max_efficiency * fa2["bwd", "causal"].max_efficiency / fa2["bwd", "full"].max_efficiency)
    shipped = yaml.safe_load((REPO / "megatron_fcp/data/kernel_laws/h100_published_fa3_derived.yaml").read_text())
    assert shipped["laws"]["bwd_causal"]["max_efficiency"] == pytest.approx(derived.max_efficiency, rel=1e-9)
    assert shipped["laws"]["bwd_causal"]["row_overhead_keys"] == pytest.approx(derived.row_overhead_keys, rel=1e-9)
    for key in ("fwd_full", "fwd_causal", "bwd_full"):
        p, m = key.split("_")
        assert shipped["laws"][key]["max_efficiency"] == pytest.approx(fa3[p, m].max_efficiency, rel=1e-9)
