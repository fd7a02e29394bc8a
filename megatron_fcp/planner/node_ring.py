"""Node ring staging: the staging order of a node-aware plan, laid out so that the round-after relay
(:mod:`megatron_fcp.planner.relay`) brings each key/value of a shared document into a node once, and every rank of
the node takes a near-equal share of it over InfiniBand in every round. Pure integers (numpy), a function of
``(pieces, cp_node, slot)`` alone, so every rank derives the same order without a message.

Why: every holder of a long document receives nearly all of it. With each receiver's own staging order, node-mates
hold the same tokens in unrelated rounds, so most copies cross InfiniBand (docs/node_aware_exchange.md, step 5).

The layout. The stage split (:func:`~.stages.split_stages`) cuts a receiver's staging order every ``B`` positions
from the end; here positions may leave holes, and ``Piece.TOTAL`` is the end of the order (a multiple of ``slot``),
so with ``B = slot`` (the ``auto`` budget) every *slot* of ``slot`` positions is one stage. On each node, the
documents that at least two of its ranks receive, :data:`MIN_SLOTS` slots or more in all, from at least
:data:`MIN_SOURCE_NODES` other nodes, get a *region* of slots each (up to :data:`MAX_DOCUMENTS`, most received
first), the same slots on every rank of the node. For a region of ``k`` receivers (ring order: by rank) the
document's range ``[lo, hi)`` that the node receives is cut into *sub-chunks* of ``slot // k`` tokens, labelled
``(e, r)`` (``e`` in ``0..k-1``, ``r`` from 0). Receiver ``i`` holds sub-chunk ``(e, r)`` in the region's slot
``r + d`` with ``d = (i - e) mod k``, at offset ``d * (slot // k)`` of that slot. So in slot ``t`` it holds
``(i - d, t - d)`` for ``d = 0..k-1``, and its ring predecessor ``i - 1`` held all but the first of them one slot
earlier: each slot brings one sub-chunk from its owner (``d = 0``) and ``k - 1`` from the predecessor's stage buffer
over NVLink. Backward runs the same ring the other way (the refetch of slot ``t`` comes from the successor, which
held it one round earlier; gradients are summed down the ring). A region takes ``ceil(Q / k) + k - 1`` slots for
``Q`` sub-chunks: the ring fills and drains in its first and last ``k - 1`` slots. Labels are rotated by the node
(sub-chunk ``q`` has label ``q + node * k`` mod the region's), so the nodes fetch different parts of a document from
its owners in the same round.

A receiver of a region receives only what its queries need, as without the layout: where it does not need part of a
sub-chunk (tokens it owns, or past the last it needs), the successor takes that part from its owner. The rest of a
receiver's pieces keep their staging order: they fill the places its regions leave empty (the ring's partial slots,
the regions of documents it does not receive), cut where a free run ends, and what does not fit is packed against
the end of the order. Every receiver of a region of the node ends its order at the same slot, so their stages (and
backward rounds) line up. Ranks of the node that receive no region keep the plain order.

Memory: a stage holds at most ``B`` tokens as before (holes hold none). With a budget other than ``slot`` the
slots and the stages do not line up: the plan stays exact, only the relays find fewer copies.
"""

from __future__ import annotations

import numpy as np

from megatron_fcp.planner.columns import Piece
from megatron_fcp.planner.pairs import arange_within

MIN_SLOTS = 2
"""A document gets a region on a node where the node's ranks receive at least this many slots of it in all."""
MAX_DOCUMENTS = 8
"""At most this many regions per node (the documents its ranks receive most of)."""
MIN_SUB_CHUNK = 16
"""No region where a sub-chunk (``slot // k`` tokens) would be shorter than this."""
MIN_SOURCE_NODES = 2
"""A document gets a region on a node only where the node receives it from at least this many other nodes. With
one, the ring's extra stages (its fill and drain) cost more than the InfiniBand it saves in the validated model
(CP 16 and 32: up to 4% slower steps on linux_dirs); with two or more it pays."""


