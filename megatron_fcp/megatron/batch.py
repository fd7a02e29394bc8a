"""Data-loader hooks: packed variable-length micro-batches, planned and cut per CP rank inside the data loader.

A packed micro-batch is one sample of ``seq_length`` tokens holding several documents, as Megatron's GPTDataset
makes with ``--reset-position-ids`` (each document's positions restart at 0). :class:`FcpBatchDataset` wraps
such a dataset. For every sample it

1. reads the document lengths from the position ids (a document starts where its position is 0),
2. plans the micro-batch for the CP group (deterministic: every CP rank computes the same plan on its own, so
   the ranks need no communication to agree), and
3. builds the rank's finished attention schedule (kernel calls, index arrays, stages, rounds and message sizes)
   as one int64 array (:func:`megatron_fcp.attention.schedule.encode_schedule`), and
4. returns only this rank's tokens, labels, loss mask and per-token positions, in the plan's order with the
   padding slots last (loss mask 0), the schedule (``fcp_schedule``) and the planner's figures (``fcp_stats``).

It runs in the data loader's worker processes, so planning and schedule building happen ahead of the step, off
its critical path: the training process only copies the schedule to the GPU (one pinned, non-blocking copy).

:class:`MockDocumentDataset` makes packed samples whose document lengths follow a length file (the shipped
real distributions), for runs without a tokenized corpus.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import zlib

import numpy as np

from megatron_fcp.attention.head_parallel import local_token_index
from megatron_fcp.attention.schedule import encode_schedule
from megatron_fcp.data.lengths import LengthDistribution, draw_documents, load_distribution
from megatron_fcp.errors import InputError
from megatron_fcp.megatron.config import FcpConfig
from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.checks import assert_plan_ok
from megatron_fcp.planner.columns import VIEW_ROWS, Piece
from megatron_fcp.planner.fcp import FcpOptions
from megatron_fcp.planner.pairs import MASKS
from megatron_fcp.planner.plan import Plan, RankPlan

SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
STATS = ("plan_seconds", "pairs_imbalance", "comm_vs_ring", "num_docs", "pad_tokens", "schedule_seconds",
         "heads_exchange")
"""Fields of ``fcp_stats``: planner wall time, max/mean exact attention pairs over ranks, mean received
key/value tokens per rank over ring CP's, documents in the micro-batch, padding slots on this rank, the wall
time of building this rank's schedule, and 1 where the micro-batch runs the heads exchange (0: ``p2p``)."""


# -- document boundaries ------------------------------------------------------------------------------
def doc_lengths_from_positions(position_ids) -> np.ndarray:
    """Document lengths of one packed sample from its position ids (a document starts at position 0).

    Raises :class:`InputError` unless positions count 0, 1, 2, ... inside every document.
    """
    pos = np.asarray(position_ids, dtype=np.int64).reshape(-1)
    if pos.size == 0:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(pos == 0)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    lens = np.diff(np.append(starts, pos.size))
    expected = np.arange(pos.size) - np.repeat(starts, lens) + pos[0] * (np.arange(pos.size) < lens[0])
    if not np.array_equal(pos, expected):
        bad = int(np.flatnonzero(pos != expected)[0])
        raise InputError(f"position ids are not per-document counters (0, 1, 2, ... after each document start) at "
                         f"token {bad}: the dataset must reset positions per document (--reset-position-ids)")
    return lens.astype(np.int64)


# -- planning -----------------------------------------------------------------------------------------
COST_PROFILE = "h100_node_fa3_published"
"""The hardware profile with which ``--fcp-node-exchange auto`` models a micro-batch's two exchanges: the profile the
cost model was checked against MagiAttention's published H100 measurements with (docs/model_vs_published.md)."""


def _plan(doc_lens, cfg: FcpConfig, ranks: int, slots: int, cp_node) -> Plan:
    options = FcpOptions(tile_size=cfg.tile_size) if cfg.scheduler == "fcp" else None
    plan = make_plan(doc_lens, ranks, slots, cfg.mask, strategy=cfg.scheduler, options=options, cp_node=cp_node)
    if cfg.debug_checks:  # the ring and hybrid placements may hold more slots than seq_length / cp by design
        assert_plan_ok(plan, check_request=cfg.scheduler not in ("ring", "hybrid"))
    return plan


