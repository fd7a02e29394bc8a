"""Memory and the staged time model of the cost model; the --kv-budget-tokens flag."""

import dataclasses
import json

import numpy as np
import pytest

from megatron_fcp.cli import main
from megatron_fcp.data.lengths import load_distribution, pack_batches
from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.plan import Plan
from megatron_fcp.planner.stages import MEMORY_FIELDS, p2p_memory
from megatron_fcp.sim.model import (
    StagedExchange,
    _local_split,
    evaluate,
    load_hardware,
    plan_memory,
    staged_exchange,
    staged_times,
)
from megatron_fcp.sim.simulate import SimConfig, cells_to_json, simulate

HW = load_hardware("h100_node")


def _two_rank_plan() -> Plan:
    """One full-mask document of 8 tokens: rank 0 owns [0, 4), rank 1 owns [4, 8); each fetches the other half."""
    return Plan(strategy="hand", cp=2, mask="full", doc_lens=np.array([8]),
                q_rows=np.array([[0, 0, 0, 4], [1, 0, 4, 8]]),
                kv=np.array([[0, 1, 0, 4, 8], [1, 0, 0, 0, 4]]), num_pad_tokens=np.zeros(2, np.int64))


# -- memory ---------------------------------------------------------------------------------------------------
def test_ring_memory_two_blocks_in_flight_nothing_kept():
    plan = make_plan([1000, 3096], 4, 1024, "full", "ring")
    mem = plan_memory(plan)
    t = plan.num_tokens
    assert set(mem) == set(MEMORY_FIELDS)
    np.testing.assert_array_equal(mem["own_kv_tokens"], t)
    np.testing.assert_array_equal(mem["recv_kv_tokens"], 3 * t)
    np.testing.assert_array_equal(mem["refetch_kv_tokens"], 3 * t)
    np.testing.assert_array_equal(mem["peak_remote_kv_tokens"], 2 * t)
    np.testing.assert_array_equal(mem["peak_grad_tokens"], 2 * t)
    np.testing.assert_array_equal(mem["saved_remote_kv_tokens"], 0)
    np.testing.assert_array_equal(mem["peak_returned_grad_tokens"], 0)
    np.testing.assert_array_equal(mem["num_stages"], 3)
    assert plan_memory(plan, None)["peak_remote_kv_tokens"].tolist() == mem["peak_remote_kv_tokens"].tolist()
    two = plan_memory(make_plan([2048], 2, 1024, "causal", "ring"))  # cp 2: one block from the one other rank
    np.testing.assert_array_equal(two["peak_remote_kv_tokens"], 1024)
    np.testing.assert_array_equal(two["num_stages"], 1)


def test_group_ring_memory_per_document_group():
    # doc 0 (2048) is split over a group of 2 ranks, the rest sit on one rank each
    mem = plan_memory(make_plan([2048, 512, 512, 1024], 4, 1024, "causal", "hybrid"))
    np.testing.assert_array_equal(mem["recv_kv_tokens"], [1024, 1024, 0, 0])
    np.testing.assert_array_equal(mem["refetch_kv_tokens"], [1024, 1024, 0, 0])
    np.testing.assert_array_equal(mem["peak_remote_kv_tokens"], [1024, 1024, 0, 0])
    np.testing.assert_array_equal(mem["peak_grad_tokens"], [1024, 1024, 0, 0])
    np.testing.assert_array_equal(mem["num_stages"], [1, 1, 0, 0])
    np.testing.assert_array_equal(mem["saved_remote_kv_tokens"], 0)
    np.testing.assert_array_equal(mem["peak_returned_grad_tokens"], 0)
    # one document over a group of 4: three chunks travel, two are held at once
    mem = plan_memory(make_plan([4096], 4, 1024, "full", "hybrid"))
    np.testing.assert_array_equal(mem["recv_kv_tokens"], 3 * 1024)
    np.testing.assert_array_equal(mem["peak_remote_kv_tokens"], 2 * 1024)
    np.testing.assert_array_equal(mem["num_stages"], 3)


