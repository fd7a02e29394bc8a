"""Ring context parallelism executed by the FCP engine: the baseline the CPU benchmark compares with.

A ring plan (:func:`megatron_fcp.planner.baselines.plan_ring`: every document cut into ``2 * cp`` chunks, rank
``r`` holding chunks ``r`` and ``2cp - 1 - r``) is stepped the way ring CP steps (Transformer Engine's
``AttnFuncWithCPAndKVP2P``): in step ``s`` every rank attends to the whole key/value buffer of rank ``r - s``
while passing it on to ``r + 1``; in backward the buffers travel again with their gradients, which reach their
owner after the last step. Kernels, the merge and the gradient accumulation are the FCP engine's.
"""

from __future__ import annotations

import torch

from megatron_fcp.attention.engine import (
    BackwardQueries,
    GradState,
    Kernels,
    KeyValues,
    backward_calls,
    forward_calls,
    new_forward_state,
    to_local,
)
from megatron_fcp.attention.exchange import P2PExchange
from megatron_fcp.attention.schedule import CallPlan, build_schedule, offset_rows, visible_call
from megatron_fcp.kernels import Backend, get_backend, resolve_softmax_scale
from megatron_fcp.planner.plan import Plan


def ring_steps(plan: Plan, cp_rank: int, device) -> list[tuple[CallPlan, ...]]:
    """Kernel calls per ring step: step 0 the rank's own blocks, step ``s`` the buffer of rank ``cp_rank - s``."""
    own = offset_rows(plan.for_rank(cp_rank).q)
    steps = [build_schedule(plan.for_rank(cp_rank), device).local_calls]
    for s in range(1, plan.cp):
        call = visible_call(f"ring{s}", own, offset_rows(plan.for_rank((cp_rank - s) % plan.cp).q), plan.mask,
                            device)
        steps.append((call,) if call else ())
    return steps


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, steps, exchange: P2PExchange, kernels: Kernels, num_real: int):
        r, cp = exchange.cp_rank, exchange.cp
        ahead, behind = [((r + 1) % cp, 0, k.shape[0])], [((r - 1) % cp, 0, k.shape[0])]
        state = new_forward_state(num_real, q)
        cur = torch.stack((k, v), dim=1)
        for s in range(cp):
            if s + 1 < cp:
                nxt = torch.empty_like(cur)
                pending = exchange.start("forward", cur, ahead, nxt, behind)
            forward_calls(steps[s], q, KeyValues(cur[:, 0], cur[:, 1]), kernels, state)
            if s + 1 < cp:
                pending.wait()
                cur = nxt
        out = to_local(q, state.out)
        ctx.save_for_backward(q, k, v, out, state.lse)
        ctx.ring = (steps, exchange, kernels, num_real)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        steps, exchange, kernels, num_real = ctx.ring
        r, cp = exchange.cp_rank, exchange.cp
        ahead, behind = [((r + 1) % cp, 0, k.shape[0])], [((r - 1) % cp, 0, k.shape[0])]
        queries = BackwardQueries(dout.contiguous(), q, out, lse)
        dq = torch.zeros((num_real, *q.shape[1:]), dtype=lse.dtype, device=q.device)
        cur, incoming, grad_pending = torch.stack((k, v), dim=1), None, None
        for s in range(cp):
            if s + 1 < cp:
                nxt = torch.empty_like(cur)
                kv_pending = exchange.start("backward", cur, ahead, nxt, behind)
            grad = torch.zeros(cur.shape, dtype=lse.dtype, device=q.device)
            backward_calls(steps[s], queries, KeyValues(cur[:, 0], cur[:, 1]), kernels,
                           GradState(dq, grad[:, 0], grad[:, 1]))
            if grad_pending is not None:  # what the previous holders of this buffer added
                grad_pending.wait()
                grad += incoming.to(grad.dtype)
            if cp == 1:
                incoming = grad.to(k.dtype)
                break
            incoming = torch.empty_like(cur)
            grad_pending = exchange.start("backward", grad.to(k.dtype), ahead, incoming, behind)
            if s + 1 < cp:
                kv_pending.wait()
                cur = nxt
        if grad_pending is not None:
            grad_pending.wait()  # after the last step every buffer's gradient has reached its owner
        return to_local(q, dq), incoming[:, 0].clone(), incoming[:, 1].clone(), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, exchange: P2PExchange,
                   softmax_scale: float | None = None, backend: str | Backend = "auto", steps=None) -> torch.Tensor:
    """Ring attention of this rank's tokens of ``plan`` (tensors as for ``fcp_attention``); differentiable."""
    kernels = Kernels(get_backend(backend, q.device), resolve_softmax_scale(softmax_scale, q.shape[2]))
    steps = steps or ring_steps(plan, exchange.cp_rank, q.device)
    num_real = int(plan.num_real_tokens[exchange.cp_rank])
    return _RingAttention.apply(q, k, v, steps, exchange, kernels, num_real)
