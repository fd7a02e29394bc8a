"""The FCP attention step of one rank: local blocks while key/values travel, remote blocks when they arrive.

The stages are plain functions over a :class:`~megatron_fcp.attention.schedule.RankSchedule`, shared by the
distributed autograd function (:func:`fcp_attention`) and the in-process executor
(:mod:`megatron_fcp.attention.executor`), so both run the same kernels and the same merge in the same order.
Partial outputs are merged in float32 (float64 for float64 inputs); key/value gradients are accumulated in
float32 (float64) on their owner and travel back in the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_fcp.attention.backends import Backend, get_backend, lse_dtype
from megatron_fcp.attention.exchange import P2PExchange, Pending
from megatron_fcp.attention.merge import merge_into
from megatron_fcp.attention.schedule import CallPlan, RankSchedule, cached_schedule
from megatron_fcp.errors import InputError
from megatron_fcp.planner.plan import RankPlan

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _rows(x: torch.Tensor, index: torch.Tensor | None, n: int) -> torch.Tensor:
    return x[:n].contiguous() if index is None else x.index_select(0, index)


def _add_rows(acc: torch.Tensor, index: torch.Tensor | None, value: torch.Tensor) -> None:
    if index is None:
        acc[: value.shape[0]] += value.to(acc.dtype)
    else:
        acc.index_add_(0, index, value.to(acc.dtype))


def pack_send(sched: RankSchedule, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Send buffer ``[num_send, 2, kv_heads, head_dim]``: the owned key/values each destination needs."""
    return torch.stack((k.index_select(0, sched.send_index), v.index_select(0, sched.send_index)), dim=1)