@pytest.mark.parametrize(("budget", "stages", "peak", "saved", "refetch"),
                         [(None, 1, 4, 4, 0), ("auto", 1, 4, 4, 0), (2, 2, 4, 2, 2), (3, 2, 4, 3, 1), (1, 4, 2, 1, 3)])
def test_p2p_memory_min_r_2b_min_r_b(budget, stages, peak, saved, refetch):
    mem = plan_memory(_two_rank_plan(), budget)  # R = 4 per rank, own 4 ("auto" = 4)
    np.testing.assert_array_equal(mem["recv_kv_tokens"], [4, 4])
    np.testing.assert_array_equal(mem["num_stages"], [stages] * 2)
    np.testing.assert_array_equal(mem["peak_remote_kv_tokens"], [peak] * 2)
    np.testing.assert_array_equal(mem["saved_remote_kv_tokens"], [saved] * 2)
    np.testing.assert_array_equal(mem["refetch_kv_tokens"], [refetch] * 2)


def test_p2p_plan_memory_is_the_planner_figure_and_auto_bounds_it():
    batch = pack_batches(load_distribution("linux_files"), 16 * 2048, 1, 0)[0]
    for strategy in ("fcp", "magi"):
        plan = make_plan(batch, 16, 2048, "full", strategy)
        mem = plan_memory(plan)
        ref = p2p_memory(plan.num_tokens, plan.pieces, "auto")
        assert all(np.array_equal(mem[k], ref[k]) for k in MEMORY_FIELDS)
        assert (mem["peak_remote_kv_tokens"] <= 2 * mem["own_kv_tokens"]).all()
        assert (mem["saved_remote_kv_tokens"] <= mem["own_kv_tokens"]).all()
        cost = evaluate(plan, HW)
        assert cost.kv_budget_tokens == 2048
        np.testing.assert_allclose(cost.bwd_bytes, (mem["refetch_kv_tokens"] + mem["recv_kv_tokens"])
                                   * HW.kv_bytes_per_token)


# -- the staged time model --------------------------------------------------------------------------------------
def test_hand_plan_one_stage_closed_form():
    plan = _two_rank_plan()
    cost = evaluate(plan, HW, None)
    launch = HW.kernel_launch_us * 1e-6
    eff = 16 + HW.tile_size / 2 * (4 + 4) + HW.tile_size ** 2 / 4  # 4 queries x 4 keys, local and remote alike
    local_f, local_b = HW.seconds_fwd(eff) + launch, HW.seconds_bwd(eff) + launch
    comm = HW.seconds_transfer(4 * HW.kv_bytes_per_token, False) + HW.p2p_latency_us * 1e-6  # one peer, NVLink
    fwd = max(local_f, comm) + local_f
    bwd = local_b + max(local_b, comm)
    np.testing.assert_allclose(cost.step_s, fwd + bwd, rtol=1e-12)
    np.testing.assert_allclose(cost.compute_s, 2 * (local_f + local_b), rtol=1e-12)


def _batch_plans():
    batch = pack_batches(load_distribution("spamassassin"), 16 * 2048, 1, 0)[0]
    return [make_plan(batch, 16, 2048, mask, strategy) for strategy in ("fcp", "magi") for mask in ("causal", "full")]


def test_no_budget_is_the_one_stage_formula():
    for plan in _batch_plans():
        x = staged_exchange(plan, HW, None)
        assert x.eff_pairs.shape[1] == 1 and (x.num_stages <= 1).all()
        local_f, local_b = np.full(plan.cp, 2e-4), np.full(plan.cp, 5e-4)
        fwd, bwd, _ = staged_times(x, local_f, local_b, HW)
        launch = HW.kernel_launch_us * 1e-6 * (x.eff_pairs[:, 0] > 0)
        c_f, c_b = HW.seconds_fwd(x.eff_pairs[:, 0]) + launch, HW.seconds_bwd(x.eff_pairs[:, 0]) + launch
        np.testing.assert_allclose(fwd, np.maximum(local_f, x.fwd_comm_s[:, 0]) + c_f, rtol=1e-12)
        np.testing.assert_allclose(bwd, c_b + np.maximum(local_b, x.grad_comm_s[:, 0]), rtol=1e-12)


