"""Independent checks that a plan is sound; used by tests, ``fcp plan --check`` and debug runs.

A sound plan: every token of every document is owned by exactly one rank; every rank has the same number of
token slots; for point-to-point plans each rank's owned plus received key/values tile exactly the keys its
queries need (so every need is met, nothing arrives twice and nothing arrives needlessly), and every received
range is owned by the rank it comes from.
"""

from __future__ import annotations

import numpy as np

from megatron_fcp.planner.pairs import needed_kv_end
from megatron_fcp.planner.plan import Plan


class PlanError(AssertionError):
    """A plan breaks one of the invariants above."""


def plan_problems(plan: Plan) -> list[str]:
    """Every broken invariant of ``plan``, as sentences; empty when the plan is sound."""
    problems = _ownership_problems(plan) + _token_problems(plan)
    if not problems and plan.exchange != "ring":
        need_mask = plan.mask if plan.exchange == "p2p" else "full"
        problems += _source_problems(plan) + _delivery_problems(plan, need_mask)
    return problems


def assert_plan_ok(plan: Plan) -> None:
    """Raise :class:`PlanError` listing every broken invariant."""
    problems = plan_problems(plan)
    if problems:
        raise PlanError(f"{plan!r} is unsound:\n  " + "\n  ".join(problems[:20]))


def _ownership_problems(plan: Plan) -> list[str]:
    q, lens = plan.q, plan.doc_lens
    problems = []
    if q.shape[0] and (q[:, 0].min() < 0 or q[:, 0].max() >= plan.cp):
        problems.append("a q range names a rank outside [0, cp)")
    if q.shape[0] and (q[:, 1].min() < 0 or q[:, 1].max() >= lens.shape[0]):
        return problems + ["a q range names a document that does not exist"]
    if np.any(q[:, 2] >= q[:, 3]) or np.any(q[:, 2] < 0) or np.any(q[:, 3] > lens[q[:, 1]]):
        problems.append("a q range is empty or lies outside its document")
    order = np.lexsort((q[:, 2], q[:, 1]))
    s = q[order]
    covered = np.bincount(s[:, 1], weights=s[:, 3] - s[:, 2], minlength=lens.shape[0])
    if not np.array_equal(covered.astype(np.int64), lens):
        bad = int(np.flatnonzero(covered.astype(np.int64) != lens)[0])
        problems.append(f"document {bad} has {int(covered[bad])} owned tokens but length {int(lens[bad])}")
    same_doc = s[1:, 1] == s[:-1, 1]
    if np.any(same_doc & (s[1:, 2] != s[:-1, 3])):
        problems.append("q ranges of one document overlap or leave a gap")
    first = np.concatenate([[True], ~same_doc]) if s.shape[0] else np.zeros(0, bool)
    if np.any(s[first, 2] != 0):
        problems.append("a document's first q range does not start at 0")
    return problems


def _token_problems(plan: Plan) -> list[str]:
    if np.any(plan.num_pad_tokens < 0):
        return ["negative padding"]
    tokens = plan.num_tokens
    if tokens.shape[0] and tokens.min() != tokens.max():
        return [f"token slots differ across ranks: min {int(tokens.min())}, max {int(tokens.max())}"]
    return []


def _source_problems(plan: Plan) -> list[str]:
    kv, q = plan.kv, plan.q
    if kv.shape[0] == 0:
        return []
    if np.any(kv[:, 0] == kv[:, 1]):
        return ["a rank receives key/values from itself"]
    if np.any(kv[:, 3] >= kv[:, 4]):
        return ["an empty or inverted kv range"]
    owners = q[np.lexsort((q[:, 2], q[:, 1]))]
    key = owners[:, 1] * (1 << 40) + owners[:, 2]
    lo = np.searchsorted(key, kv[:, 2] * (1 << 40) + kv[:, 3], side="right") - 1
    hi = np.searchsorted(key, kv[:, 2] * (1 << 40) + kv[:, 4] - 1, side="right") - 1
    change = np.concatenate([[0], np.cumsum((owners[1:, 0] != owners[:-1, 0]) | (owners[1:, 1] != owners[:-1, 1]))])
    ok = (lo >= 0) & (owners[lo, 1] == kv[:, 2]) & (owners[lo, 0] == kv[:, 1]) & (change[hi] == change[lo])
    ok &= owners[hi, 3] >= kv[:, 4]
    if not np.all(ok):
        bad = kv[int(np.flatnonzero(~ok)[0])].tolist()
        return [f"kv row {bad} (rank, src, doc, start, end) is not owned by its source"]
    return []


def _delivery_problems(plan: Plan, need_mask: str) -> list[str]:
    q, kv, lens = plan.q, plan.kv, plan.doc_lens
    own = np.column_stack([q[:, 0], q[:, 1], q[:, 2], q[:, 3]])
    got = np.column_stack([kv[:, 0], kv[:, 2], kv[:, 3], kv[:, 4]])
    rows = np.concatenate([own, got])
    if rows.shape[0] == 0:
        return []
    rows = rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))]
    same = (rows[1:, 0] == rows[:-1, 0]) & (rows[1:, 1] == rows[:-1, 1])
    if np.any(same & (rows[1:, 2] != rows[:-1, 3])):
        i = int(np.flatnonzero(same & (rows[1:, 2] != rows[:-1, 3]))[0])
        return [f"rank {int(rows[i, 0])} doc {int(rows[i, 1])}: owned+received ranges overlap or leave a gap "
                f"at token {int(rows[i, 3])} (something is missing, received twice or received needlessly)"]
    first = np.concatenate([[True], ~same])
    last = np.concatenate([~same, [True]])
    if np.any(rows[first, 2] != 0):
        return ["a rank's owned+received keys of a document do not start at token 0"]
    need = _need_end_per_rank_doc(q, lens, need_mask)
    ends = {(int(r), int(d)): int(e) for r, d, e in zip(rows[last, 0], rows[last, 1], rows[last, 3], strict=True)}
    for (r, d), e in ends.items():
        if need.get((r, d)) != e:
            what = "receives keys of a document it does not compute" if (r, d) not in need else (
                f"has keys up to {e} but needs up to {need[(r, d)]}")
            return [f"rank {r} doc {d}: {what}"]
    return []


def _need_end_per_rank_doc(q: np.ndarray, lens: np.ndarray, mask: str) -> dict[tuple[int, int], int]:
    need = needed_kv_end(q[:, 3], lens[q[:, 1]], mask)
    out: dict[tuple[int, int], int] = {}
    for r, d, e in zip(q[:, 0].tolist(), q[:, 1].tolist(), need.tolist(), strict=True):
        out[(r, d)] = max(out.get((r, d), 0), e)
    return out