def plan_micro_batch(doc_lens, cfg: FcpConfig) -> Plan:
    """The plan of one micro-batch of ``cfg.seq_length`` tokens over ``cfg.cp`` ranks, carrying the CP group's node
    layout ``cfg.cp_node`` (in the digest the ranks check their plans by). Under ``--fcp-node-exchange heads``: over
    the nodes, ``cfg.plan_ranks`` ranks of ``cfg.heads_per_node x cfg.tokens_per_rank`` slots, each on a node of its
    own (:mod:`megatron_fcp.attention.head_parallel`). Under ``auto``: both, and the one whose modeled step
    (:func:`node_exchange_steps`) is shorter (the CP ranks' plan on a tie); ``cfg.heads_split(plan.cp)`` says which.
    Deterministic, so every CP rank picks the same."""
    g = cfg.heads_per_node  # 1 under p2p, and where a node holds one CP rank: nothing to split
    if g == 1:
        return _plan(doc_lens, cfg, cfg.cp, cfg.tokens_per_rank, cfg.cp_node)
    nodes = _plan(doc_lens, cfg, cfg.plan_ranks, g * cfg.tokens_per_rank, None)
    if cfg.node_exchange == "heads":
        return nodes
    ranks = _plan(doc_lens, cfg, cfg.cp, cfg.tokens_per_rank, cfg.cp_node)
    steps = node_exchange_steps(doc_lens, ranks, nodes, cfg)
    return nodes if steps["heads"] < steps["p2p"] else ranks


def node_exchange_steps(doc_lens, p2p_plan: Plan, node_plan: Plan, cfg: FcpConfig) -> dict[str, float]:
    """Modeled seconds of one micro-batch's attention step (forward + backward of the slowest rank) under each node
    exchange, from the plans the runtime would run (``megatron_fcp.sim.published.node_exchange_steps``: the cost model
    with its added costs, on :data:`COST_PROFILE` with ``cfg.heads_per_node`` CP ranks a node and this model's
    heads, ``cfg.attention_shape``, and the run's key/value budget)."""
    from megatron_fcp.sim import published

    hw = _cost_profile(cfg.attention_shape, cfg.heads_per_node)
    return published.node_exchange_steps(hw, published.Extras(), np.asarray(doc_lens, np.int64), p2p_plan, node_plan,
                                         cfg.kv_budget_tokens)


@functools.cache
def _cost_profile(shape: tuple[int, int, int] | None, ranks_per_node: int):
    """:data:`COST_PROFILE` with ``ranks_per_node`` GPUs a node and the layer ``shape`` (query heads, key/value
    heads, head dimension; None: the profile's own), loaded once per process."""
    from megatron_fcp.sim.model import load_hardware

    hw = dataclasses.replace(load_hardware(COST_PROFILE), gpus_per_node=ranks_per_node)
    if shape is not None:
        hw = dataclasses.replace(hw, num_heads=shape[0], num_kv_heads=shape[1], head_dim=shape[2])
    return hw


def plan_figures(plan: Plan) -> tuple[float, float]:
    """(max/mean exact attention pairs over ranks, mean received key/value tokens per rank / ring CP's)."""
    pairs = plan.rank_pairs()
    imbalance = float(pairs.max() / pairs.mean()) if pairs.sum() > 0 else 1.0
    ring = (plan.cp - 1) * float(plan.num_tokens.max(initial=0))
    comm = float(plan.recv_tokens.mean() / ring) if ring > 0 else 0.0
    return imbalance, comm


# -- the rank's plan view as one int64 array (data loaders collate tensors, not objects) -------------------
_WIDTHS = tuple(len(columns) for columns in VIEW_ROWS)
"""Values per row of ``q``, ``kv_recv``, ``kv_send``, ``recv_pieces``, ``send_pieces`` (3, 4, 4, 6, 7)."""

