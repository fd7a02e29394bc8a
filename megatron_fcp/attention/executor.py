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
    add_returned_grads,
    backward_calls,
    finish_forward,
    forward_calls,
    new_forward_state,
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
        out_acc, lse = new_forward_state(sched.num_real, q[r])
        forward_calls(sched.local_calls, q[r], k[r], v[r], kernels, scale, out_acc, lse)
        forward_calls(sched.remote_calls, q[r], recv[r][:, 0], recv[r][:, 1], kernels, scale, out_acc, lse)
        outs.append(finish_forward(q[r], out_acc))
        lses.append(lse)
    if dout is None:
        return InProcessResult(outs, None, None, None)
    grads, d_remote = [], []
    for r, sched in enumerate(scheds):
        acc = lses[r].dtype
        dq = torch.zeros((sched.num_real, *q[r].shape[1:]), dtype=acc, device=q[r].device)
        dk, dv = torch.zeros_like(k[r], dtype=acc), torch.zeros_like(v[r], dtype=acc)
        dr = torch.zeros(recv[r].shape, dtype=acc, device=q[r].device)
        backward_calls(sched.remote_calls, dout[r].contiguous(), q[r], recv[r][:, 0], recv[r][:, 1], outs[r],
                       lses[r], kernels, scale, dq, dr[:, 0], dr[:, 1])
        grads.append((dq, dk, dv))
        d_remote.append(dr.to(k[r].dtype))
    returned = _route(scheds, d_remote, "recv_splits", "send_splits")
    dqs, dks, dvs = [], [], []
    for r, sched in enumerate(scheds):
        dq, dk, dv = grads[r]
        backward_calls(sched.local_calls, dout[r].contiguous(), q[r], k[r], v[r], outs[r], lses[r], kernels,
                       scale, dq, dk, dv)
        add_returned_grads(sched, dk, dv, returned[r])
        dq_full = torch.zeros_like(q[r])
        dq_full[: sched.num_real] = dq.to(q[r].dtype)
        dqs.append(dq_full)
        dks.append(dk.to(k[r].dtype))
        dvs.append(dv.to(v[r].dtype))
    return InProcessResult(outs, dqs, dks, dvs)
