"""The plan: a frozen value saying which tokens each CP rank computes and which key/values it exchanges.

Legend (every range is half-open ``[start, end)`` in token positions inside one document):

- ``q``  int64 ``[num_q, 4]``:  rows ``(cp_rank, doc, start, end)``: query tokens the rank owns and computes,
  grouped by rank in the rank's local token order. Owned key/values are the tokens of the rank's own q ranges.
  A plan stores them as given (``q_rows``) or, for micro-batches of many short documents, compactly: the
  rank of every document held whole by one rank (``whole_rank``) beside the rows of the documents that are
  cut (``q_rows``), the rows of each rank then ordered by document and start. ``q`` lists every row either
  way, built on first use; the per-rank views read only the ranks they need.
- ``kv`` int64 ``[num_kv, 5]``: rows ``(cp_rank, src_rank, doc, start, end)``: key/value ranges the rank
  receives from their owner ``src_rank``. Send lists are the same rows seen from ``src_rank``; in backward the
  same lists carry key/value gradients back to their owners.

``exchange`` says how key/values move: ``"p2p"`` (exactly the ``kv`` rows, point to point), ``"ring"`` (every
rank receives every other rank's key/values in ``cp - 1`` ring steps; ``kv`` is implied and left empty) or
``"group_ring"`` (a ring inside each document's group of ranks; ``kv`` lists what travels).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from megatron_fcp.planner.columns import (
    KV,
    VIEW_KV_RECV,
    VIEW_KV_SEND,
    VIEW_Q,
    VIEW_RECV_PIECES,
    VIEW_SEND_PIECES,
    Piece,
    Q,
)
from megatron_fcp.planner.pairs import check_mask, needed_kv_end, q_pairs
from megatron_fcp.planner.relay import relay_figures
from megatron_fcp.planner.stages import (
    DEFAULT_KV_BUDGET,
    cut_at_owners,
    local_offsets,
    p2p_memory,
    plan_pieces,
    resolve_kv_budget,
    sort_order,
    staging_anchor,
    with_positions,
)
from megatron_fcp.planner.topology import check_cp_node, num_nodes

EXCHANGES = ("p2p", "ring", "group_ring")
Q_COLS = tuple(column.name.lower() for column in Q)
"""``("cp_rank", "doc", "start", "end")``: the columns of ``q`` rows (:class:`~megatron_fcp.planner.columns.Q`)."""
KV_COLS = tuple(column.name.lower() for column in KV)
"""``("cp_rank", "src_rank", "doc", "start", "end")``: the columns of ``kv`` rows (:class:`.columns.KV`)."""


@dataclass(frozen=True)
class RankPlan:
    """What one CP rank computes, receives and sends. Tuples of ``(doc, start, end)`` style rows: the plan's rows
    of the rank, columns :data:`~megatron_fcp.planner.columns.VIEW_Q`, ``VIEW_KV_RECV`` and so on."""

    cp_rank: int
    cp: int
    """Context-parallel size of the plan this view belongs to."""
    mask: str
    """``causal`` or ``full``."""
    q: tuple[tuple[int, int, int], ...]
    """Owned query (and key/value) ranges ``(doc, start, end)`` in local token order."""
    kv_recv: tuple[tuple[int, int, int, int], ...]
    """Key/value ranges ``(src_rank, doc, start, end)`` received from their owners."""
    kv_send: tuple[tuple[int, int, int, int], ...]
    """Key/value ranges ``(dst_rank, doc, start, end)`` this rank sends to the ranks that need them."""
    num_tokens: int
    """Token slots on this rank, real plus padding (equal on every rank)."""
    num_pad_tokens: int
    """Padding tokens among ``num_tokens``."""
    recv_pieces: tuple[tuple[int, int, int, int, int, int], ...]
    """``(src, doc, start, end, src_offset, pos)``: ``kv_recv`` cut where the owner's rows end, sorted by ``pos``
    (see :mod:`megatron_fcp.planner.stages`); the stage split and the receive buffers follow from these."""
    send_pieces: tuple[tuple[int, int, int, int, int, int, int], ...]
    """``(dst, doc, start, end, offset, dst_pos, dst_total)``: the same pieces seen from this rank as their owner;
    ``offset`` is the local token index of ``start`` here, ``dst_pos``/``dst_total`` place the piece in the
    receiver's staging order, so both ends cut stages at the same tokens."""
    plan_digest: int
    """63-bit fingerprint of the whole plan: ranks that hold the same plan hold the same digest."""
    cp_node: tuple[int, ...] | None = None
    """The node of every CP rank (:attr:`Plan.cp_node`), or None where the plan has no layout."""
    node_pieces: tuple[tuple[int, ...], ...] | None = None
    """Where the plan's ranks lie on more than one node: every piece (columns
    :class:`~megatron_fcp.planner.columns.Piece`) received on this rank's node and on the nodes of the ranks it
    sends to, from which the node-aware exchange (:func:`megatron_fcp.planner.relay.rank_messages`) derives what
    this rank sends, forwards and receives. None: one node, or no layout (every piece from its owner)."""

    @property
    def relays(self) -> bool:
        """Whether the rank's exchange is node-aware (key/values forwarded between node-mates)."""
        return self.node_pieces is not None

    @property
    def node(self) -> int | None:
        """This rank's node, or None where the plan has no layout."""
        return None if self.cp_node is None else self.cp_node[self.cp_rank]

    @property
    def num_recv(self) -> int:
        """Key/value tokens this rank receives (the sum of its pieces)."""
        return sum(end - start for _, _, start, end, _, _ in self.recv_pieces)

    @property
    def recv_total(self) -> int:
        """The end of this rank's staging order (``Piece.TOTAL``): :attr:`num_recv`, or more where a node ring leaves
        holes in it (:mod:`megatron_fcp.planner.node_ring`)."""
        total = next((row[Piece.TOTAL] for row in self.node_pieces or () if row[Piece.DST] == self.cp_rank), None)
        return self.num_recv if total is None else int(total)

    def memory(self, kv_budget_tokens=DEFAULT_KV_BUDGET) -> dict[str, int]:
        """This rank's figures of :func:`megatron_fcp.planner.stages.p2p_memory` (``MEMORY_FIELDS``, tokens), from
        the view alone: its own pieces and the pieces it sends carry every position the stage split needs. A
        node-aware view's gradients coming back (``peak_returned_grad_tokens``) follow the relays
        (:func:`~megatron_fcp.planner.relay.relay_figures` of its node pieces)."""
        rank = self.cp_rank
        total = self.recv_total
        rows = [(rank, src, doc, start, end, offset, pos, total)
                for src, doc, start, end, offset, pos in self.recv_pieces]
        rows += [(dst, rank, doc, start, end, offset, pos, total)
                 for dst, doc, start, end, offset, pos, total in self.send_pieces]
        mem = p2p_memory(np.full(self.cp, self.num_tokens), np.asarray(rows, np.int64).reshape(-1, len(Piece)),
                         kv_budget_tokens)
        out = {key: int(value[rank]) for key, value in mem.items()}
        if self.relays:  # node-aware: gradients come back from the node-mate that summed them, in its round
            budget = resolve_kv_budget(kv_budget_tokens, self.num_tokens)
            figures = relay_figures(np.asarray(self.node_pieces, np.int64).reshape(-1, len(Piece)),
                                    np.asarray(self.cp_node, np.int64), budget, self.cp)
            out["peak_returned_grad_tokens"] = int(figures["peak_returned_grad_tokens"][rank])
        return out

    def __hash__(self) -> int:
        # the generated hash would walk every row of every field on each lookup (once per layer in
        # cached_schedule); equal views have equal digests and ranks, so this agrees with equality
        return hash((self.plan_digest, self.cp_rank, self.num_tokens))


