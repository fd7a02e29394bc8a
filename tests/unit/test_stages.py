"""The staged exchange in the planner (pure integers): pieces, the stage split under a budget, the budget setting,
and the memory figures. The runtime's measurements are checked against these in the attention tests."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_fcp.data.lengths import load_distribution, pack_batches
from megatron_fcp.errors import InputError
from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.plan import Plan
from megatron_fcp.planner.stages import (
    num_stages,
    p2p_memory,
    parse_kv_budget,
    resolve_kv_budget,
    split_stages,
    stage_memory,
)

STRATEGIES = ("fcp", "magi", "ring", "hybrid")


def _batch(name: str, cp: int, tokens_per_rank: int, seed: int = 0) -> np.ndarray:
    return pack_batches(load_distribution(name), cp * tokens_per_rank, 1, seed)[0]


def _local_tokens(plan: Plan, rank: int) -> list[tuple[int, int]]:
    return [(d, t) for d, s, e in plan.for_rank(rank).q for t in range(s, e)]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mask", ["causal", "full"])
def test_pieces_are_contiguous_on_the_owner_and_mirror_each_other(strategy, mask):
    plan = make_plan(_batch("magi_hist", 4, 512), 4, 512, mask, strategy)
    views = [plan.for_rank(r) for r in range(plan.cp)]
    local = [_local_tokens(plan, r) for r in range(plan.cp)]
    received, sent = set(), set()
    for dst, view in enumerate(views):
        pos = 0
        for src, doc, start, end, src_offset, piece_pos in view.recv_pieces:
            assert piece_pos == pos, "pieces lie end to end in the staging order"
            assert local[src][src_offset:src_offset + end - start] == [(doc, t) for t in range(start, end)]
            received.add((src, dst, doc, start, end, src_offset, piece_pos, view.num_recv))
            pos += end - start
        assert pos == view.num_recv == sum(e - s for _, _, s, e in view.kv_recv)
    for src, view in enumerate(views):
        for dst, doc, start, end, offset, dst_pos, dst_total in view.send_pieces:
            sent.add((src, dst, doc, start, end, offset, dst_pos, dst_total))
    assert received == sent
    assert all(view.plan_digest == plan.digest for view in views)


@pytest.mark.parametrize("mask", ["causal", "full"])
def test_ring_views_equal_the_generic_pieces(mask):
    plan = make_plan(_batch("linux_files", 4, 1024), 4, 1024, mask, "ring")
    generic = Plan(strategy="ring-explicit", cp=plan.cp, mask=mask, doc_lens=plan.doc_lens, q_rows=plan.q,
                   kv=plan.kv_explicit, num_pad_tokens=plan.num_pad_tokens)
    for r in range(plan.cp):
        fast, slow = plan.for_rank(r), generic.for_rank(r)
        assert sorted(fast.recv_pieces) == sorted(slow.recv_pieces)
        assert sorted(fast.send_pieces) == sorted(slow.send_pieces)


def test_full_mask_staging_starts_after_the_receivers_own_tokens():
    plan = make_plan([4096], 4, 1024, "full", "fcp")  # one document over every rank
    firsts = set()
    for r in range(plan.cp):
        view = plan.for_rank(r)
        owned = {t for _, s, e in view.q for t in range(s, e)}
        anchor = min(s for _, s, _ in view.q)
        want = next(t % 4096 for t in range(anchor, anchor + 4096) if t % 4096 not in owned)
        first = min(view.recv_pieces, key=lambda p: p[5])
        assert first[2] == want, f"rank {r} stages {first} first; its first own token is {anchor}"
        firsts.add(first[2])
    assert len(firsts) == plan.cp, "receivers start their staging order at different tokens"


@given(total=st.integers(1, 500), budget=st.integers(1, 120), cuts=st.lists(st.integers(1, 499), max_size=8))
@settings(max_examples=200, deadline=None)
def test_split_stages_tiles_the_ranges_with_full_stages_after_the_first(total, budget, cuts):
    bounds = sorted({0, total, *(c for c in cuts if c < total)})
    pos, length = np.array(bounds[:-1]), np.diff(bounds)
    index, offset, sub_len, stage, n = split_stages(pos, length, np.full(pos.shape, total), budget)
    assert np.all(sub_len > 0)
    starts = pos[index] + offset
    covered = np.zeros(total, int)
    for s, m in zip(starts, sub_len, strict=True):
        covered[s:s + m] += 1
    assert np.all(covered == 1), "every token lies in exactly one sub-range"
    sizes = np.bincount(stage, weights=sub_len).astype(int)
    expect_n = -(-total // budget)
    assert n.max() == expect_n == sizes.shape[0]
    assert np.all(sizes[1:] == budget) and 1 <= sizes[0] <= budget, sizes
    for s, m, j in zip(starts, sub_len, stage, strict=True):  # a sub-range lies inside its stage
        lo = 0 if j == 0 else total - (expect_n - j) * budget
        assert lo <= s and s + m <= lo + sizes[j]


def test_split_without_budget_is_one_stage():
    index, offset, length, stage, n = split_stages([0, 5], [5, 7], [12, 12], None)
    assert index.tolist() == [0, 1] and offset.tolist() == [0, 0] and length.tolist() == [5, 7]
    assert stage.tolist() == [0, 0] and n.tolist() == [1, 1]


def test_stage_memory_formulas():
    total = np.array([0, 5, 10, 11, 25, 1000])
    m = stage_memory(total, 10)
    assert m["stages"].tolist() == [0, 1, 1, 2, 3, 100]
    assert m["peak"].tolist() == [0, 5, 10, 11, 20, 20]
    assert m["saved"].tolist() == [0, 5, 10, 10, 10, 10]
    assert m["refetch"].tolist() == [0, 0, 0, 1, 15, 990]
    unbounded = stage_memory(total, None)
    assert unbounded["peak"].tolist() == unbounded["saved"].tolist() == total.tolist()
    assert unbounded["refetch"].tolist() == [0] * 6 and num_stages(total, None).tolist() == [0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("name", ["linux_dirs", "spamassassin"])
@pytest.mark.parametrize("mask", ["causal", "full"])
def test_default_budget_bounds_memory_at_cp64(name, mask):
    tokens = 1024
    plan = make_plan(_batch(name, 64, tokens), 64, tokens, mask)
    mem = p2p_memory(plan.num_tokens, plan.pieces, "auto")
    assert np.all(mem["peak_remote_kv_tokens"] <= 2 * mem["own_kv_tokens"])
    assert np.all(mem["saved_remote_kv_tokens"] <= mem["own_kv_tokens"])
    assert np.array_equal(mem["peak_grad_tokens"], mem["peak_remote_kv_tokens"])
    unbounded = p2p_memory(plan.num_tokens, plan.pieces, None)
    assert np.array_equal(unbounded["peak_remote_kv_tokens"], plan.recv_tokens)
    refetch = mem["refetch_kv_tokens"]
    assert np.array_equal(refetch, np.maximum(plan.recv_tokens - tokens, 0))


def test_returned_gradients_per_round_sum_to_what_a_rank_sends():
    plan = make_plan(_batch("magi_hist", 8, 512), 8, 512, "full")
    for budget in (None, "auto", 100):
        mem = p2p_memory(plan.num_tokens, plan.pieces, budget)
        assert np.all(mem["peak_returned_grad_tokens"] <= plan.send_tokens)
    assert np.array_equal(p2p_memory(plan.num_tokens, plan.pieces, None)["peak_returned_grad_tokens"],
                          plan.send_tokens)


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("AUTO", "auto"), (None, None), ("none", None),
                                            ("64", 64), (1, 1), (4096, 4096), (np.int64(7), 7)])
def test_budget_settings(value, expected):
    assert parse_kv_budget(value) == expected


@pytest.mark.parametrize("value,message", [(0, "below one key/value token"), (-5, "below one key/value token"),
                                           ("-1", "below one key/value token"), ("1.5", "whole number"),
                                           (2.5, "whole number"), ("lots", "whole number"), (True, "whole number")])
def test_bad_budgets_name_the_flag_and_a_value_that_works(value, message):
    with pytest.raises(InputError, match=message) as err:
        parse_kv_budget(value, flag="--kv-budget-tokens")
    text = str(err.value)
    assert "--kv-budget-tokens" in text and ("4096" in text or "auto" in text) and "\n" not in text


def test_auto_resolves_to_the_ranks_tokens():
    assert resolve_kv_budget("auto", 2048) == 2048 and resolve_kv_budget(None, 2048) is None
    assert resolve_kv_budget(100, 2048) == 100
