"""Scale limits of the planner (issue "Bad input, faults and scale limits"): size guards, lengths beyond int64,
the checker's rule for a plan that holds more tokens per rank than requested, balance and traffic of the FCP
plans kept, and the planning-time target for micro-batches of very many short documents.

The 50 ms figure at CP 256 x 16K is measured by ``scripts/planning_speed.py --scale``; the test here has a
generous bound.
"""

import dataclasses
import statistics
import time

import numpy as np
import pytest

from megatron_fcp.cli import main
from megatron_fcp.data.lengths import load_distribution, pack_batches
from megatron_fcp.errors import InputError
from megatron_fcp.planner.api import MAX_CP, MAX_TOKENS_PER_RANK, MAX_TOTAL_TOKENS, check_batch, check_sizes, make_plan
from megatron_fcp.planner.checks import plan_problems, request_problems
from megatron_fcp.planner.plan import Plan

# ---- size guards ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cp", "tokens_per_rank", "match"),
    [
        (100_000, 16384, "above the largest supported CP size 65536"),
        (MAX_CP + 1, 1, "above the largest supported CP size"),
        (2, 100_000_000_000, "tokens_per_rank=100000000000 is above the largest supported"),
        (1, MAX_TOKENS_PER_RANK + 1, "tokens_per_rank=.* is above the largest supported"),
        (MAX_CP, MAX_TOKENS_PER_RANK, f"is above the largest supported micro-batch of {MAX_TOTAL_TOKENS} tokens"),
        (2**70, 1, "cp=.* is above"),
        (1, 2**70, "tokens_per_rank=.* is above"),
    ],
)
def test_sizes_beyond_the_bounds_are_refused_at_once_in_one_line(cp, tokens_per_rank, match):
    start = time.perf_counter()
    for call in (lambda: check_sizes(cp, tokens_per_rank), lambda: make_plan([1], cp, tokens_per_rank)):
        with pytest.raises(InputError, match=match) as error:
            call()
        assert "\n" not in str(error.value)
    assert time.perf_counter() - start < 1.0


