"""A rank's plan turned into kernel calls and exchange messages, built once per micro-batch (and budget).

The schedule is built on the host, in numpy, as **one int64 array** (:func:`encode_schedule`): the data loader's
worker builds it next to the plan and ships it with the sample, and the training process turns it into a
:class:`RankSchedule` with :func:`decode_schedule`, which reads the structure on the host and moves every device
array (cumulative segment lengths, row indices) with one host-to-device copy (pinned, non-blocking on GPU). No
kernel call, message or index is built in the attention layer. :func:`build_schedule` is the two together.

Local token order is the order of the rank's ``q`` rows (the plan's order), then padding.

Received key/values travel in **stages** of at most ``kv_budget_tokens`` tokens
(:mod:`megatron_fcp.planner.stages`): stage ``j`` arrives in forward round ``j`` into its own buffer
``[2, stage_tokens, kv_heads, head_dim]`` (keys, then values), grouped by source rank (ascending) and, inside a
source, in the source's local token order. A run of pieces that is contiguous on the source is one message (one
for keys, one for values): the source sends a slice of its own ``k``/``v`` with no copy, and the receiver
receives into a slice of the stage buffer. Both ends cut stages and merge runs from the same pieces, so no sizes
or offsets travel. The last stage is kept for backward; backward round ``t`` fetches the receiver's stage
``n - 1 - t`` again (``t >= 1``) and returns the key/value gradients of that stage to their owners.

The attention of one query row ``[s, e)`` of document ``d`` splits into blocks by where its keys live:

- ``own``: under a causal mask the diagonal block (the row against itself, causal); under a full mask the row
  against every key the rank owns of ``d`` (no mask);
- ``earlier`` (causal only): the row against the rank's own rows of ``d`` that end at or before ``s`` (no mask:
  every such key is visible) -- the late half of a zigzag pair sees its early half here;
- ``stage{j}``: the row against the received ranges of ``d`` in stage ``j`` that it may see (causal: ending at or
  before ``s``; full: all of them), no mask.

Where the plan's ranks lie on more than one node (``RankPlan.relays``), key/values cross between nodes fewer
times (:mod:`megatron_fcp.planner.relay`): a rank forwards rows of its stage buffer of the round before to
node-mates whose next stage holds the same tokens (``relay_rounds``, ``refetch_relay_rounds``), a stage lists its
sources per pass (``Stage.recv``, ``Stage.refetch``), and its key/value gradients go to their owners or to a
node-mate that adds them to its own next stage's before sending them on (``Stage.grad_sends``,
``grad_relay_rounds``). The stage buffers, the kernel calls and the memory bound stay as they are; a node-mate's
partial gradients arrive in a buffer of their own.

Own and received ranges never straddle a query row's start (they are disjoint from the rank's own rows), so
every block is either fully visible, diagonal, or invisible; no kernel needs a causal mask with unequal query
and key lengths. The local calls run while the first stage is in flight; stage ``j``'s call runs while stage
``j + 1`` is in flight.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

from megatron_fcp.errors import InputError
from megatron_fcp.kernels.base import VarlenCall, check_segments
from megatron_fcp.planner.columns import VIEW_RECV_PIECES, VIEW_SEND_PIECES, Piece
from megatron_fcp.planner.plan import RankPlan
from megatron_fcp.planner.relay import rank_messages
from megatron_fcp.planner.stages import DEFAULT_KV_BUDGET, resolve_kv_budget, split_stages

Message = tuple[int, int, int]
"""``(peer, start, end)``: rows ``[start, end)`` of a buffer that travel to or from ``peer`` (CP group rank)."""


@dataclass(frozen=True, eq=False)
class CallPlan:
    """One kernel call: which local query rows and which key rows (of the local or received buffer) it uses."""

    name: str
    call: VarlenCall
    q_index: torch.Tensor | None
    """Local token indices of the call's queries, in segment order (None: local tokens ``[0, call.num_q)``)."""
    k_index: torch.Tensor | None
    """Indices of the call's keys in their buffer, in segment order (None: ``[0, call.num_k)``)."""