_HEAD = 8 + len(_WIDTHS)
"""Header values: CP size, rank, mask, token slots, padding, plan digest, the row count of each list, the number of
node entries (the CP size, or 0 where the plan has no node layout), then the number of node pieces (-1: none, the
exchange is not node-aware)."""


def encode_rank_plan(view: RankPlan) -> np.ndarray:
    """``view`` as one int64 array: a header (CP size, rank, mask, token slots, padding, plan digest, the row count of
    each list and the number of node entries), then the rows of ``q``, ``kv_recv``, ``kv_send``, ``recv_pieces``,
    ``send_pieces``, then the node of every CP rank (``cp_node``, where the plan has a layout)."""
    lists = (view.q, view.kv_recv, view.kv_send, view.recv_pieces, view.send_pieces)
    nodes = list(view.cp_node or ())
    node_pieces = view.node_pieces or ()
    head = [view.cp, view.cp_rank, MASKS.index(view.mask), view.num_tokens, view.num_pad_tokens, view.plan_digest,
            *(len(rows) for rows in lists), len(nodes), -1 if view.node_pieces is None else len(node_pieces)]
    body = [x for rows in (*lists, node_pieces) for row in rows for x in row]
    return np.asarray(head + body + nodes, dtype=np.int64)


def decode_rank_plan(data) -> RankPlan:
    """Inverse of :func:`encode_rank_plan` (accepts a numpy array, a tensor or a list)."""
    values = [int(x) for x in (data.tolist() if hasattr(data, "tolist") else data)]
    if len(values) < _HEAD:
        raise InputError(f"encoded rank plan has {len(values)} values, fewer than its header: the batch was not made "
                         "by FcpBatchDataset")
    cp, cp_rank, mask, num_tokens, num_pad, digest, *counts, num_nodes, num_node_pieces = values[:_HEAD]
    expected = (_HEAD + sum(n * w for n, w in zip(counts, _WIDTHS, strict=True)) + num_nodes
                + max(num_node_pieces, 0) * len(Piece))
    if len(values) != expected:
        raise InputError(f"encoded rank plan has {len(values)} values, its header says {expected}: the batch was "
                         "not made by FcpBatchDataset")
    pos = _HEAD

    def rows(n, width):
        nonlocal pos
        out = tuple(tuple(values[pos + i * width: pos + (i + 1) * width]) for i in range(n))
        pos += n * width
        return out

    q, recv, send, recv_pieces, send_pieces = (rows(n, w) for n, w in zip(counts, _WIDTHS, strict=True))
    node_pieces = rows(num_node_pieces, len(Piece)) if num_node_pieces >= 0 else None
    return RankPlan(cp_rank=cp_rank, cp=cp, mask=MASKS[mask], q=q, kv_recv=recv, kv_send=send,
                    num_tokens=num_tokens, num_pad_tokens=num_pad, recv_pieces=recv_pieces,
                    send_pieces=send_pieces, plan_digest=digest, cp_node=tuple(values[pos:]) if num_nodes else None,
                    node_pieces=node_pieces)


