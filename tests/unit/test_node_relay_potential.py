"""scripts/node_relay_potential.py against a token-by-token count on small plans."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.columns import Piece
from megatron_fcp.planner.stages import split_stages


@pytest.fixture(scope="module")
def script(load_script):
    return load_script("node_relay_potential")


def _by_token(plan, movement: str, gpus_per_node: int, budget: int) -> dict[str, float]:
    """The same shares, counted one token copy at a time."""
    p = plan.pieces
    index, offset, length, stage, n = split_stages(p[:, Piece.POS], p[:, Piece.END] - p[:, Piece.START],
                                                   p[:, Piece.TOTAL], budget)
    rounds = defaultdict(list)  # (node, doc, token) -> the round of each copy
    for i, o, k, j, m in zip(index.tolist(), offset.tolist(), length.tolist(), stage.tolist(), n.tolist(),
                             strict=True):
        dst, src, doc, start = (int(p[i, c]) for c in (Piece.DST, Piece.SRC, Piece.DOC, Piece.START))
        rnd = j if movement == "forward" else m - 1 - j
        if dst // gpus_per_node == src // gpus_per_node or (movement == "refetch" and rnd == 0):
            continue
        for token in range(start + o, start + o + k):
            rounds[dst // gpus_per_node, doc, token].append(rnd)
    total = sum(len(r) for r in rounds.values())
    same = sum(len(set(r)) for r in rounds.values())
    partner = 1 if movement == "gradients" else -1  # gradients join a copy one round later
    after = sum(sum(1 for x in r if x + partner not in r) for r in rounds.values())
    both = sum(sum(1 for x in set(r) if x + partner not in r) for r in rounds.values())
    return {"inter_node_tokens": total, "once per node": len(rounds) / total, "same round": same / total,
            "round after": after / total, "both": both / total}


@pytest.mark.parametrize("budget", [200, 1024])
@pytest.mark.parametrize("rings", [False, True])
@pytest.mark.parametrize("mask", ["causal", "full"])
def test_the_shares_are_the_token_by_token_count(script, mask, rings, budget):
    plan = _small_plan(mask, rings)
    for movement in script.PASSES:
        got = script.relay_shares(plan, movement, gpus_per_node=2, budget=budget)
        want = _by_token(plan, movement, 2, budget)
        assert got["inter_node_tokens"] == want["inter_node_tokens"] > 0
        for key in ("once per node", "same round", "round after", "both"):
            assert got[key] == pytest.approx(want[key], abs=1e-12), (movement, key)
        assert got["once per node"] <= got["both"] <= min(got["same round"], got["round after"]) <= 1


def _small_plan(mask: str, rings: bool = False):
    """Node rings (``rings``) on 4 nodes of 2 with a slot of 1024, the plan's own staging otherwise; a document of
    5000 tokens among short ones, so that there are rings."""
    rng = np.random.default_rng(3)
    lens = np.concatenate([[5000], rng.integers(1, 900, 60)])
    lens = lens[np.cumsum(lens) <= 8 * 1024]
    return make_plan([*lens.tolist(), 8 * 1024 - int(lens.sum())], 8, 1024, mask,
                     cp_node=np.arange(8) // 2 if rings else None)


@pytest.mark.parametrize("staging", ["rings", "plain", "aligned"])
@pytest.mark.parametrize("mask", ["causal", "full"])
def test_the_busiest_gpu_of_each_round_is_the_token_by_token_count(script, mask, staging):
    plan = _small_plan(mask, rings=staging == "rings")
    p = plan.pieces
    if staging == "aligned":
        index, offset, length, stage, n = script.aligned_stages(plan, 200, 2)
        last = int(n.max())
    else:
        index, offset, length, stage, n = split_stages(p[:, Piece.POS], p[:, Piece.END] - p[:, Piece.START],
                                                       p[:, Piece.TOTAL], 200)
    for movement in script.PASSES:
        copies = defaultdict(list)  # (node, doc, token, round) -> the GPUs that take it
        for i, o, k, j, m in zip(index.tolist(), offset.tolist(), length.tolist(), stage.tolist(), n.tolist(),
                                 strict=True):
            dst, src, doc, start = (int(p[i, c]) for c in (Piece.DST, Piece.SRC, Piece.DOC, Piece.START))
            rnd = j if movement == "forward" else (last if staging == "aligned" else m) - 1 - j
            if dst // 2 == src // 2 or (movement == "refetch" and j == m - 1):
                continue
            for token in range(start + o, start + o + k):
                copies[dst // 2, doc, token, rnd].append(dst)
        direct, split = defaultdict(float), defaultdict(float)
        for (_, _, _, rnd), ranks in copies.items():
            for rank in ranks:
                direct[rnd, rank] += 1
                split[rnd, rank] += 1 / len(ranks)
        rounds = {rnd for rnd, _ in direct}
        got = script.relay_shares(plan, movement, gpus_per_node=2, budget=200, staging=staging)
        assert got["busiest"] == sum(max(v for (r, _), v in direct.items() if r == rnd) for rnd in rounds)
        assert got["busiest, split"] == pytest.approx(sum(max(v for (r, _), v in split.items() if r == rnd)
                                                          for rnd in rounds), rel=1e-12)


@pytest.mark.parametrize("mask", ["causal", "full"])
def test_aligned_stages_cover_the_pieces_within_the_budget_and_line_up_node_mates(script, mask):
    plan = _small_plan(mask)
    p = plan.pieces
    index, offset, length, stage, n = script.aligned_stages(plan, 200, 4)
    # every piece cut into sub-ranges that tile it
    for i in range(p.shape[0]):
        mine = np.flatnonzero(index == i)
        order = mine[np.argsort(offset[mine])]
        assert offset[order][0] == 0 and np.array_equal(offset[order][1:], (offset + length)[order][:-1])
        assert int(length[mine].sum()) == int(p[i, Piece.END] - p[i, Piece.START])
    # at most a budget of tokens per (receiver, stage); a receiver's stages are 0..n-1
    dst = p[index, Piece.DST]
    per_stage = np.bincount(dst * (int(stage.max()) + 1) + stage, weights=length)
    assert per_stage.max() <= 200
    assert np.array_equal(n, [stage[dst == d].max() + 1 for d in dst])
    # node-mates whose longest document is the same hold each token of it that both receive in the same stage
    doc = p[index, Piece.DOC]
    longest = {d: max(set(doc[dst == d].tolist()), key=lambda x: (plan.doc_lens[x], -x)) for d in set(dst.tolist())}
    where = defaultdict(dict)  # (node, doc, token) -> {rank: stage}
    for i, o, k, j in zip(index.tolist(), offset.tolist(), length.tolist(), stage.tolist(), strict=True):
        d, r = int(p[i, Piece.DOC]), int(p[i, Piece.DST])
        if d == longest[r]:
            for token in range(int(p[i, Piece.START]) + o, int(p[i, Piece.START]) + o + k):
                where[r // 4, d, token][r] = j
    shared = [set(stages.values()) for stages in where.values() if len(stages) > 1]
    assert shared and all(len(s) == 1 for s in shared)
