"""Today's CP designs, expressed in the planner's vocabulary so that one cost model compares them all.

- :func:`plan_ring`: ring CP as Transformer Engine runs packed (THD) batches: every document padded to a
  multiple of ``2*cp`` and cut into ``2*cp`` equal chunks, rank ``r`` holding chunks ``r`` and ``2*cp-1-r``;
  every key/value travels the whole ring in ``cp - 1`` steps.
- :func:`plan_hybrid`: Megatron's hybrid/dynamic CP: each document gets the smallest power-of-two group of
  ranks that holds it at ``tokens_per_rank`` per rank, a zigzag ring inside the group, and groups are chosen
  greedily (largest work first onto the least-loaded aligned group).
- :func:`plan_magi`: MagiAttention-style dispatch: the packed batch cut into equal chunks (2048 tokens by
  default), chunks handed out largest-cost first to the least-loaded rank that still has room, equal chunk
  counts per rank; key/values exchanged exactly as needed (group-cast).
- :func:`plan_nocp`: no CP splitting: whole documents on ranks (largest first onto the least-loaded rank with
  room). Only defined where every document fits one rank.
"""

from __future__ import annotations

import heapq

import numpy as np

from megatron_fcp.errors import InputError
from megatron_fcp.planner.pairs import arange_within, q_pairs
from megatron_fcp.planner.plan import Plan, derive_kv, merge_adjacent_q

MAGI_CHUNK = 2048
"""MagiAttention's default dispatch chunk size (tokens)."""


