"""The FCP planner: token-exact sharding of documents over CP ranks with balanced attention work.

Granularity: the planner cuts documents at any token. A piece that a rank owns starts and ends at any token
position, nothing is rounded to a block or a tile, and every rank owns exactly its share of the real tokens
(``total // cp``, one more on the first ``total % cp`` ranks). ``FcpOptions.tile_size`` is only the attention
kernel tile with which the edge cost of a piece is modeled (step 1); it is not a block size and moves no cut.

How it works (all integers, no device, no communication):

1. Every non-empty document is a *unit*: a token range with a work, the exact number of query-key pairs its
   queries see plus a share (``edge_weight``) of the kernel's edge work (``tile_size**2 / 4`` pairs for a
   partly filled tile and half a tile row along the keys, as in :mod:`megatron_fcp.sim.model`), so tiny pieces
   are never free. Units are ordered by work density (work per token).
2. A causal document that costs more than one rank's share of work, or holds more tokens than a rank, will be
   spread over several ranks. It becomes a *zigzag unit*: every take removes tokens from both of its ends at
   once (the early end gets the odd token), so each rank holding part of it owns an early range and a late
   range (the zigzag pairing of ring CP, but with range lengths in tokens chosen by balance). Its density stays
   constant as it is consumed, and the early key/values that every later range needs are owned by many ranks,
   so no single rank has to send them to all the others.
3. Ranks are filled one after another. A rank's work target is the work still unplaced divided by the ranks
   still empty (plus the edge work that cuts have been adding per rank), so deviations never accumulate. The
   rank takes the ``num_dense`` densest tokens from the dense end of the order and the rest of its token share
   from the sparse end, whole units first, cutting only the two boundary units (at any token);
   ``num_dense`` is found by bisection over token counts so that the work hits the target. Short documents
   therefore stay whole but for at most two cuts per rank. A full-mask document too expensive for one rank is
   first cut into the fewest pieces that fit, equal to within one token.
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
    """Knobs of the FCP planner.

    The planner cuts documents at any token: pieces start and end anywhere, and ranks own exact token counts.
    ``tile_size`` is only the kernel tile that a piece's modeled edge cost is computed with, not a block size.
    """

    tile_size: int = 128
    """Attention kernel tile (tokens) that a piece's edge work is modeled with (see module docstring). It is not
    a block size and does not set where the planner cuts: pieces start and end at any token."""
    edge_weight: float = 0.5
    """Share of the kernel edge work counted. 1 balances modeled kernel time alone, 0 exact pairs alone; both
    are reported, and 0.5 keeps the worse of the two lowest on the shipped distributions."""
    small_tokens: int = 512
    """Documents of at most this many tokens are dealt evenly over the ranks before the fill (0: never)."""
    zigzag: bool = True
    """Split causal documents that need several ranks zigzag (an early and a late range together)."""

    def __post_init__(self):
        if int(self.tile_size) != self.tile_size or self.tile_size < 1:
            raise ValueError(f"tile_size must be a positive integer, got {self.tile_size!r}")
        if not 0.0 <= self.edge_weight <= 1.0:
            raise ValueError(f"edge_weight must lie in [0, 1], got {self.edge_weight!r}")
        if int(self.small_tokens) != self.small_tokens or self.small_tokens < 0:
            raise ValueError(f"small_tokens must be an integer >= 0, got {self.small_tokens!r}")


class _Pool:
    """Units ordered by density, consumed from both ends of the order; Python scalars for speed.

    Units are indices into the order (parallel lists ``doc``, ``start``, ``end``, ...). The live ones lie in
    ``[sparsest, densest]`` (both ends included). A plain unit is taken from its front (sparse end of the order)
    or its back (dense end). A zigzag unit is taken from both of its ends at once, whichever end of the order
    takes it.
    """

    def __init__(self, lens: np.ndarray, units: np.ndarray, mask: str, tile_size: int, edge_weight: float):
        doc, start, end, is_zigzag = units.T
        self.piece_overhead = edge_weight * tile_size * tile_size / 4
        self.edge_per_key = edge_weight * tile_size / 2
        work = (q_pairs(start, end, lens[doc], mask) + self.piece_overhead
                + self.edge_per_key * needed_kv_end(end, lens[doc], mask))
        density = work / (end - start)
        order = np.argsort(density, kind="stable")
        self.doc = doc[order].tolist()
        self.start = start[order].tolist()
        self.end = end[order].tolist()
        self.doc_len = lens[doc][order].tolist()
        self.is_zigzag = is_zigzag[order].astype(bool).tolist()
        self.density = density[order].tolist()
        self.causal = mask == "causal"
        self.sparsest, self.densest = 0, len(self.doc) - 1
        self.work = float(work.sum())
        self.cut_units: set[int] = set()  # units cut while filling the current rank, to be re-sorted
        in_several_units = np.bincount(doc, minlength=lens.shape[0]) > 1
        self.spread_docs = set(np.flatnonzero(in_several_units).tolist()) | set(doc[is_zigzag == 1].tolist())
        """Documents too large or expensive for one rank (cut into pieces up front, or zigzag units)."""

    def size(self, unit: int) -> int:
        return self.end[unit] - self.start[unit]

    def _work(self, unit: int, start: int, end: int) -> float:
        """Pairs of a piece plus its kernel edges: a partly filled tile and half a tile row along its keys
        (this runs tens of thousands of times per plan, so the pair count is written out)."""
        if end <= start:
            return 0.0
        if self.causal:
            return (end * (end + 1) - start * (start + 1)) / 2 + self.piece_overhead + self.edge_per_key * end
        num_keys = self.doc_len[unit]
        return (end - start) * num_keys + self.piece_overhead + self.edge_per_key * num_keys

    def unit_work(self, unit: int) -> float:
        return self._work(unit, self.start[unit], self.end[unit])

    def _ranges(self, unit: int, num_tokens: int, from_dense: bool) -> tuple[tuple[int, int], ...]:
        """The token ranges of ``unit`` that a take of ``num_tokens`` tokens removes."""
        start, end = self.start[unit], self.end[unit]
        if self.is_zigzag[unit]:
            num_front = (num_tokens + 1) // 2
            return (start, start + num_front), (end - (num_tokens - num_front), end)
        return ((end - num_tokens, end),) if from_dense else ((start, start + num_tokens),)

    def take_work(self, unit: int, num_tokens: int, from_dense: bool) -> float:
        """Work of taking ``num_tokens`` tokens of ``unit`` from the given end of the order (the ranges of
        :meth:`_ranges`, written out for speed)."""
        start, end = self.start[unit], self.end[unit]
        if self.is_zigzag[unit]:
            num_front = (num_tokens + 1) // 2
            return self._work(unit, start, start + num_front) + self._work(unit, end - (num_tokens - num_front), end)
        return self._work(unit, end - num_tokens, end) if from_dense else self._work(unit, start, start + num_tokens)

    def take(self, unit: int, num_tokens: int, from_dense: bool) -> list[Piece]:
        """Remove ``num_tokens`` tokens of ``unit`` and return them as pieces."""
        ranges = self._ranges(unit, num_tokens, from_dense)
        pieces = [(self.doc[unit], start, end, self._work(unit, start, end)) for start, end in ranges if end > start]
        self.work -= self.unit_work(unit)
        if self.is_zigzag[unit] or not from_dense:
            self.start[unit] = ranges[0][1]
        if self.is_zigzag[unit] or from_dense:
            self.end[unit] = ranges[-1][0]
        self.work += self.unit_work(unit)  # the remainder is a piece of its own
        if self.start[unit] < self.end[unit]:
            self.cut_units.add(unit)
        return pieces

    def walk(self, from_dense: bool, limit: int) -> tuple[list[int], list[int], list[float]]:
        """Units from one end until ``limit`` tokens: their indices, and tokens and work before each one."""
        units, tokens_before, work_before = [], [0], [0.0]
        start, end, sparsest, densest = self.start, self.end, self.sparsest, self.densest
        unit, step = (densest, -1) if from_dense else (sparsest, 1)
        while tokens_before[-1] < limit and sparsest <= unit <= densest:
            if end[unit] > start[unit]:
                units.append(unit)
                tokens_before.append(tokens_before[-1] + end[unit] - start[unit])
                work_before.append(work_before[-1] + self._work(unit, start[unit], end[unit]))
            unit += step
        return units, tokens_before, work_before

    def settle(self) -> None:
        """Drop used-up units at the ends; move cut units to where their new density belongs (order stays sorted).

        Units used up in the middle of the order stay as empty entries that every walk skips.
        """
        while self.sparsest <= self.densest and not self.size(self.sparsest):
            self.sparsest += 1
        while self.densest >= self.sparsest and not self.size(self.densest):
            self.densest -= 1
        to_resort = sorted(
            (unit for unit in self.cut_units if self.sparsest <= unit <= self.densest and self.size(unit)),
            reverse=True,
        )
        self.cut_units = set()
        if self.densest <= self.sparsest:
            return
        for item in [self._pop(unit) for unit in to_resort]:
            insert_at = bisect.bisect_left(self.density, item[-1], self.sparsest, self.densest + 1)
            for column, value in zip(self._columns(), item, strict=True):
                column.insert(insert_at, value)
            self.densest += 1

    def _columns(self) -> tuple[list, ...]:
        return self.doc, self.start, self.end, self.doc_len, self.is_zigzag, self.density

    def _pop(self, unit: int) -> tuple:
        density = self.unit_work(unit) / self.size(unit)
        item = [column.pop(unit) for column in self._columns()]
        self.densest -= 1
        item[-1] = density
        return tuple(item)


FULL_PIECE_FILL = 0.95
"""A full-mask document too expensive for one rank is cut into equal pieces of at most this share of a rank's
work, so each piece stays whole on its rank and leaves room for cheaper documents."""


def initial_units(lens: np.ndarray, cp: int, tokens_per_rank: int, mask: str, zigzag: bool = True) -> np.ndarray:
    """Units ``(doc, start, end, zigzag)`` the fill starts from.

    Documents that fit one rank (in tokens and in work) are whole units. A causal document that does not is
    one zigzag unit (taken from both ends). A full-mask document that does not is cut into the fewest pieces
    that each fit, equal to within one token: under a full mask every holder of a piece fetches the whole
    document, so the number of holders is what communication costs.
    """
    docs = np.flatnonzero(lens > 0)
    doc_len = lens[docs]
    work = q_pairs(0, doc_len, doc_len, mask).astype(np.float64)
    too_big = (work > work.sum() / cp) | (doc_len > tokens_per_rank)
    num_pieces = np.ones_like(doc_len)
    if mask == "full":
        by_work = np.ceil(work / (FULL_PIECE_FILL * work.sum() / cp)).astype(np.int64)
        by_tokens = -(-doc_len // tokens_per_rank)
        num_pieces = np.minimum(np.where(too_big, np.maximum(by_work, by_tokens), 1), doc_len)
    doc_index = np.repeat(np.arange(docs.shape[0]), num_pieces)  # per piece: its document's index in docs
    piece_index = arange_within(num_pieces)  # per piece: its index within its document
    start = piece_index * doc_len[doc_index] // num_pieces[doc_index]
    end = (piece_index + 1) * doc_len[doc_index] // num_pieces[doc_index]
    is_zigzag = too_big[doc_index] & (mask == "causal") & zigzag
    return np.column_stack([docs[doc_index], start, end, is_zigzag.astype(np.int64)])


def plan_fcp(
    doc_lens, cp: int, tokens_per_rank: int, mask: str = "causal", options: FcpOptions | None = None
) -> Plan:
    """Plan one micro-batch with FCP. ``doc_lens`` must hold at most ``cp * tokens_per_rank`` tokens."""
    options = options or FcpOptions()
    check_mask(mask)
    lens = np.asarray(doc_lens, dtype=np.int64)
    num_doc_tokens = int(lens.sum())
    real_per_rank = np.full(cp, num_doc_tokens // cp, np.int64)
    real_per_rank[: num_doc_tokens % cp] += 1
    units = initial_units(lens, cp, tokens_per_rank, mask, options.zigzag)
    pool = _Pool(lens, units, mask, options.tile_size, options.edge_weight)
    placed = _deal_small_units(pool, cp, real_per_rank, options.small_tokens)
    placed_work = [sum(piece[3] for piece in pieces) for pieces in placed]
    rows: list[tuple[int, int, int, int]] = []
    cut_work = 0.0  # edge work that cuts have added so far (the pool's work does not foresee it)
    for cp_rank in range(cp):
        pool_work_before = pool.work
        target = (pool_work_before + sum(placed_work[cp_rank:])) / (cp - cp_rank) + cut_work / max(cp_rank, 1)
        num_free_tokens = int(real_per_rank[cp_rank]) - sum(piece[2] - piece[1] for piece in placed[cp_rank])
        pieces = _fill_rank(pool, num_free_tokens, target - placed_work[cp_rank])
        cut_work += sum(piece[3] for piece in pieces) - (pool_work_before - pool.work)
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
    small_units = [unit for unit in range(pool.sparsest, pool.densest + 1) if 0 < pool.size(unit) <= small_tokens]
    if len(small_units) < cp or small_tokens <= 0:
        return placed  # too few to matter: the fill places them where balance needs them
    rank_heap = [(0, rank) for rank in range(cp)]  # (small tokens dealt so far, rank)
    token_limit, work_limit = (real_per_rank // 2).tolist(), pool.work / cp / 2
    dealt_work = [0.0] * cp
    for unit in sorted(small_units, key=pool.size, reverse=True):
        dealt_tokens, rank = heapq.heappop(rank_heap)
        unit_tokens, unit_work = pool.size(unit), pool.unit_work(unit)
        if dealt_tokens + unit_tokens > token_limit[rank] or dealt_work[rank] + unit_work > work_limit:
            heapq.heappush(rank_heap, (dealt_tokens, rank))
            continue
        placed[rank] += pool.take(unit, unit_tokens, False)
        dealt_work[rank] += unit_work
        heapq.heappush(rank_heap, (dealt_tokens + unit_tokens, rank))
    pool.settle()
    return placed


def _fill_rank(pool: _Pool, num_tokens: int, target: float) -> list[Piece]:
    """Take exactly ``num_tokens`` tokens: the densest ``num_dense`` from the dense end and the rest from the
    sparse end.

    Moving one token of the rank's share from the sparse end to the dense end raises its work by the
    difference of the two boundary tokens' densities, so the work is (close to) increasing in ``num_dense`` and
    a bisection over token counts finds the ``num_dense`` whose work is closest to ``target``. Whole units are
    taken from both ends; only the two boundary units are cut (at any token).
    """
    dense_side, sparse_side = pool.walk(True, num_tokens), pool.walk(False, num_tokens)

    def work(num_dense: int) -> float:
        return (_side_work(pool, dense_side, num_dense, True)
                + _side_work(pool, sparse_side, num_tokens - num_dense, False))

    left, right = 0, num_tokens  # bisection bounds on num_dense
    if work(right) <= target:
        left = right
    elif work(left) < target:
        while right - left > 1:  # invariant: work(left) < target <= work(right)
            mid = (left + right) // 2
            left, right = (mid, right) if work(mid) < target else (left, mid)
        left = left if target - work(left) <= work(right) - target else right
    pieces = _one_spread_document(pool, dense_side, left, num_tokens, target)
    if pieces is None:
        pieces = (_take_side(pool, dense_side, left, True)
                  + _take_side(pool, sparse_side, num_tokens - left, False))
    pool.settle()
    return pieces


def _one_spread_document(pool: _Pool, dense_side, num_dense: int, num_tokens: int, target: float
                         ) -> list[Piece] | None:
    """Keep a rank from holding parts of two documents that each span several ranks.

    Every holder of part of such a document fetches most of it (all of it under a full mask), so a rank that
    holds the tail of one and the start of the next receives twice as much as any other. When the dense side
    would reach into a second spread document, it stops at the first one, and the rest of the rank is a window
    of whole units from the middle of the density order whose work makes up the difference. Returns the
    pieces, or None when the two-ended fill should be used (no second document, or no window within
    ``WINDOW_SLACK`` of the target).
    """
    units, tokens_before, work_before = dense_side
    first_doc, k = None, 0
    while k < len(units) and tokens_before[k] < num_dense:
        doc = pool.doc[units[k]]
        if doc in pool.spread_docs and first_doc is not None and doc != first_doc:
            break
        if doc in pool.spread_docs:
            first_doc = doc
        k += 1
    if k == len(units) or tokens_before[k] >= num_dense or first_doc is None:
        return None
    stop = units[k - 1] if k else pool.densest + 1
    window = _middle_window(pool, num_tokens - tokens_before[k], target - work_before[k], stop)
    if window is None or abs(work_before[k] + window[1] - target) > WINDOW_SLACK * target:
        return None
    pieces = _take_side(pool, dense_side, tokens_before[k], True)
    for unit, num_taken in window[0]:
        pieces += pool.take(unit, num_taken, False)
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
    left, right = pool.sparsest, stop - 1
    sparsest_window = _window(pool, left, num_tokens, stop)
    if sparsest_window is None or sparsest_window[1] >= need:
        return sparsest_window
    while right - left > 1:  # invariant: window(left) < need; window(right) >= need or does not fit
        mid = (left + right) // 2
        window = _window(pool, mid, num_tokens, stop)
        if window is not None and window[1] < need:
            left = mid
        else:
            right = mid
    candidates = [window for window in (_window(pool, left, num_tokens, stop), _window(pool, right, num_tokens, stop))
                  if window]
    return min(candidates, key=lambda window: abs(window[1] - need))


def _window(pool: _Pool, first_unit: int, num_tokens: int, stop: int):
    """Whole units from index ``first_unit`` on, then a prefix, holding ``num_tokens`` tokens (None if too few)."""
    taken, work, unit = [], 0.0, first_unit
    while num_tokens and unit < stop:
        num_taken = min(pool.size(unit), num_tokens)
        if num_taken:
            taken.append((unit, num_taken))
            work += pool.take_work(unit, num_taken, False) if num_taken < pool.size(unit) else pool.unit_work(unit)
            num_tokens -= num_taken
        unit += 1
    return (taken, work) if not num_tokens else None


def _side_work(pool: _Pool, side, num_tokens: int, from_dense: bool) -> float:
    """Work of the first ``num_tokens`` tokens of a walked side (whole units, then a boundary piece)."""
    units, tokens_before, work_before = side
    k = bisect.bisect_right(tokens_before, num_tokens) - 1
    num_boundary = num_tokens - tokens_before[k]
    return work_before[k] + (pool.take_work(units[k], num_boundary, from_dense) if num_boundary else 0.0)


def _take_side(pool: _Pool, side, num_tokens: int, from_dense: bool) -> list[Piece]:
    """Take the first ``num_tokens`` tokens of a walked side out of the pool."""
    units, tokens_before, _ = side
    pieces: list[Piece] = []
    for k, unit in enumerate(units):
        num_taken = min(tokens_before[k + 1], num_tokens) - tokens_before[k]
        if num_taken <= 0:
            break
        pieces += pool.take(unit, num_taken, from_dense)
    return pieces
