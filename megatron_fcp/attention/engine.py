"""The FCP attention step of one rank: local blocks while the first stage of received key/values travels, then
each stage while the next one travels.

The stages are plain functions over a :class:`RankStep` (the rank's
:class:`~megatron_fcp.attention.schedule.RankSchedule`, own tensors and :class:`Kernels`) and the step's state
(:class:`ForwardState`; :class:`BackwardQueries` and :class:`GradState` in backward). The rounds around them are
written once, :func:`forward_rounds` and :func:`backward_rounds`, over any
:class:`~megatron_fcp.attention.exchange.Exchange`: the distributed autograd function (:func:`fcp_attention`)
drives one rank's rounds on a :class:`~megatron_fcp.attention.exchange.P2PExchange` (:func:`run_alone`), and the
in-process executor (:mod:`megatron_fcp.testing.executor`) drives every rank's on the
:class:`~megatron_fcp.attention.exchange.InProcessExchange` of one process (:func:`run_together`), so both run
the same kernels, merges, messages and buffers in the same order.
Partial outputs are merged in float32 (float64 for float64 inputs); key/value gradients are accumulated in
float32 (float64) and travel back to their owners in the input dtype.

Every rank posts its messages in the same order of rounds, so that messages between two ranks match in order
(NCCL matches point-to-point messages by order only): forward rounds ``0, 1, ...``; in backward the key/values
of round 1, then for ``t = 0, 1, ...`` the gradients of round ``t`` (sent back, and received as their owner)
and the key/values of round ``t + 2``. A rank with nothing to move in a round skips it. Backward round ``t``
waits for its refetched stage, posts the next refetch, computes the stage, then waits for the gradients of
round ``t - 1`` (which travelled meanwhile) and posts its own.

Memory (per layer): at most two stage buffers are alive at once (the one computed and the next one arriving),
forward and backward; the last stage is saved for backward and freed as soon as backward has used it; sends
are slices of ``k`` and ``v`` (no copy). In backward, the gradients of at most two stages (the one computed,
with its float32 accumulator, and the previous one travelling) and the gradients coming back to this rank in
one round are alive at a time (meter kinds ``kv``, ``grad``, ``returned``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_fcp.attention.exchange import Exchange, ExchangeError, InProcessExchange, MemoryMeter, P2PExchange
from megatron_fcp.attention.schedule import CallPlan, Message, RankSchedule, Stage, cached_schedule
from megatron_fcp.errors import InputError
from megatron_fcp.kernels import Backend, get_backend, lse_dtype, resolve_softmax_scale
from megatron_fcp.kernels.merge import merge_into
from megatron_fcp.planner.plan import RankPlan
from megatron_fcp.planner.stages import DEFAULT_KV_BUDGET, parse_kv_budget

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class PlanMismatchError(ExchangeError):
    """CP ranks hold different plans (or budgets) for one step; raised on every rank before anything moves."""


# -- what travels together -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernels:
    """How every kernel call of one step computes."""

    backend: Backend
    """The kernel backend (forward returns out and LSE; backward takes them)."""
    scale: float
    """Softmax scale."""


@dataclass(frozen=True, eq=False)
class KeyValues:
    """The keys and values kernel calls read, ``[rows, kv_heads, head_dim]`` each: a rank's own ``k``/``v`` or a
    received stage."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def of_stage(cls, buf: torch.Tensor) -> KeyValues:
        """The keys and values of a stage buffer ``[2, rows, kv_heads, head_dim]``."""
        return cls(buf[0], buf[1])


@dataclass(frozen=True, eq=False)
class RankStep:
    """What one rank's attention step computes with, fixed for the step: its schedule, own tensors and kernels."""

    sched: RankSchedule
    kernels: Kernels
    q: torch.Tensor
    """``[num_tokens, q_heads, head_dim]``."""
    k: torch.Tensor
    """``[num_tokens, kv_heads, head_dim]``."""
    v: torch.Tensor
    """Like ``k``."""

    @property
    def own(self) -> KeyValues:
        return KeyValues(self.k, self.v)