def node_ring_positions(pieces: np.ndarray, cp_node: np.ndarray, slot: int) -> np.ndarray:
    """``pieces`` (columns :class:`~.columns.Piece`, sorted by ``(dst, pos)``, contiguous positions) with the
    receivers' staging orders laid out as node rings (module docstring): pieces of a region cut at sub-chunk
    boundaries, ``pos`` and ``total`` of every receiver of a region rewritten. Sorted by ``(dst, pos)``."""
    cp_node = np.asarray(cp_node, np.int64)
    if pieces.shape[0] == 0 or slot < 1:
        return pieces
    dst = pieces[:, Piece.DST]
    regions = _regions(pieces, cp_node, slot)
    if not regions:
        return pieces
    ring_rows, end_slots, receivers_of_node = [], {}, {}
    for n, first_slot, receivers, lo, num_rows, members in regions:
        ring_rows.append(_ring_rows(pieces[members], receivers, lo, first_slot, num_rows, slot, n))
        end_slots[n] = first_slot + num_rows + receivers.shape[0] - 1  # regions of a node come in slot order
        receivers_of_node.setdefault(n, set()).update(receivers.tolist())
    in_region = np.zeros(pieces.shape[0], bool)
    in_region[np.concatenate([members for *_, members in regions])] = True
    ring = np.concatenate(ring_rows)
    ring = ring[np.lexsort((ring[:, Piece.POS], ring[:, Piece.DST]))]
    ring_ranks = np.asarray(sorted(r for ranks in receivers_of_node.values() for r in ranks), np.int64)
    # the rest of a ring receiver's pieces, in their order: first into the places its regions leave empty, then
    # packed against the end of its order, which is the same slot on every ring receiver of the node
    rest = pieces[np.isin(dst, ring_ranks) & ~in_region]  # sorted by receiver, as ring is
    ring_at = np.searchsorted(ring[:, Piece.DST], np.append(ring_ranks, ring_ranks[-1] + 1))
    rest_at = np.searchsorted(rest[:, Piece.DST], np.append(ring_ranks, ring_ranks[-1] + 1))
    placed, tails = [], {}
    for i, r in enumerate(ring_ranks.tolist()):
        mine = ring[ring_at[i]:ring_at[i + 1]]
        in_holes, tail = _into_holes(rest[rest_at[i]:rest_at[i + 1]], mine[:, Piece.POS],
                                     mine[:, Piece.END] - mine[:, Piece.START], end_slots[int(cp_node[r])] * slot)
        placed.append(in_holes)
        tails[r] = tail
    node_end = np.zeros(int(cp_node.max()) + 1, np.int64)
    for n, ranks in receivers_of_node.items():
        node_end[n] = end_slots[n] + max(-(-_tokens(tails[r]) // slot) for r in ranks)
    total = node_end[cp_node] * slot  # per rank: the end of its order (ring receivers)
    for r, tail in tails.items():  # packed against the end
        tail[:, Piece.POS] += total[r] - _tokens(tail)
        placed.append(tail)
    out = np.concatenate([pieces[~np.isin(dst, ring_ranks)], ring, *placed])
    of_ring = np.isin(out[:, Piece.DST], ring_ranks)
    out[of_ring, Piece.TOTAL] = total[out[of_ring, Piece.DST]]
    return out[np.lexsort((out[:, Piece.POS], out[:, Piece.DST]))]


def _tokens(rows: np.ndarray) -> int:
    return int((rows[:, Piece.END] - rows[:, Piece.START]).sum())


def _into_holes(rows: np.ndarray, taken_pos: np.ndarray, taken_len: np.ndarray, limit: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Lay ``rows`` (one receiver's pieces, in order) end to end into the positions below ``limit`` that the sorted
    places ``[taken_pos, taken_pos + taken_len)`` leave free, cutting them where a free run ends. Returns the rows
    placed there and the rest, positioned from 0 (to be moved to the end of the order)."""
    hole_start = np.concatenate([[0], taken_pos + taken_len])
    hole_end = np.concatenate([taken_pos, [limit]])
    keep = hole_end > hole_start
    hole_start, hole_len = hole_start[keep], (hole_end - hole_start)[keep]
    room = int(hole_len.sum())
    lens = rows[:, Piece.END] - rows[:, Piece.START]
    at = np.cumsum(lens) - lens  # each row's start, laid end to end
    cuts = np.unique(np.concatenate([at, at + lens, np.cumsum(hole_len)[:-1], [room]]))
    cuts = cuts[cuts <= int(lens.sum())]
    row = np.searchsorted(at, cuts[:-1], "right") - 1  # the row of each elementary range
    out = rows[row].copy()
    out[:, Piece.START] += cuts[:-1] - at[row]
    out[:, Piece.END] = out[:, Piece.START] + np.diff(cuts)
    out[:, Piece.SRC_OFFSET] += cuts[:-1] - at[row]
    inside = cuts[:-1] < room
    hole = np.searchsorted(np.cumsum(hole_len), cuts[:-1], "right")
    free_before = np.concatenate([[0], np.cumsum(hole_len)])
    out[inside, Piece.POS] = hole_start[hole[inside]] + cuts[:-1][inside] - free_before[hole[inside]]
    out[~inside, Piece.POS] = cuts[:-1][~inside] - room
    return out[inside], out[~inside]


def _regions(pieces: np.ndarray, cp_node: np.ndarray, slot: int) -> list[tuple]:
    """The regions of every node, in slot order: ``(node, first slot, receivers (sorted), lo, rows of labels, piece
    indices)``; a region takes ``rows + k - 1`` slots."""
    dst, doc = pieces[:, Piece.DST], pieces[:, Piece.DOC]
    lens = pieces[:, Piece.END] - pieces[:, Piece.START]
    node = cp_node[dst]
    num_docs, width = int(doc.max()) + 1, int(dst.max()) + 1
    keys, inverse = np.unique(node * num_docs + doc, return_inverse=True)
    inverse = inverse.reshape(-1)
    tokens = np.bincount(inverse, weights=lens).astype(np.int64)
    num_receivers = np.bincount(np.unique(inverse * width + dst) // width, minlength=keys.shape[0])
    src_node = cp_node[pieces[:, Piece.SRC]]
    nodes = int(cp_node.max()) + 1
    other = np.unique((inverse * nodes + src_node)[src_node != node])  # distinct (key, other source node)
    num_sources = np.bincount(other // nodes, minlength=keys.shape[0])
    chosen = np.flatnonzero((num_receivers >= 2) & (tokens >= MIN_SLOTS * slot) & (num_sources >= MIN_SOURCE_NODES)
                            & (slot // np.maximum(num_receivers, 1) >= MIN_SUB_CHUNK))
    # per node, most received first (ties: the lower document)
    chosen = chosen[np.lexsort((keys[chosen] % num_docs, -tokens[chosen], keys[chosen] // num_docs))]
    by_key = np.argsort(inverse, kind="stable")  # the pieces of each (node, document), in piece order
    key_at = np.searchsorted(inverse[by_key], np.arange(keys.shape[0] + 1))
    regions, next_slot, count = [], {}, {}
    for c in chosen.tolist():
        n = int(keys[c]) // num_docs
        if count.get(n, 0) >= MAX_DOCUMENTS:
            continue
        members = by_key[key_at[c]:key_at[c + 1]]
        receivers = np.unique(dst[members])
        k, sub = receivers.shape[0], slot // receivers.shape[0]
        lo, hi = int(pieces[members, Piece.START].min()), int(pieces[members, Piece.END].max())
        num_sub_chunks = -(-(hi - lo) // sub)
        num_rows = -(-num_sub_chunks // k)
        first_slot = next_slot.get(n, 0)
        regions.append((n, first_slot, receivers, lo, num_rows, members))
        next_slot[n] = first_slot + num_rows + k - 1
        count[n] = count.get(n, 0) + 1
    return regions


def _ring_rows(rows: np.ndarray, receivers: np.ndarray, lo: int, first_slot: int, num_rows: int, slot: int,
               node: int) -> np.ndarray:
    """A region's pieces cut at sub-chunk boundaries, with their ring positions (module docstring)."""
    k = receivers.shape[0]
    sub = slot // k
    start, end = rows[:, Piece.START], rows[:, Piece.END]
    q_first, q_last = (start - lo) // sub, (end - 1 - lo) // sub
    count = q_last - q_first + 1
    of = np.repeat(np.arange(rows.shape[0]), count)
    q = q_first[of] + arange_within(count)
    out = rows[of].copy()
    out[:, Piece.START] = np.maximum(start[of], lo + q * sub)
    out[:, Piece.END] = np.minimum(end[of], lo + (q + 1) * sub)
    out[:, Piece.SRC_OFFSET] += out[:, Piece.START] - start[of]
    label = (q + node * k) % (num_rows * k)
    d = (np.searchsorted(receivers, out[:, Piece.DST]) - label % k) % k
    out[:, Piece.POS] = (first_slot + label // k + d) * slot + d * sub + out[:, Piece.START] - lo - q * sub
    return out