def _zigzag_rows(lens: np.ndarray, group_size: np.ndarray, first_rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q rows of documents split zigzag over groups ``[first_rank, first_rank + group_size)``.

    Returns ``(rows, padded_len)``: rows ``(cp_rank, doc, start, end)`` of non-empty chunks, and each
    document's length padded to a multiple of ``2 * group_size``.
    """
    docs = np.flatnonzero(lens > 0)
    g = group_size[docs]
    chunk = -(-lens[docs] // (2 * g))
    padded = np.zeros_like(lens)
    padded[docs] = chunk * 2 * g
    num = 2 * g
    rep = np.repeat(np.arange(docs.shape[0]), num)
    k = arange_within(num)  # chunk index within its document
    gg = g[rep]
    member = np.where(k < gg, k, 2 * gg - 1 - k)
    start = np.minimum(k * chunk[rep], lens[docs][rep])
    end = np.minimum((k + 1) * chunk[rep], lens[docs][rep])
    rows = np.column_stack([first_rank[docs][rep] + member, docs[rep], start, end])
    rows = rows[end > start]
    return rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))], padded


def _pad_to_equal(rows: np.ndarray, cp: int, slots: int) -> np.ndarray:
    real = np.bincount(rows[:, 0], weights=rows[:, 3] - rows[:, 2], minlength=cp).astype(np.int64)
    return slots - real


def plan_ring(lens: np.ndarray, cp: int, tokens_per_rank: int, mask: str) -> Plan:
    """Transformer Engine's ring CP on a packed batch (see module docstring)."""
    rows, padded = _zigzag_rows(lens, np.full(lens.shape, cp), np.zeros(lens.shape, np.int64))
    slots = max(int(padded.sum()) // cp, tokens_per_rank)
    return Plan(strategy="ring", cp=cp, mask=mask, doc_lens=lens, q=rows, kv=np.zeros((0, 5), np.int64),
                num_pad_tokens=_pad_to_equal(rows, cp, slots), exchange="ring")


def plan_hybrid(lens: np.ndarray, cp: int, tokens_per_rank: int, mask: str) -> Plan:
    """Megatron's hybrid/dynamic CP (see module docstring)."""
    group = np.ones_like(lens)
    need = -(-lens // tokens_per_rank)
    while np.any((group < need) & (group < cp)):
        group = np.where((group < need) & (group < cp), group * 2, group)
    group = np.minimum(group, _largest_pow2_divisor(cp))
    first = _place_groups(lens, group, cp, tokens_per_rank, mask)
    rows, padded = _zigzag_rows(lens, group, first)
    slot_use = np.zeros(cp, np.int64)
    for doc in np.flatnonzero(lens > 0).tolist():
        slot_use[first[doc] : first[doc] + group[doc]] += padded[doc] // group[doc]
    slots = max(int(slot_use.max()), tokens_per_rank)
    num_pad = _pad_to_equal(rows, cp, slots)
    return Plan(strategy="hybrid", cp=cp, mask=mask, doc_lens=lens, q=rows, kv=derive_kv(rows, lens, cp, "full"),
                num_pad_tokens=num_pad, exchange="group_ring")


def _largest_pow2_divisor(n: int) -> int:
    return n & -n


def _place_groups(lens: np.ndarray, group: np.ndarray, cp: int, tokens_per_rank: int, mask: str) -> np.ndarray:
    """First rank of each document's aligned group: largest work first, least-loaded group with token room."""
    work = q_pairs(0, lens, lens, mask).astype(np.float64)
    load = np.zeros(cp)
    tokens = np.zeros(cp)
    first = np.zeros(lens.shape, np.int64)
    for doc in np.argsort(-work, kind="stable"):
        if lens[doc] == 0:
            continue
        g = int(group[doc])
        share = lens[doc] / g
        group_load = load.reshape(-1, g).max(axis=1)
        room = tokens.reshape(-1, g).max(axis=1) + share <= tokens_per_rank
        candidates = np.flatnonzero(room) if room.any() else np.arange(cp // g)
        best = int(candidates[np.argmin(group_load[candidates])])
        first[doc] = best * g
        load[best * g : (best + 1) * g] += work[doc] / g
        tokens[best * g : (best + 1) * g] += share
    return first


def plan_magi(lens: np.ndarray, cp: int, tokens_per_rank: int, mask: str, chunk: int = MAGI_CHUNK) -> Plan:
    """MagiAttention-style equal-chunk min-heap dispatch (see module docstring)."""
    chunk = _chunk_size(tokens_per_rank, chunk)
    bounds = np.concatenate([[0], np.cumsum(lens)])
    num_chunks = cp * tokens_per_rank // chunk
    pieces = _chunk_pieces(lens, bounds, chunk, num_chunks)  # (chunk_id, doc, start, end)
    cost = np.bincount(pieces[:, 0], weights=q_pairs(pieces[:, 2], pieces[:, 3], lens[pieces[:, 1]], mask),
                       minlength=num_chunks)
    owner = _heap_dispatch(cost, cp, tokens_per_rank // chunk)
    rows = np.column_stack([owner[pieces[:, 0]], pieces[:, 1:]])
    rows = merge_adjacent_q(rows)
    return Plan(strategy="magi", cp=cp, mask=mask, doc_lens=lens, q=rows, kv=derive_kv(rows, lens, cp, mask),
                num_pad_tokens=_pad_to_equal(rows, cp, tokens_per_rank), exchange="p2p",
                notes=(("chunk", str(chunk)),))


def _chunk_size(tokens_per_rank: int, preferred: int) -> int:
    """The largest divisor of ``tokens_per_rank`` not above ``preferred`` (equal chunks per rank)."""
    for size in range(min(preferred, tokens_per_rank), 0, -1):
        if tokens_per_rank % size == 0:
            return size
    return 1


def _chunk_pieces(lens: np.ndarray, bounds: np.ndarray, chunk: int, num_chunks: int) -> np.ndarray:
    """Split documents at global chunk boundaries: rows ``(chunk_id, doc, start, end)``."""
    docs = np.flatnonzero(lens > 0)
    first = bounds[docs] // chunk
    last = (bounds[docs + 1] - 1) // chunk
    num = last - first + 1
    rep = np.repeat(np.arange(docs.shape[0]), num)
    cid = first[rep] + arange_within(num)
    start = np.maximum(cid * chunk, bounds[docs][rep]) - bounds[docs][rep]
    end = np.minimum((cid + 1) * chunk, bounds[docs + 1][rep]) - bounds[docs][rep]
    assert cid.max(initial=0) < num_chunks
    return np.column_stack([cid, docs[rep], start, end])


def _heap_dispatch(cost: np.ndarray, cp: int, per_rank: int) -> np.ndarray:
    """Largest cost first onto the least-loaded rank that has fewer than ``per_rank`` chunks."""
    heap = [(0.0, r) for r in range(cp)]
    count = [0] * cp
    owner = np.zeros(cost.shape[0], np.int64)
    for c in np.argsort(-cost, kind="stable").tolist():
        load, r = heapq.heappop(heap)
        owner[c] = r
        count[r] += 1
        if count[r] < per_rank:
            heapq.heappush(heap, (load + float(cost[c]), r))
    return owner


def plan_nocp(lens: np.ndarray, cp: int, tokens_per_rank: int, mask: str) -> Plan:
    """Whole documents per rank, no key/value exchange (see module docstring)."""
    if lens.max(initial=0) > tokens_per_rank:
        raise InputError(
            f"strategy nocp needs every document to fit one rank, but a document has {int(lens.max())} tokens "
            f"> tokens_per_rank={tokens_per_rank}"
        )
    work = q_pairs(0, lens, lens, mask).astype(np.float64)
    load = [(0.0, r) for r in range(cp)]
    tokens = np.zeros(cp, np.int64)
    owner = np.zeros(lens.shape, np.int64)
    for doc in np.argsort(-work, kind="stable").tolist():
        if lens[doc] == 0:
            continue
        skipped = []
        while load:
            w, r = heapq.heappop(load)
            if tokens[r] + lens[doc] <= tokens_per_rank or not load:
                break
            skipped.append((w, r))
        owner[doc] = r
        tokens[r] += lens[doc]
        for item in [*skipped, (w + float(work[doc]), r)]:
            heapq.heappush(load, item)
    docs = np.flatnonzero(lens > 0)
    rows = np.column_stack([owner[docs], docs, np.zeros_like(docs), lens[docs]])
    rows = rows[np.lexsort((rows[:, 1], rows[:, 0]))]
    slots = max(int(tokens.max()), tokens_per_rank)
    return Plan(strategy="nocp", cp=cp, mask=mask, doc_lens=lens, q=rows, kv=np.zeros((0, 5), np.int64),
                num_pad_tokens=slots - tokens, exchange="p2p")
