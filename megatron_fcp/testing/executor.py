"""Run every rank of a plan in one process: the attention step's own rounds with the in-process exchange.

No process group: each rank's :func:`~megatron_fcp.attention.engine.forward_rounds` and
:func:`~megatron_fcp.attention.engine.backward_rounds` run on an
:class:`~megatron_fcp.attention.exchange.InProcessExchange`, which copies what a rank receives from the peers'
tensors, and :func:`~megatron_fcp.attention.engine.run_together` runs the ranks in turn, each until it waits for
messages its peers have not posted yet. This lets one GPU (or a unit test) run and check each rank's work, and it
agrees bit for bit with the multi-process run because every rank executes the same loop: the same kernels,
merges, messages and buffers in the same order. Per rank it counts the bytes the distributed step moves
(:class:`ByteCounter`) and measures the buffers it holds (:class:`MemoryMeter`, kinds ``kv``, ``grad`` and
``returned``), as the distributed step's exchange does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_fcp.attention.engine import (
    BackwardQueries,
    Kernels,
    RankStep,
    backward_rounds,
    check_inputs,
    forward_rounds,
    run_together,
)
from megatron_fcp.attention.exchange import ByteCounter, InProcessExchange, MemoryMeter
from megatron_fcp.attention.schedule import RankSchedule, build_schedule
from megatron_fcp.errors import InputError
from megatron_fcp.kernels import Backend, get_backend, resolve_softmax_scale
from megatron_fcp.planner.plan import Plan
from megatron_fcp.planner.stages import DEFAULT_KV_BUDGET


@dataclass
class InProcessResult:
    out: list[torch.Tensor]
    """Per rank ``[num_tokens, q_heads, head_dim]``."""
    dq: list[torch.Tensor] | None
    dk: list[torch.Tensor] | None
    dv: list[torch.Tensor] | None
    counters: list[ByteCounter]
    """Per rank: bytes the distributed step sends and receives, by phase (``forward``, ``backward_kv``,
    ``backward_grad``)."""
    memory: list[MemoryMeter]
    """Per rank: received key/value buffers (kind ``kv``), key/value gradients of received rows (``grad``) and
    gradients coming back (``returned``), peak over the step."""
    saved_kv_bytes: list[int]
    """Per rank: received key/value bytes alive after forward (kept for backward)."""


def check_rank_inputs(plan: Plan, q, k, v, dout=None) -> None:
    """The input checks of :func:`run_in_process` (see there)."""
    lists = {"q": q, "k": k, "v": v, **({"dout": dout} if dout is not None else {})}
    for name, tensors in lists.items():
        if not isinstance(tensors, list | tuple) or len(tensors) != plan.cp:
            count = len(tensors) if isinstance(tensors, list | tuple) else type(tensors).__name__
            raise InputError(f"run_in_process: {name} must be a list of {plan.cp} tensors (one per CP rank of the "
                             f"plan), got {count}")
    for r in range(plan.cp):
        check_inputs(q[r], k[r], v[r], plan.for_rank(r), r, plan.cp)
        for name, t in (("q", q[r]), ("k", k[r])):
            first = q[0] if name == "q" else k[0]
            if t.dtype != first.dtype or t.shape[1:] != first.shape[1:]:
                raise InputError(f"run_in_process: {name}[{r}] is {t.dtype} {tuple(t.shape)} but {name}[0] is "
                                 f"{first.dtype} {tuple(first.shape)}; every rank needs the same dtype, heads and "
                                 "head dimension")
        if dout is not None and (not isinstance(dout[r], torch.Tensor) or dout[r].shape != q[r].shape):
            got = tuple(dout[r].shape) if isinstance(dout[r], torch.Tensor) else type(dout[r]).__name__
            raise InputError(f"run_in_process: dout[{r}] must be shaped like q[{r}], {tuple(q[r].shape)}; got {got}")


def run_in_process(plan: Plan, q: list[torch.Tensor], k: list[torch.Tensor], v: list[torch.Tensor],
                   dout: list[torch.Tensor] | None = None, *, backend: str | Backend = "auto",
                   softmax_scale: float | None = None, kv_budget_tokens: int | str | None = DEFAULT_KV_BUDGET,
                   schedules: list[RankSchedule] | None = None) -> InProcessResult:
    """Forward (and backward, if ``dout`` is given) of every rank; tensors per rank as for ``fcp_attention``.
    ``schedules``: finished schedules of the plan's ranks to run instead of the plan's own under
    ``kv_budget_tokens`` (the ring baseline's, :func:`~megatron_fcp.testing.ring.ring_schedule`).

    Raises :class:`~megatron_fcp.errors.InputError` naming the tensor and the expected shape unless the lists hold
    one tensor per rank of the plan, each fitting the rank's plan view, alike across ranks (dtype, heads, head
    dimension), with ``dout`` shaped like ``q``."""
    check_rank_inputs(plan, q, k, v, dout)
    kernels = Kernels(get_backend(backend, q[0].device), resolve_softmax_scale(softmax_scale, q[0].shape[2]))
    if schedules is None:
        schedules = [build_schedule(plan.for_rank(r), q[0].device, kv_budget_tokens) for r in range(plan.cp)]
    steps = [RankStep(sched, kernels, q[r], k[r], v[r]) for r, sched in enumerate(schedules)]
    exchanges = InProcessExchange.group(plan.cp)
    forwards = run_together([forward_rounds(step, ex) for step, ex in zip(steps, exchanges, strict=True)])
    saved = [ex.memory.current("kv") for ex in exchanges]
    outs = [out for out, _, _ in forwards]
    counters, memory = [ex.counter for ex in exchanges], [ex.memory for ex in exchanges]
    if dout is None:
        return InProcessResult(outs, None, None, None, counters, memory, saved)
    backwards = [backward_rounds(step, BackwardQueries(d.contiguous(), step.q, out, lse), kept, ex)
                 for step, d, (out, lse, kept), ex in zip(steps, dout, forwards, exchanges, strict=True)]
    forwards = None  # the kept stages live on in the backward rounds only, which free them
    dqs, dks, dvs = (list(g) for g in zip(*run_together(backwards), strict=True))
    return InProcessResult(outs, dqs, dks, dvs, counters, memory, saved)
