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
- ``both``: either of the two.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from megatron_fcp.data.lengths import SHIPPED, load_distribution, pack_batches
from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.columns import Piece
from megatron_fcp.planner.stages import resolve_kv_budget, split_stages

GPUS_PER_NODE = 8
TOKENS_PER_RANK = 16384


PASSES = ("forward", "refetch", "gradients")
"""The staged exchange's three movements: forward stages (round = stage), the stages fetched again in backward
and the key/value gradients sent back (backward round = stages - 1 - stage; refetch: all but the kept stage)."""


def relay_shares(plan, movement: str = "forward", gpus_per_node: int = GPUS_PER_NODE, budget="auto"
                 ) -> dict[str, float]:
    """Inter-node tokens of one movement of ``plan`` (:data:`PASSES`) and the share left on InfiniBand under each
    scheme (module doc; for gradients the same rounds decide where node-mates' gradients can be summed first)."""
    p = plan.pieces
    budget = resolve_kv_budget(budget, int(plan.num_tokens.max(initial=1)))
    index, offset, length, stage, num_stages = split_stages(p[:, Piece.POS], p[:, Piece.END] - p[:, Piece.START],
                                                            p[:, Piece.TOTAL], budget)
    dst, src, doc = p[index, Piece.DST], p[index, Piece.SRC], p[index, Piece.DOC]
    inter = dst // gpus_per_node != src // gpus_per_node
    if movement != "forward":
        stage = num_stages - 1 - stage  # the backward round
        inter &= (stage > 0) if movement == "refetch" else True
    start, length, stage = (p[index, Piece.START] + offset)[inter], length[inter], stage[inter]
    node_doc = (dst[inter] // gpus_per_node) * plan.doc_lens.shape[0] + doc[inter]
    total = int(length.sum())
    if not total:
        return {"inter_node_tokens": 0}
    # one entry per (node, doc, token) copy: its key and round
    token = np.repeat(start - np.cumsum(length) + length, length) + np.arange(total)
    key = np.repeat(node_doc, length) * int(plan.doc_lens.max()) + token
    rnd = np.repeat(stage, length)
    order = np.lexsort((rnd, key))
    key, rnd = key[order], rnd[order]
    new_key = np.concatenate([[True], key[1:] != key[:-1]])
    new_pair = new_key | np.concatenate([[True], rnd[1:] != rnd[:-1]])
    pair_key, pair_rnd = key[new_pair], rnd[new_pair]
    pair_count = np.diff(np.append(np.flatnonzero(new_pair), total))
    # the (node, doc, token) copy one round earlier (gradients: later) exists: pairs are sorted by key then round
    if movement == "gradients":
        after = np.concatenate([(pair_key[:-1] == pair_key[1:]) & (pair_rnd[:-1] + 1 == pair_rnd[1:]), [False]])
    else:
        after = np.concatenate([[False], (pair_key[1:] == pair_key[:-1]) & (pair_rnd[1:] == pair_rnd[:-1] + 1)])
    return {"inter_node_tokens": total, "once per node": int(new_key.sum()) / total,
            "same round": int(new_pair.sum()) / total,
            "round after": int(pair_count[~after].sum()) / total, "both": int((~after).sum()) / total}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cp", default="64,128,256")
    parser.add_argument("--lengths", default=",".join(SHIPPED))
    args = parser.parse_args(argv)
    print(f"Share of inter-node key/value tokens left on InfiniBand; {GPUS_PER_NODE} GPUs per node, "
          f"{TOKENS_PER_RANK} tokens per rank, budget auto, one batch")
    print(f"command: python scripts/node_relay_potential.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"{'mix':<13} {'mask':<7} {'cp':>4} {'movement':<10} {'IB tokens':>11} {'once per node':>14} "
          f"{'same round':>11} {'round after':>12} {'both':>6}")
    for name in args.lengths.split(","):
        for cp in (int(c) for c in args.cp.split(",")):
            (lens,) = pack_batches(load_distribution(name), cp * TOKENS_PER_RANK, 1, seed=0)
            for mask in ("causal", "full"):
                plan = make_plan(lens, cp, TOKENS_PER_RANK, mask)
                for movement in PASSES:
                    s = relay_shares(plan, movement)
                    figures = ("" if not s["inter_node_tokens"] else
                               f" {s['once per node']:>14.2f} {s['same round']:>11.2f} {s['round after']:>12.2f} "
                               f"{s['both']:>6.2f}")
                    print(f"{name:<13} {mask:<7} {cp:>4} {movement:<10} {s['inter_node_tokens']:>11}{figures}",
                          flush=True)


if __name__ == "__main__":
    main()
