"""Run every rank of a plan in one process, with the same stages, kernels and merge as the distributed path.

No process group: what a rank would receive is cut from its peers' send buffers directly. This lets one GPU
(or a unit test) run and check each rank's work, and it agrees bit for bit with the multi-process run because
every rank executes the same operations in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_fcp.attention.backends import Backend, get_backend
from megatron_fcp.attention.engine import (
    backward_local,
    backward_remote,
    finish_backward,
    forward_local,
    forward_remote,
    pack_send,
)
from megatron_fcp.attention.schedule import RankSchedule, build_schedule
from megatron_fcp.planner.plan import Plan


def _route(scheds: list[RankSchedule], buffers: list[torch.Tensor], out_splits: str, in_splits: str):
    """What each rank receives: for every ``(peer, a, b)`` of its ``in_splits``, the peer's slice addressed to it."""
    received = []
    for sched in scheds:
        parts = []
        for peer, a, b in getattr(sched, in_splits):
            rows = {p: (x, y) for p, x, y in getattr(scheds[peer], out_splits)}
            x, y = rows[sched.cp_rank]
            if y - x != b - a:
                raise AssertionError(f"rank {peer} sends {y - x} rows to rank {sched.cp_rank}, which expects {b - a}")
            parts.append(buffers[peer][x:y])
        shape = (0, *buffers[sched.cp_rank].shape[1:])
        received.append(torch.cat(parts) if parts else buffers[sched.cp_rank].new_empty(shape))
    return received


@dataclass
class InProcessResult:
    out: list[torch.Tensor]
    """Per rank ``[num_tokens, q_heads, head_dim]``."""
    dq: list[torch.Tensor] | None
    dk: list[torch.Tensor] | None
    dv: list[torch.Tensor] | None


def run_in_process(plan: Plan, q: list[torch.Tensor], k: list[torch.Tensor], v: list[torch.Tensor],
                   dout: list[torch.Tensor] | None = None, *, backend: str | Backend = "auto",
                   softmax_scale: float | None = None) -> InProcessResult:
    """Forward (and backward, if ``dout`` is given) of every rank; tensors per rank as for ``fcp_attention``."""
    kernels = get_backend(backend, q[0].device)
    scale = 1.0 / math.sqrt(q[0].shape[2]) if softmax_scale is None else float(softmax_scale)
    scheds = [build_schedule(plan.for_rank(r), q[0].device) for r in range(plan.cp)]
    recv = _route(scheds, [pack_send(s, k[r], v[r]) for r, s in enumerate(scheds)], "send_splits", "recv_splits")
    outs, lses = [], []
    for r, sched in enumerate(scheds):
        out_acc, lse = forward_local(sched, q[r], k[r], v[r], kernels, scale)
        outs.append(forward_remote(sched, q[r], recv[r], kernels, scale, out_acc, lse))
        lses.append(lse)
    if dout is None:
        return InProcessResult(outs, None, None, None)
    dout = [d.contiguous() for d in dout]
    dqs, d_recv = zip(*(backward_remote(sched, dout[r], q[r], k[r], recv[r], outs[r], lses[r], kernels, scale)
                        for r, sched in enumerate(scheds)), strict=True)
    returned = _route(scheds, list(d_recv), "recv_splits", "send_splits")
    grads = []
    for r, sched in enumerate(scheds):
        dk, dv = backward_local(sched, dout[r], q[r], k[r], v[r], outs[r], lses[r], kernels, scale, dqs[r])
        grads.append(finish_backward(sched, q[r], k[r], v[r], dqs[r], dk, dv, returned[r]))
    return InProcessResult(outs, *(list(g) for g in zip(*grads, strict=True)))
