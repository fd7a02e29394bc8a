"""The staged key/value exchange: what a rank receives cut into pieces, pieces into stages under a token budget,
and the memory and traffic that follow. Pure integers (numpy): no device, no communication.

Vocabulary (every range half-open ``[start, end)`` in token positions of one document):

- A **piece** is a key/value range that one rank (``dst``) receives from its owner (``src``) and that is
  contiguous in both ranks' memory: a plan ``kv`` row cut where the owner's ``q`` rows end. Columns
  (:data:`PIECE_COLS`): ``dst, src, doc, start, end``; ``src_offset``, the owner's local token index of
  ``start``; ``pos``, where the piece starts in the receiver's *staging order*; ``total``, the tokens the
  receiver receives in all.
- The **staging order** of a receiver lays its pieces end to end by document, and inside a document by start,
  rotated to begin at an *anchor* token: under a full mask the receiver's first own token of the document,
  under a causal mask a point before it that differs between receivers (a hash of the receiver's rank). The
  rotation spreads the load over the owners: every holder of a long document fetches its early key/values,
  and without it they would all fetch them from the same owner in the same round, which makes that round as
  long as the owner's sends and brings all their gradients back to it at once in backward.
- Under a budget of ``B`` tokens, a receiver of ``R`` tokens cuts its staging order into ``n = ceil(R / B)``
  **stages** (one stage when ``R <= B`` or without a budget): the first holds the remainder
  ``R - (n - 1) * B``, every later stage exactly ``B``. On a node-aware plan the order may leave holes
  (:mod:`megatron_fcp.planner.node_ring`): it then ends at ``total > R``, the split is the same over positions
  ``[0, total)``, and a stage holds at most ``B`` tokens (possibly none). Stage ``j`` travels in forward round
  ``j``; the last stage is kept for backward, and stage ``j < n - 1`` is fetched again in backward round
  ``n - 1 - j``. Sender and receiver both derive the split from ``(pos, total, B)``, so they agree without a message.

Memory per rank and attention layer, in key/value tokens (a token is one K row and one V row; bytes = tokens x
``2 * kv_heads * head_dim * bytes_per_element``). The next stage arrives while the current one is computed, so at
most two stages are alive at once, in forward and in backward alike:

- remote key/values held at once (peak): ``min(R, 2B)``;
- remote key/values kept from forward to backward: ``min(R, B)``;
- key/values fetched again in backward: ``max(R - B, 0)``.

With holes the same hold as bounds, and :func:`p2p_memory` gives the exact figures from what each stage holds (the
most two consecutive stages hold, the last stage's tokens, the rest).

Without a budget (``None``) there is one stage: all ``R`` tokens are held and kept and nothing is fetched again.
"""

from __future__ import annotations

import numbers

import numpy as np

from megatron_fcp.errors import InputError
from megatron_fcp.planner.columns import KV, Piece, Q
from megatron_fcp.planner.node_ring import node_ring_positions
from megatron_fcp.planner.pairs import arange_within, doc_starts, matching_rows

PIECE_COLS = tuple(column.name.lower() for column in Piece)
"""``("dst", "src", "doc", "start", "end", "src_offset", "pos", "total")``: the columns of pieces (:class:`Piece`)."""
_CUT_COLS = (Piece.DST, Piece.SRC, Piece.DOC, Piece.START, Piece.END, Piece.SRC_OFFSET)
"""Columns of :func:`cut_at_owners`' rows: a piece before its staging position (the first columns of a piece)."""
DEFAULT_KV_BUDGET = "auto"
"""``auto``: a stage holds at most as many key/value tokens as the rank owns (its token slots), so a rank never
holds more than twice its own key/values from other ranks and keeps at most once its own for backward."""