@dataclass(frozen=True, eq=False)
class Stage:
    """Received key/values that travel and are computed together."""

    index: int
    """Forward round in which the stage arrives (its position in the rank's stages)."""
    num_tokens: int
    """Rows of the stage buffer."""
    recv: tuple[tuple[int, int, int, int], ...]
    """``(src, start, end, src_offset)``: buffer rows ``[start, end)`` come from the source's local rows
    ``[src_offset, src_offset + end - start)``, one message (keys and values) each."""
    call: CallPlan | None
    """The kernel call of the rank's queries against the stage (None if no query sees it)."""
    refetch_from: tuple[tuple[int, int, int, int], ...] | None = None
    """Node-aware exchange: ``recv`` of the stage fetched again in backward (None: as ``recv``)."""
    grads_to: tuple[Message, ...] | None = None
    """Node-aware exchange: ``(peer, start, end)``: rows of the stage's key/value gradients sent to ``peer`` (their
    owner, or a node-mate that adds them to its own); None: each ``recv`` message's rows back to its source."""

    @property
    def refetch(self) -> tuple[tuple[int, int, int, int], ...]:
        """``(src, start, end, src_offset)`` of the stage fetched again in backward."""
        return self.recv if self.refetch_from is None else self.refetch_from

    @property
    def grad_sends(self) -> tuple[Message, ...]:
        """``(peer, start, end)``: rows of the stage's key/value gradients and where they go."""
        return tuple((src, a, b) for src, a, b, _ in self.recv) if self.grads_to is None else self.grads_to


@dataclass(frozen=True, eq=False)
class RankSchedule:
    """Everything the engine needs for one rank of one plan under one budget (see the module docstring)."""

    cp_rank: int
    cp: int
    num_tokens: int
    num_real: int
    kv_budget_tokens: int | None
    """Tokens per stage (resolved; None: one stage)."""
    local_calls: tuple[CallPlan, ...]
    stages: tuple[Stage, ...]
    """In forward order; the last one is kept for backward."""
    send_rounds: tuple[tuple[Message, ...], ...]
    """Per forward round: the own rows sent to each destination (sliced from ``k`` and ``v``, no copy)."""
    refetch_rounds: tuple[tuple[Message, ...], ...]
    """Per backward round: own rows sent again to destinations that did not keep them (round 0 is empty)."""
    return_rounds: tuple[tuple[Message, ...], ...]
    """Per backward round: own rows whose key/value gradients come back from each destination."""
    plan_digest: int = 0
    """The digest of the plan the schedule was built from (every CP rank of one micro-batch holds the same)."""
    relay_rounds: tuple[tuple[Message, ...], ...] = ()
    """Node-aware exchange, per forward round ``r``: rows of the rank's stage buffer of round ``r - 1`` forwarded
    to node-mates (empty, or as many entries as rounds)."""
    refetch_relay_rounds: tuple[tuple[Message, ...], ...] = ()
    """The same per backward round: rows of the stage buffer of backward round ``r - 1``."""
    grad_relay_rounds: tuple[tuple[Message, ...], ...] = ()
    """Per backward round ``r``: rows of the rank's stage of round ``r + 1`` to which node-mates' partial key/value
    gradients, received in round ``r``, are added before that stage's gradients are sent."""

    @staticmethod
    def at(rounds: tuple[tuple[Message, ...], ...], round_: int) -> tuple[Message, ...]:
        """The messages of ``round_`` in a per-round table that may be empty (no node-aware exchange)."""
        return rounds[round_] if round_ < len(rounds) else ()

    @property
    def num_rounds(self) -> int:
        """Rounds this rank takes part in, forward and backward alike (receiving, sending or both)."""
        return len(self.send_rounds)

    @property
    def num_recv(self) -> int:
        return sum(stage.num_tokens for stage in self.stages)