def new_forward_state(num_real: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulators: output ``[num_real, heads, head_dim]`` (zeros) and log-sum-exp ``[num_real, heads]`` (-inf)."""
    acc = lse_dtype(q.dtype)
    out = torch.zeros((num_real, *q.shape[1:]), dtype=acc, device=q.device)
    lse = torch.full((num_real, q.shape[1]), -math.inf, dtype=acc, device=q.device)
    return out, lse


def _forward_call(plan: CallPlan, q, k_src, v_src, backend: Backend, scale: float):
    n_q, n_k = plan.call.num_q, plan.call.num_k
    return backend.forward(_rows(q, plan.q_index, n_q), _rows(k_src, plan.k_index, n_k),
                           _rows(v_src, plan.k_index, n_k), plan.call, scale)


def forward_calls(calls: tuple[CallPlan, ...], q, k_src, v_src, backend: Backend, scale: float, out, lse) -> None:
    """Run kernel calls and merge each partial result into ``out``/``lse``."""
    for plan in calls:
        merge_into(out, lse, *_forward_call(plan, q, k_src, v_src, backend, scale), plan.q_index)


def to_local(like: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Accumulated rows of the real tokens as a tensor shaped and typed like ``like``; padding rows are zero."""
    out = like.new_empty(like.shape)
    out[: rows.shape[0]] = rows
    out[rows.shape[0]:] = 0
    return out


def backward_calls(calls: tuple[CallPlan, ...], dout, q, k_src, v_src, out, lse, backend: Backend, scale: float,
                   dq_acc, dk_acc, dv_acc) -> None:
    """Gradients of kernel calls, given the merged output and log-sum-exp, added into the accumulators."""
    for plan in calls:
        n_q, n_k = plan.call.num_q, plan.call.num_k
        dq, dk, dv = backend.backward(
            _rows(dout, plan.q_index, n_q), _rows(q, plan.q_index, n_q), _rows(k_src, plan.k_index, n_k),
            _rows(v_src, plan.k_index, n_k), _rows(out, plan.q_index, n_q), _rows(lse, plan.q_index, n_q),
            plan.call, scale)
        _add_rows(dq_acc, plan.q_index, dq)
        _add_rows(dk_acc, plan.k_index, dk)
        _add_rows(dv_acc, plan.k_index, dv)


def add_returned_grads(sched: RankSchedule, dk_acc, dv_acc, returned: torch.Tensor) -> None:
    """Add the key/value gradients the destinations sent back (``[num_send, 2, ...]``) to the owned rows."""
    if sched.num_send:
        dk_acc.index_add_(0, sched.send_index, returned[:, 0].to(dk_acc.dtype))
        dv_acc.index_add_(0, sched.send_index, returned[:, 1].to(dv_acc.dtype))


def forward_local(sched: RankSchedule, q, k, v, backend: Backend, scale: float):
    """Stage 1 of forward: the blocks of owned key/values. Returns the accumulators ``(out, lse)``.

    The first local call covers every owned row in order (the schedule builds it so), and merging into empty
    accumulators is the identity, so its result becomes the accumulators as it is.
    """
    calls = sched.local_calls
    if not calls or calls[0].q_index is not None or calls[0].call.num_q != sched.num_real:
        out_acc, lse = new_forward_state(sched.num_real, q)
        forward_calls(calls, q, k, v, backend, scale, out_acc, lse)
        return out_acc, lse
    acc = lse_dtype(q.dtype)
    part_out, part_lse = _forward_call(calls[0], q, k, v, backend, scale)
    out_acc, lse = part_out.to(acc), part_lse.to(acc)
    forward_calls(calls[1:], q, k, v, backend, scale, out_acc, lse)
    return out_acc, lse


def forward_remote(sched: RankSchedule, q, recv, backend: Backend, scale: float, out_acc, lse) -> torch.Tensor:
    """Stage 2 of forward: the blocks of received key/values (``[num_recv, 2, ...]``); returns the output."""
    forward_calls(sched.remote_calls, q, recv[:, 0], recv[:, 1], backend, scale, out_acc, lse)
    return to_local(q, out_acc)


def backward_remote(sched: RankSchedule, dout, q, k, recv, out, lse, backend: Backend, scale: float):
    """Stage 1 of backward: gradients of the remote blocks. Returns the dq accumulator and the received
    key/values' gradients to send back to their owners (``[num_recv, 2, ...]`` in ``k``'s dtype)."""
    dq = torch.zeros((sched.num_real, *q.shape[1:]), dtype=lse.dtype, device=q.device)
    d_recv = torch.zeros(recv.shape, dtype=lse.dtype, device=q.device)
    backward_calls(sched.remote_calls, dout, q, recv[:, 0], recv[:, 1], out, lse, backend, scale, dq,
                   d_recv[:, 0], d_recv[:, 1])
    return dq, d_recv.to(k.dtype)


def backward_local(sched: RankSchedule, dout, q, k, v, out, lse, backend: Backend, scale: float, dq):
    """Stage 2 of backward (while the gradients travel): the local blocks. Returns the dk, dv accumulators."""
    dk, dv = torch.zeros_like(k, dtype=lse.dtype), torch.zeros_like(v, dtype=lse.dtype)
    backward_calls(sched.local_calls, dout, q, k, v, out, lse, backend, scale, dq, dk, dv)
    return dk, dv


def finish_backward(sched: RankSchedule, q, k, v, dq, dk, dv, returned):
    """Stage 3 of backward: add the gradients sent back by the destinations; ``dq, dk, dv`` like ``q, k, v``."""
    add_returned_grads(sched, dk, dv, returned)
    return to_local(q, dq), dk.to(k.dtype), dv.to(v.dtype)


class _NoExchange:
    """Stand-in for CP size 1: nothing to send or receive."""

    def start(self, *args) -> Pending:
        return Pending([], [], "", 0, 0.0)


class _FcpAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sched: RankSchedule, exchange, backend: Backend, scale: float):
        recv = k.new_empty((sched.num_recv, 2, *k.shape[1:]))
        pending = exchange.start("forward", pack_send(sched, k, v), sched.send_splits, recv, sched.recv_splits)
        out_acc, lse = forward_local(sched, q, k, v, backend, scale)
        pending.wait()
        out = forward_remote(sched, q, recv, backend, scale, out_acc, lse)
        ctx.save_for_backward(q, k, v, recv, out, lse)
        ctx.fcp = (sched, exchange, backend, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, recv, out, lse = ctx.saved_tensors
        sched, exchange, backend, scale = ctx.fcp
        dout = dout.contiguous()
        dq, d_recv = backward_remote(sched, dout, q, k, recv, out, lse, backend, scale)
        returned = k.new_empty((sched.num_send, 2, *k.shape[1:]))
        pending = exchange.start("backward", d_recv, sched.recv_splits, returned, sched.send_splits)
        dk, dv = backward_local(sched, dout, q, k, v, out, lse, backend, scale, dq)
        pending.wait()
        return (*finish_backward(sched, q, k, v, dq, dk, dv, returned), None, None, None, None)


def check_inputs(q, k, v, rank_plan: RankPlan | RankSchedule, group_rank: int, group_size: int) -> None:
    """Raise :class:`InputError` naming the problem unless q/k/v and the plan fit together."""
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


_exchanges: dict = {}


def get_exchange(group=None, timeout_s: float = 600.0) -> P2PExchange:
    """The exchange (and its byte counter) of a process group, created on first use."""
    key = (id(group), timeout_s)
    if key not in _exchanges:
        _exchanges[key] = P2PExchange(group, timeout_s)
    return _exchanges[key]


def fcp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank_plan: RankPlan | RankSchedule,
                  group: dist.ProcessGroup | None = None, softmax_scale: float | None = None, *,
                  backend: str | Backend = "auto", exchange: P2PExchange | None = None,
                  timeout_s: float = 600.0) -> torch.Tensor:
    """FCP attention of this CP rank's tokens; differentiable in ``q``, ``k`` and ``v``.

    Args:
        q: ``[num_tokens, q_heads, head_dim]``, float16/bfloat16/float32/float64, contiguous: the rank's queries
            in packed THD layout, in the plan's token order (its ``q`` rows one after another, padding last).
        k, v: ``[num_tokens, kv_heads, head_dim]``, same dtype and device as ``q``; ``q_heads`` must be a
            multiple of ``kv_heads`` (grouped-query attention).
        rank_plan: ``plan.for_rank(cp_rank)`` (or its prebuilt schedule); its mask (causal or full) applies.
        group: the CP process group (default: the world group); its size must equal the plan's CP size.
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        backend: kernel backend name (``auto``, ``cpu``, ``reference``, ``torch-flash``, ``flash-attn``, ``te``)
            or instance.
        exchange: the :class:`P2PExchange` to use (default: one per group, whose ``counter`` counts bytes).
        timeout_s: how long to wait for a peer before raising :class:`ExchangeTimeout` naming it.

    Returns:
        ``[num_tokens, q_heads, head_dim]`` in ``q``'s dtype; padding rows are zero.
    """
    cp = rank_plan.cp
    if cp == 1 and (group is None or not dist.is_initialized()):
        group_rank, group_size, exchange = 0, 1, _NoExchange()
    else:
        if not dist.is_initialized():
            raise InputError(f"fcp_attention: the plan is for CP size {cp} but torch.distributed is not "
                             "initialized; call init_process_group first (or run the in-process executor)")
        exchange = exchange or get_exchange(group, timeout_s)
        group_rank, group_size = exchange.cp_rank, exchange.cp
    check_inputs(q, k, v, rank_plan, group_rank, group_size)
    kernels = get_backend(backend, q.device)
    kernels.check(q, k)
    sched = rank_plan if isinstance(rank_plan, RankSchedule) else cached_schedule(rank_plan, str(q.device))
    scale = 1.0 / math.sqrt(q.shape[2]) if softmax_scale is None else float(softmax_scale)
    return _FcpAttentionFunction.apply(q, k, v, sched, exchange, kernels, scale)
