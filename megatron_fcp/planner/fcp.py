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
        self.cut: set[int] = set()  # units cut in the current step, to be re-sorted
        self.gone: set[int] = set()  # inner units used up in the current step, to be removed

    def start_rank(self, num_tokens: int, target: float) -> None:
        """Record the share of the rank being filled (used to tell units that cannot stay whole)."""
        self.rank_tokens, self.rank_target = num_tokens, target

    def must_split(self, u: int) -> bool:
        """True if unit ``u`` is larger than a whole rank's token share or work target."""
        return self.size(u) > self.rank_tokens or self.unit_work(u) > self.rank_target

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
        elif u == self.hi:
            self.hi -= 1
        else:
            self.gone.add(u)

    def settle(self) -> None:
        """Move units cut in the last step to where their new density belongs, keeping the order sorted."""
        cut, self.cut = sorted(self.cut | self.gone, reverse=True), set()
        gone, self.gone = self.gone, set()
        if self.hi <= self.lo and not gone:
            return
        moved = [item for item in (self._pop(u) for u in cut) if item[2] > item[1]]
        for item in moved:
            dens = item[-1]
            pos = bisect.bisect_left(self.dens, dens, self.lo, self.hi + 1)
            for column, value in zip(self._columns(), item, strict=True):
                column.insert(pos, value)
            self.hi += 1

    def _columns(self) -> tuple[list, ...]:
        return self.doc, self.start, self.end, self.doc_len, self.dens

    def _pop(self, u: int) -> tuple:
        item = [column.pop(u) for column in self._columns()]
        self.hi -= 1
        if item[2] > item[1]:
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
        pool.start_rank(int(real_per_rank[cp_rank]), target)
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
    """Take exactly ``num_tokens`` tokens from the pool with work as close to ``target`` as the units allow."""
    taken = []
    room, need = num_tokens, target
    while room > 0:
        assert not pool.empty(), "pool ran out of tokens before every rank was filled"
        pieces = _next_pieces(pool, room, need)
        pool.settle()
        for piece in pieces:
            room -= piece[2] - piece[1]
            need -= piece[3]
        taken.extend(pieces)
    return taken


def _next_pieces(pool: _Pool, room: int, need: float) -> list[tuple[int, int, int, float]]:
    """One step of the fill: whole units while they keep the target reachable, else the exact closing cut."""
    lo, hi = pool.lo, pool.hi
    if lo == hi:
        return _close_from_one_unit(pool, lo, room, need)
    wanted = need / room
    d_lo, d_hi = pool.density(lo), pool.density(hi)
    n_lo, n_hi = pool.size(lo), pool.size(hi)
    fits_hi, fits_lo = n_hi <= room, n_lo <= room
    if fits_hi and (d_hi <= wanted or need - pool.unit_work(hi) >= (room - n_hi) * d_lo):
        return [pool.take_suffix(hi, n_hi)]
    if fits_lo and (d_lo >= wanted or need - pool.unit_work(lo) <= (room - n_lo) * d_hi):
        return [pool.take_prefix(lo, n_lo)]
    b_min, b_max = max(0, room - n_lo), min(n_hi, room)
    if b_min > b_max or (fits_lo and _mix_work(pool, lo, hi, room, b_min) > need):
        return [pool.take_prefix(lo, n_lo)]  # even the sparsest close overshoots: more sparse units first
    if fits_hi and _mix_work(pool, lo, hi, room, b_max) < need:
        return [pool.take_suffix(hi, n_hi)]  # even the densest close falls short: more dense units first
    closer = hi if pool.must_split(hi) else _cheapest_closer(pool, lo, room, need, wanted)
    b = _solve_split(pool, lo, closer, room, need, b_min, min(pool.size(closer), room))
    pieces = []
    if b:
        pieces.append(pool.take_suffix(closer, b))
    if room - b:
        pieces.append(pool.take_prefix(lo, room - b))
    return pieces


def _cheapest_closer(pool: _Pool, lo: int, room: int, need: float, wanted: float) -> int:
    """The least dense unit that can close the rank together with a prefix of ``lo``.

    Cutting a unit makes its new holder fetch the keys before the cut (causal) or the whole document (full),
    so closing with the least dense unit that still reaches the target costs the least communication. Falls
    back to the densest unit.
    """
    first = bisect.bisect_right(pool.dens, wanted, lo + 1, pool.hi)
    b_min = max(0, room - pool.size(lo))
    for u in range(first, min(first + _CLOSER_SCAN, pool.hi)):
        b_max = min(pool.size(u), room)
        if b_min <= b_max and _mix_work(pool, lo, u, room, b_max) >= need >= _mix_work(pool, lo, u, room, b_min):
            return u
    return pool.hi


def _close_from_one_unit(pool: _Pool, u: int, room: int, need: float) -> list[tuple[int, int, int, float]]:
    """Last unit standing: close the rank with a dense suffix and a sparse prefix of the same unit (zigzag)."""
    if room >= pool.size(u):
        return [pool.take_prefix(u, pool.size(u))]
    b = _solve_split(pool, u, u, room, need, 0, room)
    pieces = [pool.take_suffix(u, b)] if b else []
    return pieces + ([pool.take_prefix(u, room - b)] if room - b else [])


def _mix_work(pool: _Pool, lo: int, hi: int, room: int, b: int) -> float:
    return pool.suffix_work(hi, b) + pool.prefix_work(lo, room - b)


def _solve_split(pool: _Pool, lo: int, hi: int, room: int, need: float, b_min: int, b_max: int) -> int:
    """``b`` in ``[b_min, b_max]`` whose suffix(hi, b) + prefix(lo, room - b) work is closest to ``need``.

    Moving one token from the sparse prefix to the dense suffix changes the work by a constant (causal:
    ``end_hi - start_lo - room``; full: ``len_hi - len_lo``), so the work is linear in ``b`` up to the
    per-piece overhead at the ends, and the best ``b`` is a rounding of the linear solution.
    """

    def miss(b: int) -> float:
        return abs(_mix_work(pool, lo, hi, room, b) - need)

    inner_lo, inner_hi = min(b_min + 1, b_max), max(b_max - 1, b_min)
    w_lo, w_hi = _mix_work(pool, lo, hi, room, inner_lo), _mix_work(pool, lo, hi, room, inner_hi)
    candidates = {b_min, b_max, inner_lo, inner_hi}
    if inner_hi > inner_lo and w_hi != w_lo:
        guess = inner_lo + (need - w_lo) * (inner_hi - inner_lo) / (w_hi - w_lo)
        base = int(min(max(guess, b_min), b_max))
        candidates.update(b for b in (base - 1, base, base + 1) if b_min <= b <= b_max)
    return min(sorted(candidates), key=miss)