# -- the budget -------------------------------------------------------------------------------------------------
def parse_kv_budget(value, flag: str = "kv_budget_tokens") -> int | str | None:
    """A budget setting: a positive integer (tokens per stage), ``"auto"`` or ``None``/``"none"`` (one stage).

    Raises :class:`InputError` naming ``flag`` and values that work for anything else.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise InputError(f"{flag} must be a whole number of key/value tokens per stage, 'auto' (the rank's "
                             f"own token count) or 'none' (one unbounded stage); got {value!r} (try auto or 4096)"
                             ) from None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{flag} must be a whole number of key/value tokens per stage, 'auto' or 'none'; got "
                         f"{value!r} (try auto or 4096)")
    if value < 1:
        raise InputError(f"{flag} {value} is below one key/value token, the least one kernel call needs; use a "
                         "positive number of tokens per stage (e.g. 4096), 'auto' or 'none'")
    return int(value)


def resolve_kv_budget(budget, num_tokens: int) -> int | None:
    """Tokens per stage for a rank of ``num_tokens`` token slots: ``auto`` is ``num_tokens``; ``None`` unbounded."""
    budget = parse_kv_budget(budget)
    if budget == "auto":
        return max(int(num_tokens), 1)
    return budget


# -- memory and traffic ----------------------------------------------------------------------------------------
def num_stages(total, budget: int | None) -> np.ndarray:
    """int64: stages of receivers of ``total`` tokens (0 for a receiver of nothing)."""
    total = np.asarray(total, dtype=np.int64)
    if budget is None:
        return (total > 0).astype(np.int64)
    return -(-total // budget)


def stage_memory(total, budget: int | None) -> dict[str, np.ndarray]:
    """Per receiver of ``total`` tokens in a staging order without holes (int64 arrays): ``stages``, ``peak`` remote
    key/values held at once, ``saved`` for backward, ``refetch`` (fetched again in backward); see the module
    docstring. :func:`p2p_memory` counts the same from what each stage holds, so it covers orders with holes too."""
    total = np.asarray(total, dtype=np.int64)
    if budget is None:
        return {"stages": num_stages(total, None), "peak": total.copy(), "saved": total.copy(),
                "refetch": np.zeros_like(total)}
    return {"stages": num_stages(total, budget), "peak": np.minimum(total, 2 * budget),
            "saved": np.minimum(total, budget), "refetch": np.maximum(total - budget, 0)}


# -- stages ------------------------------------------------------------------------------------------------
def split_stages(pos, length, total, budget: int | None):
    """Cut ranges ``[pos, pos + length)`` of receivers' staging orders (of ``total`` tokens) at stage boundaries.

    Returns int64 arrays, one entry per sub-range: ``index`` (the range it comes from), ``offset`` (its start
    inside that range), ``length``, ``stage`` (its stage, = forward round) and ``num_stages`` (of its receiver).
    """
    pos, length, total = (np.asarray(column, dtype=np.int64).reshape(-1) for column in (pos, length, total))
    num_recv_stages = num_stages(total, budget)
    if budget is None:
        index = np.arange(pos.shape[0], dtype=np.int64)
        return index, np.zeros_like(pos), length.copy(), np.zeros_like(pos), num_recv_stages
    # the first stage holds the remainder, so the kept last one is full
    first_stage_len = total - (num_recv_stages - 1) * budget

    def stage_of(position):
        return np.where(position < first_stage_len, 0, 1 + (position - first_stage_len) // budget)

    first_stage, last_stage = stage_of(pos), stage_of(pos + length - 1)
    num_sub_ranges = last_stage - first_stage + 1
    index = np.repeat(np.arange(pos.shape[0], dtype=np.int64), num_sub_ranges)
    stage = first_stage[index] + arange_within(num_sub_ranges)
    stage_start = np.where(stage == 0, 0, first_stage_len[index] + (stage - 1) * budget)
    stage_end = first_stage_len[index] + stage * budget
    sub_start = np.maximum(pos[index], stage_start)
    sub_end = np.minimum(pos[index] + length[index], stage_end)
    return index, sub_start - pos[index], sub_end - sub_start, stage, num_recv_stages[index]


# -- pieces ------------------------------------------------------------------------------------------------
def local_offsets(q: np.ndarray) -> np.ndarray:
    """int64 per q row ``(rank, doc, start, end)``: local token index of its start on its rank (rows of a rank
    are laid out in the order they appear)."""
    row_lens = q[:, Q.END] - q[:, Q.START]
    order = np.argsort(q[:, Q.CP_RANK], kind="stable")
    tokens_before = np.cumsum(row_lens[order]) - row_lens[order]  # over all ranks, in rank order
    ranks = q[order, Q.CP_RANK]
    is_rank_first = np.concatenate([[True], ranks[1:] != ranks[:-1]]) if ranks.shape[0] else np.zeros(0, bool)
    rank_start = tokens_before[np.flatnonzero(is_rank_first)][np.cumsum(is_rank_first) - 1]
    out = np.empty_like(row_lens)
    out[order] = tokens_before - rank_start
    return out


def _lookup(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray, default: int = 0) -> np.ndarray:
    """``values`` at ``wanted`` keys (``keys`` sorted and unique), ``default`` where absent."""
    slot = np.minimum(np.searchsorted(keys, wanted), max(keys.shape[0] - 1, 0))
    found = keys.shape[0] > 0 and (keys[slot] == wanted)
    return np.where(found, values[slot] if keys.shape[0] else default, default)


def first_own_starts(q: np.ndarray, num_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys ``rank * num_docs + doc`` and the first start each rank owns of each document it holds."""
    key = q[:, Q.CP_RANK] * num_docs + q[:, Q.DOC]
    rank_doc_keys, key_of_row = np.unique(key, return_inverse=True)
    first_start = np.full(rank_doc_keys.shape[0], np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first_start, key_of_row.reshape(-1), q[:, Q.START])
    return rank_doc_keys, first_start