@dataclass(frozen=True, eq=False)
class ForwardState:
    """Forward accumulators of the real query rows, float32 (float64 for float64 inputs)."""

    out: torch.Tensor
    """``[num_real, q_heads, head_dim]``."""
    lse: torch.Tensor
    """``[num_real, q_heads]``."""


@dataclass(frozen=True, eq=False)
class BackwardQueries:
    """What backward reads at each call's query rows."""

    dout: torch.Tensor
    """``[num_tokens, q_heads, head_dim]``, ``q``'s dtype, contiguous."""
    q: torch.Tensor
    """Like ``dout``."""
    out: torch.Tensor
    """The forward's output, like ``dout``."""
    lse: torch.Tensor
    """The forward's merged log-sum-exp ``[num_real, q_heads]``, float32 (float64)."""


@dataclass(frozen=True, eq=False)
class GradState:
    """Gradient accumulators, float32 (float64): ``dq`` of the real query rows, ``dk``/``dv`` of the key/value
    rows they belong to (a rank's own or a stage's)."""

    dq: torch.Tensor
    """``[num_real, q_heads, head_dim]``."""
    dk: torch.Tensor
    """``[rows, kv_heads, head_dim]``."""
    dv: torch.Tensor
    """Like ``dk``."""


# -- kernel calls ----------------------------------------------------------------------------------------------
def _rows(x: torch.Tensor, index: torch.Tensor | None, n: int) -> torch.Tensor:
    return x[:n].contiguous() if index is None else x.index_select(0, index)


def _add_rows(acc: torch.Tensor, index: torch.Tensor | None, value: torch.Tensor) -> None:
    if index is None:
        acc[: value.shape[0]] += value.to(acc.dtype)
    else:
        acc.index_add_(0, index, value.to(acc.dtype))


def new_forward_state(num_real: int, q: torch.Tensor) -> ForwardState:
    """Accumulators: output ``[num_real, heads, head_dim]`` (zeros) and log-sum-exp ``[num_real, heads]`` (-inf)."""
    acc = lse_dtype(q.dtype)
    out = torch.zeros((num_real, *q.shape[1:]), dtype=acc, device=q.device)
    lse = torch.full((num_real, q.shape[1]), -math.inf, dtype=acc, device=q.device)
    return ForwardState(out, lse)


def _forward_call(plan: CallPlan, q, kv: KeyValues, kernels: Kernels):
    n_q, n_k = plan.call.num_q, plan.call.num_k
    return kernels.backend.forward(_rows(q, plan.q_index, n_q), _rows(kv.k, plan.k_index, n_k),
                                   _rows(kv.v, plan.k_index, n_k), plan.call, kernels.scale)


def forward_calls(calls: tuple[CallPlan, ...], q, kv: KeyValues, kernels: Kernels, state: ForwardState) -> None:
    """Run kernel calls and merge each partial result into the accumulators."""
    for plan in calls:
        merge_into(state.out, state.lse, *_forward_call(plan, q, kv, kernels), plan.q_index)