def test_recurrence_two_stages_by_hand():
    hw = dataclasses.replace(HW, kernel_launch_us=0.0)
    per_sec_f, per_sec_b = hw.seconds_fwd(1.0), hw.seconds_bwd(1.0)
    eff = np.array([[2.0, 4.0]]) / per_sec_f  # forward seconds 2 and 4; backward 2 * b and 4 * b
    x = StagedExchange(budget=1, num_stages=np.array([2]), pairs=eff, eff_pairs=eff,
                       fwd_comm_s=np.array([[3.0, 5.0]]), refetch_comm_s=np.array([[0.0, 6.0]]),
                       grad_comm_s=np.array([[1.0, 7.0]]))
    fwd, bwd, compute = staged_times(x, np.array([1.0]), np.array([0.5]), hw)
    # forward: a0 = 3; s = max(1, 3) = 3, a1 = 3 + 5 = 8, f = 3 + 2 = 5; s = max(5, 8) = 8, f = 8 + 4 = 12
    assert fwd[0] == pytest.approx(12.0)
    b = per_sec_b / per_sec_f
    c1, c0 = 4.0 * b, 2.0 * b  # backward computes stage 1 (kept) first, then stage 0 (fetched again)
    f = c1  # t = 0: s = 0
    g, a1 = f + 1.0, 6.0
    s = max(f, a1)  # t = 1: wait the refetched stage, compute it, then wait the previous gradient round
    f = max(s + c0, g)
    g = f + 7.0
    assert bwd[0] == pytest.approx(max(f + 0.5, g))
    assert compute[0] == pytest.approx(1.0 + 0.5 + 6.0 + 6.0 * b)


def test_more_stages_never_reduce_compute_and_keep_pairs():
    for plan in _batch_plans():
        local, _, total, _ = _local_split(plan)
        remote = np.bincount(plan.q[:, 0], weights=total - local, minlength=plan.cp)
        previous = None
        for budget in (None, 4096, 2048, 1024, 512):  # each boundary set refines the one before
            x = staged_exchange(plan, HW, budget)
            np.testing.assert_allclose(x.pairs.sum(axis=1), remote)
            compute = evaluate(plan, HW, budget).compute_s
            if previous is not None:
                assert (compute >= previous * (1 - 1e-12)).all(), (plan.strategy, plan.mask, budget)
            previous = compute
        big = int(plan.recv_tokens.max()) + 1
        np.testing.assert_allclose(evaluate(plan, HW, big).step_s, evaluate(plan, HW, None).step_s, rtol=1e-12)


# -- simulator and command line --------------------------------------------------------------------------------
def test_simulate_memory_columns():
    config = SimConfig(lengths=("linux_files",), cps=(8,), tokens_per_rank=2048, masks=("full",), num_batches=2,
                       strategies=("fcp", "ring", "hybrid", "nocp"))
    cells = {c.strategy: c for c in simulate(config, HW)}
    fcp, ring = cells["fcp"], cells["ring"]
    assert fcp.peak_kv_x <= 2 and fcp.saved_kv_x <= 1
    assert fcp.peak_kv_x_unbounded >= fcp.peak_kv_x and fcp.saved_kv_x_unbounded >= fcp.saved_kv_x
    assert (ring.peak_kv_x, ring.saved_kv_x, ring.returned_x, ring.bytes_vs_ring) == (2.0, 0.0, 0.0, 1.0)
    assert ring.peak_kv_x_unbounded == ring.peak_kv_x
    assert ring.peak_kv_mb >= 2 * 2048 * HW.kv_bytes_per_token / 1e6  # ring pads its slots, so at least this
    assert 0 < fcp.bytes_vs_ring < 1
    assert cells["nocp"].num_batches == 0 or cells["nocp"].peak_kv_x == 0
    record = cells_to_json(list(cells.values()), config, HW)
    assert record["kv_budget_tokens"] == "auto" and record["kv_budget_tokens_resolved"] == 2048
    assert SimConfig(lengths=("x",), kv_budget_tokens="none").kv_budget_tokens is None


