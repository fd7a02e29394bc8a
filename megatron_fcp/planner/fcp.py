"""The FCP planner: block-level sharding with exact token counts and balanced attention work.

How it works (all integers, no device, no communication):

1. Every non-empty document is a *unit* ``[start, end)``. Its work is the exact number of query-key pairs its
   queries see plus a per-piece kernel overhead (``tile**2 / 4`` pairs, the cost of a partly filled tile), so
   tiny pieces are never free. Units are ordered by work density (work per token).
2. Ranks are filled one after another. Each rank's work target is the work still unplaced divided by the ranks
   still empty, so small deviations never accumulate. A rank takes units from both ends of the density order:
   from the dense end while it is short of work, from the sparse end while it is ahead, whole units first.
3. When no whole unit fits, the rank is closed exactly: it takes the densest key suffix of the dense unit and
   a prefix of the sparse unit, with the cut chosen by bisection so that tokens hit the rank's share exactly
   and work hits the target. A long, expensive document is thereby cut into as many contiguous blocks as
   balance needs (its last, most expensive tokens first, finer where they are denser), and short documents
   stay whole except for at most one cut per rank.
4. Key/value exchange follows from ownership: a rank receives exactly the keys its queries need that it does
   not own, once, from their owner (:func:`megatron_fcp.planner.plan.derive_kv`).

Every rank gets the same number of token slots; when the documents do not fill ``cp * tokens_per_rank`` the
rest is padding, spread as evenly as the count allows and reported.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from megatron_fcp.planner.pairs import check_mask
from megatron_fcp.planner.plan import Plan, derive_kv, merge_adjacent_q


@dataclass(frozen=True, kw_only=True)
class FcpOptions:
    """Knobs of the FCP planner."""

    tile: int = 128
    """Attention kernel tile (tokens). A piece's fixed overhead is ``tile**2 / 4`` pairs of work."""

    def __post_init__(self):
        if int(self.tile) != self.tile or self.tile < 1:
            raise ValueError(f"tile must be a positive integer, got {self.tile!r}")


_CLOSER_SCAN = 32
"""How many units above the wanted density the closing step considers (bounds planning time)."""


class _Pool:
    """Units ordered by density; consumed from both ends, cut where needed. Python scalars for speed."""

    def __init__(self, lens: np.ndarray, mask: str, overhead: float):
        docs = np.flatnonzero(lens > 0)
        n = lens[docs].astype(np.float64)
        pairs = n * (n + 1) / 2 if mask == "causal" else n * n
        order = np.argsort((pairs + overhead) / n, kind="stable")
        self.doc = docs[order].tolist()
        self.start = [0] * len(self.doc)
        self.end = lens[docs][order].tolist()
        self.doc_len = list(self.end)
        self.causal = mask == "causal"
        self.overhead = overhead
        self.lo, self.hi = 0, len(self.doc) - 1
        self.work = float(pairs.sum()) + overhead * len(self.doc)
        self.dens = ((pairs + overhead) / n)[order].tolist()
        self.cut: set[int] = set()  # units cut while filling the current rank, to be re-sorted

    def empty(self) -> bool:
        return self.lo > self.hi

    def size(self, u: int) -> int:
        return self.end[u] - self.start[u]

    def pairs(self, u: int, start: int, end: int) -> float:
        if self.causal:
            return (end * (end + 1) - start * (start + 1)) / 2
        return (end - start) * self.doc_len[u]

    def unit_work(self, u: int) -> float:
        return self.pairs(u, self.start[u], self.end[u]) + self.overhead

    def density(self, u: int) -> float:
        return self.unit_work(u) / self.size(u)

    def prefix_work(self, u: int, a: int) -> float:
        return self.pairs(u, self.start[u], self.start[u] + a) + (self.overhead if a else 0.0)

    def suffix_work(self, u: int, b: int) -> float:
        return self.pairs(u, self.end[u] - b, self.end[u]) + (self.overhead if b else 0.0)

    def take_prefix(self, u: int, a: int) -> tuple[int, int, int, float]:
        """Remove ``a`` tokens from the front of unit ``u``; return ``(doc, start, end, work)``."""
        s = self.start[u]
        work = self.prefix_work(u, a)
        self.start[u] = s + a
        self._account(u, work)
        return self.doc[u], s, s + a, work

    def take_suffix(self, u: int, b: int) -> tuple[int, int, int, float]:
        """Remove ``b`` tokens from the back of unit ``u``; return ``(doc, start, end, work)``."""
        e = self.end[u]
        work = self.suffix_work(u, b)
        self.end[u] = e - b
        self._account(u, work)
        return self.doc[u], e - b, e, work

    def _account(self, u: int, work: float) -> None:
        self.work -= work
        if self.start[u] < self.end[u]:
            self.work += self.overhead  # the remainder is a piece of its own
            self.cut.add(u)
        elif u == self.lo:
            self.lo += 1
        else:
            self.hi -= 1

    def walk(self, from_hi: bool, limit: int) -> tuple[list[int], list[int], list[float]]:
        """Units from one end until ``limit`` tokens: their indices, and tokens and work before each one."""
        idx, tokens, work = [], [0], [0.0]
        u, step = (self.hi, -1) if from_hi else (self.lo, 1)
        while tokens[-1] < limit and self.lo <= u <= self.hi:
            idx.append(u)
            tokens.append(tokens[-1] + self.size(u))
            work.append(work[-1] + self.unit_work(u))
            u += step
        return idx, tokens, work

    def settle(self) -> None:
        """Move the end units cut for the last rank to where their new density belongs (order stays sorted)."""
        cut = sorted((u for u in self.cut if self.lo <= u <= self.hi), reverse=True)
        self.cut = set()
        if self.hi <= self.lo:
            return
        for item in [self._pop(u) for u in cut]:
            pos = bisect.bisect_left(self.dens, item[-1], self.lo, self.hi + 1)
            for column, value in zip(self._columns(), item, strict=True):
                column.insert(pos, value)
            self.hi += 1

    def _columns(self) -> tuple[list, ...]:
        return self.doc, self.start, self.end, self.doc_len, self.dens

    def _pop(self, u: int) -> tuple:
        item = [column.pop(u) for column in self._columns()]
        self.hi -= 1
        item[-1] = self._density_of(item)
        return tuple(item)

    def _density_of(self, item: list) -> float:
        doc, start, end, doc_len, _ = item
        pairs = (end * (end + 1) - start * (start + 1)) / 2 if self.causal else (end - start) * doc_len
        return (pairs + self.overhead) / (end - start)