def to_local(like: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Accumulated rows of the real tokens as a tensor shaped and typed like ``like``; padding rows are zero."""
    out = like.new_empty(like.shape)
    out[: rows.shape[0]] = rows
    out[rows.shape[0]:] = 0
    return out


def backward_calls(calls: tuple[CallPlan, ...], queries: BackwardQueries, kv: KeyValues, kernels: Kernels,
                   grads: GradState) -> None:
    """Gradients of kernel calls, given the merged output and log-sum-exp, added into the accumulators (``grads``'
    ``dk``/``dv`` rows are ``kv``'s)."""
    for plan in calls:
        n_q, n_k = plan.call.num_q, plan.call.num_k
        dq, dk, dv = kernels.backend.backward(
            _rows(queries.dout, plan.q_index, n_q), _rows(queries.q, plan.q_index, n_q),
            _rows(kv.k, plan.k_index, n_k), _rows(kv.v, plan.k_index, n_k), _rows(queries.out, plan.q_index, n_q),
            _rows(queries.lse, plan.q_index, n_q), plan.call, kernels.scale)
        _add_rows(grads.dq, plan.q_index, dq)
        _add_rows(grads.dk, plan.k_index, dk)
        _add_rows(grads.dv, plan.k_index, dv)


# -- the stages of one rank ------------------------------------------------------------------------------------
def forward_local(step: RankStep) -> ForwardState:
    """The blocks of owned key/values. Returns the accumulators.

    The first local call covers every owned row in order (the schedule builds it so), and merging into empty
    accumulators is the identity, so its result becomes the accumulators as it is.
    """
    calls, num_real = step.sched.local_calls, step.sched.num_real
    if not calls or calls[0].q_index is not None or calls[0].call.num_q != num_real:
        state = new_forward_state(num_real, step.q)
        forward_calls(calls, step.q, step.own, step.kernels, state)
        return state
    acc = lse_dtype(step.q.dtype)
    part_out, part_lse = _forward_call(calls[0], step.q, step.own, step.kernels)
    state = ForwardState(part_out.to(acc), part_lse.to(acc))
    forward_calls(calls[1:], step.q, step.own, step.kernels, state)
    return state


def stage_buffer(stage: Stage | None, like: torch.Tensor, meter: MemoryMeter | None = None) -> torch.Tensor | None:
    """An empty stage buffer ``[2, stage.num_tokens, kv_heads, head_dim]`` (keys, values) like ``like``."""
    if stage is None:
        return None
    buf = like.new_empty((2, stage.num_tokens, *like.shape[1:]))
    if meter is not None:
        meter.track("kv", buf)
    return buf


def forward_stage(step: RankStep, stage: Stage, buf: torch.Tensor, state: ForwardState) -> None:
    """The blocks of one stage of received key/values (``buf``), merged into the accumulators."""
    if stage.call is not None:
        forward_calls((stage.call,), step.q, KeyValues.of_stage(buf), step.kernels, state)


def new_grad_state(num_real: int, q: torch.Tensor, k: torch.Tensor) -> GradState:
    """Accumulators ``dq`` (real rows), ``dk``, ``dv`` (every own row), zero, in float32 (float64)."""
    acc = lse_dtype(q.dtype)
    dq = torch.zeros((num_real, *q.shape[1:]), dtype=acc, device=q.device)
    return GradState(dq, torch.zeros(k.shape, dtype=acc, device=k.device),
                     torch.zeros(k.shape, dtype=acc, device=k.device))


def backward_stage(step: RankStep, stage: Stage, buf: torch.Tensor, queries: BackwardQueries, grads: GradState,
                   meter: MemoryMeter | None = None) -> torch.Tensor:
    """Gradients of one stage: adds into ``grads.dq``, returns the stage's key/value gradients ``[2, n, ...]`` in
    the accumulators' dtype (float32, float64); the rounds add node-mates' partial gradients to them and send them
    in the key/values' dtype."""
    stage_grads = torch.zeros(buf.shape, dtype=queries.lse.dtype, device=buf.device)
    if meter is not None:
        meter.track("grad", stage_grads)
    if stage.call is not None:
        backward_calls((stage.call,), queries, KeyValues.of_stage(buf), step.kernels,
                       GradState(grads.dq, stage_grads[0], stage_grads[1]))
    return stage_grads


def backward_local(step: RankStep, queries: BackwardQueries, grads: GradState) -> None:
    """The gradients of the local blocks, added into the accumulators."""
    backward_calls(step.sched.local_calls, queries, step.own, step.kernels, grads)


def add_message_rows(accs, messages: tuple[Message, ...], received: torch.Tensor) -> None:
    """Add ``received`` (``[2, rows, ...]``: keys' then values' rows, the messages' rows end to end) to the rows
    ``[start, end)`` of each message in ``accs`` (the keys' and the values' accumulators: own ``dk``/``dv``, or a
    stage's gradients ``[2, rows, ...]``)."""
    offset = 0
    for _, a, b in messages:
        for acc, part in zip(accs, received, strict=True):
            acc[a:b] += part[offset:offset + b - a].to(acc.dtype)
        offset += b - a


def finish_backward(step: RankStep, grads: GradState):
    """``dq, dk, dv`` from the accumulators, shaped and typed like ``q, k, v`` (padding rows of ``dq`` zero)."""
    return to_local(step.q, grads.dq), grads.dk.to(step.k.dtype), grads.dv.to(step.v.dtype)


def release(t: torch.Tensor) -> None:
    """Release a tensor's memory now, even while autograd still holds it (the saved last stage)."""
    t.untyped_storage().resize_(0)


# -- the rounds: one loop, any exchange ------------------------------------------------------------------------
def _kv_messages(messages: tuple[Message, ...], own: KeyValues) -> list[tuple[int, torch.Tensor]]:
    return [m for peer, a, b in messages for m in ((peer, own.k[a:b]), (peer, own.v[a:b]))]


def _buffer_messages(messages, buf) -> list[tuple[int, torch.Tensor]]:
    """``(peer, start, end, ...)`` rows of a ``[2, rows, ...]`` buffer (keys, values) as messages, keys first."""
    return [m for peer, a, b, *_ in messages for m in ((peer, buf[0, a:b]), (peer, buf[1, a:b]))]


class _Posts:
    """The messages one rank posts on its exchange in each round (see the module docstring for their order)."""

    def __init__(self, step: RankStep, exchange: Exchange):
        self.sched, self.own, self.exchange = step.sched, step.own, exchange
        self.meter = exchange.memory

    def stage_at(self, round_: int, backward: bool) -> Stage | None:
        n = len(self.sched.stages)
        j = n - 1 - round_ if backward else round_
        return self.sched.stages[j] if 0 <= j < n else None

    def kv(self, round_: int, backward: bool, held: torch.Tensor | None = None):
        """Receive this rank's stage of the round (a new buffer, the handle's ``result``) and send the round's
        rows: its own, then (node-aware exchange) rows of ``held``, its stage buffer of the round before, that
        node-mates take from it."""
        sched = self.sched
        stage = self.stage_at(round_, backward)
        buf = stage_buffer(stage, self.own.k, self.meter)
        sends = _kv_messages((sched.refetch_rounds if backward else sched.send_rounds)[round_], self.own)
        relays = sched.at(sched.refetch_relay_rounds if backward else sched.relay_rounds, round_)
        if relays:
            sends += _buffer_messages(relays, held)
        recvs = [] if stage is None else _buffer_messages(stage.refetch if backward else stage.recv, buf)
        pending = self.exchange.post("backward_kv" if backward else "forward", sends, recvs)
        pending.result = buf
        return pending

    def _end_to_end(self, kind: str, messages: tuple[Message, ...], like: torch.Tensor):
        """One new buffer ``[2, rows, ...]`` for ``messages``' rows end to end, and the receives into it."""
        buf = like.new_empty((2, sum(b - a for _, a, b in messages), *like.shape[1:]))
        self.meter.track(kind, buf)
        recvs, offset = [], 0
        for peer, a, b in messages:
            recvs += [(peer, buf[0, offset:offset + b - a]), (peer, buf[1, offset:offset + b - a])]
            offset += b - a
        return buf, recvs

    def grads(self, round_: int, stage_grads: torch.Tensor | None):
        """Send a stage's key/value gradients to their owners (or, node-aware, to node-mates that add them to their
        own) and receive, into new buffers (the handle's ``result``: ``(returned, relayed)``), the gradients of this
        rank's key/values that come back in the round and node-mates' partial gradients for its next stage."""
        stage = self.stage_at(round_, True) if stage_grads is not None else None
        returned, recvs = self._end_to_end("returned", self.sched.return_rounds[round_], self.own.k)
        relayed = None
        relay_rows = self.sched.at(self.sched.grad_relay_rounds, round_)
        if relay_rows:
            relayed, relay_recvs = self._end_to_end("relayed_grad", relay_rows, self.own.k)
            recvs += relay_recvs
        sends = [] if stage is None else _buffer_messages(stage.grad_sends, stage_grads)
        pending = self.exchange.post("backward_grad", sends, recvs)
        pending.result = (returned, relayed)
        return pending


def forward_rounds(step: RankStep, exchange: Exchange):
    """One rank's forward, as a generator: yields each message handle just before waiting for it (where a driver
    may run other ranks first, see :func:`run_together`); returns ``(out, lse, kept)``: the output shaped like
    ``q``, the merged log-sum-exp and the last stage, kept for backward (None without stages)."""
    sched, post = step.sched, _Posts(step, exchange)
    pending = post.kv(0, backward=False) if sched.num_rounds else None
    state = forward_local(step)
    kept = None
    for j in range(sched.num_rounds):
        yield pending
        buf = pending.wait()
        if j + 1 < sched.num_rounds:
            pending = post.kv(j + 1, backward=False, held=buf)
        if buf is not None:
            forward_stage(step, sched.stages[j], buf, state)
            kept = buf if j == len(sched.stages) - 1 else None
        buf = None
    return to_local(step.q, state.out), state.lse, kept


def backward_rounds(step: RankStep, queries: BackwardQueries, kept: torch.Tensor | None, exchange: Exchange):
    """One rank's backward, as a generator like :func:`forward_rounds` (``kept``: its last stage, released here);
    returns ``dq, dk, dv`` shaped and typed like ``q, k, v``."""
    sched, post = step.sched, _Posts(step, exchange)
    grads = new_grad_state(sched.num_real, step.q, step.k)
    pending_kv = post.kv(1, backward=True) if sched.num_rounds > 1 else None
    pending_grad = None
    for t in range(sched.num_rounds):
        if t == 0:
            buf, kept = kept, None
        else:
            yield pending_kv
            buf = pending_kv.wait()
        if t >= 1 and t + 1 < sched.num_rounds:
            pending_kv = post.kv(t + 1, backward=True, held=buf)  # round 0's buffer (kept) is never forwarded
        stage, stage_grads = post.stage_at(t, backward=True), None
        if stage is not None:
            stage_grads = backward_stage(step, stage, buf, queries, grads, exchange.memory)
            if t == 0:
                release(buf)
        buf = None
        if pending_grad is not None:  # the previous round's gradients travelled while this stage computed
            yield pending_grad
            returned, relayed = pending_grad.wait()
            add_message_rows((grads.dk, grads.dv), sched.return_rounds[t - 1], returned)
            if relayed is not None:  # node-mates' partial gradients of this stage's rows, added before it is sent
                add_message_rows(stage_grads, sched.at(sched.grad_relay_rounds, t - 1), relayed)
            returned = relayed = None
        if stage_grads is not None:
            stage_grads = stage_grads.to(step.k.dtype)
            exchange.memory.track("grad", stage_grads)
        pending_grad = post.grads(t, stage_grads)
        stage_grads = None
    backward_local(step, queries, grads)
    if pending_grad is not None:
        yield pending_grad
        returned, _ = pending_grad.wait()
        add_message_rows((grads.dk, grads.dv), sched.return_rounds[-1], returned)
    return finish_backward(step, grads)


def run_alone(rounds):
    """Drive one rank's :func:`forward_rounds` or :func:`backward_rounds` to its end, each wait blocking until
    its messages arrive (a process of a distributed job); returns what it returns."""
    while True:
        try:
            next(rounds)
        except StopIteration as done:
            return done.value


def run_together(rounds: list) -> list:
    """Drive the rounds of every rank of one process (their exchanges those of one :class:`LocalHub`) to their
    ends, in rank order, each rank running until it waits for messages not yet posted; returns what each returns.

    Raises :class:`ExchangeError` if every rank left waits for messages no other rank will post (a deadlock the
    distributed job would hang in)."""
    results: list = [None] * len(rounds)
    waiting = dict.fromkeys(range(len(rounds)))  # rank -> the handle it waits for (None: not started)
    while waiting:
        moved = False
        for r in list(waiting):
            pending = waiting[r]
            try:
                while pending is None or pending.ready():
                    pending = next(rounds[r])
                    moved = True
            except StopIteration as done:
                results[r], moved = done.value, True
                del waiting[r]
                continue
            waiting[r] = pending
        if not moved:
            stuck = ", ".join(f"CP rank {r} ({p.phase})" for r, p in waiting.items())
            raise ExchangeError(f"in-process exchange: every rank left waits for messages no rank posts: {stuck}; "
                                "the ranks' schedules do not match")
    return results


class _FcpAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sched: RankSchedule, exchange: Exchange, kernels: Kernels):
        out, lse, kept = run_alone(forward_rounds(RankStep(sched, kernels, q, k, v), exchange))
        ctx.save_for_backward(q, k, v, out, lse, kept)
        ctx.fcp = (sched, exchange, kernels)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, kept = ctx.saved_tensors
        sched, exchange, kernels = ctx.fcp
        if kept is not None and kept.numel() and kept.untyped_storage().nbytes() == 0:
            raise RuntimeError("FCP attention frees its saved key/values during backward, so its backward cannot run "
                               "twice (retain_graph=True); run the forward again instead")
        queries = BackwardQueries(dout.contiguous(), q, out, lse)
        grads = run_alone(backward_rounds(RankStep(sched, kernels, q, k, v), queries, kept, exchange))
        return (*grads, None, None, None)


def attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sched: RankSchedule, exchange: Exchange,
                   kernels: Kernels) -> torch.Tensor:
    """The differentiable attention step of one rank on a finished schedule and an exchange, without the checks
    of :func:`fcp_attention` (for the ring baseline and tools that build their own schedules)."""
    return _FcpAttentionFunction.apply(q, k, v, sched, exchange, kernels)


