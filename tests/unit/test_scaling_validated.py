"""The scaling table with the validated model (scripts/scaling_validated.py) on the CI case."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_fcp.data.lengths import load_distribution, pack_batches
from megatron_fcp.planner.columns import Transfer
from megatron_fcp.planner.fcp import plan_fcp
from megatron_fcp.planner.relay import relay_figures, relay_transfers
from megatron_fcp.sim import published as P
from megatron_fcp.sim.model import load_hardware


@pytest.fixture(scope="module")
def script(load_script):
    return load_script("scaling_validated")


@pytest.fixture(scope="module")
def small(script, tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    script.main(["--small", "--lengths", "spamassassin", "--jobs", "1", "--out-dir", str(out)])
    return json.loads((out / "scaling_validated.json").read_text()), (out / "scaling_validated.md").read_text()


def test_every_cell_is_the_published_models_time_of_the_same_batches(script, small):
    data, text = small
    rows = data["rows"]
    assert data["hardware"] == "h100_node_fa3_published"
    assert {(r["strategy"], r["mask"], r["cp"]) for r in rows} == {
        (s, m, cp) for s in script.TABLE for m in script.MASKS for cp in (8, 16)}
    hw = load_hardware(script.HARDWARE)
    (lens,) = pack_batches(load_distribution("spamassassin"), 16 * 16384, 1, seed=0)
    fcp = next(r for r in rows if (r["strategy"], r["mask"], r["cp"]) == ("fcp", "full", 16))
    seconds = P.strategy_seconds("fcp", hw, P.Extras(), lens, 16, "full", 16384)
    assert fcp["fwd_ms"] == pytest.approx(1e3 * seconds["fwd"], rel=1e-12)
    pairs = float((lens.astype(float) ** 2).sum())  # full mask: every pair of each document
    flops = pairs * 4 * 64 * 128 * 3.5  # GQA 64 query heads of 128, forward + 2.5x backward
    assert fcp["mfu"] == pytest.approx(flops / (16 * 989.4e12 * (seconds["fwd"] + seconds["bwd"])), rel=1e-9)
    assert all(0 < r["mfu"] < 1 for r in rows)
    assert "| 16 | " in text and "## spamassassin, causal" in text


def test_the_summary_compares_fcp_at_both_ends_and_counts_its_wins(script, small):
    """FCP in the summary is fcp_auto: per batch the setting with the shorter step (fcp: p2p, fcp_heads: heads; p2p
    on a tie), its figures those of the picked batches; each setting's own ratio is kept beside it; wins count
    against every strategy that is not FCP."""
    data, _ = small
    rows, summary = data["rows"], data["summary"]
    for s in summary:
        here = {(r["strategy"], r["cp"]): r for r in rows if (r["lengths"], r["mask"]) == (s["lengths"], s["mask"])}
        for cp in (8, 16):
            p2p, heads, auto = (here[k, cp] for k in ("fcp", "fcp_heads", "fcp_auto"))
            picked = [h < p for p, h in zip(p2p["batch_step_ms"], heads["batch_step_ms"], strict=True)]
            assert auto["heads_batches"] == sum(picked)
            want = [hs if h else ps for h, ps, hs in zip(picked, p2p["batch_step_ms"], heads["batch_step_ms"],
                                                         strict=True)]
            assert auto["fwd_ms"] + auto["bwd_ms"] == pytest.approx(np.mean(want), rel=1e-12)
            assert auto["fwd_ms"] + auto["bwd_ms"] <= min(r["fwd_ms"] + r["bwd_ms"] for r in (p2p, heads)) + 1e-9
        mfu = {k: r["mfu"] for k, r in here.items()}
        assert s["fcp_mfu_ratio"] == pytest.approx(mfu["fcp_auto", 16] / mfu["fcp_auto", 8])
        assert s["p2p_mfu_ratio"] == pytest.approx(mfu["fcp", 16] / mfu["fcp", 8])
        assert s["heads_mfu_ratio"] == pytest.approx(mfu["fcp_heads", 16] / mfu["fcp_heads", 8])
        step = {cp: {k: r["fwd_ms"] + r["bwd_ms"] for (k, c), r in here.items() if c == cp} for cp in (8, 16)}
        others = {cp: min(v for k, v in t.items() if not k.startswith("fcp")) for cp, t in step.items()}
        assert s["fcp_fastest_cells"] == sum(step[cp]["fcp_auto"] < others[cp] * (1 - 1e-9) for cp in (8, 16))
        assert s["heads_batches"] == [here["fcp_auto", cp]["heads_batches"] for cp in (8, 16)]
        assert s["target"] == 0.85


def test_ties_are_counted_as_not_fastest(script):
    rows = [{"lengths": "a", "mask": "full", "cp": 8, "strategy": s, "fwd_ms": f, "bwd_ms": 1.0}
            for s, f in (("fcp", 2.0), ("fcp_heads", 1.5), ("fcp_auto", 1.5), ("usp", 1.5), ("ring_p2p", 9.0))]
    (cell,) = script.not_fastest(rows)
    assert (cell["fastest"], cell["fcp_over_fastest"]) == ("usp", 1.0)


def test_ulysses_is_left_out_above_one_rank_per_query_head(script):
    hw = load_hardware(script.HARDWARE)
    assert script.applies("ulysses", 64, hw) and not script.applies("ulysses", 128, hw)
    assert script.applies("fcp", 256, hw)


def test_the_cells_fcp_loses_are_listed_with_the_winner(script):
    rows = [{"lengths": "a", "mask": "causal", "cp": 8, "strategy": s, "fwd_ms": f, "bwd_ms": 1.0}
            for s, f in (("fcp", 2.0), ("fcp_heads", 2.5), ("fcp_auto", 1.9), ("usp", 1.5), ("ring_p2p", 9.0))]
    rows += [{"lengths": "a", "mask": "causal", "cp": 16, "strategy": s, "fwd_ms": f, "bwd_ms": 1.0}
             for s, f in (("fcp", 1.0), ("fcp_heads", 3.0), ("fcp_auto", 1.0), ("usp", 1.5))]
    assert script.not_fastest(rows) == [{"lengths": "a", "mask": "causal", "cp": 8, "fastest": "usp",
                                         "fcp_over_fastest": 2.9 / 2.5}]


def test_fcp_rows_carry_what_its_step_spends_on_communication(script, small):
    """One node (CP 8): nothing crosses InfiniBand and no partial gradients are relayed; two nodes (CP 16): some GPU
    receives over it, the most at least the mean, counted from the relays' transfers (of the plan the runtime runs
    there); exposed communication between zero and the step."""
    data, text = small
    fcp = {(r["mask"], r["cp"]): r for r in data["rows"] if r["strategy"] == "fcp"}
    for (_, cp), r in fcp.items():
        assert 0 <= r["exposed_ms"] <= r["fwd_ms"] + r["bwd_ms"]
        assert (r["ib_mb_max"] == r["ib_mb_mean"] == 0) if cp == 8 else (r["ib_mb_max"] >= r["ib_mb_mean"] > 0)
        assert r["relayed_grad_x"] == 0 if cp == 8 else r["relayed_grad_x"] >= 0
    hw = load_hardware(script.HARDWARE)
    (lens,) = pack_batches(load_distribution("spamassassin"), 16 * 16384, 1, seed=0)
    plan = P.fcp_plan(hw, lens, 16, "causal", 16384)
    node = np.arange(16) // 8
    got = np.zeros(16)
    for movement in ("forward", "refetch", "gradients"):
        t = relay_transfers(plan.pieces, node, 16384, movement)
        across = node[t[:, Transfer.SRC]] != node[t[:, Transfer.DST]]
        np.add.at(got, t[across, Transfer.DST], t[across, Transfer.END] - t[across, Transfer.START])
    assert fcp["causal", 16]["ib_mb_max"] == pytest.approx(got.max() * hw.kv_bytes_per_token / 1e6, rel=1e-12)
    relayed = relay_figures(plan.pieces, node, 16384, 16)["peak_relayed_grad_tokens"]
    assert fcp["causal", 16]["relayed_grad_x"] == pytest.approx(relayed.max() / 16384, rel=1e-12)
    assert "## FCP's communication" in text and "| spamassassin | causal | 16 | p2p |" in text
    # heads: each GPU receives its head shard (1/8) of what its node-sized rank receives, nothing relayed
    heads = {(r["mask"], r["cp"]): r for r in data["rows"] if r["strategy"] == "fcp_heads"}
    assert heads["causal", 8]["ib_mb_max"] == 0 and heads["causal", 16]["relayed_grad_x"] == 0
    node_plan = plan_fcp(lens, 2, 8 * 16384, "causal")
    figures = relay_figures(node_plan.pieces, np.arange(2), 8 * 16384, 2)
    tokens = sum(figures[f"received_across_{phase}"] for phase in ("forward", "backward_kv", "backward_grad"))
    assert heads["causal", 16]["ib_mb_max"] == pytest.approx(tokens.max() * hw.kv_bytes_per_token / 8 / 1e6,
                                                             rel=1e-12)
