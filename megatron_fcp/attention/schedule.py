"""A rank's plan turned into kernel calls and exchange messages, built once per micro-batch (and budget).

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

Own and received ranges never straddle a query row's start (they are disjoint from the rank's own rows), so
every block is either fully visible, diagonal, or invisible; no kernel needs a causal mask with unequal query
and key lengths. The local calls run while the first stage is in flight; stage ``j``'s call runs while stage
``j + 1`` is in flight.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from megatron_fcp.kernels.base import VarlenCall
from megatron_fcp.planner.plan import RankPlan
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

    @property
    def num_rounds(self) -> int:
        """Rounds this rank takes part in, forward and backward alike (receiving, sending or both)."""
        return len(self.send_rounds)

    @property
    def num_recv(self) -> int:
        return sum(stage.num_tokens for stage in self.stages)

    @property
    def num_send(self) -> int:
        return sum(b - a for messages in self.send_rounds for _, a, b in messages)


def _aranges(rows) -> np.ndarray:
    """Concatenated ``arange(a, b)`` for ``(a, b)`` pairs."""
    if not rows:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in rows])


def _index(values: np.ndarray, device) -> torch.Tensor | None:
    """An index tensor, or None where it is the identity ``0..n-1``."""
    if np.array_equal(values, np.arange(values.shape[0])):
        return None
    return torch.from_numpy(values).to(device)


def visible_call(name: str, q_rows, key_rows, mask: str, device, skip_self: bool = False) -> CallPlan | None:
    """Full-visible blocks of local query rows against key rows.

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
    return CallPlan(name=name, call=VarlenCall.make(q_lens, k_lens, False, device),
                    q_index=_index(_aranges(q_parts), device), k_index=_index(_aranges(k_parts), device))


def offset_rows(rows) -> list[tuple[int, int, int, int]]:
    """``(doc, start, end, offset)`` for rows ending in ``(doc, start, end)``, laid out one after another."""
    out, off = [], 0
    for row in rows:
        out.append((*row[-3:], off))
        off += row[-1] - row[-2]
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


def _stages(rank_plan: RankPlan, own, budget: int | None, device) -> tuple[Stage, ...]:
    pieces = np.asarray(rank_plan.recv_pieces, dtype=np.int64).reshape(-1, 6)  # src, doc, start, end, src_off, pos
    if pieces.shape[0] == 0:
        return ()
    lens = pieces[:, 3] - pieces[:, 2]
    index, offset, length, stage, _ = split_stages(pieces[:, 5], lens, np.full(lens.shape, int(lens.sum())), budget)
    src, doc = pieces[index, 0], pieces[index, 1]
    start, src_offset = pieces[index, 2] + offset, pieces[index, 4] + offset
    stages = []
    for j in range(int(stage.max()) + 1):
        sel = np.flatnonzero(stage == j)
        sel = sel[np.lexsort((src_offset[sel], src[sel]))]  # by source, then the source's local order
        buf = np.cumsum(length[sel]) - length[sel]
        messages = _merge_messages(np.column_stack([src[sel], src_offset[sel], length[sel], buf]))
        rows = [(int(d), int(s), int(s + n), int(b)) for d, s, n, b in
                zip(doc[sel], start[sel], length[sel], buf, strict=True)]
        call = visible_call(f"stage{j}", own, rows, rank_plan.mask, device)
        stages.append(Stage(index=j, num_tokens=int(length[sel].sum()), recv=tuple(messages), call=call))
    return tuple(stages)


def _send_messages(rank_plan: RankPlan, budget: int | None) -> list[tuple[int, int, int, int, int]]:
    """``(dst, start, end, forward_round, backward_round)`` of the own rows this rank sends."""
    pieces = np.asarray(rank_plan.send_pieces, dtype=np.int64).reshape(-1, 7)  # dst, doc, s, e, off, pos, total
    if pieces.shape[0] == 0:
        return []
    index, offset, length, stage, n = split_stages(pieces[:, 5], pieces[:, 3] - pieces[:, 2], pieces[:, 6], budget)
    dst, own_offset = pieces[index, 0], pieces[index, 4] + offset
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


def build_schedule(rank_plan: RankPlan, device: torch.device | str = "cpu",
                   kv_budget_tokens: int | str | None = DEFAULT_KV_BUDGET) -> RankSchedule:
    """Kernel calls and exchange messages of one rank under a key/value budget (see the module docstring)."""
    device = torch.device(device)
    budget = resolve_kv_budget(kv_budget_tokens, rank_plan.num_tokens)
    own = offset_rows(rank_plan.q)
    num_real = sum(e - s for _, s, e, _ in own)
    local_calls = []
    if own:
        sizes = [e - s for _, s, e, _ in own]
        if rank_plan.mask == "causal":
            local_calls.append(CallPlan(name="own", call=VarlenCall.make(sizes, sizes, True, device),
                                        q_index=None, k_index=None))
            earlier = visible_call("earlier", own, own, "causal", device, skip_self=True)
            local_calls += [earlier] if earlier else []
        else:
            local_calls.append(visible_call("own", own, own, "full", device))
    stages = _stages(rank_plan, own, budget, device)
    sends = _send_messages(rank_plan, budget)
    if any(b > num_real for _, _, b, _, _ in sends):
        raise ValueError(f"rank {rank_plan.cp_rank} is asked to send key/values it does not own")
    num_rounds = max([len(stages)] + [max(j, t) + 1 for *_, j, t in sends])
    send_rounds = tuple(tuple((d, a, b) for d, a, b, j, _ in sends if j == r) for r in range(num_rounds))
    return_rounds = tuple(tuple((d, a, b) for d, a, b, _, t in sends if t == r) for r in range(num_rounds))
    refetch_rounds = tuple(messages if r else () for r, messages in enumerate(return_rounds))
    return RankSchedule(cp_rank=rank_plan.cp_rank, cp=rank_plan.cp, num_tokens=rank_plan.num_tokens,
                        num_real=num_real, kv_budget_tokens=budget, local_calls=tuple(local_calls), stages=stages,
                        send_rounds=send_rounds, refetch_rounds=refetch_rounds, return_rounds=return_rounds)


@lru_cache(maxsize=16)
def cached_schedule(rank_plan: RankPlan, device: str, kv_budget_tokens: int | str | None = DEFAULT_KV_BUDGET
                    ) -> RankSchedule:
    """:func:`build_schedule`, memoised per plan view, device and budget (layers of one micro-batch share it)."""
    return build_schedule(rank_plan, device, kv_budget_tokens)