def check_inputs(q, k, v, rank_plan: RankPlan | RankSchedule, group_rank: int, group_size: int) -> None:
    """Raise :class:`InputError` naming the problem unless q/k/v and the plan (or schedule) fit together."""
    where = f"fcp_attention on CP rank {group_rank}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise InputError(f"{where}: {name} must be [tokens, heads, head_dim] (THD), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise InputError(f"{where}: {name} has dtype {t.dtype}; use float16, bfloat16, float32 or float64")
        if not t.is_contiguous():
            raise InputError(f"{where}: {name} is not contiguous; call .contiguous() first")
    if not q.dtype == k.dtype == v.dtype or not q.device == k.device == v.device:
        raise InputError(f"{where}: q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                         f"{q.device}/{k.device}/{v.device}")
    if k.shape != v.shape or q.shape[2] != k.shape[2]:
        raise InputError(f"{where}: k {tuple(k.shape)} and v {tuple(v.shape)} must match, with q's head_dim "
                         f"({q.shape[2]})")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise InputError(f"{where}: {q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads "
                         "(grouped-query attention needs q_heads % kv_heads == 0)")
    if rank_plan.cp != group_size:
        raise InputError(f"{where}: the plan is for CP size {rank_plan.cp} but the process group has "
                         f"{group_size} ranks; plan with --cp {group_size}")
    if rank_plan.cp_rank != group_rank:
        raise InputError(f"{where}: got the plan view of CP rank {rank_plan.cp_rank}; pass plan.for_rank"
                         f"({group_rank})")
    for name, t in (("q", q), ("k", k)):
        if t.shape[0] != rank_plan.num_tokens:
            raise InputError(f"{where}: {name} has {t.shape[0]} tokens but the plan gives this rank "
                             f"{rank_plan.num_tokens}; pass the tokens in the plan's order, padding last")


_exchanges: dict[tuple[dist.ProcessGroup, float | None], P2PExchange] = {}
"""Exchanges by (process group object, timeout). Keyed by the group itself, not ``id(group)``: the entry holds the
group (and so does its exchange), so a destroyed group's id cannot be reused for another group's lookup, and a
group created later is a new key. (A weak key would not drop either: the exchange refers to its group.)"""


def get_exchange(group=None, timeout_s: float | None = None) -> P2PExchange:
    """The exchange (and its byte counter and memory meter) of a process group, created on first use."""
    key = (group if group is not None else dist.group.WORLD, timeout_s)
    if key not in _exchanges:
        _exchanges[key] = P2PExchange(group, timeout_s)
    return _exchanges[key]


def _budget_code(budget: int | None) -> int:
    return -1 if budget is None else int(budget)


AGREEMENT = ("plan", "budget", "cp_rank", "dtype", "q_heads", "kv_heads", "head_dim", "softmax_scale")
"""What every CP rank of one attention call must share (``cp_rank`` only names the rank); the columns of
:func:`agreement_row`."""
_NOT_CHECKED = -2
"""A column value every rank uses for what it does not check (the step's host check before the model runs knows
the plan and budget, not the tensors)."""
_AGREEMENT_FIXES = {
    "plan": "every CP rank must plan the same micro-batch: make the dataset return the same sample for an index on "
            "every rank and give every rank the same planner options",
    "budget": "pass the same kv_budget_tokens on every rank",
    "dtype": "every CP rank must call attention with the same dtype (same --bf16/--fp16 and model config)",
    "q_heads": "every CP rank must have the same query heads (same model config and tensor-parallel size)",
    "kv_heads": "every CP rank must have the same key/value heads (same model config and tensor-parallel size)",
    "head_dim": "every CP rank must have the same head dimension (same model config)",
    "softmax_scale": "pass the same softmax_scale on every rank",
}


def agreement_row(sched: RankSchedule, cp_rank: int, q: torch.Tensor | None = None, k: torch.Tensor | None = None,
                  scale: float | None = None) -> list[int]:
    """This rank's values of :data:`AGREEMENT` as int64 (the scale as its float64 bits); the tensor columns are
    :data:`_NOT_CHECKED` where ``q``/``k``/``scale`` are not given."""
    tensors = [_NOT_CHECKED] * 5
    if q is not None and k is not None and scale is not None:
        scale_bits = int(np.array(scale, dtype=np.float64).view(np.int64))
        tensors = [DTYPES.index(q.dtype) if q.dtype in DTYPES else -1, q.shape[1], k.shape[1], q.shape[2], scale_bits]
    return [sched.plan_digest, _budget_code(sched.kv_budget_tokens), cp_rank, *tensors]


def _label(column: str, value: int) -> str:
    if column == "plan":
        return f"plan {value:015x}"
    if column == "budget":
        return "no budget" if value < 0 else f"budget {value}"
    if column == "dtype":
        return f"dtype {str(DTYPES[value]).removeprefix('torch.')}" if 0 <= value < len(DTYPES) else "another dtype"
    if column == "softmax_scale":
        return f"softmax scale {float(np.array(value, dtype=np.int64).view(np.float64)):g}"
    return f"{column.replace('_', ' ')} {value}"


def check_agreement(rows: list[tuple[int, ...]]) -> None:
    """Raise the same one-line :class:`PlanMismatchError` on every rank unless every CP rank's
    :func:`agreement_row` (``rows``, in CP rank order) holds the same values of every shared column."""
    for column, name in enumerate(AGREEMENT):
        if name == "cp_rank":
            continue
        groups: dict[int, list[int]] = {}
        for rank, row in enumerate(rows):
            groups.setdefault(row[column], []).append(rank)
        if len(groups) > 1:
            ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[1][0]))
            parts = [f"CP rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} "
                     f"{'hold' if len(ranks) > 1 else 'holds'} {_label(name, value)}" for value, ranks in ordered]
            what = {"plan": "plans", "budget": "key/value budgets"}.get(name, f"attention inputs ({name})")
            raise PlanMismatchError(f"FCP {what} differ across the CP group ({'; '.join(parts)}); nothing was "
                                    f"exchanged: {_AGREEMENT_FIXES[name]}")


