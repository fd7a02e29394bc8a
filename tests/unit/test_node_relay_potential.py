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


@pytest.mark.parametrize("mask", ["causal", "full"])
def test_the_shares_are_the_token_by_token_count(script, mask):
    rng = np.random.default_rng(3)
    lens = rng.integers(1, 900, 60)
    lens = lens[np.cumsum(lens) <= 8 * 1024]
    plan = make_plan([*lens.tolist(), 8 * 1024 - int(lens.sum())], 8, 1024, mask)
    for movement in script.PASSES:
        got = script.relay_shares(plan, movement, gpus_per_node=2, budget=200)
        want = _by_token(plan, movement, 2, 200)
        assert got["inter_node_tokens"] == want["inter_node_tokens"] > 0
        for key in ("once per node", "same round", "round after", "both"):
            assert got[key] == pytest.approx(want[key], abs=1e-12), (movement, key)
        assert got["once per node"] <= got["both"] <= min(got["same round"], got["round after"]) <= 1