def test_sizes_at_the_bounds_are_accepted():
    check_sizes(MAX_CP, MAX_TOTAL_TOKENS // MAX_CP)
    check_sizes(MAX_TOTAL_TOKENS // MAX_TOKENS_PER_RANK, MAX_TOKENS_PER_RANK)
    assert make_plan([1, 0, 2], 3, 1).num_tokens.tolist() == [1, 1, 1]


def test_more_document_entries_than_token_slots_are_refused():
    check_batch([0] * 1000 + [4], 2, 2)  # empty entries are fine in moderation
    with pytest.raises(InputError, match="document lengths but cp x tokens_per_rank"):
        check_batch(np.zeros((1 << 20) + 1, np.int64), 2, 2)


@pytest.mark.parametrize("lens", [[2**63], [2**64], [5, 2**70], [1, 2**100, 3]])
def test_lengths_beyond_int64_are_an_input_error(lens):
    with pytest.raises(InputError, match="above the largest integer the planner holds") as error:
        make_plan(lens, 2, 8)
    assert "\n" not in str(error.value)


def test_cli_refuses_a_batch_too_large_as_one_line(tmp_path, capsys):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("4\n4\n")
    assert main(["plan", "--lengths", str(lengths), "--cp", "100000", "--tokens-per-rank", "16384", "--as-batch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "above the largest supported CP size" in err


# ---- the checker's rule: a rank above the requested tokens ------------------------------------------------------


def test_a_rank_above_tokens_per_rank_is_a_problem_with_the_figures():
    plan = make_plan([100] + [1] * 5, 3, 40, "causal", "hybrid")  # a 100-token document on a group of one rank
    problems = plan_problems(plan)
    assert problems == request_problems(plan) and len(problems) == 1
    assert "holds 100 tokens" in problems[0] and "above tokens_per_rank=40" in problems[0]
    assert plan_problems(plan, tokens_per_rank=100) == []  # within a larger request
    bare = Plan(strategy=plan.strategy, cp=plan.cp, mask=plan.mask, doc_lens=plan.doc_lens, q_rows=plan.q, kv=plan.kv,
                num_pad_tokens=plan.num_pad_tokens, exchange=plan.exchange)
    assert bare == plan and plan_problems(bare) == []  # the request is not part of the value; unknown, unchecked
    assert make_plan([100] + [1] * 5, 3, 40, "causal", "fcp").tokens_per_rank == 40
    assert plan_problems(make_plan([100] + [1] * 5, 3, 40, "causal", "fcp")) == []


def test_cli_exits_non_zero_on_a_hybrid_plan_above_the_request(tmp_path, capsys):
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("\n".join(["100"] + ["1"] * 20) + "\n")
    assert main(["plan", "--lengths", str(lengths), "--cp", "3", "--tokens-per-rank", "40", "--strategy", "hybrid",
                 "--as-batch"]) == 1
    assert "above tokens_per_rank=40" in capsys.readouterr().out


# ---- balance and traffic of FCP plans kept ---------------------------------------------------------------------

CP, TOKENS_PER_RANK = 64, 4096

RECORDED = {
    "linux_files": [(1.014794, 1607680), (1.014731, 1728300), (1.016231, 3736106)],
    "linux_dirs": [(1.006247, 7804934), (1.005995, 9265734), (1.001297, 6517337)],
    "spamassassin": [(1.039394, 1827625), (1.014702, 460646), (1.044000, 586896)],
    "magi_hist": [(1.007664, 2474276), (1.003668, 6591252), (1.019197, 1227753)],
}
"""Pairs imbalance (max/mean of ``rank_pairs``) and the sum of ``recv_tokens`` of causal FCP plans of three
batches (``pack_batches(..., 3, seed=1)``) at CP 64 x 4096, recorded from the planner that carries the rest of a
cut document on to the next ranks (``fcp._Pool.carry``). Against the figures of commit ea9edac, recorded before
it, the largest changes are on spamassassin: its second batch 1.036211 -> 1.014702 and 430543 -> 460646 tokens
(the extra key/values move between consecutive ranks), its third 1.037346 -> 1.044000; every other figure moves by
less than 0.001 and 1%, but magi_hist's third batch (1.029005 -> 1.019197)."""
RECORDED_ADVERSARIAL = (1.001525, 6194520)
"""The same of the adversarial batch of :func:`adversarial_batch`, recorded with :data:`RECORDED` (commit ea9edac:
1.0, 6193152)."""


def adversarial_batch(total: int, seed: int = 5) -> np.ndarray:
    """One document of half the batch among documents of 1 to 64 tokens, shuffled."""
    rng = np.random.default_rng(seed)
    lens = np.concatenate([[total // 2], rng.integers(1, 65, total // 16)])
    ends = np.cumsum(lens)
    count = int(np.searchsorted(ends, total))
    lens = lens[: count + 1].copy()
    lens[-1] -= int(ends[count]) - total
    return rng.permutation(lens[lens > 0])


def figures(plan: Plan) -> tuple[float, int]:
    pairs = plan.rank_pairs()
    return float(pairs.max() / pairs.mean()), int(plan.recv_tokens.sum())


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_fcp_balance_and_traffic_of_the_shipped_mixes_are_kept(name):
    batches = pack_batches(load_distribution(name), CP * TOKENS_PER_RANK, 3, seed=1)
    for lens, (imbalance, traffic) in zip(batches, RECORDED[name], strict=True):
        got_imbalance, got_traffic = figures(make_plan(lens, CP, TOKENS_PER_RANK))
        assert got_imbalance <= imbalance + 0.005
        assert got_traffic <= 1.02 * traffic


def test_fcp_balance_and_traffic_of_an_adversarial_batch_are_kept():
    lens = adversarial_batch(CP * TOKENS_PER_RANK)
    plan = make_plan(lens, CP, TOKENS_PER_RANK)
    assert plan_problems(plan) == []
    got_imbalance, got_traffic = figures(plan)
    assert got_imbalance <= RECORDED_ADVERSARIAL[0] + 0.005
    assert got_traffic <= 1.02 * RECORDED_ADVERSARIAL[1]


# ---- planning time with very many documents ----------------------------------------------------------------------


def test_four_million_one_token_documents_plan_in_half_a_second():
    """The target is 50 ms here (``scripts/planning_speed.py --scale``); CI's bound is ten times that, so a busy
    machine does not fail it, while the planner of commit ea9edac (about 17 s) would."""
    lens = np.ones(256 * 16384, np.int64)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        plan = make_plan(lens, 256, 16384)
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.5
    assert plan.num_real_tokens.tolist() == [16384] * 256
    assert plan.q_rows.shape[0] == 0 and plan.kv.shape[0] == 0  # every document whole, stored as one rank each
    docs = [doc for doc, start, end in plan.for_rank(7).q if (start, end) == (0, 1)]
    assert len(docs) == 16384 and docs == sorted(docs) and np.array_equal(plan.whole_rank[docs], np.full(16384, 7))


def _shuffled_many(kind: str) -> np.ndarray:
    """About 100K documents in random order, shaped to take each grouping form of the planner."""
    rng = np.random.default_rng(3)
    num = 100_000
    if kind == "nearly_all":  # one length for almost every document (the few others, cut ones among them)
        return np.where(rng.random(num) < 0.97, 700, rng.integers(1, 3000, num))
    if kind == "common":  # several lengths many documents share (some cut at rank boundaries), and a long tail
        return rng.choice([1, 2, 3, 5, 600, 700, 40, 900, 2500], size=num, p=[.3, .2, .15, .1, .1, .1, .03, .01, .01])
    return np.concatenate([np.ones(num, np.int64), [5000, 7000]])[rng.permutation(num + 2)]  # ones and two long


@pytest.mark.parametrize("mask", ["causal", "full"])
@pytest.mark.parametrize("kind", ["nearly_all", "common", "ones_and_long"])
def test_the_grouping_forms_give_the_plan_of_one_sort(monkeypatch, kind, mask):
    """Large shuffled batches group their most shared lengths by a compare each (an index array, or every
    document but the few others) instead of one sort; the plan is the same as with the sort alone."""
    from megatron_fcp.planner import fcp

    lens = _shuffled_many(kind)
    cp = 16
    tokens_per_rank = -(-int(lens.sum()) // cp)
    batch = fcp.group_by_length(lens, cp, tokens_per_rank, mask)
    assert batch.bin_index or batch.bin_all_but  # the forms are taken
    plan = make_plan(lens, cp, tokens_per_rank, mask)
    monkeypatch.setattr(fcp, "SCAN_MIN_DOCS", 1 << 62)
    sorted_only = make_plan(lens, cp, tokens_per_rank, mask)
    assert not fcp.group_by_length(lens, cp, tokens_per_rank, mask).bin_index
    assert plan == sorted_only and plan.digest == sorted_only.digest
    assert np.array_equal(plan.whole_rank, sorted_only.whole_rank) and np.array_equal(plan.q, sorted_only.q)
    assert plan_problems(plan) == []
    cut = np.unique(plan.q_rows[:, 1])  # documents cut at rank boundaries, of the lengths grouped by a compare too
    assert np.isin(lens[cut], [700, 600] if kind != "ones_and_long" else [5000, 7000]).any()


@pytest.mark.parametrize("mask", ["causal", "full"])
@pytest.mark.parametrize("kind", ["common", "ones_and_long"])
def test_a_rank_view_counts_whole_documents_without_their_rows(kind, mask):
    """A rank's view places its pieces from the cut documents' rows and the tokens of the documents held whole
    before them; it is the view cut from every rank's full rows (``Plan.pieces``)."""
    lens = _shuffled_many(kind)
    cp = 16
    plan = make_plan(lens, cp, -(-int(lens.sum()) // cp), mask)
    full = dataclasses.replace(plan)
    assert full.pieces.shape[0] > 0  # computed from every row, written out
    for rank in range(cp):
        assert dataclasses.replace(plan).for_rank(rank) == full.for_rank(rank)


@pytest.mark.parametrize("mask", ["causal", "full"])
@pytest.mark.parametrize("lens", [[3] * 40 + [1] * 30 + [50, 7, 7], [0, 5, 0, 5, 60, 1, 1, 2, 2, 9] * 6])
def test_the_compact_rows_are_the_plan_written_out(mask, lens):
    """A plan keeps documents held whole as one rank each (``whole_rank``); written out as rows it is the same
    plan (equal, same digest), and every rank's view reads the same from both forms."""
    plan = make_plan(lens, 4, sum(lens) // 4 + 3, mask)
    assert plan.whole_rank is not None and (plan.whole_rank >= 0).any()
    written_out = Plan(strategy=plan.strategy, cp=plan.cp, mask=plan.mask, doc_lens=plan.doc_lens, q_rows=plan.q,
                       kv=plan.kv, num_pad_tokens=plan.num_pad_tokens, notes=plan.notes)
    assert written_out == plan and written_out.digest == plan.digest
    assert np.array_equal(written_out.whole_rank, plan.whole_rank)
    for rank in range(plan.cp):
        assert np.array_equal(plan.rows_of([rank]), plan.q[plan.q[:, 0] == rank])
        assert written_out.for_rank(rank) == plan.for_rank(rank)
    assert plan_problems(plan) == []


def test_rows_in_another_order_are_kept_as_given():
    """Rows of a rank not ordered by document are the rank's local order: they stay explicit."""
    q = np.array([[0, 1, 0, 2], [0, 0, 0, 2], [1, 2, 0, 4]])
    plan = Plan(strategy="hand", cp=2, mask="causal", doc_lens=np.array([2, 2, 4]), q_rows=q,
                kv=np.zeros((0, 5), np.int64), num_pad_tokens=np.zeros(2, np.int64))
    assert plan.whole_rank is None and plan.q.tolist() == q.tolist()