def check_plan_agreement(sched: RankSchedule, exchange: P2PExchange, device, q: torch.Tensor | None = None,
                         k: torch.Tensor | None = None, scale: float | None = None) -> float:
    """Check that every CP rank holds the same plan and budget, and (given ``q``, ``k`` and ``scale``) calls with the
    same dtype, heads, head dimension and softmax scale, before anything moves; returns the seconds it took.

    One all-gather of :data:`AGREEMENT` (8 int64) per rank on the exchange's group, on ``device``,
    read back on the host (a stream synchronisation on GPU: the Megatron step checks on a host group instead, see
    :func:`check_plan_agreement_on_host`). On a mismatch every rank raises the same one-line
    :class:`PlanMismatchError` naming the ranks that disagree.
    """
    start = time.perf_counter()
    mine = torch.tensor(agreement_row(sched, exchange.cp_rank, q, k, scale), dtype=torch.int64, device=device)
    check_agreement([tuple(int(x) for x in t.tolist()) for t in exchange.all_gather("plan check", mine)])
    return time.perf_counter() - start


def check_plan_agreement_on_host(sched: RankSchedule, group: dist.ProcessGroup) -> float:
    """:func:`check_plan_agreement` over a host (gloo) process group holding the same ranks as the CP group, in
    the same order: host tensors only, so the GPU stream is never synchronised. Returns the seconds it took."""
    start = time.perf_counter()
    mine = torch.tensor(agreement_row(sched, dist.get_rank(group)), dtype=torch.int64)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    check_agreement([tuple(int(x) for x in t.tolist()) for t in gathered])
    return time.perf_counter() - start