@pytest.mark.parametrize(("value", "resolved"), [("auto", 1024), ("none", None), ("512", 512)])
def test_cli_plan_budget_and_memory_json(tmp_path, capsys, value, resolved):
    out = tmp_path / "plan.json"
    argv = ["plan", "--lengths", "linux_files", "--cp", "8", "--tokens-per-rank", "1024", "--mask", "full",
            "--kv-budget-tokens", value, "--json", str(out)]
    assert main(argv) == 0
    memory = json.loads(out.read_text())["metrics"]["memory"]
    assert set(MEMORY_FIELDS) <= set(memory)
    assert all(len(memory[k]) == 8 for k in MEMORY_FIELDS)
    assert memory["kv_budget_tokens"] == resolved
    assert memory["kv_bytes_per_token"] == HW.kv_bytes_per_token
    if resolved is not None:
        assert max(memory["peak_remote_kv_tokens"]) <= 2 * resolved
        assert max(memory["saved_remote_kv_tokens"]) <= resolved
    printed = capsys.readouterr().out
    assert "peak_kv_x=" in printed and "kept for backward max" in printed


@pytest.mark.parametrize("command", ["plan", "simulate"])
@pytest.mark.parametrize("value", ["0", "-5", "abc", "1.5"])
def test_cli_bad_budget_is_one_line_naming_the_flag(capsys, command, value):
    argv = [command, "--lengths", "spamassassin", "--cp", "2", "--tokens-per-rank", "512",
            f"--kv-budget-tokens={value}"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fcp {command}: error: ") and "--kv-budget-tokens" in lines[0]
    assert captured.out == ""


def test_cli_simulate_writes_memory_plot(tmp_path):
    png, js = tmp_path / "sim.png", tmp_path / "sim.json"
    argv = ["simulate", "--lengths", "spamassassin", "--cp", "2,4", "--tokens-per-rank", "1024", "--num-batches", "1",
            "--masks", "causal", "--kv-budget-tokens", "256", "--plot", str(png), "--json", str(js), "--quiet"]
    assert main(argv) == 0
    assert (tmp_path / "sim_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert data["kv_budget_tokens"] == 256 and data["config"]["kv_budget_tokens"] == 256
    fcp = [c for c in data["cells"] if c["strategy"] == "fcp"]
    assert all(c["peak_kv_x"] <= 2 * 256 / 1024 + 1e-12 for c in fcp)


def test_local_split_keeps_each_ranks_documents_apart_with_empty_documents():
    """Rows of different (rank, document) pairs are never grouped together, whatever the number of rows (the key
    was once made with the row count, so rank 0's document 3 and rank 1's document 1 met with two rows)."""
    from megatron_fcp.sim.model import _local_split

    plan = Plan(strategy="hand", cp=2, mask="causal", doc_lens=np.array([0, 5, 0, 5]),
                q_rows=np.array([[0, 3, 0, 5], [1, 1, 0, 5]]), kv=np.zeros((0, 5), np.int64),
                num_pad_tokens=np.zeros(2, np.int64))
    local, local_keys, total, other = _local_split(plan)
    assert local.tolist() == total.tolist() == [15, 15]
    assert local_keys.tolist() == [5, 5] and other.tolist() == [0, 0]

