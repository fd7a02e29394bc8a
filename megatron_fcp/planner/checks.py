"""Independent checks that a plan is sound; used by tests, ``fcp plan --check`` and debug runs.

A sound plan: every token of every document is owned by exactly one rank; every rank has the same number of
token slots, no more than requested (``tokens_per_rank``, where the plan records it); for point-to-point plans
each rank's owned plus received key/values tile exactly the keys its queries need (so every need is met, nothing
arrives twice and nothing arrives needlessly), and every received range is owned by the rank it comes from.
"""

from __future__ import annotations

import numpy as np

from megatron_fcp.planner.columns import KV, Q
from megatron_fcp.planner.pairs import needed_kv_end
from megatron_fcp.planner.plan import Plan


class PlanError(AssertionError):
    """A plan breaks one of the invariants above."""


def plan_problems(plan: Plan, tokens_per_rank: int | None = None) -> list[str]:
    """Every broken invariant of ``plan``, as sentences; empty when the plan is sound.

    ``tokens_per_rank`` (default: the plan's own ``tokens_per_rank``, which :func:`~megatron_fcp.planner.api.
    make_plan` records) is the request: a rank whose token slots exceed it is a problem.
    """
    problems = _ownership_problems(plan) + _token_problems(plan)
    if not problems and plan.exchange != "ring":
        need_mask = plan.mask if plan.exchange == "p2p" else "full"
        problems += _source_problems(plan) + _delivery_problems(plan, need_mask)
    problems += request_problems(plan, tokens_per_rank)  # after the others: it does not hide them
    return problems


def assert_plan_ok(plan: Plan, check_request: bool = True) -> None:
    """Raise :class:`PlanError` listing every broken invariant; ``check_request=False`` leaves out the request
    (for the ring and hybrid baselines, which pad documents to their chunk or group sizes and may hold more token
    slots than requested by design)."""
    problems = plan_problems(plan)
    if not check_request:
        over = set(request_problems(plan))
        problems = [p for p in problems if p not in over]
    if problems:
        raise PlanError(f"{plan!r} is unsound:\n  " + "\n  ".join(problems[:20]))


def _ownership_problems(plan: Plan) -> list[str]:
    q, lens = plan.q, plan.doc_lens
    rank, doc, start, end = q.T
    problems = []
    if q.shape[0] and (rank.min() < 0 or rank.max() >= plan.cp):
        problems.append("a q range names a rank outside [0, cp)")
    if q.shape[0] and (doc.min() < 0 or doc.max() >= lens.shape[0]):
        return problems + ["a q range names a document that does not exist"]
    if np.any(start >= end) or np.any(start < 0) or np.any(end > lens[doc]):
        problems.append("a q range is empty or lies outside its document")
    order = np.lexsort((start, doc))
    doc, start, end = doc[order], start[order], end[order]  # by document and start
    covered = np.bincount(doc, weights=end - start, minlength=lens.shape[0])
    if not np.array_equal(covered.astype(np.int64), lens):
        bad = int(np.flatnonzero(covered.astype(np.int64) != lens)[0])
        problems.append(f"document {bad} has {int(covered[bad])} owned tokens but length {int(lens[bad])}")
    same_doc = doc[1:] == doc[:-1]
    if np.any(same_doc & (start[1:] != end[:-1])):
        problems.append("q ranges of one document overlap or leave a gap")
    is_doc_first = np.concatenate([[True], ~same_doc]) if doc.shape[0] else np.zeros(0, bool)
    if np.any(start[is_doc_first] != 0):
        problems.append("a document's first q range does not start at 0")
    return problems


def _token_problems(plan: Plan) -> list[str]:
    if np.any(plan.num_pad_tokens < 0):
        return ["negative padding"]
    tokens = plan.num_tokens
    if tokens.shape[0] and tokens.min() != tokens.max():
        return [f"token slots differ across ranks: min {int(tokens.min())}, max {int(tokens.max())}"]
    return []