def plan_fcp(doc_lens, cp: int, tokens_per_rank: int, mask: str = "causal", options: FcpOptions | None = None) -> Plan:
    """Plan one micro-batch with FCP. ``doc_lens`` must hold at most ``cp * tokens_per_rank`` tokens."""
    options = options or FcpOptions()
    check_mask(mask)
    lens = np.asarray(doc_lens, dtype=np.int64)
    total = int(lens.sum())
    real_per_rank = np.full(cp, total // cp, np.int64)
    real_per_rank[: total % cp] += 1
    pool = _Pool(lens, mask, options.tile**2 / 4)
    rows: list[tuple[int, int, int, int]] = []
    for cp_rank in range(cp):
        target = pool.work / (cp - cp_rank)
        for doc, start, end, _ in _fill_rank(pool, int(real_per_rank[cp_rank]), target):
            rows.append((cp_rank, doc, start, end))
    q = merge_adjacent_q(np.asarray(rows, dtype=np.int64).reshape(-1, 4))
    return Plan(
        strategy="fcp",
        cp=cp,
        mask=mask,
        doc_lens=lens,
        q=q,
        kv=derive_kv(q, lens, cp, mask),
        num_pad_tokens=tokens_per_rank - real_per_rank,
        exchange="p2p",
        notes=(("tile", str(options.tile)),),
    )


def _fill_rank(pool: _Pool, num_tokens: int, target: float) -> list[tuple[int, int, int, float]]:
    """Take exactly ``num_tokens`` tokens: the densest ``b`` from the dense end and the rest from the sparse end.

    Moving one token of the rank's share from the sparse end to the dense end raises its work by the
    difference of the two boundary tokens' densities, so the work is (close to) increasing in ``b`` and a
    bisection finds the ``b`` whose work is closest to ``target``. Whole units are taken from both ends; only
    the two boundary units are cut.
    """
    dense, sparse = pool.walk(True, num_tokens), pool.walk(False, num_tokens)

    def work(b: int) -> float:
        return _side_work(pool, dense, b, True) + _side_work(pool, sparse, num_tokens - b, False)

    left, right = 0, num_tokens
    if work(right) <= target:
        left = right
    elif work(left) < target:
        while right - left > 1:  # invariant: work(left) < target <= work(right)
            mid = (left + right) // 2
            left, right = (mid, right) if work(mid) < target else (left, mid)
        left = left if target - work(left) <= work(right) - target else right
    pieces = _take_side(pool, dense, left, True) + _take_side(pool, sparse, num_tokens - left, False)
    pool.settle()
    return pieces


def _side_work(pool: _Pool, side, num_tokens: int, from_hi: bool) -> float:
    """Work of the first ``num_tokens`` tokens of a walked side (whole units, then a boundary piece)."""
    idx, tokens, work = side
    k = bisect.bisect_right(tokens, num_tokens) - 1
    rest = num_tokens - tokens[k]
    if not rest:
        return work[k]
    return work[k] + (pool.suffix_work(idx[k], rest) if from_hi else pool.prefix_work(idx[k], rest))


def _take_side(pool: _Pool, side, num_tokens: int, from_hi: bool) -> list[tuple[int, int, int, float]]:
    """Take the first ``num_tokens`` tokens of a walked side out of the pool."""
    idx, tokens, _ = side
    take = pool.take_suffix if from_hi else pool.take_prefix
    pieces = []
    for k, u in enumerate(idx):
        n = min(tokens[k + 1], num_tokens) - tokens[k]
        if n <= 0:
            break
        pieces.append(take(u, n))
    return pieces
