"""Ring context parallelism as a schedule of the FCP engine's own rounds: the baseline the CPU benchmark compares
with.

A ring plan (:func:`megatron_fcp.planner.baselines.plan_ring`: every document cut into ``2 * cp`` chunks, rank
``r`` holding chunks ``r`` and ``2cp - 1 - r``) is computed the way ring CP steps it (Transformer Engine's
``AttnFuncWithCPAndKVP2P``): the rank's own blocks, then in step ``s`` its queries against the whole key/value
buffer of rank ``r - s``. :func:`ring_schedule` writes that as a
:class:`~megatron_fcp.attention.schedule.RankSchedule` for :func:`~megatron_fcp.attention.engine.forward_rounds`
and :func:`~megatron_fcp.attention.engine.backward_rounds`: stage ``s - 1`` is rank ``r - s``'s whole buffer,
arriving in round ``s - 1`` straight from its owner (ring CP passes it along the ring instead: the same bytes
forward); in backward the last buffer is kept, the others are fetched again, and each buffer's gradients go
straight back to its owner. Kernels, merges, messages and buffers are the engine's.
"""

from __future__ import annotations

import torch

from megatron_fcp.attention.engine import Kernels, attention_step
from megatron_fcp.attention.exchange import Exchange
from megatron_fcp.attention.schedule import RankSchedule, Stage, build_schedule, offset_rows, visible_call
from megatron_fcp.kernels import Backend, get_backend, resolve_softmax_scale
from megatron_fcp.planner.plan import Plan


def ring_schedule(plan: Plan, cp_rank: int, device) -> RankSchedule:
    """The schedule of ring step ``s = 1 .. cp - 1`` as stage ``s - 1``: the whole buffer of rank ``cp_rank - s``
    (see the module docstring); the local calls are the FCP schedule's."""
    cp, sizes = plan.cp, [int(n) for n in plan.num_tokens]
    own = offset_rows(plan.for_rank(cp_rank).q)
    stages = []
    for s in range(1, cp):
        src = (cp_rank - s) % cp
        call = visible_call(f"ring{s}", own, offset_rows(plan.for_rank(src).q), plan.mask, device)
        stages.append(Stage(index=s - 1, num_tokens=sizes[src], recv=((src, 0, sizes[src], 0),), call=call))
    mine, local = sizes[cp_rank], build_schedule(plan.for_rank(cp_rank), device).local_calls
    sends = tuple((((cp_rank + j + 1) % cp, 0, mine),) for j in range(cp - 1))  # stage j of rank r + j + 1
    returns = tuple((((cp_rank + cp - 1 - t) % cp, 0, mine),) for t in range(cp - 1))  # its backward round
    return RankSchedule(cp_rank=cp_rank, cp=cp, num_tokens=mine, num_real=int(plan.num_real_tokens[cp_rank]),
                        kv_budget_tokens=max(sizes), local_calls=local,
                        stages=tuple(stages), send_rounds=sends, refetch_rounds=((), *returns[1:]),
                        return_rounds=returns, plan_digest=plan.digest)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, exchange: Exchange,
                   softmax_scale: float | None = None, backend: str | Backend = "auto",
                   sched: RankSchedule | None = None) -> torch.Tensor:
    """Ring attention of this rank's tokens of ``plan`` (tensors as for ``fcp_attention``); differentiable.
    ``sched``: :func:`ring_schedule` of this rank, if already built."""
    kernels = Kernels(get_backend(backend, q.device), resolve_softmax_scale(softmax_scale, q.shape[2]))
    sched = sched or ring_schedule(plan, exchange.cp_rank, q.device)
    return attention_step(q, k, v, sched, exchange, kernels)
