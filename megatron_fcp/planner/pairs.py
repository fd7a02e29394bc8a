"""Exact counts of query-key pairs under causal and full masks, vectorised.

Ranges are half-open, ``[start, end)``, in token positions inside one document. Under the causal mask query
``i`` sees key ``j`` iff ``j <= i``; under the full (bidirectional) mask it sees every key of its document.
All functions accept numpy arrays (broadcast elementwise) or Python ints and return int64 counts.
"""

from __future__ import annotations

import numpy as np

MASKS = ("causal", "full")
BWD_FLOPS_FACTOR = 2.5
"""Backward FLOPs over forward FLOPs of attention, the FlashAttention papers' convention (five matmuls backward,
two forward); shared by the cost model and the benchmarks."""


def tri(n):
    """``n * (n + 1) // 2``: causal pairs of the first ``n`` rows of a document."""
    n = np.asarray(n, dtype=np.int64)
    return n * (n + 1) // 2


def q_pairs(start, end, doc_len, mask: str):
    """Pairs of queries ``[start, end)`` against every key they may see in their document."""
    start = np.asarray(start, dtype=np.int64)
    end = np.asarray(end, dtype=np.int64)
    if mask == "causal":
        return tri(end) - tri(start)
    return (end - start) * np.asarray(doc_len, dtype=np.int64)


def _causal_prefix(q_end, k_start, k_end):
    """Causal pairs of query rows ``[0, q_end)`` against keys ``[k_start, k_end)``."""
    q_end_in_keys = np.clip(q_end, k_start, k_end)
    return tri(q_end_in_keys - k_start) + np.maximum(q_end - k_end, 0) * (k_end - k_start)


def block_pairs(q_start, q_end, k_start, k_end, mask: str):
    """Pairs of queries ``[q_start, q_end)`` against keys ``[k_start, k_end)`` of the same document."""
    q_start, q_end, k_start, k_end = (np.asarray(bound, dtype=np.int64) for bound in (q_start, q_end, k_start, k_end))
    if mask == "full":
        return (q_end - q_start) * (k_end - k_start)
    return _causal_prefix(q_end, k_start, k_end) - _causal_prefix(q_start, k_start, k_end)


def edge_pairs(num_tokens, num_segments, tile: int):
    """The attention kernel's edge work, in pairs: the partly filled tiles of a sequence cost half a tile per
    query or key token along its edges and a quarter tile squared per sequence. The one formula behind the
    planner's piece cost (:mod:`megatron_fcp.planner.fcp`) and the cost model's (:mod:`megatron_fcp.sim`)."""
    return tile / 2 * num_tokens + tile * tile / 4 * num_segments


def arange_within(counts) -> np.ndarray:
    """For groups of ``counts`` elements laid end to end, each element's position inside its group."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def doc_starts(doc_lens: np.ndarray, docs) -> np.ndarray:
    """int64 per entry of ``docs``: the packed-batch position of that document's first token, ``sum(doc_lens[:d])``.
    One segment sum between the distinct documents asked for instead of a prefix sum of every document (a tenth of
    its time on a batch of millions of documents, of which a rank's view asks for a few)."""
    docs = np.asarray(docs, dtype=np.int64)
    if doc_lens.shape[0] <= 4 * docs.shape[0]:  # as many documents as are asked for: the prefix sum is cheaper
        return np.concatenate([[0], np.cumsum(doc_lens)]).astype(np.int64)[docs]
    distinct, slot = np.unique(docs, return_inverse=True)
    if distinct.shape[0] == 0:
        return np.zeros(0, np.int64)
    between = np.add.reduceat(doc_lens, distinct)[:-1]  # tokens of documents distinct[k] .. distinct[k + 1] - 1
    starts = np.concatenate([[0], np.cumsum(between)]) + int(doc_lens[: distinct[0]].sum())
    return starts.astype(np.int64)[slot.reshape(-1)]


def matching_rows(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every ``(i, j)`` with ``sorted_keys[j] == keys[i]`` (``sorted_keys`` ascending): a vectorised join, as
    int64 arrays ``i`` (ascending) and ``j``."""
    first_match = np.searchsorted(sorted_keys, keys, "left")
    num_matches = np.searchsorted(sorted_keys, keys, "right") - first_match
    i = np.repeat(np.arange(keys.shape[0], dtype=np.int64), num_matches)
    return i, first_match[i] + arange_within(num_matches)


def needed_kv_end(q_end, doc_len, mask: str):
    """End of the key range ``[0, end)`` that queries ending at ``q_end`` need (causal) or the document (full)."""
    if mask == "causal":
        return np.asarray(q_end, dtype=np.int64)
    return np.asarray(doc_len, dtype=np.int64)


def check_mask(mask: str) -> str:
    """Return ``mask`` if it is a known mask type, else raise a ValueError naming the choices."""
    if mask not in MASKS:
        raise ValueError(f"unknown mask {mask!r}: choose one of {', '.join(MASKS)}")
    return mask