def _readonly(array: np.ndarray, ncols: int, dtype=np.int64) -> np.ndarray:
    """A read-only view (a copy only where the type or layout differs): the caller's array stays writable."""
    out = np.ascontiguousarray(np.asarray(array, dtype=dtype).reshape(-1, ncols)).view()
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class Plan:
    """A frozen placement and communication plan for one packed micro-batch on ``cp`` ranks."""

    strategy: str
    """Name of the strategy that made the plan (``fcp``, ``ring``, ...)."""
    cp: int
    """Context-parallel size."""
    mask: str
    """``"causal"`` or ``"full"``."""
    doc_lens: np.ndarray
    """int64 ``[num_docs]``: document lengths of the micro-batch, in batch order."""
    q_rows: np.ndarray
    """int64 ``[num_rows, 4]``: ``(cp_rank, doc, start, end)``, grouped by rank in local order: every row of the
    plan, or with ``whole_rank`` the rows of the documents it does not place (see :attr:`q`)."""
    kv: np.ndarray
    """int64 ``[num_kv, 5]``: ``(cp_rank, src_rank, doc, start, end)``; empty for ``exchange="ring"``."""
    num_pad_tokens: np.ndarray
    """int64 ``[cp]``: padding slots per rank."""
    exchange: str = "p2p"
    """How key/values travel: ``p2p``, ``ring`` or ``group_ring`` (see module docstring)."""
    notes: tuple[tuple[str, str], ...] = field(default=())
    """Free-form ``(key, value)`` facts the strategy wants reported (for example the block size it used)."""
    tokens_per_rank: int | None = None
    """Token slots per rank that the caller asked for (set by :func:`megatron_fcp.planner.api.make_plan`); the
    checker reports a rank whose slots exceed it. Not part of the plan's value (equality, digest, JSON)."""
    whole_rank: np.ndarray | None = None
    """int32 ``[num_docs]`` or None: the rank that holds each document whole, -1 for a document whose rows are
    in ``q_rows`` (cut, or empty). With it, the rows of each rank are ordered by document and start."""
    cp_node: np.ndarray | None = None
    """int64 ``[cp]`` or None: the node of each CP rank, nodes numbered 0.. in order of first appearance, each holding
    as many CP ranks (:mod:`megatron_fcp.planner.topology`); None: no layout given (the group taken as one node).
    Part of the plan's value only when given, so a plan without it keeps the digest it always had."""

    def __post_init__(self):
        check_mask(self.mask)
        if self.exchange not in EXCHANGES:
            raise ValueError(f"unknown exchange {self.exchange!r}: choose one of {EXCHANGES}")
        object.__setattr__(self, "doc_lens", _readonly(self.doc_lens, 1).reshape(-1))
        q_rows, whole_rank = _compact(_readonly(self.q_rows, len(Q)), self.whole_rank, self.doc_lens)
        object.__setattr__(self, "q_rows", q_rows)
        if whole_rank is not None:
            whole_rank = whole_rank.view()
            whole_rank.setflags(write=False)
        object.__setattr__(self, "whole_rank", whole_rank)
        object.__setattr__(self, "kv", _readonly(self.kv, len(KV)))
        object.__setattr__(self, "num_pad_tokens", _readonly(self.num_pad_tokens, 1).reshape(-1))
        if self.num_pad_tokens.shape[0] != self.cp:
            raise ValueError(f"num_pad_tokens has {self.num_pad_tokens.shape[0]} entries for cp={self.cp}")
        if self.cp_node is not None:
            object.__setattr__(self, "cp_node", check_cp_node(self.cp_node, self.cp))

    # -- rows ------------------------------------------------------------------------------------
    @cached_property
    def q(self) -> np.ndarray:
        """int64 ``[num_q, 4]``: every row ``(cp_rank, doc, start, end)``, grouped by rank in local order."""
        if self.whole_rank is None:
            return self.q_rows
        return _readonly(self.rows_of(np.arange(self.cp)), len(Q))

    def rows_of(self, ranks) -> np.ndarray:
        """The rows of ``ranks`` (int array), grouped by rank in local order, without building every rank's."""
        ranks = np.asarray(ranks, dtype=np.int64)
        rows = self.q_rows[np.isin(self.q_rows[:, Q.CP_RANK], ranks)]
        if self.whole_rank is None:
            return rows
        docs = (np.flatnonzero(self.whole_rank == ranks[0]) if ranks.shape[0] == 1
                else np.flatnonzero(np.isin(self.whole_rank, ranks)))
        whole = np.column_stack([self.whole_rank[docs], docs, np.zeros_like(docs), self.doc_lens[docs]])  # Q rows
        rows = np.concatenate([rows, whole.astype(np.int64)])
        return rows[np.lexsort((rows[:, Q.START], rows[:, Q.DOC], rows[:, Q.CP_RANK]))]

    # -- derived per-rank quantities -------------------------------------------------------------
    @cached_property
    def num_real_tokens(self) -> np.ndarray:
        """int64 ``[cp]``: real (document) tokens owned per rank."""
        rows = self.q_rows
        tokens = np.bincount(rows[:, Q.CP_RANK], weights=rows[:, Q.END] - rows[:, Q.START], minlength=self.cp)
        tokens = tokens.astype(np.int64)
        if self.whole_rank is not None:
            held_tokens = np.bincount(self.whole_rank + 1, weights=self.doc_lens.astype(np.float64),  # 0: not held
                                      minlength=self.cp + 1)  # float weights: bincount's own conversion is slower
            tokens += held_tokens[1:].astype(np.int64)
        return tokens

    @cached_property
    def num_tokens(self) -> np.ndarray:
        """int64 ``[cp]``: token slots per rank, real plus padding."""
        return self.num_real_tokens + self.num_pad_tokens

    @cached_property
    def kv_explicit(self) -> np.ndarray:
        """The ``kv`` rows, expanded for ``exchange="ring"`` (every other rank's ranges)."""
        if self.exchange != "ring":
            return self.kv
        return ring_kv_rows(self.q, self.cp)

    def rank_pairs(self) -> np.ndarray:
        """float64 ``[cp]``: exact attention pairs (query-key pairs the mask allows) each rank computes."""
        q = self.q
        pairs = q_pairs(q[:, Q.START], q[:, Q.END], self.doc_lens[q[:, Q.DOC]], self.mask)
        return np.bincount(q[:, Q.CP_RANK], weights=pairs, minlength=self.cp)

    @cached_property
    def recv_tokens(self) -> np.ndarray:
        """int64 ``[cp]``: key/value tokens each rank receives (for ``ring`` including padding slots)."""
        if self.exchange == "ring":
            return (self.num_tokens.sum() - self.num_tokens).astype(np.int64)
        kv = self.kv
        tokens = np.bincount(kv[:, KV.CP_RANK], weights=kv[:, KV.END] - kv[:, KV.START], minlength=self.cp)
        return tokens.astype(np.int64)

    @cached_property
    def send_tokens(self) -> np.ndarray:
        """int64 ``[cp]``: key/value tokens each rank sends."""
        if self.exchange == "ring":
            return ((self.cp - 1) * self.num_tokens).astype(np.int64)
        kv = self.kv
        tokens = np.bincount(kv[:, KV.SRC_RANK], weights=kv[:, KV.END] - kv[:, KV.START], minlength=self.cp)
        return tokens.astype(np.int64)

    # -- views ------------------------------------------------------------------------------------
    def token_index(self, cp_rank: int) -> np.ndarray:
        """int64: for each real local token of ``cp_rank`` (in plan order), its index in the packed batch."""
        rows = self.rows_of([cp_rank])
        if rows.shape[0] == 0:
            return np.zeros(0, np.int64)
        doc_starts = np.concatenate([[0], np.cumsum(self.doc_lens)])[rows[:, Q.DOC]]
        return np.concatenate([np.arange(doc_start + start, doc_start + end)
                               for doc_start, start, end in zip(doc_starts, rows[:, Q.START], rows[:, Q.END],
                                                                strict=True)
                               ]).astype(np.int64)

    def for_rank(self, cp_rank: int) -> RankPlan:
        """The view of one rank: exactly what it computes, receives and sends."""
        if not 0 <= cp_rank < self.cp:
            raise ValueError(f"cp_rank {cp_rank} out of range for cp={self.cp}")
        rows = self.rows_of([cp_rank])
        own = rows[:, VIEW_Q]
        node_pieces = None
        if self.exchange == "ring":  # one rank's share of ring_kv_rows, without expanding every rank's
            recv, send = _ring_rank_rows(self.q, self.cp, cp_rank)
            recv_pieces, send_pieces = _ring_rank_pieces(self.q, self.doc_lens, self.cp, cp_rank, self.mask)
        else:
            kv = self.kv
            recv = kv[kv[:, KV.CP_RANK] == cp_rank][:, VIEW_KV_RECV]
            send = kv[kv[:, KV.SRC_RANK] == cp_rank][:, VIEW_KV_SEND]
            receivers = self._receivers_of(cp_rank)
            pieces = self._pieces_of(receivers)
            recv_pieces = pieces[pieces[:, Piece.DST] == cp_rank][:, VIEW_RECV_PIECES]
            send_pieces = pieces[pieces[:, Piece.SRC] == cp_rank][:, VIEW_SEND_PIECES]
            if self._node_aware:
                node_pieces = pieces[np.isin(pieces[:, Piece.DST], receivers)]
        # the rank's tokens from its own rows (num_tokens counts every rank's: a pass over every document)
        real = int((rows[:, Q.END] - rows[:, Q.START]).sum())
        return RankPlan(
            cp_rank=cp_rank,
            cp=self.cp,
            mask=self.mask,
            q=tuple(map(tuple, own.tolist())),
            kv_recv=tuple(map(tuple, recv.tolist())),
            kv_send=tuple(map(tuple, send.tolist())),
            num_tokens=real + int(self.num_pad_tokens[cp_rank]),
            num_pad_tokens=int(self.num_pad_tokens[cp_rank]),
            recv_pieces=tuple(map(tuple, recv_pieces.tolist())),
            send_pieces=tuple(map(tuple, send_pieces.tolist())),
            plan_digest=self.digest,
            cp_node=None if self.cp_node is None else tuple(self.cp_node.tolist()),
            node_pieces=tuple(map(tuple, node_pieces.tolist())) if node_pieces is not None else None,
        )

    @property
    def _node_aware(self) -> bool:
        """Whether the exchange forwards between node-mates: a point-to-point plan on more than one node."""
        return self.exchange == "p2p" and self.cp_node is not None and int(self.cp_node.max(initial=0)) > 0

    def _receivers_of(self, cp_rank: int) -> np.ndarray:
        """The ranks whose received pieces ``cp_rank``'s view needs: itself and the ranks it sends to (their staging
        positions depend on all their pieces); on a node-aware plan every rank of these ranks' nodes (whose pieces
        decide what ``cp_rank`` sends, forwards and receives)."""
        kv = self.kv
        receivers = np.append(np.unique(kv[kv[:, KV.SRC_RANK] == cp_rank, KV.CP_RANK]), cp_rank)
        return np.flatnonzero(np.isin(self.cp_node, self.cp_node[receivers])) if self._node_aware else receivers

    def _pieces_of(self, receivers: np.ndarray) -> np.ndarray:
        """The pieces ``receivers`` (:meth:`_receivers_of`) receive, without cutting every rank's (:attr:`pieces`
        if already computed)."""
        if "pieces" in self.__dict__:
            return self.pieces
        kv = self.kv
        kv = kv[np.isin(kv[:, KV.CP_RANK], receivers)]
        ranks = np.unique(kv[:, [KV.CP_RANK, KV.SRC_RANK]])  # the receivers and their sources
        if self.whole_rank is None or kv.shape[0] == 0:
            return plan_pieces(self.q_rows[:0] if kv.shape[0] == 0 else self.rows_of(ranks), kv, self.doc_lens,
                               self.mask, *self._ring_layout)
        # only the cut documents' rows take part; the documents held whole count by their tokens before each row
        rows = self.q_rows[np.isin(self.q_rows[:, Q.CP_RANK], ranks)]
        rows = rows[np.lexsort((rows[:, Q.START], rows[:, Q.DOC], rows[:, Q.CP_RANK]))]
        offsets = local_offsets(rows) + self._whole_tokens_before(rows[:, Q.CP_RANK], rows[:, Q.DOC])
        return with_positions(cut_at_owners(rows, kv, self.doc_lens.shape[0], offsets), rows, self.doc_lens,
                              self.mask, *self._ring_layout)

    def _whole_tokens_before(self, ranks: np.ndarray, docs: np.ndarray) -> np.ndarray:
        """Per ``(rank, doc)``: tokens of the documents that ``rank`` holds whole with a smaller index (they come
        first in its local order): a count per rank of the documents between two of ``docs`` (the cut documents,
        a few hundred at most); over a slice of the batch each where the gaps hold many documents (no per-document
        index array for millions of documents)."""
        bounds = np.unique(docs)
        num_docs, width = self.doc_lens.shape[0], self.cp + 1  # column 0: documents not held whole
        lens = self.doc_lens.astype(np.float64)  # what bincount turns integer weights into, at half the cost
        if num_docs < 64 * (bounds.shape[0] + 1):  # few documents per gap: one count, keyed by gap and rank
            gap = np.repeat(np.arange(bounds.shape[0] + 1), np.diff(np.concatenate([[0], bounds, [num_docs]])))
            tokens = np.bincount(gap * width + (self.whole_rank + 1), weights=lens,
                                 minlength=(bounds.shape[0] + 1) * width).reshape(-1, width)
        else:
            edges = np.concatenate([[0], bounds, [num_docs]]).tolist()
            tokens = np.zeros((bounds.shape[0] + 1, width))
            for gap, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
                tokens[gap] = np.bincount(self.whole_rank[lo:hi] + 1, weights=lens[lo:hi], minlength=width)
        before = np.cumsum(tokens[:, 1:], axis=0).astype(np.int64)  # row k: documents before bounds[k]
        return before[np.searchsorted(bounds, docs), ranks]

    @cached_property
    def pieces(self) -> np.ndarray:
        """int64 ``[num_pieces, 8]``: every received key/value piece (columns :class:`.columns.Piece`), sorted by
        receiver and staging position; contiguous in the owner's and in the receiver's memory. On a node-aware plan
        the staging orders are node rings (:mod:`megatron_fcp.planner.node_ring`)."""
        return plan_pieces(self.q, self.kv_explicit, self.doc_lens, self.mask, *self._ring_layout)

    @property
    def _ring_layout(self) -> tuple[np.ndarray | None, int | None]:
        """``(cp_node, slot)`` for :func:`~.stages.with_positions`: node rings on a node-aware plan, with a slot of the
        ranks' token slots (the ``auto`` budget); ``(None, None)`` otherwise."""
        if not self._node_aware:
            return None, None
        return self.cp_node, int(self.num_tokens.max(initial=1))

    def to_dict(self, metrics: dict | None = None) -> dict:
        """The plan in the project's JSON format (see README: "Plan JSON")."""
        kv = self.kv_explicit
        q_by_rank = _split_by_rank(self.q, self.cp)
        kv_by_rank = _split_by_rank(kv, self.cp)
        ranks = [
            {
                "q": q_by_rank[rank][:, VIEW_Q].tolist(),
                "kv_recv": kv_by_rank[rank][:, VIEW_KV_RECV].tolist(),
                "num_tokens": int(self.num_tokens[rank]),
                "num_pad_tokens": int(self.num_pad_tokens[rank]),
            }
            for rank in range(self.cp)
        ]
        out = {
            "strategy": self.strategy,
            "cp": self.cp,
            "mask": self.mask,
            "exchange": self.exchange,
            "docs": self.doc_lens.tolist(),
            "ranks": ranks,
            "metrics": metrics or {},
        }
        if self.notes:
            out["notes"] = dict(self.notes)
        if self.cp_node is not None:
            out["cp_node"] = self.cp_node.tolist()
        return out

    def to_json(self, metrics: dict | None = None, indent: int | None = None) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(metrics), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        """Rebuild a plan from :meth:`to_dict` output (``kv`` kept explicit)."""
        q = [[rank, *row] for rank, rank_data in enumerate(data["ranks"]) for row in rank_data["q"]]
        kv = [[rank, *row] for rank, rank_data in enumerate(data["ranks"]) for row in rank_data["kv_recv"]]
        exchange = data.get("exchange", "p2p")
        return cls(
            strategy=data.get("strategy", "unknown"),
            cp=int(data["cp"]),
            mask=data["mask"],
            doc_lens=np.asarray(data["docs"], dtype=np.int64),
            q_rows=np.asarray(q, dtype=np.int64).reshape(-1, len(Q)),
            kv=np.asarray([] if exchange == "ring" else kv, dtype=np.int64).reshape(-1, len(KV)),
            num_pad_tokens=np.asarray([rank_data["num_pad_tokens"] for rank_data in data["ranks"]], dtype=np.int64),
            exchange=exchange,
            notes=tuple(sorted((data.get("notes") or {}).items())),
            cp_node=data.get("cp_node"),
        )

    # -- value semantics --------------------------------------------------------------------------
    @cached_property
    def _digest(self) -> str:
        hasher = hashlib.sha256()
        hasher.update(f"{self.strategy}|{self.cp}|{self.mask}|{self.exchange}|{self.notes}".encode())
        stored = (self.q_rows,) if self.whole_rank is None else (self.q_rows, b"whole", self.whole_rank)
        nodes = () if self.cp_node is None else (b"nodes", self.cp_node)  # no layout: the digest plans always had
        for array in (self.doc_lens, *stored, self.kv, self.num_pad_tokens, *nodes):
            hasher.update(array)
            hasher.update(b"|")
        return hasher.hexdigest()

    @cached_property
    def digest(self) -> int:
        """63-bit fingerprint of the plan (from the same hash as equality): equal plans, equal digests."""
        return int(self._digest[:15], 16)

    def __eq__(self, other):
        return isinstance(other, Plan) and self._digest == other._digest

    def __hash__(self):
        return hash(self._digest)

    @property
    def _num_q_rows(self) -> int:
        held = 0 if self.whole_rank is None else int(np.count_nonzero(self.whole_rank >= 0))
        return self.q_rows.shape[0] + held

    def __repr__(self):
        return (
            f"Plan(strategy={self.strategy!r}, cp={self.cp}, mask={self.mask!r}, exchange={self.exchange!r}, "
            f"docs={self.doc_lens.shape[0]}, q_ranges={self._num_q_rows}, kv_ranges={self.kv.shape[0]}, "
            f"tokens_per_rank={int(self.num_tokens.max(initial=0))}, pad={int(self.num_pad_tokens.sum())}"
            + ("" if self.cp_node is None else f", nodes={num_nodes(self.cp_node)}") + ")"
        )

    def describe(self, max_ranks: int = 8) -> str:
        """Human-readable per-rank summary (first ``max_ranks`` ranks)."""
        lines = [repr(self)]
        for rank in range(min(self.cp, max_ranks)):
            view = self.for_rank(rank)
            q_txt = (", ".join(f"d{doc}[{start}:{end})" for doc, start, end in view.q[:6])
                     + (" ..." if len(view.q) > 6 else ""))
            node = "" if view.node is None else f" (node {view.node})"
            lines.append(
                f"  rank {rank}{node}: {view.num_tokens} tokens ({view.num_pad_tokens} pad), {len(view.q)} q ranges "
                f"[{q_txt}], recv {int(self.recv_tokens[rank])} kv tokens from "
                f"{len({src for src, *_ in view.kv_recv})} peers"
            )
        if self.cp > max_ranks:
            lines.append(f"  ... {self.cp - max_ranks} more ranks")
        return "\n".join(lines)


