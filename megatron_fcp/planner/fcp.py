"""The FCP planner: block-level sharding with exact token counts and balanced attention work.

How it works (all integers, no device, no communication):

1. Every non-empty document is a *unit*: a token range with a work, the exact number of query-key pairs its
   queries see plus a share (``edge_weight``) of the kernel's edge work (``tile**2 / 4`` pairs for a partly
   filled tile and half a tile row along the keys, as in :mod:`megatron_fcp.sim.model`), so tiny pieces are
   never free. Units are ordered by work density (work per token).
2. A causal document that costs more than one rank's share of work, or holds more tokens than a rank, will be
   spread over several ranks. It becomes a *zigzag unit*: every take removes tokens from both of its ends at
   once, so each rank holding part of it owns an early block and a late block (the zigzag pairing of ring CP,
   but with block sizes chosen by balance). Its density stays constant as it is consumed, and the early
   key/values that every later block needs are owned by many ranks, so no single rank has to send them to all
   the others.
3. Ranks are filled one after another. A rank's work target is the work still unplaced divided by the ranks
   still empty (plus the edge work that cuts have been adding per rank), so deviations never accumulate. The
   rank takes the ``b`` densest tokens from the dense end of the order and the rest of its token share from
   the sparse end, whole units first, cutting only the two boundary units; ``b`` is found by bisection so that
   the work hits the target. Short documents therefore stay whole but for at most two cuts per rank. A
   full-mask document too expensive for one rank is first cut into the fewest equal pieces that fit.
4. Before the fill, documents of at most ``small_tokens`` tokens are dealt evenly over the ranks, so each
   rank carries the same share of the overhead of small kernels; and a rank does not take parts of two
   documents that span ranks where a window of middle-density units can make up its work instead.
5. Key/value exchange follows from ownership: a rank receives exactly the keys its queries need that it does
   not own, once, from their owner (:func:`megatron_fcp.planner.plan.derive_kv`).

Every rank gets the same number of token slots; when the documents do not fill ``cp * tokens_per_rank`` the
rest is padding, spread as evenly as the count allows and reported.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass

import numpy as np

from megatron_fcp.planner.pairs import arange_within, check_mask, needed_kv_end, q_pairs
from megatron_fcp.planner.plan import Plan, derive_kv, merge_adjacent_q

Piece = tuple[int, int, int, float]
"""``(doc, start, end, work)``: a token range taken by a rank, and its work."""


@dataclass(frozen=True, kw_only=True)
class FcpOptions:
    """Knobs of the FCP planner."""

    tile_size: int = 128
    """Attention kernel tile (tokens) that a piece's edge work is modeled with (see module docstring). It does
    not set where the planner cuts: pieces start and end at any token."""
    edge_weight: float = 0.5
    """Share of the kernel edge work counted. 1 balances modeled kernel time alone, 0 exact pairs alone; both
    are reported, and 0.5 keeps the worse of the two lowest on the shipped distributions."""
    small_tokens: int = 512
    """Documents of at most this many tokens are dealt evenly over the ranks before the fill (0: never)."""
    zigzag: bool = True
    """Split causal documents that need several ranks zigzag (early and late blocks together)."""

    def __post_init__(self):
        if int(self.tile_size) != self.tile_size or self.tile_size < 1:
            raise ValueError(f"tile_size must be a positive integer, got {self.tile_size!r}")
        if not 0.0 <= self.edge_weight <= 1.0:
            raise ValueError(f"edge_weight must lie in [0, 1], got {self.edge_weight!r}")
        if int(self.small_tokens) != self.small_tokens or self.small_tokens < 0:
            raise ValueError(f"small_tokens must be an integer >= 0, got {self.small_tokens!r}")


class _Pool:
    """Units ordered by density, consumed from both ends of the order; Python scalars for speed.

    A plain unit is taken from its front (sparse end of the order) or its back (dense end). A zigzag unit is
    taken from both of its ends at once, whichever end of the order takes it.
    """

    def __init__(self, lens: np.ndarray, units: np.ndarray, mask: str, tile: int, edge_weight: float):
        doc, start, end, zig = units.T
        self.overhead, self.edge = edge_weight * tile * tile / 4, edge_weight * tile / 2
        work = q_pairs(start, end, lens[doc], mask) + self.overhead + self.edge * needed_kv_end(end, lens[doc], mask)
        dens = work / (end - start)
        order = np.argsort(dens, kind="stable")
        self.doc = doc[order].tolist()
        self.start = start[order].tolist()
        self.end = end[order].tolist()
        self.doc_len = lens[doc][order].tolist()
        self.zig = zig[order].astype(bool).tolist()
        self.dens = dens[order].tolist()
        self.causal = mask == "causal"
        self.lo, self.hi = 0, len(self.doc) - 1
        self.work = float(work.sum())
        self.cut: set[int] = set()  # units cut while filling the current rank, to be re-sorted
        split = np.bincount(doc, minlength=lens.shape[0]) > 1
        self.spread = set(np.flatnonzero(split).tolist()) | set(doc[zig == 1].tolist())
        """Documents too large or expensive for one rank (cut into pieces up front, or zigzag units)."""

    def size(self, u: int) -> int:
        return self.end[u] - self.start[u]

    def _work(self, u: int, start: int, end: int) -> float:
        """Pairs of a piece plus its kernel edges: a partly filled tile and half a tile row along its keys
        (this runs tens of thousands of times per plan, so the pair count is written out)."""
        if end <= start:
            return 0.0
        if self.causal:
            return (end * (end + 1) - start * (start + 1)) / 2 + self.overhead + self.edge * end
        keys = self.doc_len[u]
        return (end - start) * keys + self.overhead + self.edge * keys

    def unit_work(self, u: int) -> float:
        return self._work(u, self.start[u], self.end[u])

    def _ranges(self, u: int, n: int, from_hi: bool) -> tuple[tuple[int, int], ...]:
        """The token ranges of unit ``u`` that a take of ``n`` tokens removes."""
        s, e = self.start[u], self.end[u]
        if self.zig[u]:
            front = (n + 1) // 2
            return (s, s + front), (e - (n - front), e)
        return ((e - n, e),) if from_hi else ((s, s + n),)

    def take_work(self, u: int, n: int, from_hi: bool) -> float:
        """Work of taking ``n`` tokens of unit ``u`` from the given end of the order (the ranges of
        :meth:`_ranges`, written out for speed)."""
        s, e = self.start[u], self.end[u]
        if self.zig[u]:
            front = (n + 1) // 2
            return self._work(u, s, s + front) + self._work(u, e - (n - front), e)
        return self._work(u, e - n, e) if from_hi else self._work(u, s, s + n)

    def take(self, u: int, n: int, from_hi: bool) -> list[Piece]:
        """Remove ``n`` tokens of unit ``u`` and return them as pieces."""
        ranges = self._ranges(u, n, from_hi)
        pieces = [(self.doc[u], s, e, self._work(u, s, e)) for s, e in ranges if e > s]
        self.work -= self.unit_work(u)
        if self.zig[u] or not from_hi:
            self.start[u] = ranges[0][1]
        if self.zig[u] or from_hi:
            self.end[u] = ranges[-1][0]
        self.work += self.unit_work(u)  # the remainder is a piece of its own
        if self.start[u] < self.end[u]:
            self.cut.add(u)
        return pieces

    def walk(self, from_hi: bool, limit: int) -> tuple[list[int], list[int], list[float]]:
        """Units from one end until ``limit`` tokens: their indices, and tokens and work before each one."""
        idx, tokens, work = [], [0], [0.0]
        start, end, lo, hi = self.start, self.end, self.lo, self.hi
        u, step = (hi, -1) if from_hi else (lo, 1)
        while tokens[-1] < limit and lo <= u <= hi:
            if end[u] > start[u]:
                idx.append(u)
                tokens.append(tokens[-1] + end[u] - start[u])
                work.append(work[-1] + self._work(u, start[u], end[u]))
            u += step
        return idx, tokens, work

    def settle(self) -> None:
        """Drop used-up units at the ends; move cut units to where their new density belongs (order stays sorted).

        Units used up in the middle of the order stay as empty entries that every walk skips.
        """
        while self.lo <= self.hi and not self.size(self.lo):
            self.lo += 1
        while self.hi >= self.lo and not self.size(self.hi):
            self.hi -= 1
        cut = sorted((u for u in self.cut if self.lo <= u <= self.hi and self.size(u)), reverse=True)
        self.cut = set()
        if self.hi <= self.lo:
            return
        for item in [self._pop(u) for u in cut]:
            pos = bisect.bisect_left(self.dens, item[-1], self.lo, self.hi + 1)
            for column, value in zip(self._columns(), item, strict=True):
                column.insert(pos, value)
            self.hi += 1

    def _columns(self) -> tuple[list, ...]:
        return self.doc, self.start, self.end, self.doc_len, self.zig, self.dens

    def _pop(self, u: int) -> tuple:
        density = self.unit_work(u) / self.size(u)
        item = [column.pop(u) for column in self._columns()]
        self.hi -= 1
        item[-1] = density
        return tuple(item)


FULL_PIECE_FILL = 0.95
"""A full-mask document too expensive for one rank is cut into equal pieces of at most this share of a rank's
work, so each piece stays whole on its rank and leaves room for cheaper documents."""


def initial_units(lens: np.ndarray, cp: int, tokens_per_rank: int, mask: str, zigzag: bool = True) -> np.ndarray:
    """Units ``(doc, start, end, zigzag)`` the fill starts from.

    Documents that fit one rank (in tokens and in work) are whole units. A causal document that does not is
    one zigzag unit (taken from both ends). A full-mask document that does not is cut into the fewest equal
    pieces that each fit: under a full mask every holder of a piece fetches the whole document, so the number
    of holders is what communication costs.
    """
    docs = np.flatnonzero(lens > 0)
    n = lens[docs]
    work = q_pairs(0, n, n, mask).astype(np.float64)
    too_big = (work > work.sum() / cp) | (n > tokens_per_rank)
    num_pieces = np.ones_like(n)
    if mask == "full":
        by_work = np.ceil(work / (FULL_PIECE_FILL * work.sum() / cp)).astype(np.int64)
        num_pieces = np.minimum(np.where(too_big, np.maximum(by_work, -(-n // tokens_per_rank)), 1), n)
    rep = np.repeat(np.arange(docs.shape[0]), num_pieces)
    k = arange_within(num_pieces)
    start = k * n[rep] // num_pieces[rep]
    end = (k + 1) * n[rep] // num_pieces[rep]
    zig = too_big[rep] & (mask == "causal") & zigzag
    return np.column_stack([docs[rep], start, end, zig.astype(np.int64)])


def plan_fcp(
    doc_lens, cp: int, tokens_per_rank: int, mask: str = "causal", options: FcpOptions | None = None
) -> Plan:
    """Plan one micro-batch with FCP. ``doc_lens`` must hold at most ``cp * tokens_per_rank`` tokens."""
    options = options or FcpOptions()
    check_mask(mask)
    lens = np.asarray(doc_lens, dtype=np.int64)
    total = int(lens.sum())
    real_per_rank = np.full(cp, total // cp, np.int64)
    real_per_rank[: total % cp] += 1
    units = initial_units(lens, cp, tokens_per_rank, mask, options.zigzag)
    pool = _Pool(lens, units, mask, options.tile_size, options.edge_weight)
    placed = _deal_small_units(pool, cp, real_per_rank, options.small_tokens)
    placed_work = [sum(p[3] for p in pieces) for pieces in placed]
    rows: list[tuple[int, int, int, int]] = []
    cut_work = 0.0  # edge work that cuts have added so far (the pool's work does not foresee it)
    for cp_rank in range(cp):
        before = pool.work
        target = (before + sum(placed_work[cp_rank:])) / (cp - cp_rank) + cut_work / max(cp_rank, 1)
        room = int(real_per_rank[cp_rank]) - sum(p[2] - p[1] for p in placed[cp_rank])
        pieces = _fill_rank(pool, room, target - placed_work[cp_rank])
        cut_work += sum(p[3] for p in pieces) - (before - pool.work)
        rows += [(cp_rank, doc, start, end) for doc, start, end, _ in placed[cp_rank] + pieces]
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
        notes=(("tile_size", str(options.tile_size)),),
    )


def _deal_small_units(pool: _Pool, cp: int, real_per_rank: np.ndarray, small_tokens: int) -> list[list[Piece]]:
    """Deal whole units of at most ``small_tokens`` tokens over the ranks before the fill, evenly in count and
    tokens (largest first, each to the rank with the fewest small tokens so far).

    Small documents cost more per pair (partly filled kernel tiles), so a rank made of many of them is slower
    than one with the same pairs in a few long pieces. Dealt evenly, they give every rank the same share of
    that overhead, and the fill balances the rest. Dealing stops at half of each rank's tokens or work.
    """
    placed: list[list[Piece]] = [[] for _ in range(cp)]
    small = [u for u in range(pool.lo, pool.hi + 1) if 0 < pool.size(u) <= small_tokens]
    if len(small) < cp or small_tokens <= 0:
        return placed  # too few to matter: the fill places them where balance needs them
    heap = [(0, r) for r in range(cp)]
    limit, work_limit = (real_per_rank // 2).tolist(), pool.work / cp / 2
    dealt_work = [0.0] * cp
    for u in sorted(small, key=pool.size, reverse=True):
        tokens, rank = heapq.heappop(heap)
        size, work = pool.size(u), pool.unit_work(u)
        if tokens + size > limit[rank] or dealt_work[rank] + work > work_limit:
            heapq.heappush(heap, (tokens, rank))
            continue
        placed[rank] += pool.take(u, size, False)
        dealt_work[rank] += work
        heapq.heappush(heap, (tokens + size, rank))
    pool.settle()
    return placed


def _fill_rank(pool: _Pool, num_tokens: int, target: float) -> list[Piece]:
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
    pieces = _one_spread_document(pool, dense, left, num_tokens, target)
    if pieces is None:
        pieces = _take_side(pool, dense, left, True) + _take_side(pool, sparse, num_tokens - left, False)
    pool.settle()
    return pieces


def _one_spread_document(pool: _Pool, dense, b: int, num_tokens: int, target: float) -> list[Piece] | None:
    """Keep a rank from holding parts of two documents that each span several ranks.

    Every holder of part of such a document fetches most of it (all of it under a full mask), so a rank that
    holds the tail of one and the start of the next receives twice as much as any other. When the dense side
    would reach into a second spread document, it stops at the first one, and the rest of the rank is a window
    of whole units from the middle of the density order whose work makes up the difference. Returns the
    pieces, or None when the two-ended fill should be used (no second document, or no window within
    ``WINDOW_SLACK`` of the target).
    """
    idx, tokens, cum = dense
    first, k = None, 0
    while k < len(idx) and tokens[k] < b:
        doc = pool.doc[idx[k]]
        if doc in pool.spread and first is not None and doc != first:
            break
        if doc in pool.spread:
            first = doc
        k += 1
    if k == len(idx) or tokens[k] >= b or first is None:
        return None
    window = _middle_window(pool, num_tokens - tokens[k], target - cum[k], idx[k - 1] if k else pool.hi + 1)
    if window is None or abs(cum[k] + window[1] - target) > WINDOW_SLACK * target:
        return None
    pieces = _take_side(pool, dense, tokens[k], True)
    for u, n in window[0]:
        pieces += pool.take(u, n, False)
    return pieces


WINDOW_SLACK = 0.02
"""Work deviation (fraction of the rank's target) accepted to keep a rank to one spread document."""


def _middle_window(pool: _Pool, num_tokens: int, need: float, stop: int):
    """Consecutive units of the density order (before index ``stop``) holding ``num_tokens`` tokens, the last
    cut to a prefix, with work closest to ``need``: ``([(unit, tokens), ...], work)``, or None if none fits.

    A window's work grows with its first unit, so the first unit is found by bisection over the order.
    """
    if num_tokens == 0:
        return [], 0.0
    left, right = pool.lo, stop - 1
    first = _window(pool, left, num_tokens, stop)
    if first is None or first[1] >= need:
        return first
    while right - left > 1:  # invariant: window(left) < need; window(right) >= need or does not fit
        mid = (left + right) // 2
        window = _window(pool, mid, num_tokens, stop)
        if window is not None and window[1] < need:
            left = mid
        else:
            right = mid
    candidates = [w for w in (_window(pool, left, num_tokens, stop), _window(pool, right, num_tokens, stop)) if w]
    return min(candidates, key=lambda w: abs(w[1] - need))


def _window(pool: _Pool, first: int, num_tokens: int, stop: int):
    """Whole units from index ``first`` on, then a prefix, holding ``num_tokens`` tokens (None if too few)."""
    taken, work, u = [], 0.0, first
    while num_tokens and u < stop:
        n = min(pool.size(u), num_tokens)
        if n:
            taken.append((u, n))
            work += pool.take_work(u, n, False) if n < pool.size(u) else pool.unit_work(u)
            num_tokens -= n
        u += 1
    return (taken, work) if not num_tokens else None


def _side_work(pool: _Pool, side, num_tokens: int, from_hi: bool) -> float:
    """Work of the first ``num_tokens`` tokens of a walked side (whole units, then a boundary piece)."""
    idx, tokens, work = side
    k = bisect.bisect_right(tokens, num_tokens) - 1
    rest = num_tokens - tokens[k]
    return work[k] + (pool.take_work(idx[k], rest, from_hi) if rest else 0.0)


def _take_side(pool: _Pool, side, num_tokens: int, from_hi: bool) -> list[Piece]:
    """Take the first ``num_tokens`` tokens of a walked side out of the pool."""
    idx, tokens, _ = side
    pieces: list[Piece] = []
    for k, u in enumerate(idx):
        n = min(tokens[k + 1], num_tokens) - tokens[k]
        if n <= 0:
            break
        pieces += pool.take(u, n, from_hi)
    return pieces
