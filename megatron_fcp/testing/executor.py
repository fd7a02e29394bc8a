"""Run every rank of a plan in one process, with the same stages, kernels and merges as the distributed path.

No process group: what a rank would receive is copied from its peers' tensors directly, stage by stage, with the
same buffers and lifetimes as the distributed step (the next stage is filled while the current one is computed,
the last one is kept for backward). This lets one GPU (or a unit test) run and check each rank's work, and it
agrees bit for bit with the multi-process run because every rank executes the same operations in the same order.
Per rank it counts the bytes the distributed step would move (:class:`ByteCounter`) and measures the received
key/value buffers it holds (:class:`MemoryMeter`, kind ``kv``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_fcp.attention.engine import (
    BackwardQueries,
    Kernels,
    RankStep,
    add_returned,
    backward_local,
    backward_stage,
    check_inputs,
    finish_backward,
    forward_local,
    forward_stage,
    new_grad_state,
    release,
    stage_buffer,
    to_local,
)
from megatron_fcp.attention.exchange import ByteCounter, MemoryMeter
from megatron_fcp.attention.schedule import RankSchedule, Stage, build_schedule
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
    """Per rank: received key/value buffers (kind ``kv``), peak over the step."""
    saved_kv_bytes: list[int]
    """Per rank: received key/value bytes alive after forward (kept for backward)."""


class _Ranks:
    """Every rank's schedule and tensors, and the copies that stand in for messages."""

    def __init__(self, scheds: list[RankSchedule], k, v):
        self.scheds, self.k, self.v = scheds, k, v
        self.counters = [ByteCounter() for _ in scheds]
        self.memory = [MemoryMeter() for _ in scheds]

    def fill(self, r: int, stage: Stage | None, phase: str) -> torch.Tensor | None:
        """Rank ``r``'s buffer of ``stage``, copied from the owners' key/values."""
        buf = stage_buffer(stage, self.k[r], self.memory[r])
        if stage is None:
            return None
        for src, a, b, offset in stage.recv:
            buf[0, a:b] = self.k[src][offset:offset + b - a]
            buf[1, a:b] = self.v[src][offset:offset + b - a]
            self._count(phase, src, r, buf[:, a:b])
        return buf

    def returned(self, owner: int, messages, grads, where) -> torch.Tensor:
        """What comes back to ``owner`` in one round: the receivers' gradient rows, end to end."""
        parts = []
        for dst, a, _ in messages:
            j, start, end = where[(dst, owner, a)]
            parts.append(grads[dst][j][:, start:end])
            self._count("backward_grad", dst, owner, parts[-1])
        k = self.k[owner]
        return torch.cat(parts, dim=1) if parts else k.new_empty((2, 0, *k.shape[1:]))

    def _count(self, phase: str, sender: int, receiver: int, rows: torch.Tensor) -> None:
        nbytes = rows.numel() * rows.element_size()
        self.counters[sender].add(phase, nbytes, 0)
        self.counters[receiver].add(phase, 0, nbytes)


def _forward(ranks: _Ranks, step: RankStep):
    """Forward of one rank: its output, the merged log-sum-exp and the last stage, kept for backward."""
    r, stages = step.sched.cp_rank, step.sched.stages
    nxt = ranks.fill(r, stages[0], "forward") if stages else None
    state = forward_local(step)
    kept = None
    for j, stage in enumerate(stages):
        buf = nxt
        nxt = ranks.fill(r, stages[j + 1], "forward") if j + 1 < len(stages) else None
        forward_stage(step, stage, buf, state)
        kept = buf if j == len(stages) - 1 else None
        buf = None
    return to_local(step.q, state.out), state.lse, kept


def _backward_stages(ranks: _Ranks, step: RankStep, queries: BackwardQueries, kept):
    """The received stages of a rank in backward order: its gradient accumulators (``dq`` holds the stages') and
    each stage's key/value gradients."""
    r, stages = step.sched.cp_rank, step.sched.stages
    n = len(stages)
    grads = new_grad_state(step.sched.num_real, step.q, step.k)
    stage_grads = {}
    nxt = ranks.fill(r, stages[n - 2], "backward_kv") if n >= 2 else None
    for t in range(n):
        buf = kept if t == 0 else nxt
        kept = None
        if t >= 1:
            nxt = ranks.fill(r, stages[n - 2 - t], "backward_kv") if n - 2 - t >= 0 else None
        stage = stages[n - 1 - t]
        stage_grads[stage.index] = backward_stage(step, stage, buf, queries, grads)
        if t == 0:
            release(buf)
        buf = None
    return grads, stage_grads


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
                   softmax_scale: float | None = None,
                   kv_budget_tokens: int | str | None = DEFAULT_KV_BUDGET) -> InProcessResult:
    """Forward (and backward, if ``dout`` is given) of every rank; tensors per rank as for ``fcp_attention``.

    Raises :class:`~megatron_fcp.errors.InputError` naming the tensor and the expected shape unless the lists hold
    one tensor per rank of the plan, each fitting the rank's plan view, alike across ranks (dtype, heads, head
    dimension), with ``dout`` shaped like ``q``."""
    check_rank_inputs(plan, q, k, v, dout)
    kernels = Kernels(get_backend(backend, q[0].device), resolve_softmax_scale(softmax_scale, q[0].shape[2]))
    scheds = [build_schedule(plan.for_rank(r), q[0].device, kv_budget_tokens) for r in range(plan.cp)]
    steps = [RankStep(sched, kernels, q[r], k[r], v[r]) for r, sched in enumerate(scheds)]
    ranks = _Ranks(scheds, k, v)
    forwards = [_forward(ranks, step) for step in steps]
    saved = [ranks.memory[r].current("kv") for r in range(plan.cp)]
    outs = [f[0] for f in forwards]
    if dout is None:
        return InProcessResult(outs, None, None, None, ranks.counters, ranks.memory, saved)
    queries = [BackwardQueries(d.contiguous(), q[r], out, lse)
               for r, (d, (out, lse, _)) in enumerate(zip(dout, forwards, strict=True))]
    accs, grads = [], []
    for r, (_, _, kept) in enumerate(forwards):
        acc, stage_grads = _backward_stages(ranks, steps[r], queries[r], kept)
        accs.append(acc)
        grads.append(stage_grads)
    forwards = None
    where = {(dst, src, offset): (stage.index, a, b)
             for dst, sched in enumerate(scheds) for stage in sched.stages for src, a, b, offset in stage.recv}
    results = []
    for r, sched in enumerate(scheds):
        # the distributed order: what comes back in rounds 0 .. R-2, the local blocks, then round R-1
        rounds = sched.return_rounds or ((),)
        for t, messages in enumerate(rounds):
            if t == len(rounds) - 1:
                backward_local(steps[r], queries[r], accs[r])
            add_returned(accs[r], messages, ranks.returned(r, messages, grads, where))
        results.append(finish_backward(steps[r], accs[r]))
    dqs, dks, dvs = (list(g) for g in zip(*results, strict=True))
    return InProcessResult(outs, dqs, dks, dvs, ranks.counters, ranks.memory, saved)