_SPREAD = 2654435761
"""Knuth's multiplicative hash constant: spreads receivers' causal starting points (integer arithmetic only, so
every machine computes the same staging order)."""


def staging_anchor(dst: np.ndarray, doc: np.ndarray, q: np.ndarray, doc_lens: np.ndarray, mask: str) -> np.ndarray:
    """Per ``(dst, doc)``: the token of the document where the receiver's staging order starts (see the module
    docstring). Full mask: the receiver's first own token. Causal: a point before it, spread over receivers by a
    hash of ``dst`` and moved back to the start of the ``q`` row that holds it (so no piece straddles it)."""
    num_docs = doc_lens.shape[0]
    keys, first_start = first_own_starts(q, num_docs)
    own_first = _lookup(keys, first_start, dst * num_docs + doc)
    if mask == "full":
        return own_first
    target = (own_first * ((dst * _SPREAD) % (1 << 32))) >> 32
    starts = doc_starts(doc_lens, np.concatenate([q[:, Q.DOC], doc]))
    q_doc_start, doc_start = starts[: q.shape[0]], starts[q.shape[0]:]
    row_starts = np.sort(q_doc_start + q[:, Q.START])
    row = np.searchsorted(row_starts, doc_start + target, "right") - 1
    return row_starts[np.maximum(row, 0)] - doc_start


def staging_key(rows: np.ndarray, q: np.ndarray, doc_lens: np.ndarray, mask: str) -> np.ndarray:
    """Per row ``(dst, src, doc, start, ...)`` (the first columns of a :class:`Piece`): its place in the receiver's
    staging order inside the document, ``(start - anchor) mod doc_len`` (:func:`staging_anchor`)."""
    if rows.shape[0] == 0:
        return rows[:, Piece.START].copy()
    anchor = staging_anchor(rows[:, Piece.DST], rows[:, Piece.DOC], q, doc_lens, mask)
    return (rows[:, Piece.START] - anchor) % np.maximum(doc_lens[rows[:, Piece.DOC]], 1)


def sort_order(*columns: np.ndarray) -> np.ndarray:
    """Indices sorting rows stably by ``columns`` (major first; non-negative int64 columns): one argsort of a
    combined key where it fits in 62 bits, else a lexsort."""
    if columns[0].shape[0] == 0:
        return np.zeros(0, np.int64)
    spans = [int(column.max()) + 1 for column in columns]
    if np.prod([float(span) for span in spans]) < 2.0**62:
        key = columns[0]
        for column, span in zip(columns[1:], spans[1:], strict=True):
            key = key * span + column
        return np.argsort(key, kind="stable")
    return np.lexsort(columns[::-1])