# -- the per-rank dataset ------------------------------------------------------------------------------
def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def rank_sample(sample: dict, cfg: FcpConfig, cp_rank: int, with_plan_view: bool = False) -> dict:
    """This CP rank's share of one packed sample (see module docstring); ``with_plan_view`` also ships the rank's
    plan view (``fcp_plan``, :func:`encode_rank_plan`) for tools that model it."""
    missing = [k for k in SAMPLE_KEYS if k not in sample]
    if missing:
        raise InputError(f"FCP samples need {', '.join(SAMPLE_KEYS)}; this dataset gives no {', '.join(missing)}")
    arrays = {k: _as_numpy(sample[k]).reshape(-1) for k in SAMPLE_KEYS}
    if arrays["tokens"].shape[0] != cfg.seq_length:
        raise InputError(f"a sample holds {arrays['tokens'].shape[0]} tokens but --seq-length is {cfg.seq_length}")
    lens = doc_lengths_from_positions(arrays["position_ids"])
    start = time.perf_counter()
    plan = plan_micro_batch(lens, cfg)
    g = cfg.heads_split(plan.cp)  # heads: the plan's rank is this rank's node, which holds g ranks' slots
    view = plan.for_rank(cp_rank // g)
    plan_seconds = time.perf_counter() - start
    schedule = encode_schedule(view, cfg.kv_budget_tokens)
    schedule_seconds = time.perf_counter() - start - plan_seconds
    index = plan.token_index(cp_rank) if g == 1 else local_token_index(plan, g, cp_rank)
    n, real = view.num_tokens // g, index.shape[0]
    out = {}
    for key in ("tokens", "labels", "loss_mask"):
        local = np.zeros(n, dtype=arrays[key].dtype)
        local[:real] = arrays[key][index]
        out[key] = local
    out["position_ids"] = np.zeros(n, np.int64)
    out["position_ids"][:real] = arrays["position_ids"][index]
    out["fcp_schedule"] = schedule
    if with_plan_view:
        out["fcp_plan"] = encode_rank_plan(view)
    imbalance, comm = plan_figures(plan)
    out["fcp_stats"] = np.asarray([plan_seconds, imbalance, comm, lens.shape[0], view.num_pad_tokens,
                                   schedule_seconds, float(g > 1)], np.float64)
    return out


class FcpBatchDataset:
    """Wraps a packed-sample dataset; item ``i`` is CP rank ``cp_rank``'s share of sample ``i`` (see
    :func:`rank_sample`)."""

    def __init__(self, inner, cfg: FcpConfig, cp_rank: int, with_plan_view: bool = False):
        if not 0 <= cp_rank < cfg.cp:
            raise InputError(f"cp_rank {cp_rank} is outside the CP group of {cfg.cp}")
        self.inner, self.cfg, self.cp_rank, self.with_plan_view = inner, cfg, cp_rank, with_plan_view

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict:
        return rank_sample(self.inner[index], self.cfg, self.cp_rank, self.with_plan_view)


# -- mock data with real document lengths ---------------------------------------------------------------
class MockDocumentDataset:
    """Packed samples of ``seq_length`` tokens whose documents have lengths drawn from a length distribution.

    Each document counts up from a random token with a random stride of 1, 2 or 3 (modulo the vocabulary), so a
    model can learn it, the stride only from earlier tokens of the same document; ``labels`` are the next tokens
    and the loss mask is 0 on each document's last token (its next token belongs
    to another document), like Megatron's GPTDataset with ``--eod-mask-loss``. Sample ``i`` depends only on
    ``(seed, i)``: every rank and every data-loader worker builds the same one.
    """

    def __init__(self, num_samples: int, seq_length: int, lengths: LengthDistribution | str, vocab_size: int,
                 seed: int = 1234):
        if seq_length < 1 or num_samples < 0 or vocab_size < 2:
            raise InputError(f"MockDocumentDataset needs seq_length >= 1, num_samples >= 0 and vocab_size >= 2; "
                             f"got {seq_length}, {num_samples}, {vocab_size}")
        self.lengths = load_distribution(lengths) if isinstance(lengths, str) else lengths
        self.num_samples, self.seq_length, self.vocab_size = num_samples, seq_length, vocab_size
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def doc_lens(self, index: int) -> np.ndarray:
        """Document lengths of sample ``index``: empty documents dropped, the last one cut to fill the sample."""
        rng = np.random.default_rng([zlib.crc32(b"fcp-mock"), self.seed, index])
        return draw_documents(self.lengths, rng, self.seq_length, skip_empty=True)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        lens = self.doc_lens(index)
        rng = np.random.default_rng([self.seed, index])
        pieces, labels, mask, pos = [], [], [], []
        for n in lens.tolist():
            start, stride = rng.integers(0, self.vocab_size), rng.integers(1, 4)
            seq = (start + stride * np.arange(n + 1)) % self.vocab_size
            pieces.append(seq[:-1])
            labels.append(seq[1:])
            m = np.ones(n, np.float32)
            m[-1] = 0.0
            mask.append(m)
            pos.append(np.arange(n))
        return {"tokens": np.concatenate(pieces).astype(np.int64), "labels": np.concatenate(labels).astype(np.int64),
                "loss_mask": np.concatenate(mask), "position_ids": np.concatenate(pos).astype(np.int64)}
