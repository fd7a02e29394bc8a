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
from megatron_fcp.planner.columns import KV, Q
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
    doc_group_size = group_size[docs]
    chunk = -(-lens[docs] // (2 * doc_group_size))
    padded = np.zeros_like(lens)
    padded[docs] = chunk * 2 * doc_group_size
    num_chunks = 2 * doc_group_size
    doc_index = np.repeat(np.arange(docs.shape[0]), num_chunks)  # per chunk: its document's index in docs
    chunk_index = arange_within(num_chunks)  # chunk index within its document
    chunk_group_size = doc_group_size[doc_index]
    member = np.where(chunk_index < chunk_group_size, chunk_index, 2 * chunk_group_size - 1 - chunk_index)
    start = np.minimum(chunk_index * chunk[doc_index], lens[docs][doc_index])
    end = np.minimum((chunk_index + 1) * chunk[doc_index], lens[docs][doc_index])
    rows = np.column_stack([first_rank[docs][doc_index] + member, docs[doc_index], start, end])
    rows = rows[end > start]
    return rows[np.lexsort((rows[:, Q.START], rows[:, Q.DOC], rows[:, Q.CP_RANK]))], padded


def _pad_to_equal(rows: np.ndarray, cp: int, slots: int) -> np.ndarray:
    num_real = np.bincount(rows[:, Q.CP_RANK], weights=rows[:, Q.END] - rows[:, Q.START], minlength=cp)
    return slots - num_real.astype(np.int64)


def plan_ring(lens: np.ndarray, cp: int, tokens_per_rank: int, mask: str) -> Plan:
    """Transformer Engine's ring CP on a packed batch (see module docstring)."""
    rows, padded = _zigzag_rows(lens, np.full(lens.shape, cp), np.zeros(lens.shape, np.int64))
    slots = max(int(padded.sum()) // cp, tokens_per_rank)
    return Plan(strategy="ring", cp=cp, mask=mask, doc_lens=lens, q_rows=rows, kv=np.zeros((0, len(KV)), np.int64),
                num_pad_tokens=_pad_to_equal(rows, cp, slots), exchange="ring")


def plan_hybrid(lens: np.ndarray, cp: int, tokens_per_rank: int, mask: str) -> Plan:
    """Megatron's hybrid/dynamic CP (see module docstring)."""
    group = np.ones_like(lens)
    num_ranks_needed = -(-lens // tokens_per_rank)
    while np.any((group < num_ranks_needed) & (group < cp)):
        group = np.where((group < num_ranks_needed) & (group < cp), group * 2, group)
    group = np.minimum(group, _largest_pow2_divisor(cp))
    first_rank = _place_groups(lens, group, cp, tokens_per_rank, mask)
    rows, padded = _zigzag_rows(lens, group, first_rank)
    slot_use = np.zeros(cp, np.int64)
    for doc in np.flatnonzero(lens > 0).tolist():
        slot_use[first_rank[doc] : first_rank[doc] + group[doc]] += padded[doc] // group[doc]
    slots = max(int(slot_use.max()), tokens_per_rank)
    num_pad = _pad_to_equal(rows, cp, slots)
    return Plan(strategy="hybrid", cp=cp, mask=mask, doc_lens=lens, q_rows=rows, kv=derive_kv(rows, lens, cp, "full"),
                num_pad_tokens=num_pad, exchange="group_ring")


def _largest_pow2_divisor(n: int) -> int:
    return n & -n


def _place_groups(lens: np.ndarray, group: np.ndarray, cp: int, tokens_per_rank: int, mask: str) -> np.ndarray:
    """First rank of each document's aligned group: largest work first, least-loaded group with token room."""
    work = q_pairs(0, lens, lens, mask).astype(np.float64)
    load = np.zeros(cp)
    tokens = np.zeros(cp)
    first_rank = np.zeros(lens.shape, np.int64)
    for doc in np.argsort(-work, kind="stable"):
        if lens[doc] == 0:
            continue
        group_size = int(group[doc])
        share = lens[doc] / group_size
        group_load = load.reshape(-1, group_size).max(axis=1)
        room = tokens.reshape(-1, group_size).max(axis=1) + share <= tokens_per_rank
        candidates = np.flatnonzero(room) if room.any() else np.arange(cp // group_size)
        best_group = int(candidates[np.argmin(group_load[candidates])])
        first_rank[doc] = best_group * group_size
        load[best_group * group_size : (best_group + 1) * group_size] += work[doc] / group_size
        tokens[best_group * group_size : (best_group + 1) * group_size] += share
    return first_rank


def plan_magi(lens: np.ndarray, cp: int, tokens_per_rank: int, mask: str, chunk: int = MAGI_CHUNK) -> Plan:
    """MagiAttention-style equal-chunk min-heap dispatch (see module docstring)."""
    chunk = _chunk_size(tokens_per_rank, chunk)
    doc_bounds = np.concatenate([[0], np.cumsum(lens)])
    num_chunks = cp * tokens_per_rank // chunk
    pieces = _chunk_pieces(lens, doc_bounds, chunk, num_chunks)  # (chunk_id, doc, start, end)
    cost = np.bincount(pieces[:, 0], weights=q_pairs(pieces[:, 2], pieces[:, 3], lens[pieces[:, 1]], mask),
                       minlength=num_chunks)
    owner = _heap_dispatch(cost, cp, tokens_per_rank // chunk)
    rows = np.column_stack([owner[pieces[:, 0]], pieces[:, 1:]])
    rows = merge_adjacent_q(rows)
    return Plan(strategy="magi", cp=cp, mask=mask, doc_lens=lens, q_rows=rows, kv=derive_kv(rows, lens, cp, mask),
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
    first_chunk = bounds[docs] // chunk
    last_chunk = (bounds[docs + 1] - 1) // chunk
    num_doc_chunks = last_chunk - first_chunk + 1
    doc_index = np.repeat(np.arange(docs.shape[0]), num_doc_chunks)  # per piece: its document's index in docs
    chunk_id = first_chunk[doc_index] + arange_within(num_doc_chunks)
    start = np.maximum(chunk_id * chunk, bounds[docs][doc_index]) - bounds[docs][doc_index]
    end = np.minimum((chunk_id + 1) * chunk, bounds[docs + 1][doc_index]) - bounds[docs][doc_index]
    assert chunk_id.max(initial=0) < num_chunks
    return np.column_stack([chunk_id, docs[doc_index], start, end])


def _heap_dispatch(cost: np.ndarray, cp: int, per_rank: int) -> np.ndarray:
    """Largest cost first onto the least-loaded rank that has fewer than ``per_rank`` chunks."""
    rank_heap = [(0.0, rank) for rank in range(cp)]  # (load, rank) of ranks with room
    num_rank_chunks = [0] * cp
    owner = np.zeros(cost.shape[0], np.int64)
    for chunk_id in np.argsort(-cost, kind="stable").tolist():
        load, rank = heapq.heappop(rank_heap)
        owner[chunk_id] = rank
        num_rank_chunks[rank] += 1
        if num_rank_chunks[rank] < per_rank:
            heapq.heappush(rank_heap, (load + float(cost[chunk_id]), rank))
    return owner


def plan_nocp(lens: np.ndarray, cp: int, tokens_per_rank: int, mask: str) -> Plan:
    """Whole documents per rank, no key/value exchange (see module docstring)."""
    if lens.max(initial=0) > tokens_per_rank:
        raise InputError(
            f"strategy nocp needs every document to fit one rank, but a document has {int(lens.max())} tokens "
            f"> tokens_per_rank={tokens_per_rank}"
        )
    work = q_pairs(0, lens, lens, mask).astype(np.float64)
    rank_heap = [(0.0, rank) for rank in range(cp)]  # (load, rank)
    tokens = np.zeros(cp, np.int64)
    owner = np.zeros(lens.shape, np.int64)
    for doc in np.argsort(-work, kind="stable").tolist():
        if lens[doc] == 0:
            continue
        skipped = []
        while rank_heap:
            load, rank = heapq.heappop(rank_heap)
            if tokens[rank] + lens[doc] <= tokens_per_rank or not rank_heap:
                break
            skipped.append((load, rank))
        owner[doc] = rank
        tokens[rank] += lens[doc]
        for item in [*skipped, (load + float(work[doc]), rank)]:
            heapq.heappush(rank_heap, item)
    docs = np.flatnonzero(lens > 0)
    rows = np.column_stack([owner[docs], docs, np.zeros_like(docs), lens[docs]])
    rows = rows[np.lexsort((rows[:, Q.DOC], rows[:, Q.CP_RANK]))]
    slots = max(int(tokens.max()), tokens_per_rank)
    return Plan(strategy="nocp", cp=cp, mask=mask, doc_lens=lens, q_rows=rows, kv=np.zeros((0, len(KV)), np.int64),

                num_pad_tokens=slots - tokens, exchange="p2p")
