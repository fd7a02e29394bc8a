"""The FCP planner: token-exact sharding of documents over CP ranks with balanced attention work.

Granularity: the planner cuts documents at any token. A piece that a rank owns starts and ends at any token
position, nothing is rounded to a block or a tile, and every rank owns exactly its share of the real tokens
(``total // cp``, one more on the first ``total % cp`` ranks). ``FcpOptions.tile_size`` is only the attention
kernel tile with which the edge cost of a piece is modeled (step 1); it is not a block size and moves no cut.

How it works (all integers, no device, no communication):

1. A range of tokens has a work: the exact number of query-key pairs its queries see plus a share
   (``edge_weight``) of the kernel's edge work (``tile_size**2 / 4`` pairs for a partly filled tile and half a
   tile row along the keys, as in :mod:`megatron_fcp.sim.model`), so tiny pieces are never free. Entries of
   the pool are ordered by work density (work per token).
2. A causal document that costs more than one rank's share of work, or holds more tokens than a rank, will be
   spread over several ranks. It becomes a *zigzag unit*: every take removes tokens from both of its ends at
   once (the early end gets the odd token), so each rank holding part of it owns an early range and a late
   range (the zigzag pairing of ring CP, but with range lengths in tokens chosen by balance). Its density stays
   constant as it is consumed, and the early key/values that every later range needs are owned by many ranks,
   so no single rank has to send them to all the others. A full-mask document too expensive for one rank is
   cut into the fewest pieces that fit, equal to within one token.
3. Every other document is placed whole unless it lies at the boundary of a rank. Documents of one length
   have the same density, so they are held in aggregate: one *bin* per length, a count of documents that are
   handed out in batch order. Planning therefore costs the same for 4M one-token documents as for one bin
   of 4M tokens; only the number of distinct lengths and of cut documents counts.
4. Before the fill, documents of at most ``small_tokens`` tokens are dealt evenly over the ranks (a bin at a
   time, longest first, its count shared equally and the remainder to the ranks with the fewest dealt
   tokens), so each rank carries the same share of the overhead of small kernels.
5. Ranks are filled one after another. A rank's work target is the work still unplaced divided by the ranks
   still empty (plus the edge work that cuts have been adding per rank), so deviations never accumulate. The
   rank takes the ``num_dense`` densest tokens from the dense end of the order and the rest of its token share
   from the sparse end, whole documents first, cutting only the two boundary documents (at any token);
   ``num_dense`` is found by bisection over token counts so that the work hits the target. A rank does not take
   parts of two documents that span ranks where a window of middle-density entries can make up its work. Under a
   causal mask a rank first takes what is left of the documents the rank before it cut, as far as its target
   allows (``_Pool.carry``), so a cut document stays on consecutive ranks (node-mates, mostly) instead of leaving
   a dense late part for a rank far away that would fetch the document's head from another node.
6. Key/value exchange follows from ownership: a rank receives exactly the keys its queries need that it does
   not own, once, from their owner (:func:`megatron_fcp.planner.plan.derive_kv`).

The plan stores the documents placed whole as one rank per document (``Plan.whole_rank``) and the rows of the
cut ones (``Plan.q_rows``). Every rank gets the same number of token slots; when the documents do not fill
``cp * tokens_per_rank`` the rest is padding, spread as evenly as the count allows and reported.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass

import numpy as np

from megatron_fcp.planner.columns import Q
from megatron_fcp.planner.pairs import check_mask, edge_pairs, q_pairs
from megatron_fcp.planner.plan import Plan, derive_kv, merge_adjacent_q

Part = tuple[int, int, int]
"""``(doc, start, end)``: a token range of one document."""


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


FULL_PIECE_FILL = 0.95
"""A full-mask document too expensive for one rank is cut into equal pieces of at most this share of a rank's
work, so each piece stays whole on its rank and leaves room for cheaper documents."""


@dataclass(frozen=True)
class _Batch:
    """The micro-batch grouped by length: the bins of documents placed whole, and the spread documents.

    A bin is a group of :attr:`groups` (one length), held in one of its three forms (see :class:`_Groups`).
    """

    groups: _Groups
    bin_group: list[int]
    """Per bin: its group in :attr:`groups`."""
    bin_count: list[int]
    bin_length: list[int]
    spread_docs: np.ndarray
    """Documents too large or too expensive for one rank, in batch order."""
    num_tokens: int
    """Tokens of the whole batch."""
    total_work: float
    """Query-key pairs of the whole batch (what a rank's share of work is measured against)."""

    @property
    def bin_index(self) -> dict[int, np.ndarray]:
        """The bins held as an index array of their own: their documents."""
        return {b: self.groups.index[g] for b, g in enumerate(self.bin_group) if g in self.groups.index}

    @property
    def bin_all_but(self) -> tuple[int, np.ndarray] | None:
        """The bin (if any) held as every document but the given ones."""
        all_but = self.groups.all_but
        bins = [b for b, g in enumerate(self.bin_group) if all_but and g == all_but[0]]
        return (bins[0], all_but[1]) if bins else None


def group_by_length(lens: np.ndarray, cp: int, tokens_per_rank: int, mask: str) -> _Batch:
    """Bins of the documents that fit one rank in tokens and in work, and the documents that do not.

    Lengths are clipped above ``tokens_per_rank`` (16-bit keys where they fit) and grouped (:func:`_length_groups`);
    the work of the batch follows from the groups, so nothing else runs once per document.
    """
    clip = tokens_per_rank + 1
    key_type = np.uint16 if clip < 1 << 16 else np.uint32
    # clipped and narrowed in one pass (the ufunc casts its int64 result as it writes)
    key = np.minimum(lens, clip, out=np.empty(lens.shape, key_type), casting="unsafe")
    groups = _length_groups(key)
    length, count = groups.length, groups.count
    over = length == clip
    work = q_pairs(0, length, length, mask).astype(np.float64)
    long_docs = groups.docs(int(np.flatnonzero(over)[0])) if over.any() else np.zeros(0, np.int64)
    num_tokens = int((count * length)[~over].sum() + lens[long_docs].sum())
    total_work = float((count * work)[~over].sum()) + float(q_pairs(0, lens[long_docs], lens[long_docs], mask).sum())
    whole = (length > 0) & ~over & (work <= total_work / cp)
    spread = ~whole & (length > 0)
    spread_docs = np.sort(np.concatenate([groups.docs(g) for g in np.flatnonzero(spread).tolist()]
                                         or [np.zeros(0, np.int64)]))
    return _Batch(groups=groups, bin_group=np.flatnonzero(whole).tolist(), bin_count=count[whole].tolist(),
                  bin_length=length[whole].tolist(), spread_docs=spread_docs, num_tokens=num_tokens,
                  total_work=total_work)


SCAN_MIN_DOCS = 1 << 16
"""From this many documents on, a length shared by at least ``1 / COMMON_SHARE`` of a sample of the batch is
found by one compare and one scan instead of being sorted: the shape of micro-batches of millions of tiny
documents."""
COMMON_SHARE = 16
NEARLY_ALL = 7 / 8
"""A length of at least this share of the sample is held as every document but the others: a scan that finds
its few others, where an index array would cost a scan finding its own many documents and a scatter of their
ranks in :meth:`_Pool.whole_rank`."""


@dataclass(frozen=True)
class _Groups:
    """The documents grouped by key, groups in increasing key order.

    A group's documents (in batch order) are held in one of three forms: a slice of ``order`` (the documents
    sorted by key; the identity where the keys are in order already); an index array of its own (``index``), for
    a key that many documents of a large batch share (one compare and one scan instead of a sort); or, for the key
    of nearly all documents, every document but the few others (``all_but``: the group, the others, and for
    each other the position in the group's documents before which it lies).
    """

    length: np.ndarray
    count: np.ndarray
    first: np.ndarray
    """Per group: where its documents start in ``order`` (-1 for the other forms)."""
    order: np.ndarray | None
    index: dict[int, np.ndarray]
    all_but: tuple[int, np.ndarray, np.ndarray] | None

    def docs(self, g: int) -> np.ndarray:
        """The documents of group ``g``, in batch order."""
        if g in self.index:
            return self.index[g]
        if self.all_but and self.all_but[0] == g:
            return np.delete(np.arange(self.all_but[1].shape[0] + int(self.count[g])), self.all_but[1])
        first, count = int(self.first[g]), int(self.count[g])
        return np.arange(first, first + count) if self.order is None else self.order[first:first + count]

    def doc_at(self, g: int, position: int) -> int:
        """The document at ``position`` (from 0) of group ``g``."""
        if g in self.index:
            return int(self.index[g][position])
        if self.all_but and self.all_but[0] == g:  # skip the others before it
            return position + int(np.searchsorted(self.all_but[2], position, side="right"))
        position += int(self.first[g])
        return position if self.order is None else int(self.order[position])


def _length_groups(key: np.ndarray) -> _Groups:
    """The documents grouped by ``key``: nothing sorted where the keys are in order already; in a batch of at
    least ``SCAN_MIN_DOCS`` documents, the keys that many share found by a compare each (the key of nearly all,
    as the few documents without it); one stable sort of the rest."""
    empty = np.zeros(0, np.int64)
    num_docs = key.shape[0]
    if num_docs == 0:
        return _Groups(empty, empty, empty, None, {}, None)
    if not (key[1:] < key[:-1]).any():
        length, count = _runs(key)
        return _Groups(length, count, np.cumsum(count) - count, None, {}, None)
    common = []
    if num_docs >= SCAN_MIN_DOCS:
        sample = key[:: num_docs // 4096]
        values, num = np.unique(sample, return_counts=True)
        common = values[num * COMMON_SHARE >= sample.shape[0]].tolist()
        nearly_all = values[num >= NEARLY_ALL * sample.shape[0]].tolist()
    index, all_but, rest = {}, None, None
    if common and nearly_all:
        rest = np.flatnonzero(key != nearly_all[0])
        all_but = (nearly_all[0], rest)
    elif common:
        index = {value: np.flatnonzero(key == value) for value in common}
        rest = _other_than(key, common) if sum(docs.shape[0] for docs in index.values()) < num_docs else empty
    order = np.argsort(key, kind="stable") if rest is None else rest[np.argsort(key[rest], kind="stable")]
    sorted_length, sorted_count = _runs(key[order]) if order.shape[0] else (empty, empty)
    groups = {value: (num, first) for value, num, first in zip(sorted_length.tolist(), sorted_count.tolist(),
                                                              (np.cumsum(sorted_count) - sorted_count).tolist(),
                                                              strict=True)}
    groups |= {value: (docs.shape[0], -1) for value, docs in index.items()}
    if all_but:
        groups[all_but[0]] = (num_docs - all_but[1].shape[0], -1)
    values = sorted(groups)
    position = {value: g for g, value in enumerate(values)}
    return _Groups(length=np.array(values, np.int64), count=np.array([groups[v][0] for v in values], np.int64),
                   first=np.array([groups[v][1] for v in values], np.int64), order=order,
                   index={position[value]: docs for value, docs in index.items()},
                   all_but=(position[all_but[0]], all_but[1], all_but[1] - np.arange(all_but[1].shape[0]))
                   if all_but else None)


def _other_than(key: np.ndarray, values: list[int]) -> np.ndarray:
    """The documents whose key is none of ``values``."""
    unmatched = key != values[0]
    for value in values[1:]:
        unmatched &= key != value
    return np.flatnonzero(unmatched)


def _expand(starts: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """int32 ``[size]``: ``values[i]`` from ``starts[i]`` up to the next start (``starts`` ascending from 0)."""
    return np.repeat(values.astype(np.int32), np.diff(np.append(starts, size)))


def _runs(sorted_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of a sorted array and how many times each occurs."""
    first = np.append(0, np.flatnonzero(sorted_key[1:] != sorted_key[:-1]) + 1)
    return sorted_key[first].astype(np.int64), np.diff(np.append(first, sorted_key.shape[0]))


def spread_units(lens: np.ndarray, docs: np.ndarray, cp: int, tokens_per_rank: int, mask: str, total_work: float,
                 zigzag: bool = True) -> list[tuple[Part, bool]]:
    """The units of the documents too large or expensive for one rank: ``((doc, start, end), is_zigzag)``.

    A causal one is a zigzag unit (taken from both ends). A full-mask one is cut into the fewest pieces that
    each fit, equal to within one token: under a full mask every holder of a piece fetches the whole document,
    so the number of holders is what communication costs.
    """
    units = []
    for doc in docs.tolist():
        length = int(lens[doc])
        num_pieces = 1
        if mask == "full":
            by_work = int(np.ceil(length * length / (FULL_PIECE_FILL * total_work / cp)))
            num_pieces = min(max(by_work, -(-length // tokens_per_rank)), length)
        units += [((doc, k * length // num_pieces, (k + 1) * length // num_pieces), mask == "causal" and zigzag)
                  for k in range(num_pieces)]
    return units


class _Pool:
    """Entries ordered by work density, consumed from both ends of the order; Python scalars for speed.

    An entry is a *run*: ``count`` whole documents of one length (a bin, or none), with possibly a partial
    document at its front and one at its back (``(doc, start, end)`` each); or a *zigzag* unit (its remaining
    range in ``front``). The sparse end of the order takes a run from its front (the front partial, then whole
    documents, then the back partial), the dense end from its back; a zigzag unit is taken from both of its
    ends at once, whichever end of the order takes it. The live entries lie in ``[sparsest, densest]``.

    Takes are recorded: the rows ``(rank, doc, start, end)`` of partial documents, and the whole documents of
    each bin as ``(bin, first, count, rank)`` (rank -1 for a document cut at a rank boundary, whose parts are
    rows). A bin hands out its documents in order.
    """

    def __init__(self, lens: np.ndarray, batch: _Batch, units, mask: str, tile_size: int, edge_weight: float):
        self.piece_overhead = edge_weight * edge_pairs(0, 1, tile_size)
        self.edge_per_key = edge_weight * edge_pairs(1, 0, tile_size)
        self.causal = mask == "causal"
        self.batch = batch
        self.doc_lens = lens
        self.spread_docs = set(batch.spread_docs.tolist())
        self.bin_next = [0] * len(batch.bin_count)
        self.rows: list[tuple[int, int, int, int]] = []
        self.allocs: list[tuple[int, int, int, int]] = []
        self.dealings: list[tuple[int, int, np.ndarray]] = []  # (bin, first, count per rank), after alloc_chunks
        self.alloc_chunks: list[np.ndarray] = []  # earlier allocations, as arrays, in the order made
        spread_docs = {part[0] for part, zig in units if zig} | _repeated(part[0] for part, _ in units)
        entries = [(length, count, None, b, False, -1) for b, (length, count)
                   in enumerate(zip(batch.bin_length, batch.bin_count, strict=True))]
        entries += [(int(lens[part[0]]), 0, part, -1, zig, part[0] if part[0] in spread_docs else -1)
                    for part, zig in units]
        columns = [list(column) for column in zip(*entries, strict=True)] if entries else [[] for _ in range(6)]
        self.length, self.count, self.front, self.bin, self.zig, self.spread = columns
        self.back: list[Part | None] = [None] * len(entries)
        self.whole_work = [self._work(length, 0, length) for length in self.length]
        self.density = [self.entry_work(e) / self.size(e) for e in range(len(entries))]
        order = np.argsort(self.density, kind="stable").tolist()
        for column in self._columns():
            column[:] = [column[e] for e in order]
        self.sparsest, self.densest = 0, len(entries) - 1
        self.work = sum(self.entry_work(e) for e in range(len(entries)))
        self.touched: set[int] = set()  # entries cut since the last settle, to be re-sorted
        self.cut_rest: list[Part] = []  # causal: what is left of the documents cut since the last carry

    def _columns(self) -> tuple[list, ...]:
        return (self.length, self.count, self.front, self.back, self.bin, self.zig, self.spread, self.whole_work,
                self.density)

    def _work(self, length: int, start: int, end: int) -> float:
        """Pairs of a piece plus its kernel edges: a partly filled tile and half a tile row along its keys
        (this runs tens of thousands of times per plan, so the pair count is written out)."""
        if end <= start:
            return 0.0
        if self.causal:
            return (end * (end + 1) - start * (start + 1)) / 2 + self.piece_overhead + self.edge_per_key * end
        return (end - start) * length + self.piece_overhead + self.edge_per_key * length

    def _part_work(self, length: int, part: Part | None) -> float:
        return 0.0 if part is None else self._work(length, part[1], part[2])

    def size(self, e: int) -> int:
        front, back = self.front[e], self.back[e]
        return (self.count[e] * self.length[e] + (front[2] - front[1] if front else 0)
                + (back[2] - back[1] if back else 0))

    def entry_work(self, e: int) -> float:
        length = self.length[e]
        return (self.count[e] * self.whole_work[e] + self._part_work(length, self.front[e])
                + self._part_work(length, self.back[e]))

    def take_work(self, e: int, num_tokens: int, from_dense: bool) -> float:
        """Work of taking ``num_tokens`` tokens of entry ``e`` from the given end of the order (what
        :meth:`take` removes, written out for speed: the bisection of the fill calls this most)."""
        length = self.length[e]
        if self.zig[e]:
            _, start, end = self.front[e]
            num_front = (num_tokens + 1) // 2
            return self._work(length, start, start + num_front) + self._work(length, end - num_tokens + num_front, end)
        near, far = (self.back[e], self.front[e]) if from_dense else (self.front[e], self.back[e])
        if near is None and far is None:  # whole documents of a bin only, the commonest case
            num_whole = num_tokens // length
            work = num_whole * self.whole_work[e]
            rest = num_tokens - num_whole * length
            if not rest:
                return work
            return work + (self._work(length, length - rest, length) if from_dense else self._work(length, 0, rest))
        work = 0.0
        if near is not None:
            num_taken = min(num_tokens, near[2] - near[1])
            work += self._end_work(length, near, num_taken, from_dense)
            num_tokens -= num_taken
            if not num_tokens:
                return work
        num_whole = min(num_tokens // length, self.count[e])
        work += num_whole * self.whole_work[e]
        num_tokens -= num_whole * length
        if not num_tokens:
            return work
        if num_whole < self.count[e]:  # one document cut
            return work + self._end_work(length, (0, 0, length), num_tokens, from_dense)
        return work + self._end_work(length, far, num_tokens, from_dense)

    def _end_work(self, length: int, part: Part, num_tokens: int, from_dense: bool) -> float:
        """Work of the last (``from_dense``) or first ``num_tokens`` tokens of ``part``."""
        _, start, end = part
        if from_dense:
            return self._work(length, end - num_tokens, end)
        return self._work(length, start, start + num_tokens)

    def take(self, e: int, num_tokens: int, from_dense: bool, rank: int) -> float:
        """Remove ``num_tokens`` tokens of entry ``e`` for ``rank``, record them, and return their work."""
        length, old_work, work = self.length[e], self.entry_work(e), 0.0
        if num_tokens % length == 0 and self.front[e] is None and self.back[e] is None and not self.zig[e]:
            num_whole = num_tokens // length  # whole documents of a bin only, the commonest case: no rows
            if num_whole:
                self._allocate(e, num_whole, rank)
            self.work += self.entry_work(e) - old_work
            return num_whole * self.whole_work[e]
        taken: list[Part] = []
        if self.zig[e]:
            doc, start, end = self.front[e]
            num_front = (num_tokens + 1) // 2
            taken = [(doc, start, start + num_front), (doc, end - num_tokens + num_front, end)]
            self.front[e] = (doc, start + num_front, end - num_tokens + num_front)
        else:
            near, num_tokens = _cut(self.back[e] if from_dense else self.front[e], num_tokens, from_dense, taken)
            num_whole = min(num_tokens // length, self.count[e])
            num_tokens -= num_whole * length
            work = num_whole * self.whole_work[e]
            if num_whole:
                self._allocate(e, num_whole, rank)
            if num_tokens and self.count[e]:  # cut one document: its rest is the near partial
                doc = self._doc_at(*self._allocate(e, 1, -1))
                near, num_tokens = _cut((doc, 0, length), num_tokens, from_dense, taken)
            far, num_tokens = _cut(self.front[e] if from_dense else self.back[e], num_tokens, from_dense, taken)
            self.front[e], self.back[e] = (far, near) if from_dense else (near, far)
        pieces = [part for part in taken if part[2] > part[1]]
        if self.causal and not self.zig[e]:  # a document placed whole but for its cut (see carry)
            cut = {part[0] for part in pieces} - self.spread_docs
            self.cut_rest += [part for part in (self.front[e], self.back[e]) if part and part[0] in cut]
        self.rows += [(rank, *part) for part in pieces]
        self.work += self.entry_work(e) - old_work
        if pieces:
            self.touched.add(e)
        return work + sum(self._work(length, start, end) for _, start, end in pieces)

    def carry(self, num_tokens: int, target: float, rank: int) -> tuple[int, float]:
        """Causal: give ``rank`` first what is left of the documents that the rank before it cut, as far as the
        rank's work can still hit ``target`` with its ``num_tokens`` (the rest filled from the sparsest tokens does
        not pass it, from the densest reaches it); what does not fit goes on to the next rank. Returns the tokens
        and work taken.

        Without it the rest of a cut document waits in the density order until some rank far away takes it: the
        late part of a document cut at its head is dense, and its holder needs every earlier key/value of it, from
        a rank that may be on another node."""
        rests, self.cut_rest = self.cut_rest, []
        taken_tokens, taken_work = 0, 0.0
        for part in rests:
            e = self._entry_of(part)
            if e is None:  # taken since
                continue
            left = num_tokens - taken_tokens
            sides = self.walk(False, left), self.walk(True, left)
            num = min(part[2] - part[1], left)
            if num and not self._carry_fits(e, num, left, target - taken_work, sides):
                low, high = 0, num  # fits with low tokens, not with high
                while high - low > 1:
                    mid = (low + high) // 2
                    fits = self._carry_fits(e, mid, left, target - taken_work, sides)
                    low, high = (mid, high) if fits else (low, mid)
                num = low
            if num:  # the rest of it, if any, is carried on by take
                taken_work += self.take(e, num, False, rank)
                taken_tokens += num
            else:
                self.cut_rest.append(part)
        self.settle()
        return taken_tokens, taken_work

    def _carry_fits(self, e: int, num: int, num_tokens: int, target: float, sides) -> bool:
        """Whether ``num`` tokens of entry ``e`` leave a rank of ``num_tokens`` able to hit ``target``: it lies
        between the work with the rest from the sparsest tokens and with the rest from the densest (``sides``:
        both walks), within ``CARRY_SLACK``."""
        work, rest = self.take_work(e, num, False), num_tokens - num
        least = work + (_side_work(self, sides[0], rest, False) if rest else 0.0)
        most = work + (_side_work(self, sides[1], rest, True) if rest else 0.0)
        return least - CARRY_SLACK * target <= target <= most + CARRY_SLACK * target

    def _entry_of(self, part: Part) -> int | None:
        """The entry that holds partial document ``part`` alone (as :meth:`settle` leaves it), None if none."""
        density = self._work(int(self.doc_lens[part[0]]), part[1], part[2]) / (part[2] - part[1])
        e = bisect.bisect_left(self.density, density, self.sparsest, self.densest + 1)
        while e <= self.densest and self.density[e] == density:
            if self.front[e] == part and self.back[e] is None and not self.count[e]:
                return e
            e += 1
        return None

    def _allocate(self, e: int, num_docs: int, rank: int) -> tuple[int, int]:
        """Hand out the next ``num_docs`` documents of entry ``e``'s bin to ``rank``; return the bin and the
        position in it of the first one (see :meth:`_doc_at`)."""
        b = self.bin[e]
        first = self.bin_next[b]
        self.bin_next[b] += num_docs
        self.count[e] -= num_docs
        self.allocs.append((b, first, num_docs, rank))
        return b, first

    def _doc_at(self, b: int, position: int) -> int:
        """The document at ``position`` (from 0) of bin ``b``."""
        return self.batch.groups.doc_at(self.batch.bin_group[b], position)

    def hand_out(self, e: int, num_docs: int, rank: int) -> None:
        """Deal ``num_docs`` whole documents of entry ``e``'s bin to ``rank`` before the fill."""
        self._allocate(e, num_docs, rank)
        self.work -= num_docs * self.whole_work[e]

    def hand_out_to_all(self, e: int, num_docs: np.ndarray) -> None:
        """Deal ``num_docs[rank]`` whole documents of entry ``e``'s bin to every rank at once, in rank order."""
        b, total = self.bin[e], int(num_docs.sum())
        if self.allocs:  # those recorded one by one so far come first
            self._flush()
        self.dealings.append((b, self.bin_next[b], num_docs.copy()))  # the flush turns them into rows at once
        self.bin_next[b] += total
        self.count[e] -= total
        self.work -= total * self.whole_work[e]

    def _flush(self) -> None:
        """Bring every allocation into :attr:`alloc_chunks` as int64 rows ``(bin, first, count, rank)``, in the
        order made: the dealings to all ranks, then the allocations recorded one by one."""
        if self.dealings:
            bins, firsts, num = (np.array(column) for column in zip(*self.dealings, strict=True))
            dealing, rank = np.nonzero(num)  # by dealing, then rank
            firsts = firsts[dealing] + (np.cumsum(num, axis=1) - num)[dealing, rank]
            self.alloc_chunks.append(np.column_stack([bins[dealing], firsts, num[dealing, rank], rank]))
            self.dealings = []
        if self.allocs:
            self.alloc_chunks.append(np.asarray(self.allocs, dtype=np.int64))
            self.allocs = []

    def walk(self, from_dense: bool, limit: int) -> tuple[list[int], list[int], list[float]]:
        """Entries from one end until ``limit`` tokens: their indices, and tokens and work before each one."""
        units, tokens_before, work_before = [], [0], [0.0]
        e, step = (self.densest, -1) if from_dense else (self.sparsest, 1)
        while tokens_before[-1] < limit and self.sparsest <= e <= self.densest:
            size = self.size(e)
            if size:
                units.append(e)
                tokens_before.append(tokens_before[-1] + size)
                work_before.append(work_before[-1] + self.entry_work(e))
            e += step
        return units, tokens_before, work_before

    def settle(self) -> None:
        """Drop used-up entries at the ends; split partial documents off the runs that were cut and move every
        changed entry to where its density belongs (the order stays sorted).

        Entries used up in the middle of the order stay as empty entries that every walk skips.
        """
        while self.sparsest <= self.densest and not self.size(self.sparsest):
            self.sparsest += 1
        while self.densest >= self.sparsest and not self.size(self.densest):
            self.densest -= 1
        to_resort = sorted((e for e in self.touched if self.sparsest <= e <= self.densest and self.size(e)),
                           reverse=True)
        self.touched = set()
        if self.densest <= self.sparsest and not to_resort:
            return
        for item in [item for e in to_resort for item in self._pop(e)]:
            insert_at = bisect.bisect_left(self.density, item[-1], self.sparsest, self.densest + 1)
            for column, value in zip(self._columns(), item, strict=True):
                column.insert(insert_at, value)
            self.densest += 1

    def _pop(self, e: int) -> list[tuple]:
        """Remove entry ``e``; return it as entries with their densities: its whole documents (if any) and each
        partial document apart."""
        item = [column.pop(e) for column in self._columns()]
        self.densest -= 1
        length, count, front, back, b, zig, spread, whole_work, density = item
        out = [(length, count, None, None, b, zig, spread, whole_work, density)] if count else []
        part_spread = spread if b < 0 else -1
        out += [(length, 0, part, None, -1, zig, part_spread, whole_work,
                 self._work(length, part[1], part[2]) / (part[2] - part[1])) for part in (front, back) if part]
        return out

    def whole_rank(self, num_docs: int) -> np.ndarray:
        """int32 ``[num_docs]``: the rank each binned document went to whole, -1 for the rest.

        A bin hands out its documents in order, so its ranks are runs, one per allocation, and each form of
        group is written by expanding runs once: the groups of ``order`` in sorted order (the batch order where
        there is none), the key of nearly all straight in batch order (its others overwritten by ``order``),
        a group with an index array of its own through it.
        """
        batch, groups = self.batch, self.batch.groups
        bins, firsts, ranks = self._handed_out()
        in_order = _expand(*self._order_runs(bins, firsts, ranks),
                           num_docs if groups.order is None else groups.order.shape[0])
        if groups.order is None:
            return in_order
        at = np.searchsorted(bins, np.arange(len(batch.bin_group) + 1))  # bin b's allocations: at[b]:at[b + 1]
        if batch.bin_all_but:  # its runs start after the others before them (every other is in ``order``)
            b = batch.bin_all_but[0]
            starts = firsts[at[b]:at[b + 1]] + np.searchsorted(groups.all_but[2], firsts[at[b]:at[b + 1]], "right")
            out = _expand(np.append(0, starts), np.append(-1, ranks[at[b]:at[b + 1]]), num_docs)
        else:
            out = np.full(num_docs, -1, np.int32)
        for b, docs in batch.bin_index.items():
            out[docs] = _expand(firsts[at[b]:at[b + 1]], ranks[at[b]:at[b + 1]], docs.shape[0])
        out[groups.order] = in_order
        return out

    def _handed_out(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every allocation of whole documents as ``bin``, ``first`` (its first document's position in the bin)
        and ``rank`` columns, by bin and within one in the order handed out; checked to cover each bin in order."""
        batch = self.batch
        # in the order handed out (dealt, then taken by the fill): within a bin, the order of its documents
        self._flush()
        allocs = np.concatenate([*self.alloc_chunks, np.zeros((0, 4), np.int64)])
        allocs = allocs[allocs[:, 2] > 0]
        bin_key = allocs[:, 0].astype(np.uint16 if len(batch.bin_count) < 1 << 16 else np.int64)
        allocs = allocs[np.argsort(bin_key, kind="stable")]  # bins are numbered by length
        bins, firsts, counts = allocs[:, 0], allocs[:, 1], allocs[:, 2]
        ends = np.append(0, np.cumsum(counts))  # where each allocation starts among all handed out, and the end
        bin_ids = np.arange(len(batch.bin_count))
        bin_start = ends[np.searchsorted(bins, bin_ids)]  # where each bin starts among them
        bin_end = ends[np.searchsorted(bins, bin_ids, side="right")]
        if (not np.array_equal(bin_end - bin_start, batch.bin_count)
                or not np.array_equal(firsts, ends[:-1] - bin_start[bins])):
            raise AssertionError(f"the bins handed out {int(ends[-1])} of their {sum(batch.bin_count)} documents "
                                 "or not in order")
        return bins, firsts, allocs[:, 3]

    def _order_runs(self, bins: np.ndarray, firsts: np.ndarray, ranks: np.ndarray) -> tuple[np.ndarray, ...]:
        """The runs ``(starts, ranks)`` of the groups held in ``order``, by position there: -1 from each group's
        first document on, then one run per allocation of their bins (a bin's first one starts with its group and
        comes later, so it is the one that lasts)."""
        first = self.batch.groups.first
        alloc_first = first[np.asarray(self.batch.bin_group, np.int64)[bins]]  # where its bin's group starts
        in_order = alloc_first >= 0
        starts = np.concatenate([first[first >= 0], alloc_first[in_order] + firsts[in_order]])
        values = np.concatenate([np.full(np.count_nonzero(first >= 0), -1), ranks[in_order]])
        by_start = np.argsort(starts, kind="stable")
        return starts[by_start], values[by_start]


def _repeated(values) -> set[int]:
    seen, repeated = set(), set()
    for value in values:
        (repeated if value in seen else seen).add(value)
    return repeated


def _cut(part: Part | None, num_tokens: int, from_dense: bool, taken: list[Part]) -> tuple[Part | None, int]:
    """Take up to ``num_tokens`` tokens of ``part`` from its back (``from_dense``) or front into ``taken``;
    return what is left of it (None when used up) and of ``num_tokens``."""
    if part is None or not num_tokens:
        return part, num_tokens
    doc, start, end = part
    num_taken = min(num_tokens, end - start)
    if from_dense:
        taken.append((doc, end - num_taken, end))
        part = (doc, start, end - num_taken)
    else:
        taken.append((doc, start, start + num_taken))
        part = (doc, start + num_taken, end)
    return (part if part[2] > part[1] else None), num_tokens - num_taken


def plan_fcp(
    doc_lens, cp: int, tokens_per_rank: int, mask: str = "causal", options: FcpOptions | None = None
) -> Plan:
    """Plan one micro-batch with FCP. ``doc_lens`` must hold at most ``cp * tokens_per_rank`` tokens."""
    options = options or FcpOptions()
    check_mask(mask)
    lens = np.asarray(doc_lens, dtype=np.int64)
    batch = group_by_length(lens, cp, tokens_per_rank, mask)
    real_per_rank = np.full(cp, batch.num_tokens // cp, np.int64)
    real_per_rank[: batch.num_tokens % cp] += 1
    units = spread_units(lens, batch.spread_docs, cp, tokens_per_rank, mask, batch.total_work, options.zigzag)
    pool = _Pool(lens, batch, units, mask, options.tile_size, options.edge_weight)
    dealt_tokens, dealt_work = _deal_small_documents(pool, cp, real_per_rank, options.small_tokens)
    work_after = np.append(np.cumsum(dealt_work[::-1])[::-1], 0.0).tolist()  # dealt work of ranks r, r+1, ...
    cut_work = 0.0  # edge work that cuts have added so far (the pool's work does not foresee it)
    for cp_rank in range(cp):
        pool_work_before = pool.work
        target = (pool_work_before + work_after[cp_rank]) / (cp - cp_rank) + cut_work / max(cp_rank, 1)
        num_free_tokens = int(real_per_rank[cp_rank] - dealt_tokens[cp_rank])
        num_carried, taken_work = pool.carry(num_free_tokens, target - dealt_work[cp_rank], cp_rank)
        taken_work += _fill_rank(pool, num_free_tokens - num_carried, target - dealt_work[cp_rank] - taken_work,
                                 cp_rank)
        cut_work += taken_work - (pool_work_before - pool.work)
    q_rows = merge_adjacent_q(np.asarray(pool.rows, dtype=np.int64).reshape(-1, len(Q)))
    return Plan(
        strategy="fcp",
        cp=cp,
        mask=mask,
        doc_lens=lens,
        q_rows=q_rows,
        kv=derive_kv(q_rows, lens, cp, mask),
        num_pad_tokens=tokens_per_rank - real_per_rank,
        exchange="p2p",
        notes=(("tile_size", str(options.tile_size)),),
        whole_rank=pool.whole_rank(lens.shape[0]),
    )


CARRY_SLACK = 0.003
"""Work deviation (fraction of the rank's target) that a carried part may force on a rank (see ``_Pool.carry``)."""

MANY_EXTRA = 16
"""Above this many documents left over after an equal share, dealing hands them out at once (one each to the
ranks with the fewest dealt tokens) instead of one at a time."""


def _deal_small_documents(pool: _Pool, cp: int, real_per_rank: np.ndarray, small_tokens: int):
    """Deal whole documents of at most ``small_tokens`` tokens over the ranks before the fill, evenly in count
    and tokens: a bin at a time, longest first, its count shared equally and the remainder to the ranks with
    the fewest dealt tokens so far. Returns the dealt tokens (int64) and work (float64) per rank.

    Small documents cost more per pair (partly filled kernel tiles), so a rank made of many of them is slower
    than one with the same pairs in a few long pieces. Dealt evenly, they give every rank the same share of
    that overhead, and the fill balances the rest. Dealing stops at half of each rank's tokens or work.
    """
    small = sorted((e for e in range(pool.sparsest, pool.densest + 1)
                    if pool.bin[e] >= 0 and pool.count[e] and pool.length[e] <= small_tokens),
                   key=lambda e: pool.length[e], reverse=True)
    if small_tokens <= 0 or sum(pool.count[e] for e in small) < cp:
        return np.zeros(cp, np.int64), np.zeros(cp)  # too few to matter: the fill places them where balance needs them
    limits = real_per_rank // 2
    token_limit, work_limit = limits.tolist(), pool.work / cp / 2
    # dealt tokens and work per rank: arrays while bins are dealt at once, lists while one document at a time
    tokens, work = np.zeros(cp, np.int64), np.zeros(cp)
    fewest = None  # (dealt tokens, rank) of every rank: a heap, built when a bin is dealt one document at a time
    for e in small:
        length, unit_work = pool.length[e], pool.whole_work[e]
        base, extra = divmod(pool.count[e], cp)
        if base or extra > MANY_EXTRA:
            tokens, work = np.asarray(tokens), np.asarray(work)
        if base:  # every rank takes the same count, as far as its limits allow
            room = np.minimum((limits - tokens) // length, (work_limit - work) // unit_work)
            num = np.clip(room, 0, base).astype(np.int64)
            pool.hand_out_to_all(e, num)
            tokens, work = tokens + num * length, work + num * unit_work
            fewest = None
        if extra > MANY_EXTRA:  # the rest at once, one each to the ranks with the fewest dealt tokens
            pick = np.argsort(tokens, kind="stable")[:extra]
            pick = pick[(tokens[pick] + length <= limits[pick]) & (work[pick] + unit_work <= work_limit)]
            num = np.zeros(cp, np.int64)
            num[pick] = 1
            pool.hand_out_to_all(e, num)
            tokens, work = tokens + num * length, work + num * unit_work
            fewest, extra = None, 0
        if extra and fewest is None:
            tokens, work = tokens.tolist(), work.tolist()
            fewest = [(tokens[rank], rank) for rank in range(cp)]
            heapq.heapify(fewest)
        for _ in range(extra):  # the rest one at a time, each to the rank with the fewest dealt tokens
            rank = fewest[0][1]
            if tokens[rank] + length > token_limit[rank] or work[rank] + unit_work > work_limit:
                break  # that rank stays the one with the fewest: none of the rest fits either
            pool.hand_out(e, 1, rank)
            tokens[rank] += length
            work[rank] += unit_work
            heapq.heapreplace(fewest, (tokens[rank], rank))
    pool.settle()
    return np.array(tokens, np.int64), np.array(work)


def _fill_rank(pool: _Pool, num_tokens: int, target: float, rank: int) -> float:
    """Take exactly ``num_tokens`` tokens for ``rank``: the densest ``num_dense`` from the dense end and the
    rest from the sparse end; return their work.

    Moving one token of the rank's share from the sparse end to the dense end raises its work by the
    difference of the two boundary tokens' densities, so the work is (close to) increasing in ``num_dense`` and
    a bisection over token counts finds the ``num_dense`` whose work is closest to ``target``. Whole documents
    are taken from both ends; only the two boundary documents are cut (at any token).
    """
    dense_side, sparse_side = pool.walk(True, num_tokens), pool.walk(False, num_tokens)

    (dense_units, dense_before, dense_work), (sparse_units, sparse_before, sparse_work) = dense_side, sparse_side
    take_work, bisect_right = pool.take_work, bisect.bisect_right

    def work(num_dense: int) -> float:  # _side_work of both sides, written out (the bisection calls this most)
        k = bisect_right(dense_before, num_dense) - 1
        extra = num_dense - dense_before[k]
        total = dense_work[k] + (take_work(dense_units[k], extra, True) if extra else 0.0)
        num_sparse = num_tokens - num_dense
        k = bisect_right(sparse_before, num_sparse) - 1
        extra = num_sparse - sparse_before[k]
        return total + (sparse_work[k] + (take_work(sparse_units[k], extra, False) if extra else 0.0))

    left, right = 0, num_tokens  # bisection bounds on num_dense
    work_right = work(right)
    if work_right <= target:
        left = right
    elif (work_left := work(left)) < target:
        while right - left > 1:  # invariant: work(left) < target <= work(right)
            mid = (left + right) // 2
            work_mid = work(mid)
            if work_mid < target:
                left, work_left = mid, work_mid
            else:
                right, work_right = mid, work_mid
        left = left if target - work_left <= work_right - target else right
    taken = _one_spread_document(pool, dense_side, left, num_tokens, target, rank)
    if taken is None:
        taken = (_take_side(pool, dense_side, left, True, rank)
                 + _take_side(pool, sparse_side, num_tokens - left, False, rank))
    pool.settle()
    return taken


def _one_spread_document(pool: _Pool, dense_side, num_dense: int, num_tokens: int, target: float, rank: int
                         ) -> float | None:
    """Keep a rank from holding parts of two documents that each span several ranks.

    Every holder of part of such a document fetches most of it (all of it under a full mask), so a rank that
    holds the tail of one and the start of the next receives twice as much as any other. When the dense side
    would reach into a second spread document, it stops at the first one, and the rest of the rank is a window
    of whole entries from the middle of the density order whose work makes up the difference. Returns the work
    taken, or None when the two-ended fill should be used (no second document, or no window within
    ``WINDOW_SLACK`` above the target and ``WINDOW_UNDER`` below it).
    """
    units, tokens_before, work_before = dense_side
    first_doc, k = -1, 0
    while k < len(units) and tokens_before[k] < num_dense:
        doc = pool.spread[units[k]]
        if doc >= 0 and first_doc >= 0 and doc != first_doc:
            break
        if doc >= 0:
            first_doc = doc
        k += 1
    if k == len(units) or tokens_before[k] >= num_dense or first_doc < 0:
        return None
    stop = units[k - 1] if k else pool.densest + 1
    window = _middle_window(pool, num_tokens - tokens_before[k], target - work_before[k], stop)
    under = WINDOW_UNDER if pool.causal else WINDOW_SLACK
    if window is None or not -under * target <= work_before[k] + window[1] - target <= WINDOW_SLACK * target:
        return None
    taken = _take_side(pool, dense_side, tokens_before[k], True, rank)
    for e, num_taken in window[0]:
        taken += pool.take(e, num_taken, False, rank)
    return taken


WINDOW_SLACK = 0.02
"""Work above the rank's target (a fraction of it) accepted to keep a rank to one spread document."""
WINDOW_UNDER = 0.05
"""Causal: work below the rank's target (a fraction of it) accepted to keep a rank to one spread document. A rank
below its target is not the slowest, and the ranks after it share the difference; a rank that holds a few tokens of
a second long document fetches nearly all of that document for them."""


def _middle_window(pool: _Pool, num_tokens: int, need: float, stop: int):
    """Consecutive entries of the density order (before index ``stop``) holding ``num_tokens`` tokens, the last
    cut to a prefix, with work closest to ``need``: ``([(entry, tokens), ...], work)``, or None if none fits.

    A window's work grows with its first entry, so the first entry is found by bisection over the order.
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


def _window(pool: _Pool, first: int, num_tokens: int, stop: int):
    """Entries from index ``first`` on, the last cut to a prefix, holding ``num_tokens`` tokens (None if too
    few)."""
    taken, work, e = [], 0.0, first
    while num_tokens and e < stop:
        num_taken = min(pool.size(e), num_tokens)
        if num_taken:
            taken.append((e, num_taken))
            work += pool.take_work(e, num_taken, False)
            num_tokens -= num_taken
        e += 1
    return (taken, work) if not num_tokens else None


def _side_work(pool: _Pool, side, num_tokens: int, from_dense: bool) -> float:
    """Work of the first ``num_tokens`` tokens of a walked side (whole entries, then a boundary part)."""
    units, tokens_before, work_before = side
    k = bisect.bisect_right(tokens_before, num_tokens) - 1
    num_boundary = num_tokens - tokens_before[k]
    return work_before[k] + (pool.take_work(units[k], num_boundary, from_dense) if num_boundary else 0.0)


def _take_side(pool: _Pool, side, num_tokens: int, from_dense: bool, rank: int) -> float:
    """Take the first ``num_tokens`` tokens of a walked side out of the pool for ``rank``; return their work."""
    units, tokens_before, _ = side
    work = 0.0
    for k, e in enumerate(units):
        num_taken = min(tokens_before[k + 1], num_tokens) - tokens_before[k]
        if num_taken <= 0:
            break
        work += pool.take(e, num_taken, from_dense, rank)
    return work