def _compact(q_rows: np.ndarray, whole_rank, doc_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The stored form of a plan's rows, the same for equal plans however they were given: where every rank's
    rows are ordered by document and start, each document held whole by one row moves to ``whole_rank``; rows
    in another order stay as they are (``whole_rank`` None)."""
    if whole_rank is None:
        if q_rows.shape[0] < 2 or np.any(_descending(q_rows)):
            return q_rows, None
        whole_rank = np.full(doc_lens.shape[0], -1, np.int32)
    else:
        whole_rank = np.asarray(whole_rank, dtype=np.int32)
        if whole_rank.shape != doc_lens.shape:
            raise ValueError(f"whole_rank has shape {whole_rank.shape}, the documents {doc_lens.shape}")
    doc = q_rows[:, Q.DOC]
    docs, num_rows = np.unique(doc, return_counts=True)
    alone = np.isin(doc, docs[num_rows == 1])
    whole = alone & (q_rows[:, Q.START] == 0) & (q_rows[:, Q.END] == doc_lens[doc])
    if whole.any():
        whole_rank = whole_rank.copy()
        whole_rank[doc[whole]] = q_rows[whole, Q.CP_RANK]
    return _readonly(q_rows[~whole], len(Q)), whole_rank


def _descending(rows: np.ndarray) -> np.ndarray:
    """Per pair of consecutive ``q`` rows: whether the second sorts before the first (by rank, doc and start)."""
    rank, doc, start = rows[:, Q.CP_RANK], rows[:, Q.DOC], rows[:, Q.START]
    later_start = (doc[1:] < doc[:-1]) | ((doc[1:] == doc[:-1]) & (start[1:] < start[:-1]))
    return (rank[1:] < rank[:-1]) | ((rank[1:] == rank[:-1]) & later_start)


def _split_by_rank(rows: np.ndarray, cp: int) -> list[np.ndarray]:
    """``q`` or ``kv`` rows (both lead with ``cp_rank``: ``Q.CP_RANK == KV.CP_RANK``), one array per rank."""
    order = np.argsort(rows[:, Q.CP_RANK], kind="stable")
    rows = rows[order]
    bounds = np.searchsorted(rows[:, Q.CP_RANK], np.arange(cp + 1))

    return [rows[bounds[rank] : bounds[rank + 1]] for rank in range(cp)]


def ring_kv_rows(q: np.ndarray, cp: int) -> np.ndarray:
    """Explicit ``kv`` rows of a ring exchange: every rank receives every other rank's ranges."""
    dst = np.tile(np.arange(cp, dtype=np.int64), q.shape[0])
    rows = np.repeat(q, cp, axis=0)
    keep = dst != rows[:, Q.CP_RANK]
    out = np.column_stack([dst[keep], rows[keep]])  # the receiver, then the owner's q row: kv columns
    order = np.lexsort([out[:, column] for column in reversed(KV)])  # by every column, cp_rank first
    return out[order]


def _ring_rank_rows(q: np.ndarray, cp: int, cp_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of :func:`ring_kv_rows` that ``cp_rank`` receives ``(src, doc, start, end)`` and sends
    ``(dst, doc, start, end)``, in the same order."""
    others = q[q[:, Q.CP_RANK] != cp_rank]  # q rows of the owners: (src, doc, start, end)
    recv = others[np.lexsort([others[:, column] for column in reversed(Q)])]
    own = q[q[:, Q.CP_RANK] == cp_rank]
    own = own[np.lexsort([own[:, column] for column in reversed(VIEW_Q)])][:, VIEW_Q]
    dst = np.delete(np.arange(cp, dtype=np.int64), cp_rank)
    send = np.column_stack([np.repeat(dst, own.shape[0]), np.tile(own, (dst.shape[0], 1))])
    return recv, send.reshape(-1, len(VIEW_KV_SEND))


def _ring_rank_pieces(q: np.ndarray, doc_lens: np.ndarray, cp: int, cp_rank: int, mask: str):
    """:attr:`RankPlan.recv_pieces` and ``send_pieces`` of a ring plan, for one rank without expanding every
    rank's rows: every rank receives every other rank's rows whole, so a piece is an owner's q row, and a
    receiver's staging position of a row is computed directly (see :mod:`megatron_fcp.planner.stages`)."""
    offsets = local_offsets(q)
    rank, doc, start, end = q.T
    row_lens = end - start
    num_docs = doc_lens.shape[0]
    others = np.flatnonzero(rank != cp_rank)
    # the rows of the others, whole, as pieces to this rank before their staging positions: (dst, q row, src_offset)
    rows = np.column_stack([np.full(others.shape[0], cp_rank), q[others], offsets[others]])
    recv = with_positions(rows, q, doc_lens, mask)[:, VIEW_RECV_PIECES]
    mine = np.flatnonzero(rank == cp_rank)
    owned = np.bincount(rank, weights=row_lens, minlength=cp).astype(np.int64)
    total = int(row_lens.sum())
    send = []
    for dst in range(cp):
        if dst == cp_rank or mine.shape[0] == 0:
            continue
        theirs = np.flatnonzero(rank == dst)
        own_per_doc = np.bincount(doc[theirs], weights=row_lens[theirs], minlength=num_docs).astype(np.int64)
        base = np.concatenate([[0], np.cumsum(doc_lens - own_per_doc)])  # received tokens of earlier documents
        docs = np.arange(num_docs)
        anchor = staging_anchor(np.full(num_docs, dst), docs, q, doc_lens, mask)
        modulus = np.maximum(doc_lens, 1)
        # staging keys (place in the receiver's staging order inside the document) of my rows and of theirs
        key_mine = (start[mine] - anchor[doc[mine]]) % modulus[doc[mine]]
        key_theirs = (start[theirs] - anchor[doc[theirs]]) % modulus[doc[theirs]]
        # their own tokens of the same document that come before each of my rows in their staging order
        same = doc[theirs][None, :] == doc[mine][:, None]
        before = (same & (key_theirs[None, :] < key_mine[:, None])) @ row_lens[theirs]
        dst_pos = base[doc[mine]] + key_mine - before
        send.append(np.column_stack([np.full(mine.shape[0], dst), doc[mine], start[mine], end[mine], offsets[mine],
                                     dst_pos, np.full(mine.shape[0], total - owned[dst])]))
    send = np.concatenate(send) if send else np.zeros((0, len(VIEW_SEND_PIECES)), np.int64)
    return recv, send


def merge_adjacent_q(rows: np.ndarray) -> np.ndarray:
    """Sort q rows ``(cp_rank, doc, start, end)`` by rank, doc and start; merge ranges that continue each other."""
    return _merge_runs(rows, Q.START)


def derive_kv(q: np.ndarray, doc_lens: np.ndarray, cp: int, mask: str) -> np.ndarray:
    """Key/value ranges each rank must receive: the keys its queries need minus what it owns.

    Every needed range is listed once per receiving rank, split by owner and merged where one owner holds
    adjacent pieces. For ``mask="full"`` this is every token of each touched document the rank does not own.
    """
    doc_lens = np.asarray(doc_lens, dtype=np.int64)
    q = np.asarray(q, dtype=np.int64)
    q = q[np.lexsort((q[:, Q.START], q[:, Q.DOC]))]
    same_doc = q[1:, Q.DOC] == q[:-1, Q.DOC]
    cut = np.zeros(q.shape[0], bool)  # q rows of the documents cut between ranks
    cut[1:] = same_doc
    cut[:-1] |= same_doc
    pieces = q[cut]
    if pieces.shape[0] == 0:
        return np.zeros((0, len(KV)), np.int64)
    by_source = np.argsort(pieces[:, Q.CP_RANK], kind="stable")  # rank, then document and start
    rows = _needed_rows(pieces, by_source, *_holders(pieces, doc_lens, mask))
    # two rows continue each other only where two pieces of their source do (q rows not merged, unlike an FCP plan's)
    return _merge_adjacent(rows) if _merge_sorted(pieces[by_source], Q.START).shape[0] < pieces.shape[0] else rows


def _holders(pieces: np.ndarray, doc_lens: np.ndarray, mask: str):
    """Unique ``(rank, doc)`` pairs among split-document pieces (``q`` rows) in that order, as rows (the first
    columns of ``q`` rows), the key end each one needs and the pair of each piece."""
    num_docs = doc_lens.shape[0]
    key = pieces[:, Q.CP_RANK] * num_docs + pieces[:, Q.DOC]
    holder_keys, holder_of_piece = np.unique(key, return_inverse=True)
    piece_need_end = needed_kv_end(pieces[:, Q.END], doc_lens[pieces[:, Q.DOC]], mask)
    need_end = np.zeros(holder_keys.shape[0], np.int64)
    np.maximum.at(need_end, holder_of_piece, piece_need_end)
    holders = np.column_stack([holder_keys // num_docs, holder_keys % num_docs])  # (rank, doc)
    return holders, need_end, holder_of_piece


def _needed_runs(pieces: np.ndarray, holders: np.ndarray, need_end: np.ndarray):
    """Each holder's run of ``pieces`` (sorted by document and start): those of its document that start before
    its needed end, from ``first``, ``num`` of them; and whether a piece of a run ends past that end (which only
    q rows that overlap one another do)."""
    span = int(pieces[:, Q.START:].max()) + 1  # pieces laid out by document: doc * span + start (or end)
    base = pieces[:, Q.DOC] * span
    first = np.searchsorted(base + pieces[:, Q.START], holders[:, Q.DOC] * span)
    num = np.searchsorted(base + pieces[:, Q.START], holders[:, Q.DOC] * span + np.clip(need_end, 0, span)) - first
    run_end = (np.maximum.accumulate(base + pieces[:, Q.END]) - base)[first + num - 1]  # the latest end in a run
    return first, num, bool(np.any((run_end > need_end) & (num > 0)))


def _needed_rows(pieces: np.ndarray, by_source: np.ndarray, holders: np.ndarray, need_end: np.ndarray,
                 holder_of_piece: np.ndarray):
    """For each holder, the other ranks' pieces of its document that start before its needed end: ``kv`` rows
    sorted by receiver, source, document and start (``by_source``: the pieces' order by source)."""
    first, num, past_end = _needed_runs(pieces, holders, need_end)
    run_start = np.cumsum(num) - num
    piece = np.repeat(first - run_start, num)  # the runs end to end
    piece += np.arange(piece.shape[0])
    own = np.arange(pieces.shape[0]) - first[holder_of_piece]  # each piece's place in its holder's run
    mine = own < num[holder_of_piece]
    order = _by_receiver(pieces, by_source, holders, piece, num, run_start[holder_of_piece[mine]] + own[mine])
    rows = np.take(np.column_stack([pieces[:, :1], pieces]), piece[order], axis=0)  # kv columns from the q row
    num_kept = num - np.bincount(holder_of_piece[mine], minlength=num.shape[0])
    rows[:, KV.CP_RANK] = np.repeat(holders[:, Q.CP_RANK], num_kept)  # rows by receiver, holders in rank order
    if past_end:
        holder = np.repeat(np.arange(num.shape[0]), num)[order]
        np.minimum(rows[:, KV.END], need_end[holder], out=rows[:, KV.END])
    return rows


def _by_receiver(pieces: np.ndarray, by_source: np.ndarray, holders: np.ndarray, piece: np.ndarray,
                 num: np.ndarray, own: np.ndarray):
    """Order of the holders' runs end to end (``num`` pieces each, ``piece`` of ``pieces``) by receiver, then by
    the pieces' order ``by_source``, without the places ``own``."""
    place = np.empty_like(by_source)
    place[by_source] = np.arange(by_source.shape[0])
    key = place[piece]  # one key per row: a receiver holds each document once
    key += np.repeat(holders[:, Q.CP_RANK] * pieces.shape[0], num)
    key[own] = np.iinfo(np.int64).max  # sorted last, then left out
    return np.argsort(key, kind="stable")[: key.shape[0] - own.shape[0]]


def _merge_adjacent(rows: np.ndarray) -> np.ndarray:
    """Merge rows ``(rank, src, doc, start, end)``, sorted by all but the end, that continue one another from the
    same source."""
    return _merge_sorted(rows, KV.START)


def _merge_runs(rows: np.ndarray, nkey: int) -> np.ndarray:
    """Rows of ``nkey`` key columns then ``start, end``, sorted by keys and start, with each run of ranges that
    continue one another (same keys, start == previous end) merged into one."""
    if rows.shape[0] == 0:
        return rows.reshape(0, nkey + 2)
    return _merge_sorted(rows[sort_order(*(rows[:, column] for column in range(nkey + 1)))], nkey)


def _merge_sorted(rows: np.ndarray, nkey: int) -> np.ndarray:
    """:func:`_merge_runs` of rows sorted already: ``rows`` itself (not a copy) where none continues another."""
    after = np.flatnonzero(rows[1:, nkey] == rows[:-1, nkey + 1])  # rows that start where the one before ends
    after = after[np.all(rows[after + 1, :nkey] == rows[after, :nkey], axis=1)]  # ... with the same keys
    if after.shape[0] == 0:
        return rows
    continues = np.zeros(rows.shape[0], bool)
    continues[after + 1] = True
    out = rows[~continues]
    out[:, nkey + 1] = rows[np.append(~continues[1:], True), nkey + 1]
    return out