def fcp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank_plan: RankPlan | RankSchedule,
                  group: dist.ProcessGroup | None = None, softmax_scale: float | None = None, *,
                  backend: str | Backend = "auto", exchange: P2PExchange | None = None,
                  timeout_s: float | None = None, kv_budget_tokens: int | str | None = DEFAULT_KV_BUDGET,
                  verify_plan: bool = True) -> torch.Tensor:
    """FCP attention of this CP rank's tokens; differentiable in ``q``, ``k`` and ``v``.

    Args:
        q: ``[num_tokens, q_heads, head_dim]``, float16/bfloat16/float32/float64, contiguous: the rank's queries
            in packed THD layout, in the plan's token order (its ``q`` rows one after another, padding last).
        k, v: ``[num_tokens, kv_heads, head_dim]``, same dtype and device as ``q``; ``q_heads`` must be a
            multiple of ``kv_heads`` (grouped-query attention).
        rank_plan: ``plan.for_rank(cp_rank)`` (its mask, causal or full, applies; the schedule is built here and
            memoised), or a finished :class:`~megatron_fcp.attention.schedule.RankSchedule` (as the data loader
            ships it; its own budget applies and ``kv_budget_tokens`` is ignored).
        group: the CP process group (default: the world group); its size must equal the plan's CP size.
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        backend: kernel backend name (``auto``, ``cpu``, ``reference``, ``torch-flash``, ``flash-attn``, ``te``)
            or instance.
        exchange: the :class:`P2PExchange` to use (default: one per group, whose ``counter`` counts bytes and whose
            ``memory`` meter measures the received buffers).
        timeout_s: None (default): wait for peers without a deadline of FCP's own (the process group's timeout
            applies; on NCCL the stream waits, the host does not). A number: each wait polls with that deadline
            and raises :class:`ExchangeTimeout` naming the silent peer (a debugging aid; on NCCL every round then
            synchronises the host).
        kv_budget_tokens: key/value tokens received per stage (:mod:`megatron_fcp.planner.stages`): a positive
            integer, ``"auto"`` (default: the rank's own token count, so at most twice its own key/values from
            other ranks are held at once and at most once its own are kept for backward) or ``None`` (one stage:
            everything received is held and kept). Every rank must pass the same value.
        verify_plan: first check, with one small all-gather, that every CP rank holds the same plan and budget and
            calls with the same dtype, query and key/value heads, head dimension and softmax scale
            (:data:`AGREEMENT`); raises :class:`PlanMismatchError` on every rank otherwise. Once per micro-batch
            is enough (layers of one micro-batch share the plan); the Megatron step checks the plan on the host
            before the model runs, and each FCP layer checks the tensors at its first call.

    Returns:
        ``[num_tokens, q_heads, head_dim]`` in ``q``'s dtype; padding rows are zero.
    """
    cp = rank_plan.cp
    if cp == 1 and (group is None or not dist.is_initialized()):
        group_rank, group_size, exchange = 0, 1, InProcessExchange.group(1)[0]
    else:
        if not dist.is_initialized():
            raise InputError(f"fcp_attention: the plan is for CP size {cp} but torch.distributed is not "
                             "initialized; call init_process_group first (or run the in-process executor)")
        exchange = exchange or get_exchange(group, timeout_s)
        group_rank, group_size = exchange.cp_rank, exchange.cp
    check_inputs(q, k, v, rank_plan, group_rank, group_size)
    kernels = get_backend(backend, q.device)
    kernels.check(q, k)
    if isinstance(rank_plan, RankSchedule):
        sched = rank_plan
    else:
        sched = cached_schedule(rank_plan, str(q.device), parse_kv_budget(kv_budget_tokens))
    scale = resolve_softmax_scale(softmax_scale, q.shape[2])
    if verify_plan and group_size > 1:
        check_plan_agreement(sched, exchange, q.device, q, k, scale)
    return attention_step(q, k, v, sched, exchange, Kernels(kernels, scale))
