"""How much of FCP's InfiniBand traffic a node-aware exchange could save, read off today's plans (counted, not
timed): for every key/value token that crosses into a node, how many GPUs of that node receive it and in which
rounds of the staged exchange (forward, the refetch in backward, and the gradients sent back).

    .venv/bin/python scripts/node_relay_potential.py        # docs/node_relay_potential.txt

Per cell (mix, mask, CP; 16384 tokens per rank, budget auto, 8 GPUs per node, one packed batch, seed 0) and
movement, the inter-node tokens, and the share of them that would still cross InfiniBand (for gradients: the
share of gradient rows still sent over it, the others summed inside the node first):

- ``once per node``: each token crosses into a node once (the floor any node-aware exchange can reach);
- ``same round``: copies that one GPU of the node receives in the same round as another are forwarded over
  NVLink inside the round (a second hop);
- ``round after``: a copy is taken over NVLink from a node-mate that received the token one round earlier (that
  node-mate holds it during the round in which this one's stage travels, so no memory is added); for gradients,
  mirrored: a copy's gradient is added to a node-mate's copy one round *later* (computed in round ``k``, it
  travels during ``k + 1`` and can only join a sum sent after that), so the copies with no copy one round later
  cross InfiniBand (``megatron_fcp.planner.relay`` applies this rule);
- ``both``: either of the two;
- ``busiest``: the largest InfiniBand receive of a GPU in a round, in tokens, summed over the rounds (each copy
  crosses); ``split``: the same over ``busiest`` when each token of a round crosses into a node once, split
  evenly over the node's GPUs that take it in that round (the same-round hop at its best). The per-round
  maximum, not the total, is what a round waits for.

``--staging``: ``rings`` (the default) counts the plans the runtime runs on nodes of 8: node rings
(:mod:`megatron_fcp.planner.node_ring`); ``plain`` each receiver's own staging order, as plans without a node
layout stage (and as every node-aware plan did before node rings); ``aligned`` node-aligned stages
(:func:`aligned_stages`, a design the planner does not use; docs/node_aware_exchange.md, step 5).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from megatron_fcp.data.lengths import SHIPPED, load_distribution, pack_batches
from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.columns import Piece
from megatron_fcp.planner.pairs import arange_within
from megatron_fcp.planner.stages import first_own_starts, resolve_kv_budget, split_stages

GPUS_PER_NODE = 8
TOKENS_PER_RANK = 16384


PASSES = ("forward", "refetch", "gradients")
"""The staged exchange's three movements: forward stages (round = stage), the stages fetched again in backward
and the key/value gradients sent back (backward round = stages - 1 - stage; refetch: all but the kept stage)."""


STAGINGS = ("rings", "plain", "aligned")
"""``today``: the planner's staging order and stage split. ``aligned``: node-aligned staging, a design the planner
does not use (:func:`aligned_stages`)."""


def _cut(a: np.ndarray, b: np.ndarray, budget: int):
    """Ranges ``[a, b)`` of a coordinate cut at multiples of ``budget``: per sub-range its range, start and window."""
    count = (b - 1) // budget - a // budget + 1
    index = np.repeat(np.arange(a.shape[0], dtype=np.int64), count)
    window = a[index] // budget + arange_within(count)
    start = np.maximum(a[index], window * budget)
    return index, start, np.minimum(b[index], (window + 1) * budget) - start, window


def aligned_stages(plan, budget: int, gpus_per_node: int = GPUS_PER_NODE):
    """Node-aligned staging (docs/node_aware_exchange.md, step 5), as :func:`~megatron_fcp.planner.stages.split_stages`
    returns stages: ``index`` (piece), ``offset``, ``length``, ``stage``, ``num_stages``. A receiver stages its
    longest document first, in the document's coordinates from a cut point ``c`` shared by its node (the first own
    token of the node's earliest holder of the document), wrapping to the document's start; a stage boundary
    falls wherever ``(token - c) mod budget == 0``, so node-mates hold a token of that document in the same stage.
    Its other documents follow, ``budget`` tokens a stage. Every stage holds at most ``budget`` tokens.
    ``num_stages``: the receiver's (its last stage is kept for backward)."""
    p, num_docs = plan.pieces, plan.doc_lens.shape[0]
    dst, doc = p[:, Piece.DST], p[:, Piece.DOC]
    doc_len = plan.doc_lens[doc]
    keys, first = first_own_starts(plan.q, num_docs)
    nodes = plan.cp // gpus_per_node + 1
    cut = np.full(nodes * num_docs, np.iinfo(np.int64).max)
    np.minimum.at(cut, (keys // num_docs) // gpus_per_node * num_docs + keys % num_docs, first)
    u = (p[:, Piece.START] - cut[dst // gpus_per_node * num_docs + doc]) % doc_len  # a piece never straddles c
    by_length = np.lexsort((doc, -doc_len, dst))
    is_first = np.concatenate([[True], dst[by_length][1:] != dst[by_length][:-1]])
    longest = np.full(plan.cp, -1)
    longest[dst[by_length][is_first]] = doc[by_length][is_first]
    lead = doc == longest[dst]
    length = p[:, Piece.END] - p[:, Piece.START]
    li, la, ll, lw = _cut(u[lead], u[lead] + length[lead], budget)
    lead_index = np.flatnonzero(lead)[li]
    last = np.full(plan.cp, -1)
    np.maximum.at(last, dst[lead_index], lw)
    rest = np.flatnonzero(~lead)
    rest = rest[np.lexsort((u[rest], doc[rest], dst[rest]))]
    before = np.cumsum(length[rest]) - length[rest]
    first_of = np.concatenate([[True], dst[rest][1:] != dst[rest][:-1]]) if rest.shape[0] else np.zeros(0, bool)
    pos = before - before[np.flatnonzero(first_of)][np.cumsum(first_of) - 1]
    ri, ra, rl, rw = _cut(pos, pos + length[rest], budget)
    rest_index = rest[ri]
    index = np.concatenate([lead_index, rest_index])
    offset = np.concatenate([la - u[lead_index], ra - pos[ri]])
    stage = np.concatenate([lw, last[dst[rest_index]] + 1 + rw])
    num_stages = np.zeros(plan.cp, np.int64)
    np.maximum.at(num_stages, dst[index], stage + 1)
    return index, offset, np.concatenate([ll, rl]), stage, num_stages[dst[index]]


def _gradients_summed(key: np.ndarray, rnd: np.ndarray, rank: np.ndarray) -> int:
    """Gradient copies summed inside their node under the capped round-after rule (``megatron_fcp.planner.relay``):
    a copy in round ``r`` goes to the first node-mate after it (cyclically, in rank order) that holds the token in
    round ``r + 1``, and each such holder takes one copy only, the nearest before it. So in the cyclic rank order of
    the copies of rounds ``r`` and ``r + 1`` together, a round-``r + 1`` copy takes one exactly when the copy just
    before it is of round ``r``. One entry per (node, doc, token) copy in, sorted by key."""
    # every copy twice: as a sender (pair r) and as a holder (pair r - 1)
    pair = np.concatenate([rnd, rnd - 1])
    sender = np.concatenate([np.ones(key.shape, bool), np.zeros(key.shape, bool)])
    k, r = np.concatenate([key, key]), np.concatenate([rank, rank])
    order = np.lexsort((r, pair, k))
    k, pair, sender = k[order], pair[order], sender[order]
    first = np.concatenate([[True], (k[1:] != k[:-1]) | (pair[1:] != pair[:-1])])
    block_first = np.flatnonzero(first)
    block_last = np.append(block_first[1:], k.shape[0]) - 1
    before = np.arange(k.shape[0]) - 1
    before[block_first] = block_last  # cyclic: the first copy's predecessor is the block's last
    return int((~sender & sender[before]).sum())


def relay_shares(plan, movement: str = "forward", gpus_per_node: int = GPUS_PER_NODE, budget="auto",
                 staging: str = "plain") -> dict[str, float]:
    """Inter-node tokens of one movement of ``plan`` (:data:`PASSES`) and the share left on InfiniBand under each
    scheme (module doc; for gradients the same rounds decide where node-mates' gradients can be summed first), with
    the plan's stages (``rings`` or ``plain``: node rings where the plan has a node layout) or node-aligned ones
    (:data:`STAGINGS`)."""
    p = plan.pieces
    budget = resolve_kv_budget(budget, int(plan.num_tokens.max(initial=1)))
    if staging == "aligned":
        index, offset, length, stage, num_stages = aligned_stages(plan, budget, gpus_per_node)
    else:
        index, offset, length, stage, num_stages = split_stages(p[:, Piece.POS], p[:, Piece.END] - p[:, Piece.START],
                                                                p[:, Piece.TOTAL], budget)
    dst, src, doc = p[index, Piece.DST], p[index, Piece.SRC], p[index, Piece.DOC]
    inter = dst // gpus_per_node != src // gpus_per_node
    if movement != "forward":
        kept = stage == num_stages - 1
        # the backward round: aligned stages count back from the common last round, so they stay aligned
        stage = (int(num_stages.max(initial=1)) if staging == "aligned" else num_stages) - 1 - stage
        inter &= ~kept if movement == "refetch" else True
    start, length, stage = (p[index, Piece.START] + offset)[inter], length[inter], stage[inter]
    node_doc = (dst[inter] // gpus_per_node) * plan.doc_lens.shape[0] + doc[inter]
    total = int(length.sum())
    if not total:
        return {"inter_node_tokens": 0}
    # one entry per (node, doc, token) copy: its key, round and receiver
    token = np.repeat(start - np.cumsum(length) + length, length) + np.arange(total)
    key = np.repeat(node_doc, length) * int(plan.doc_lens.max()) + token
    rnd = np.repeat(stage, length)
    order = np.lexsort((rnd, key))
    key, rnd, rank = key[order], rnd[order], np.repeat(dst[inter], length)[order]
    new_key = np.concatenate([[True], key[1:] != key[:-1]])
    new_pair = new_key | np.concatenate([[True], rnd[1:] != rnd[:-1]])
    pair_key, pair_rnd = key[new_pair], rnd[new_pair]
    pair_count = np.diff(np.append(np.flatnonzero(new_pair), total))
    # the (node, doc, token) copy one round earlier (gradients: later) exists: pairs are sorted by key then round
    if movement == "gradients":
        after = np.concatenate([(pair_key[:-1] == pair_key[1:]) & (pair_rnd[:-1] + 1 == pair_rnd[1:]), [False]])
        round_after_left = total - _gradients_summed(key, rnd, rank)
    else:
        after = np.concatenate([[False], (pair_key[1:] == pair_key[:-1]) & (pair_rnd[1:] == pair_rnd[:-1] + 1)])
        round_after_left = int(pair_count[~after].sum())
    # the busiest GPU of each round: its InfiniBand receive, each copy its own, or with one copy per (node, token,
    # round) split evenly over the GPUs that take it (the same-round hop, landed by all of them)
    slot = rank * (int(rnd.max()) + 1) + rnd
    size = plan.cp * (int(rnd.max()) + 1)
    direct = np.bincount(slot, minlength=size).reshape(plan.cp, -1)
    split = np.bincount(slot, weights=1.0 / np.repeat(pair_count, pair_count), minlength=size).reshape(plan.cp, -1)
    return {"inter_node_tokens": total, "once per node": int(new_key.sum()) / total,
            "same round": int(new_pair.sum()) / total,
            "round after": round_after_left / total, "both": int((~after).sum()) / total,
            "busiest": int(direct.max(axis=0).sum()), "busiest, split": float(split.max(axis=0).sum())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cp", default="64,128,256")
    parser.add_argument("--lengths", default=",".join(SHIPPED))
    parser.add_argument("--staging", choices=STAGINGS, default="rings",
                        help="the runtime's node rings, each receiver's plain order, or node-aligned stages (a "
                             "design the planner does not use)")
    args = parser.parse_args(argv)
    print(f"Share of inter-node key/value tokens left on InfiniBand; {GPUS_PER_NODE} GPUs per node, "
          f"{TOKENS_PER_RANK} tokens per rank, budget auto, one batch, staging {args.staging}")
    print(f"command: python scripts/node_relay_potential.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"{'mix':<13} {'mask':<7} {'cp':>4} {'movement':<10} {'IB tokens':>11} {'once per node':>14} "
          f"{'same round':>11} {'round after':>12} {'both':>6} {'busiest':>8} {'split':>6}")
    for name in args.lengths.split(","):
        for cp in (int(c) for c in args.cp.split(",")):
            (lens,) = pack_batches(load_distribution(name), cp * TOKENS_PER_RANK, 1, seed=0)
            for mask in ("causal", "full"):
                layout = np.arange(cp) // GPUS_PER_NODE if args.staging == "rings" else None
                plan = make_plan(lens, cp, TOKENS_PER_RANK, mask, cp_node=layout)
                for movement in PASSES:
                    s = relay_shares(plan, movement, staging=args.staging)
                    figures = ("" if not s["inter_node_tokens"] else
                               f" {s['once per node']:>14.2f} {s['same round']:>11.2f} {s['round after']:>12.2f} "
                               f"{s['both']:>6.2f} {s['busiest']:>8} {s['busiest, split'] / s['busiest']:>6.2f}")
                    print(f"{name:<13} {mask:<7} {cp:>4} {movement:<10} {s['inter_node_tokens']:>11}{figures}",
                          flush=True)


if __name__ == "__main__":
    main()