def cut_at_owners(q: np.ndarray, kv: np.ndarray, num_docs: int, offsets: np.ndarray | None = None) -> np.ndarray:
    """Rows ``(dst, src, doc, start, end, src_offset)``: ``kv`` rows ``(dst, src, doc, start, end)`` cut where the
    owner's ``q`` rows end, so each is contiguous in the owner's memory. ``offsets``: each ``q`` row's local token
    index on its rank, where ``q`` is not every row of its ranks (default: :func:`local_offsets` of ``q``)."""
    if kv.shape[0] == 0:
        return np.zeros((0, len(_CUT_COLS)), np.int64)
    offsets = local_offsets(q) if offsets is None else offsets
    order = sort_order(q[:, Q.CP_RANK], q[:, Q.DOC], q[:, Q.START])
    sorted_q, sorted_offsets = q[order], offsets[order]
    kv_row, q_row = matching_rows(sorted_q[:, Q.CP_RANK] * num_docs + sorted_q[:, Q.DOC],
                                  kv[:, KV.SRC_RANK] * num_docs + kv[:, KV.DOC])
    start = np.maximum(kv[kv_row, KV.START], sorted_q[q_row, Q.START])
    end = np.minimum(kv[kv_row, KV.END], sorted_q[q_row, Q.END])
    keep = np.flatnonzero(start < end)
    kv_row, q_row, start = kv_row[keep], q_row[keep], start[keep]
    rows = np.empty((keep.shape[0], len(_CUT_COLS)), np.int64)
    rows[:, Piece.DST] = kv[kv_row, KV.CP_RANK]
    rows[:, Piece.SRC] = kv[kv_row, KV.SRC_RANK]
    rows[:, Piece.DOC] = kv[kv_row, KV.DOC]
    rows[:, Piece.START], rows[:, Piece.END] = start, end[keep]
    rows[:, Piece.SRC_OFFSET] = sorted_offsets[q_row] + start - sorted_q[q_row, Q.START]
    return rows


def with_positions(rows: np.ndarray, q: np.ndarray, doc_lens: np.ndarray, mask: str, cp_node: np.ndarray | None = None,
                   slot: int | None = None) -> np.ndarray:
    """Rows ``(dst, src, doc, start, end, src_offset)`` -> pieces (:data:`PIECE_COLS`) sorted by ``(dst, pos)``.

    With ``cp_node`` (ranks on more than one node) and ``slot`` (the ranks' token slots, the ``auto`` budget), the
    staging orders are laid out as node rings (:mod:`megatron_fcp.planner.node_ring`): positions may leave holes,
    and ``total`` is the end of the order. ``rows`` must then hold every piece that the ranks of each node receive
    (what one rank's view computes covers whole nodes)."""
    if rows.shape[0] == 0:
        return np.zeros((0, len(PIECE_COLS)), np.int64)
    rows = rows[sort_order(rows[:, Piece.DST], rows[:, Piece.DOC], staging_key(rows, q, doc_lens, mask))]
    piece_lens = rows[:, Piece.END] - rows[:, Piece.START]
    dst = rows[:, Piece.DST]
    is_dst_first = np.concatenate([[True], dst[1:] != dst[:-1]])
    dst_group = np.cumsum(is_dst_first) - 1  # per row: index of its receiver among the receivers present
    tokens_before = np.cumsum(piece_lens) - piece_lens  # over all receivers, in order
    out = np.empty((rows.shape[0], len(PIECE_COLS)), np.int64)
    out[:, _CUT_COLS] = rows
    out[:, Piece.POS] = tokens_before - tokens_before[np.flatnonzero(is_dst_first)][dst_group]
    out[:, Piece.TOTAL] = np.bincount(dst_group, weights=piece_lens).astype(np.int64)[dst_group]
    if cp_node is not None and slot and int(np.max(cp_node, initial=0)) > 0:
        out = node_ring_positions(out, cp_node, slot)
    return out


def plan_pieces(q: np.ndarray, kv: np.ndarray, doc_lens: np.ndarray, mask: str, cp_node: np.ndarray | None = None,
                slot: int | None = None) -> np.ndarray:
    """Every piece of a point-to-point plan (its ``q`` and ``kv`` arrays), sorted by ``(dst, pos)``; node rings with
    ``cp_node`` and ``slot`` (:func:`with_positions`)."""
    return with_positions(cut_at_owners(q, kv, doc_lens.shape[0]), q, doc_lens, mask, cp_node, slot)


