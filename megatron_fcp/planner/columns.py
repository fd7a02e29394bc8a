"""Column numbers of the plan's row tables, by name (numpy takes an ``IntEnum`` member as an index).

- :class:`Q`: a plan's ``q`` rows ``(cp_rank, doc, start, end)``;
- :class:`KV`: its ``kv`` rows ``(cp_rank, src_rank, doc, start, end)``, ``cp_rank`` the receiver;
- :class:`Piece`: its pieces ``(dst, src, doc, start, end, src_offset, pos, total)`` (see
  :mod:`megatron_fcp.planner.stages`);
- :class:`Transfer`: the transfers of one movement of the staged exchange when the ranks are grouped into nodes
  (see :mod:`megatron_fcp.planner.relay`).

The per-rank view (:class:`~megatron_fcp.planner.plan.RankPlan`) keeps some columns of these tables, in the
order of ``VIEW_*``: its rows are ``table[:, VIEW_...]`` of the rank's rows.
"""

from __future__ import annotations

from enum import IntEnum


class Q(IntEnum):
    """Columns of ``q`` rows: ``[start, end)`` of document ``doc`` is owned (and computed) by ``cp_rank``."""

    CP_RANK = 0
    DOC = 1
    START = 2
    END = 3


class KV(IntEnum):
    """Columns of ``kv`` rows: ``cp_rank`` receives ``[start, end)`` of document ``doc`` from ``src_rank``."""

    CP_RANK = 0
    SRC_RANK = 1
    DOC = 2
    START = 3
    END = 4


class Piece(IntEnum):
    """Columns of pieces: ``dst`` receives ``[start, end)`` of ``doc`` from ``src``, where it starts at local token
    ``src_offset``; ``pos`` places it in the receiver's staging order, which ends at ``total``: the tokens the
    receiver receives, or more where a node ring leaves holes in the order (:mod:`~.node_ring`)."""

    DST = 0
    SRC = 1
    DOC = 2
    START = 3
    END = 4
    SRC_OFFSET = 5
    POS = 6
    TOTAL = 7


class Transfer(IntEnum):
    """Columns of transfers: tokens ``[start, end)`` of ``doc`` (owned by ``owner``) move from rank ``src`` to
    rank ``dst`` in ``round``. Each end is a rank's own key/values (``*_stage`` is ``-1``, ``*_pos`` is ``-1``,
    ``*_offset`` the local token index of ``start``, as :attr:`Piece.SRC_OFFSET`) or one of its stage buffers
    (``*_stage`` the stage, ``*_pos`` the staging position of ``start``, ``*_offset`` its row in the buffer).
    ``phase``: 0, or 1 for the same-round hop's second phase (from a lander's stage buffer of the same round)."""

    SRC = 0
    SRC_STAGE = 1
    SRC_POS = 2
    SRC_OFFSET = 3
    DST = 4
    DST_STAGE = 5
    DST_POS = 6
    DST_OFFSET = 7
    DOC = 8
    START = 9
    END = 10
    ROUND = 11
    OWNER = 12
    PHASE = 13


VIEW_Q = (Q.DOC, Q.START, Q.END)
"""``RankPlan.q``: ``(doc, start, end)``."""
VIEW_KV_RECV = (KV.SRC_RANK, KV.DOC, KV.START, KV.END)
"""``RankPlan.kv_recv``: ``(src, doc, start, end)`` of the rows the rank receives."""
VIEW_KV_SEND = (KV.CP_RANK, KV.DOC, KV.START, KV.END)
"""``RankPlan.kv_send``: ``(dst, doc, start, end)`` of the rows the rank sends."""
VIEW_RECV_PIECES = (Piece.SRC, Piece.DOC, Piece.START, Piece.END, Piece.SRC_OFFSET, Piece.POS)
"""``RankPlan.recv_pieces``: ``(src, doc, start, end, src_offset, pos)`` of the pieces the rank receives."""
VIEW_SEND_PIECES = (Piece.DST, Piece.DOC, Piece.START, Piece.END, Piece.SRC_OFFSET, Piece.POS, Piece.TOTAL)
"""``RankPlan.send_pieces``: ``(dst, doc, start, end, offset, dst_pos, dst_total)`` of the pieces the rank sends."""
VIEW_ROWS = (VIEW_Q, VIEW_KV_RECV, VIEW_KV_SEND, VIEW_RECV_PIECES, VIEW_SEND_PIECES)
"""The columns of ``RankPlan.q``, ``kv_recv``, ``kv_send``, ``recv_pieces`` and ``send_pieces``, in that order."""