def request_problems(plan: Plan, tokens_per_rank: int | None = None) -> list[str]:
    """The one problem of a plan whose ranks hold more token slots than ``tokens_per_rank`` (default: the plan's
    ``tokens_per_rank``; nothing to check when neither is known), with the figures; empty otherwise. Baselines
    can do this (a ring pads documents to ``2 * cp`` chunks, a hybrid group or a whole document may not fit).
    """
    if tokens_per_rank is None:
        tokens_per_rank = plan.tokens_per_rank
    tokens = plan.num_tokens
    if tokens_per_rank is None or not tokens.shape[0] or int(tokens.max()) <= tokens_per_rank:
        return []
    real = plan.num_real_tokens
    rank = int(np.argmax(real))
    return [f"rank {rank} holds {int(real[rank])} tokens ({int(tokens.max())} slots with padding), above "
            f"tokens_per_rank={tokens_per_rank} ({int(tokens.max()) / tokens_per_rank:.1f}x): the {plan.strategy} "
            "plan does not fit the requested memory"]


def _source_problems(plan: Plan) -> list[str]:
    kv, q = plan.kv, plan.q
    if kv.shape[0] == 0:
        return []
    dst, src, doc, start, end = kv.T
    if np.any(dst == src):
        return ["a rank receives key/values from itself"]
    if np.any(start >= end):
        return ["an empty or inverted kv range"]
    owners = q[np.lexsort((q[:, Q.START], q[:, Q.DOC]))]
    owner_rank, owner_doc = owners[:, Q.CP_RANK], owners[:, Q.DOC]
    key = owner_doc * (1 << 40) + owners[:, Q.START]
    first_row = np.searchsorted(key, doc * (1 << 40) + start, side="right") - 1  # holds the kv start
    last_row = np.searchsorted(key, doc * (1 << 40) + end - 1, side="right") - 1  # holds its last token
    # per owner row: index of its run of rows with the same (rank, doc)
    run = np.concatenate([[0], np.cumsum((owner_rank[1:] != owner_rank[:-1]) | (owner_doc[1:] != owner_doc[:-1]))])
    ok = ((first_row >= 0) & (owner_doc[first_row] == doc) & (owner_rank[first_row] == src)
          & (run[last_row] == run[first_row]))
    ok &= owners[last_row, Q.END] >= end
    if not np.all(ok):
        bad = kv[int(np.flatnonzero(~ok)[0])].tolist()
        return [f"kv row {bad} (rank, src, doc, start, end) is not owned by its source"]
    return []


def _delivery_problems(plan: Plan, need_mask: str) -> list[str]:
    q, kv, lens = plan.q, plan.kv, plan.doc_lens
    got = kv[:, [KV.CP_RANK, KV.DOC, KV.START, KV.END]]  # as q rows of the receiver
    rows = np.concatenate([q, got])
    if rows.shape[0] == 0:
        return []
    rows = rows[np.lexsort((rows[:, Q.START], rows[:, Q.DOC], rows[:, Q.CP_RANK]))]
    rank, doc, start, end = rows.T
    same = (rank[1:] == rank[:-1]) & (doc[1:] == doc[:-1])
    if np.any(same & (start[1:] != end[:-1])):
        bad = int(np.flatnonzero(same & (start[1:] != end[:-1]))[0])
        return [f"rank {int(rank[bad])} doc {int(doc[bad])}: owned+received ranges overlap or leave a gap "
                f"at token {int(end[bad])} (something is missing, received twice or received needlessly)"]
    is_first = np.concatenate([[True], ~same])
    is_last = np.concatenate([~same, [True]])
    if np.any(start[is_first] != 0):
        return ["a rank's owned+received keys of a document do not start at token 0"]
    need = _need_end_per_rank_doc(q, lens, need_mask)
    ends = {(int(r), int(d)): int(e) for r, d, e in zip(rank[is_last], doc[is_last], end[is_last], strict=True)}
    for (at_rank, at_doc), have_end in ends.items():
        if need.get((at_rank, at_doc)) != have_end:
            what = "receives keys of a document it does not compute" if (at_rank, at_doc) not in need else (
                f"has keys up to {have_end} but needs up to {need[(at_rank, at_doc)]}")
            return [f"rank {at_rank} doc {at_doc}: {what}"]

    return []


def _need_end_per_rank_doc(q: np.ndarray, lens: np.ndarray, mask: str) -> dict[tuple[int, int], int]:
    need = needed_kv_end(q[:, Q.END], lens[q[:, Q.DOC]], mask)
    out: dict[tuple[int, int], int] = {}
    for rank, doc, end in zip(q[:, Q.CP_RANK].tolist(), q[:, Q.DOC].tolist(), need.tolist(), strict=True):

        out[(rank, doc)] = max(out.get((rank, doc), 0), end)
    return out