def _stage_memory_of(dst, stage, length, num_recv_stages, recv, cp: int, num_rounds: int) -> dict[str, np.ndarray]:
    """:func:`stage_memory`'s figures from what each stage holds (sub-pieces ``dst``, ``stage``, ``length``), so that
    staging orders with holes count right: two consecutive stages are alive at once (forward: the one computed and
    the next arriving; backward: the one computed and the next refetched), the last is kept."""
    held = np.bincount(dst * num_rounds + stage, weights=length, minlength=cp * num_rounds).reshape(cp, num_rounds)
    held = held.astype(np.int64)
    stages = np.zeros(cp, np.int64)
    np.maximum.at(stages, dst, num_recv_stages)
    pairs = held.copy()
    pairs[:, :-1] += held[:, 1:]
    saved = held[np.arange(cp), np.maximum(stages - 1, 0)] * (stages > 0)
    return {"stages": stages, "peak": pairs.max(axis=1), "saved": saved, "refetch": recv - saved}


MEMORY_FIELDS = ("own_kv_tokens", "recv_kv_tokens", "num_stages", "peak_remote_kv_tokens", "saved_remote_kv_tokens",
                 "refetch_kv_tokens", "peak_grad_tokens", "peak_returned_grad_tokens")


def p2p_memory(num_tokens: np.ndarray, pieces: np.ndarray, budget) -> dict[str, np.ndarray]:
    """Memory and traffic of the staged exchange per rank (int64 ``[cp]`` each; see the module docstring):

    - ``own_kv_tokens``: the rank's key/value rows (its token slots);
    - ``recv_kv_tokens``: key/values received in forward (``R``); ``num_stages``;
    - ``peak_remote_kv_tokens`` (``min(R, 2B)``), ``saved_remote_kv_tokens`` (``min(R, B)``),
      ``refetch_kv_tokens`` (``max(R - B, 0)``, fetched again in backward);
    - ``peak_grad_tokens``: key/value gradient rows of received key/values alive at once in backward: the
      stage being computed and the previous one on its way back, ``min(R, 2B)`` (16-bit inputs add a float32
      accumulator of one stage);
    - ``peak_returned_grad_tokens``: the most gradient rows of its own key/values that come back to the rank in
      one backward round.

    ``pieces`` are the plan's (:data:`PIECE_COLS`); ``budget`` a setting as for :func:`parse_kv_budget` (``auto``
    resolves to the ranks' token slots, equal on every rank).
    """
    num_tokens = np.asarray(num_tokens, dtype=np.int64)
    cp = num_tokens.shape[0]
    budget = resolve_kv_budget(budget, int(num_tokens.max(initial=1)))
    piece_lens = pieces[:, Piece.END] - pieces[:, Piece.START]
    recv = np.bincount(pieces[:, Piece.DST], weights=piece_lens, minlength=cp).astype(np.int64)
    if not pieces.shape[0]:
        mem, peak_returned = stage_memory(recv, budget), np.zeros(cp, np.int64)
    else:
        index, _, length, stage, num_recv_stages = split_stages(pieces[:, Piece.POS], piece_lens,
                                                                pieces[:, Piece.TOTAL], budget)
        num_rounds = int(num_recv_stages.max())
        returned = np.bincount(pieces[index, Piece.SRC] * num_rounds + (num_recv_stages - 1 - stage), weights=length,
                               minlength=cp * num_rounds)  # per (owner, backward round)
        peak_returned = returned.reshape(cp, num_rounds).max(axis=1).astype(np.int64)
        mem = _stage_memory_of(pieces[index, Piece.DST], stage, length, num_recv_stages, recv, cp, num_rounds)
    return {"own_kv_tokens": num_tokens.copy(), "recv_kv_tokens": recv, "num_stages": mem["stages"],
            "peak_remote_kv_tokens": mem["peak"], "saved_remote_kv_tokens": mem["saved"],
            "refetch_kv_tokens": mem["refetch"], "peak_grad_tokens": mem["peak"].copy(),
            "peak_returned_grad_tokens": peak_returned}
