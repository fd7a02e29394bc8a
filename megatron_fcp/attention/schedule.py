"""A rank's plan turned into kernel calls and exchange index lists, built once per micro-batch.

Local token order is the order of the rank's ``q`` rows (the plan's order), then padding. Received key/values
sit in one buffer ``[num_recv, 2, kv_heads, head_dim]``, grouped by source rank (ascending) and sorted by
``(doc, start)`` inside a source; the sender packs its ``kv_send`` rows to each destination in the same order,
so no offsets travel.

The attention of one query row ``[s, e)`` of document ``d`` splits into blocks by where its keys live:

- ``own``: under a causal mask the diagonal block (the row against itself, causal); under a full mask the row
  against every key the rank owns of ``d`` (no mask);
- ``earlier`` (causal only): the row against the rank's own rows of ``d`` that end at or before ``s`` (no mask:
  every such key is visible) -- the late half of a zigzag pair sees its early half here;
- ``remote``: the row against the received ranges of ``d`` it may see (causal: ending at or before ``s``;
  full: all of them), no mask.

Own and received ranges never straddle a query row's start (they are disjoint from the rank's own rows), so
every block is either fully visible, diagonal, or invisible; no kernel needs a causal mask with unequal query
and key lengths. The first two calls run while the key/values are in flight; the third when they arrive.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from megatron_fcp.attention.backends.base import VarlenCall
from megatron_fcp.planner.plan import RankPlan


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
class RankSchedule:
    """Everything the engine needs for one rank of one plan (see the module docstring)."""

    cp_rank: int
    cp: int
    num_tokens: int
    num_real: int
    local_calls: tuple[CallPlan, ...]
    remote_calls: tuple[CallPlan, ...]
    send_index: torch.Tensor
    """Local token indices packed into the send buffer, destination by destination."""
    send_splits: tuple[tuple[int, int, int], ...]
    """``(dst_rank, start, end)`` rows of the send buffer."""
    recv_splits: tuple[tuple[int, int, int], ...]
    """``(src_rank, start, end)`` rows of the receive buffer."""

    @property
    def num_send(self) -> int:
        return int(self.send_index.shape[0])

    @property
    def num_recv(self) -> int:
        return self.recv_splits[-1][2] if self.recv_splits else 0


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


def build_schedule(rank_plan: RankPlan, device: torch.device | str = "cpu") -> RankSchedule:
    """Kernel calls and exchange lists of one rank (see the module docstring)."""
    device = torch.device(device)
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
    recv = sorted(rank_plan.kv_recv)
    recv_rows = offset_rows(recv)
    remote = visible_call("remote", own, recv_rows, rank_plan.mask, device)
    # exchange lists: per peer, rows sorted by (doc, start) -- the same order on both ends
    recv_splits, start = [], 0
    for src in sorted({r[0] for r in recv}):
        n = sum(e - s for p, _, s, e in recv if p == src)
        recv_splits.append((src, start, start + n))
        start += n
    own_by_doc = defaultdict(list)
    for doc, s, e, off in own:
        own_by_doc[doc].append((s, e, off))
    send_parts, send_splits, start = [], [], 0
    for dst, doc, s, e in sorted(rank_plan.kv_send):
        if not send_splits or send_splits[-1][0] != dst:
            send_splits.append([dst, start, start])
        for os_, oe, off in own_by_doc[doc]:
            a, b = max(s, os_), min(e, oe)
            if a < b:
                send_parts.append((off + a - os_, off + b - os_))
        start += e - s
        send_splits[-1][2] = start
    send_index = torch.from_numpy(_aranges(send_parts)).to(device)
    if send_index.shape[0] != start:
        raise ValueError(f"rank {rank_plan.cp_rank} is asked to send key/values it does not own")
    return RankSchedule(cp_rank=rank_plan.cp_rank, cp=rank_plan.cp,
                        num_tokens=rank_plan.num_tokens, num_real=num_real, local_calls=tuple(local_calls),
                        remote_calls=(remote,) if remote else (), send_index=send_index,
                        send_splits=tuple(map(tuple, send_splits)), recv_splits=tuple(recv_splits))


@lru_cache(maxsize=16)
def cached_schedule(rank_plan: RankPlan, device: str) -> RankSchedule:
    """:func:`build_schedule`, memoised per plan view and device (layers of one micro-batch share it)."""
    return build_schedule(rank_plan, device)