# -- kernel calls on the host ----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CallSpec:
    """A kernel call before any device tensor exists: segment lengths and row indices as int64 numpy arrays."""

    name: str
    causal: bool
    q_lens: np.ndarray
    k_lens: np.ndarray
    q_index: np.ndarray | None
    """None: the identity ``0 .. sum(q_lens) - 1``."""
    k_index: np.ndarray | None
    """None: the identity ``0 .. sum(k_lens) - 1``."""

    def to_device(self, device) -> CallPlan:
        """The :class:`CallPlan` of this call with its arrays on ``device`` (several small copies: for tools and
        tests; the training path moves a whole schedule at once with :func:`decode_schedule`)."""
        call = VarlenCall.make(self.q_lens, self.k_lens, self.causal, device)

        def index(values):
            return None if values is None else torch.from_numpy(values).to(device)

        return CallPlan(name=self.name, call=call, q_index=index(self.q_index), k_index=index(self.k_index))


def _aranges(rows) -> np.ndarray:
    """Concatenated ``arange(a, b)`` for ``(a, b)`` pairs."""
    if not rows:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in rows])


def _index(values: np.ndarray) -> np.ndarray | None:
    """``values``, or None where it is the identity ``0..n-1``."""
    if np.array_equal(values, np.arange(values.shape[0])):
        return None
    return values


def visible_segments(name: str, q_rows, key_rows, mask: str, skip_self: bool = False) -> CallSpec | None:
    """Full-visible blocks of local query rows against key rows, on the host.

    ``q_rows``: ``(doc, start, end, offset)`` with ``offset`` the local index of ``start``; ``key_rows`` the same
    with offsets into the key buffer. Each query row gets one segment: the key rows of its document that it sees
    entirely (causal: ending at or before its start; full: all). Returns None if no row sees any key.
    """
    by_doc = defaultdict(list)
    for row in key_rows:
        by_doc[row[0]].append(row)
    q_lens, k_lens, q_parts, k_parts = [], [], [], []
    for doc, s, e, off in q_rows:
        keys = []
        for _, ks, ke, koff in by_doc.get(doc, ()):
            if skip_self and (ks, ke) == (s, e):
                continue
            if mask == "causal" and ks < e and ke > s:
                raise AssertionError(f"key range [{ks}, {ke}) of doc {doc} overlaps query rows [{s}, {e})")
            if mask == "full" or ke <= s:
                keys.append((koff, koff + ke - ks))
        if keys:
            q_lens.append(e - s)
            k_lens.append(sum(b - a for a, b in keys))
            q_parts.append((off, off + e - s))
            k_parts.extend(keys)
    if not q_lens:
        return None
    return CallSpec(name=name, causal=False, q_lens=np.asarray(q_lens, np.int64),
                    k_lens=np.asarray(k_lens, np.int64), q_index=_index(_aranges(q_parts)),
                    k_index=_index(_aranges(k_parts)))


def visible_call(name: str, q_rows, key_rows, mask: str, device, skip_self: bool = False) -> CallPlan | None:
    """:func:`visible_segments` as a :class:`CallPlan` on ``device`` (None if no row sees any key)."""
    spec = visible_segments(name, q_rows, key_rows, mask, skip_self)
    return None if spec is None else spec.to_device(device)


def offset_rows(rows) -> list[tuple[int, int, int, int]]:
    """``(doc, start, end, offset)`` for rows ending in ``(doc, start, end)``, laid out one after another."""
    out, off = [], 0
    for *_, doc, start, end in rows:
        out.append((doc, start, end, off))
        off += end - start
    return out



