"""A brute-force, token-by-token checker of plan soundness: the oracle the planner's tests hold plans to.

It deliberately shares no code with :mod:`megatron_fcp.planner.checks` (the vectorised checker ``fcp plan
--check`` runs): it expands every plan into per-token owner arrays and per-rank needed/received key sets and
compares them token by token. It loops per document, so keep it to batches of a few thousand documents.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from megatron_fcp.planner.plan import Plan


def brute_force_problems(plan: Plan, doc_lens, cp: int, tokens_per_rank: int, mask: str) -> list[str]:
    """Every broken soundness rule of ``plan`` for the batch it was made from, found token by token.

    Rules: the plan describes the batch (lengths, ``cp``, mask); every token of every document is owned by
    exactly one rank; every rank has the same number of token slots, at least ``tokens_per_rank``, and no
    negative padding. For plans with explicit key/value rows (every exchange but ``ring``) also: every key a
    rank needs (causal: keys ``[0, e)`` of the document for a query range ending at ``e``; full, and every
    group-ring plan: the whole document) is owned by the rank or received exactly once; a rank receives only
    documents it computes, nothing twice, needlessly, from itself, or from a rank that does not own it.
    """
    doc_lens = [int(n) for n in doc_lens]
    problems = []
    if plan.doc_lens.tolist() != doc_lens or plan.cp != cp or plan.mask != mask:
        problems.append("the plan does not describe the batch it was made from")
    owner, real_tokens = _owner_arrays(plan.q, doc_lens, cp, problems)
    slots = real_tokens + np.asarray(plan.num_pad_tokens)
    if np.any(np.asarray(plan.num_pad_tokens) < 0):
        problems.append(f"negative padding {plan.num_pad_tokens.tolist()}")
    if slots.min() != slots.max() or slots.min() < tokens_per_rank:
        problems.append(f"token slots per rank {slots.tolist()} are unequal or below {tokens_per_rank}")
    if plan.exchange != "ring" and not problems:
        need_mask = mask if plan.exchange == "p2p" else "full"
        problems += _delivery_problems(plan, doc_lens, owner, need_mask)
    return problems


def _owner_arrays(q: np.ndarray, doc_lens: list[int], cp: int, problems: list[str]):
    """Per-document owner rank of every token (-1: none) and real tokens per rank; appends ownership problems."""
    owner = [np.full(n, -1, np.int64) for n in doc_lens]
    times_owned = [np.zeros(n, np.int64) for n in doc_lens]
    real_tokens = np.zeros(cp, np.int64)
    for rank, doc, start, end in q.tolist():
        if not (0 <= rank < cp and 0 <= doc < len(doc_lens) and 0 <= start < end <= doc_lens[doc]):
            problems.append(f"q row {(rank, doc, start, end)} is empty or outside the batch")
            continue
        owner[doc][start:end] = rank
        times_owned[doc][start:end] += 1
        real_tokens[rank] += end - start
    for doc, counts in enumerate(times_owned):
        if np.any(counts != 1):
            token = int(np.flatnonzero(counts != 1)[0])
            problems.append(f"doc {doc} token {token} is owned by {int(counts[token])} ranks")
    return owner, real_tokens


def _delivery_problems(plan: Plan, doc_lens: list[int], owner: list[np.ndarray], need_mask: str) -> list[str]:
    """Compare, per (rank, doc), the keys needed with the keys owned plus received (see brute_force_problems)."""
    problems = []
    need_end: dict[tuple[int, int], int] = defaultdict(int)
    for rank, doc, _, end in plan.q.tolist():
        need_end[rank, doc] = max(need_end[rank, doc], end if need_mask == "causal" else doc_lens[doc])
    received: dict[tuple[int, int], np.ndarray] = {}
    for rank, src, doc, start, end in plan.kv.tolist():
        if not (0 <= rank < plan.cp and 0 <= doc < len(doc_lens) and 0 <= start < end <= doc_lens[doc]):
            problems.append(f"kv row {(rank, src, doc, start, end)} is empty or outside the batch")
            continue
        if src == rank:
            problems.append(f"rank {rank} receives doc {doc} [{start}, {end}) from itself")
        if np.any(owner[doc][start:end] != src):
            problems.append(f"rank {rank} receives doc {doc} [{start}, {end}) from rank {src}, which does not own it")
        if (rank, doc) not in need_end:
            problems.append(f"rank {rank} receives doc {doc} [{start}, {end}), which it does not compute")
        received.setdefault((rank, doc), np.zeros(doc_lens[doc], np.int64))[start:end] += 1
    for rank, doc in sorted(set(need_end) | set(received)):
        needed = np.arange(doc_lens[doc]) < need_end.get((rank, doc), 0)
        got = received.get((rank, doc), np.zeros(doc_lens[doc], np.int64))
        owned = owner[doc] == rank
        for what, bad in (
            ("received twice", got > 1),
            ("received needlessly", (got > 0) & ~needed),
            ("received although owned", (got > 0) & owned),
            ("needed but neither owned nor received", needed & ~owned & (got == 0)),
        ):
            if np.any(bad):
                problems.append(f"rank {rank} doc {doc}: token {int(np.flatnonzero(bad)[0])} {what}")
    return problems