def _merge_messages(rows: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Rows ``(peer, offset, length, buffer_start)`` sorted by peer then offset -> messages
    ``(peer, buffer_start, buffer_end, offset)``: runs contiguous in both memories merged."""
    out: list[list[int]] = []
    for peer, off, n, buf in rows.tolist():
        last = out[-1] if out else None
        if last and last[0] == peer and last[3] + last[2] - last[1] == off and last[2] == buf:
            last[2] += n
        else:
            out.append([peer, buf, buf + n, off])
    return [tuple(m) for m in out]


@dataclass(frozen=True)
class _StageSpec:
    num_tokens: int
    recv: tuple[tuple[int, int, int, int], ...]
    call: CallSpec | None
    refetch: tuple[tuple[int, int, int, int], ...] | None = None
    """Node-aware exchange only: the stage's sources in backward (None: as ``recv``)."""
    grads: tuple[Message, ...] | None = None
    """Node-aware exchange only: where the stage's gradient rows go (None: back to ``recv``'s sources)."""


def _stages(rank_plan: RankPlan, own, budget: int | None) -> list[_StageSpec]:
    pieces = np.asarray(rank_plan.recv_pieces, dtype=np.int64).reshape(-1, len(VIEW_RECV_PIECES))
    if pieces.shape[0] == 0:
        return []
    src, doc, start, end, src_offset, pos = pieces.T
    lens = end - start
    index, offset, length, stage, n = split_stages(pos, lens, np.full(lens.shape, rank_plan.recv_total), budget)
    src, doc = src[index], doc[index]  # per sub-piece
    start, src_offset = start[index] + offset, src_offset[index] + offset
    stages = []
    for j in range(int(n.max())):  # a node ring's order may hold empty stages (holes), its last among them
        sel = np.flatnonzero(stage == j)
        sel = sel[np.lexsort((src_offset[sel], src[sel]))]  # by source, then the source's local order
        buf = np.cumsum(length[sel]) - length[sel]
        messages = _merge_messages(np.column_stack([src[sel], src_offset[sel], length[sel], buf]))
        rows = [(int(d), int(s), int(s + n), int(b)) for d, s, n, b in
                zip(doc[sel], start[sel], length[sel], buf, strict=True)]
        call = visible_segments(f"stage{j}", own, rows, rank_plan.mask)
        stages.append(_StageSpec(num_tokens=int(length[sel].sum()), recv=tuple(messages), call=call))
    return stages


def _send_messages(rank_plan: RankPlan, budget: int | None) -> list[tuple[int, int, int, int, int]]:
    """``(dst, start, end, forward_round, backward_round)`` of the own rows this rank sends."""
    pieces = np.asarray(rank_plan.send_pieces, dtype=np.int64).reshape(-1, len(VIEW_SEND_PIECES))
    if pieces.shape[0] == 0:
        return []
    dst, _, start, end, own_offset, dst_pos, dst_total = pieces.T
    index, offset, length, stage, n = split_stages(dst_pos, end - start, dst_total, budget)
    dst, own_offset = dst[index], own_offset[index] + offset  # per sub-piece

    order = np.lexsort((own_offset, dst, stage))
    out: list[list[int]] = []
    for d, a, m, j, num in zip(dst[order].tolist(), own_offset[order].tolist(), length[order].tolist(),
                               stage[order].tolist(), n[order].tolist(), strict=True):
        last = out[-1] if out else None
        if last and last[0] == d and last[3] == j and last[2] == a:
            last[2] += m
        else:
            out.append([d, a, a + m, j, num - 1 - j])
    return [tuple(m) for m in out]


def _local_calls(rank_plan: RankPlan, own) -> list[CallSpec]:
    if not own:
        return []
    if rank_plan.mask != "causal":
        return [visible_segments("own", own, own, "full")]
    sizes = np.asarray([e - s for _, s, e, _ in own], np.int64)
    earlier = visible_segments("earlier", own, own, "causal", skip_self=True)
    return [CallSpec(name="own", causal=True, q_lens=sizes, k_lens=sizes, q_index=None, k_index=None),
            *([earlier] if earlier else [])]


# -- the schedule as one int64 array ---------------------------------------------------------------------------
MAGIC = 0x46435053  # "FCPS"
VERSION = 2
HEADER = ("magic", "version", "cp", "cp_rank", "num_tokens", "num_real", "kv_budget_tokens", "plan_digest",
          "node_aware", "num_local_calls", "num_calls", "num_stages", "num_rounds", "num_recv_messages",
          "num_refetch_messages", "num_grad_messages", "device_offset", "length")
"""Header fields of an encoded schedule, in order. ``kv_budget_tokens`` is -1 for one unbounded stage;
``node_aware`` 1 where key/values are forwarded between node-mates (the refetch and gradient tables then given)."""
_CALL_COLS, _STAGE_COLS, _RECV_COLS, _ROUND_COLS, _MESSAGE_COLS = 5, 5, 4, 6, 3
"""Columns of the call table (causal, segments, q index offset, k index offset, cu offset; offsets into the
device block, -1 for an identity index), stage table (tokens, recv messages, call id or -1, refetch messages and
gradient messages, -1 for each without a node-aware exchange), recv messages (src, start, end, src offset: the
forward ones, then the refetched ones), round counts (sends, returns, refetch sends or -1 for "as the returns",
relays, refetch relays, gradient relays) and messages (peer, start, end: the stages' gradient messages, then
each round's lists in that order)."""
_STAGE_NAME = "stage"


@dataclass(frozen=True)
class _Rounds:
    """Per-round message lists of one rank (each a list over rounds; ``refetch`` None: as ``returns`` but round 0,
    the direct exchange's)."""

    send: list
    returns: list
    refetch: list | None
    relay: list
    refetch_relay: list
    grad_relay: list


def _direct_rounds(rank_plan: RankPlan, budget: int | None, num_stages: int) -> _Rounds:
    """Every key/value from its owner and every gradient back to it: the rounds of the rank's own rows."""
    sends = _send_messages(rank_plan, budget)
    if any(b > rank_plan.num_tokens - rank_plan.num_pad_tokens for _, _, b, _, _ in sends):
        raise ValueError(f"rank {rank_plan.cp_rank} is asked to send key/values it does not own")
    num_rounds = max([num_stages] + [max(j, t) + 1 for *_, j, t in sends])
    def none():
        return [[] for _ in range(num_rounds)]

    return _Rounds(send=[[(d, a, b) for d, a, b, j, _ in sends if j == r] for r in range(num_rounds)],
                   returns=[[(d, a, b) for d, a, b, _, t in sends if t == r] for r in range(num_rounds)],
                   refetch=None, relay=none(), refetch_relay=none(), grad_relay=none())


def _relayed(rank_plan: RankPlan, budget: int | None, stages: list[_StageSpec]) -> tuple[list[_StageSpec], _Rounds]:
    """The node-aware exchange of the rank (:func:`~megatron_fcp.planner.relay.rank_messages`): its stages with
    their sources and gradient destinations, and its per-round lists."""
    pieces = np.asarray(rank_plan.node_pieces, dtype=np.int64).reshape(-1, len(Piece))
    msgs = rank_messages(pieces, np.asarray(rank_plan.cp_node, np.int64), budget, rank_plan.cp_rank)
    stages = [replace(stage, recv=tuple(msgs["recv"].get(j, ())), refetch=tuple(msgs["refetch_recv"].get(j, ())),
                      grads=tuple(msgs["grad_send"].get(j, ()))) for j, stage in enumerate(stages)]
    per_round = ("send", "returns", "refetch", "relay", "refetch_relay", "grad_relay")
    num_rounds = max([len(stages)] + [r + 1 for name in per_round for r in msgs[name]])
    lists = {name: [msgs[name].get(r, []) for r in range(num_rounds)] for name in per_round}
    return stages, _Rounds(**lists)


def encode_schedule(rank_plan: RankPlan, kv_budget_tokens: int | str | None = DEFAULT_KV_BUDGET) -> np.ndarray:
    """The schedule of ``rank_plan`` under the budget as one int64 array (see :data:`HEADER`): a host part (header,
    call, stage, message and round tables) and a device block (per call: cumulative query and key lengths, then
    the query and key row indices that are not the identity). Pure numpy; runs in data-loader workers."""
    budget = resolve_kv_budget(kv_budget_tokens, rank_plan.num_tokens)
    own = offset_rows(rank_plan.q)
    num_real = sum(e - s for _, s, e, _ in own)
    local = _local_calls(rank_plan, own)
    stages = _stages(rank_plan, own, budget)
    if rank_plan.relays:
        stages, rounds = _relayed(rank_plan, budget, stages)
    else:
        rounds = _direct_rounds(rank_plan, budget, len(stages))
    num_rounds = len(rounds.send)

    calls = local + [stage.call for stage in stages if stage.call is not None]
    device: list[np.ndarray] = []
    device_len = 0

    def put(values: np.ndarray) -> int:
        nonlocal device_len
        device.append(values)
        device_len += values.shape[0]
        return device_len - values.shape[0]

    call_rows = []
    for call in calls:
        cu = put(np.concatenate([[0], np.cumsum(call.q_lens), [0], np.cumsum(call.k_lens)]))
        q_off = -1 if call.q_index is None else put(call.q_index)
        k_off = -1 if call.k_index is None else put(call.k_index)
        call_rows.append((int(call.causal), call.q_lens.shape[0], q_off, k_off, cu))
    stage_rows, recv_rows, refetch_rows, grad_rows, call_id = [], [], [], [], len(local)
    for stage in stages:
        stage_rows.append((stage.num_tokens, len(stage.recv), call_id if stage.call is not None else -1,
                           -1 if stage.refetch is None else len(stage.refetch),
                           -1 if stage.grads is None else len(stage.grads)))
        call_id += stage.call is not None
        recv_rows += stage.recv
        refetch_rows += stage.refetch or ()
        grad_rows += stage.grads or ()
    tables = [rounds.send, rounds.returns, rounds.refetch, rounds.relay, rounds.refetch_relay, rounds.grad_relay]
    round_rows = [tuple(-1 if table is None else len(table[r]) for table in tables) for r in range(num_rounds)]
    messages = grad_rows + [m for r in range(num_rounds) for table in tables if table is not None for m in table[r]]
    host = [np.asarray(rows, np.int64).reshape(-1) for rows in (call_rows, stage_rows, recv_rows + refetch_rows,
                                                                 round_rows, messages)]
    device_offset = len(HEADER) + sum(part.shape[0] for part in host)
    header = [MAGIC, VERSION, rank_plan.cp, rank_plan.cp_rank, rank_plan.num_tokens, num_real,
              -1 if budget is None else budget, rank_plan.plan_digest, int(rank_plan.relays), len(local), len(calls),
              len(stages),
              num_rounds, len(recv_rows), len(refetch_rows), len(grad_rows), device_offset,
              device_offset + device_len]
    return np.concatenate([np.asarray(header, np.int64), *host, *[d.astype(np.int64) for d in device]])


def _bad(what: str) -> InputError:
    return InputError(f"encoded FCP schedule is malformed ({what}): the batch was not made by FcpBatchDataset of "
                      "this megatron-fcp version")


def _host_array(data) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        if data.device.type != "cpu":
            raise _bad("it must stay on the host until decoded; do not move it to the GPU first")
        return data.reshape(-1).numpy()
    return np.asarray(data, dtype=np.int64).reshape(-1)


def read_header(data) -> dict[str, int]:
    """The header fields of an encoded schedule (a numpy array or a CPU tensor), checked."""
    host = _host_array(data)
    if host.shape[0] < len(HEADER):
        raise _bad(f"{host.shape[0]} values, fewer than its header")
    head = dict(zip(HEADER, (int(x) for x in host[: len(HEADER)]), strict=True))
    if head["magic"] != MAGIC or head["version"] != VERSION:
        raise _bad(f"magic {head['magic']:#x} version {head['version']}, expected {MAGIC:#x} version {VERSION}")
    if head["length"] != host.shape[0] or not len(HEADER) <= head["device_offset"] <= head["length"]:
        raise _bad(f"{host.shape[0]} values, its header says {head['length']}")
    return head


def _device_block(data, host: np.ndarray, offset: int, device: torch.device) -> torch.Tensor:
    """The device block as an int64 tensor on ``device``: one copy (pinned and non-blocking on GPU)."""
    if isinstance(data, torch.Tensor):
        block = data.reshape(-1)[offset:]
    else:
        block = torch.from_numpy(np.ascontiguousarray(host[offset:]))
    if device.type == "cpu":
        return block
    if not block.is_pinned():
        block = block.pin_memory()
    return block.to(device, non_blocking=True)


class _Reader:
    """Reads the host tables of an encoded schedule in order."""

    def __init__(self, host: np.ndarray, start: int):
        self.host, self.pos = host, start

    def rows(self, count: int, cols: int) -> np.ndarray:
        end = self.pos + count * cols
        if count < 0 or end > self.host.shape[0]:
            raise _bad("a table runs past the end")
        out, self.pos = self.host[self.pos:end].reshape(count, cols), end
        return out


def _decode_call(name: str, row, host_block: np.ndarray, dev64: torch.Tensor, dev32: torch.Tensor) -> CallPlan:
    causal, num_segments, q_off, k_off, cu = (int(x) for x in row)
    if num_segments < 1 or cu < 0 or cu + 2 * num_segments + 2 > host_block.shape[0]:
        raise _bad(f"call {name} has bad segments")
    cu_q, cu_k = host_block[cu: cu + num_segments + 1], host_block[cu + num_segments + 1: cu + 2 * num_segments + 2]
    q_lens, k_lens = tuple(np.diff(cu_q).tolist()), tuple(np.diff(cu_k).tolist())
    try:
        check_segments(q_lens, k_lens, bool(causal))
    except ValueError as err:
        raise _bad(f"call {name}: {err}") from None

    def index(off: int, n: int) -> torch.Tensor | None:
        if off == -1:
            return None
        if off < 0 or off + n > host_block.shape[0]:
            raise _bad(f"call {name} has an index past the end")
        return dev64[off: off + n]

    call = VarlenCall(q_lens=q_lens, k_lens=k_lens, cu_q=dev32[cu: cu + num_segments + 1],
                      cu_k=dev32[cu + num_segments + 1: cu + 2 * num_segments + 2], causal=bool(causal))
    return CallPlan(name=name, call=call, q_index=index(q_off, call.num_q), k_index=index(k_off, call.num_k))


def _messages(rows: np.ndarray) -> tuple[Message, ...]:
    return tuple((int(p), int(a), int(b)) for p, a, b in rows)


def decode_schedule(data, device: torch.device | str = "cpu") -> RankSchedule:
    """The :class:`RankSchedule` of an encoded schedule (a numpy array or a CPU tensor, pinned for a fast copy).

    The structure is read on the host; the device block moves to ``device`` in one copy (non-blocking from pinned
    memory), and every call's cumulative lengths and indices are views of it. No stream synchronisation.
    """
    device = torch.device(device)
    host = _host_array(data)
    head = read_header(host)
    reader = _Reader(host, len(HEADER))
    call_rows = reader.rows(head["num_calls"], _CALL_COLS)
    stage_rows = reader.rows(head["num_stages"], _STAGE_COLS)
    recv_rows = reader.rows(head["num_recv_messages"], _RECV_COLS)
    refetch_rows = reader.rows(head["num_refetch_messages"], _RECV_COLS)
    round_rows = reader.rows(head["num_rounds"], _ROUND_COLS)
    grad_rows = reader.rows(head["num_grad_messages"], _MESSAGE_COLS)
    message_rows = reader.rows(int(np.maximum(round_rows, 0).sum()), _MESSAGE_COLS)
    if reader.pos != head["device_offset"]:
        raise _bad("its tables do not end where the device block starts")
    offset = head["device_offset"]
    dev64 = _device_block(data, host, offset, device)
    dev32 = dev64.to(torch.int32)
    host_block = host[offset:]
    num_local = head["num_local_calls"]
    names = ["own", "earlier"][:num_local] + [""] * (head["num_calls"] - num_local)
    stage_of_call = {int(row[2]): j for j, row in enumerate(stage_rows) if row[2] >= 0}
    calls = [_decode_call(names[i] or f"{_STAGE_NAME}{stage_of_call.get(i, i)}", row, host_block, dev64, dev32)
             for i, row in enumerate(call_rows)]
    relays = bool(head["node_aware"])
    stages, first, first_refetch, first_grad = [], 0, 0, 0
    for j, (num_tokens, num_recv, call_id, num_refetch, num_grads) in enumerate(stage_rows.tolist()):
        recv = tuple(tuple(int(x) for x in r) for r in recv_rows[first: first + num_recv])
        first += num_recv
        refetch = grads = None
        if relays:
            if num_refetch < 0 or num_grads < 0:
                raise _bad(f"stage {j} lacks its node-aware messages")
            refetch = tuple(tuple(int(x) for x in r) for r in refetch_rows[first_refetch: first_refetch + num_refetch])
            grads = _messages(grad_rows[first_grad: first_grad + num_grads])
            first_refetch, first_grad = first_refetch + num_refetch, first_grad + num_grads
        stages.append(Stage(index=j, num_tokens=num_tokens, recv=recv, call=calls[call_id] if call_id >= 0 else None,
                            refetch_from=refetch, grads_to=grads))
    lists: list[list[tuple[Message, ...]]] = [[] for _ in range(_ROUND_COLS)]
    first = 0
    for counts in round_rows.tolist():
        for table, n in zip(lists, counts, strict=True):
            table.append(_messages(message_rows[first: first + max(n, 0)]))
            first += max(n, 0)
    send_rounds, return_rounds, refetch_rounds, relay_rounds, refetch_relay_rounds, grad_relay_rounds = lists
    if not relays:  # own rows fetched again are those whose gradients come back (none in round 0: kept)
        refetch_rounds = [messages if r else () for r, messages in enumerate(return_rounds)]
        relay_rounds = refetch_relay_rounds = grad_relay_rounds = []
    budget = head["kv_budget_tokens"]
    return RankSchedule(cp_rank=head["cp_rank"], cp=head["cp"], num_tokens=head["num_tokens"],
                        num_real=head["num_real"], kv_budget_tokens=None if budget < 0 else budget,
                        local_calls=tuple(calls[:num_local]), stages=tuple(stages), send_rounds=tuple(send_rounds),
                        refetch_rounds=tuple(refetch_rounds), return_rounds=tuple(return_rounds),
                        plan_digest=head["plan_digest"], relay_rounds=tuple(relay_rounds),
                        refetch_relay_rounds=tuple(refetch_relay_rounds), grad_relay_rounds=tuple(grad_relay_rounds))


def build_schedule(rank_plan: RankPlan, device: torch.device | str = "cpu",
                   kv_budget_tokens: int | str | None = DEFAULT_KV_BUDGET) -> RankSchedule:
    """Kernel calls and exchange messages of one rank under a key/value budget (see the module docstring):
    :func:`encode_schedule` then :func:`decode_schedule`, the path the data loader and the step take."""
    return decode_schedule(encode_schedule(rank_plan, kv_budget_tokens), device)


@lru_cache(maxsize=16)
def cached_schedule(rank_plan: RankPlan, device: str, kv_budget_tokens: int | str | None = DEFAULT_KV_BUDGET
                    ) -> RankSchedule:
    """:func:`build_schedule`, memoised per plan view, device and budget (for callers that pass plan views)."""
    return build_schedule(rank_plan, device, kv_budget_tokens)
