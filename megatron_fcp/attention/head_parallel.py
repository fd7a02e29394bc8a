"""Head-parallel inside the node, FCP across nodes (docs/node_aware_exchange.md, "Head-parallel inside the node").

The CP group's ranks lie on nodes of ``g`` ranks each. The plan is made for the nodes: ``cp / g`` node-sized ranks
of ``g x tokens_per_rank`` token slots (``make_plan(lens, cp // g, g * tokens_per_rank, mask)``). Rank ``l`` of node
``i`` holds slots ``[l T, (l + 1) T)`` of node ``i``'s order (``T = tokens_per_rank``; :func:`local_token_index`),
its queries, keys and values with every head. Then per attention call:

1. All-to-all inside the node (Ulysses): rank ``l`` sends head group ``j`` of its tokens to rank ``j`` and gets head
   group ``l`` of every rank's tokens: ``[g T, heads / g, head_dim]``, node ``i``'s whole order on ``1 / g`` of the
   heads (:func:`tokens_to_heads`).
2. FCP's staged exchange across nodes on that head group, with the rank of the same index ``l`` on every other node:
   :func:`~megatron_fcp.attention.engine.fcp_attention` with node ``i``'s plan view over the group of those ranks.
3. The all-to-all back (:func:`heads_to_tokens`).

So every key/value crosses into a node once per head group, over the NIC of the GPU that computes that group, and
every kernel call covers ``g`` times the query rows on ``1 / g`` of the heads. The memory bound holds in bytes: a
rank holds ``g T`` tokens of ``1 / g`` of the heads, the same bytes as its own ``T`` tokens with every head.
Backward: the all-to-alls are each other's inverse, so each one's gradient is the other.

Needs query heads and key/value heads divisible by ``g`` (grouped-query attention: query head group ``j`` then
uses key/value head group ``j``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from megatron_fcp.attention.engine import fcp_attention
from megatron_fcp.errors import InputError
from megatron_fcp.planner.plan import Plan


def local_token_index(node_plan: Plan, ranks_per_node: int, cp_rank: int) -> np.ndarray:
    """The batch's token indices (document order, as :meth:`Plan.token_index`) that CP rank ``cp_rank`` holds
    under head-parallel staging: slots ``[l T, (l + 1) T)`` of its node's order (``l``: its index in the node,
    ``T``: the node's slots over ``ranks_per_node``), the padding slots dropped."""
    node, local = divmod(int(cp_rank), int(ranks_per_node))
    slots = int(node_plan.num_tokens[node])
    if slots % ranks_per_node:
        raise InputError(f"node {node} has {slots} token slots, not a multiple of {ranks_per_node} ranks per node; "
                         "plan the nodes with ranks_per_node x tokens_per_rank slots each")
    per_rank = slots // ranks_per_node
    return node_plan.token_index(node)[local * per_rank:(local + 1) * per_rank]


_GROUPS: dict[tuple[int, ...], tuple] = {}
"""(node group, across group) of each CP group this process belongs to, by the CP group's global ranks."""


def make_head_parallel_groups(cp_group, heads_per_node: int, backend: str | None = None) -> tuple:
    """Create, for every CP group of the world, the node groups (``heads_per_node`` consecutive CP ranks each) and the
    across groups (the CP ranks with one index in their node), and return this rank's ``(node_group,
    across_group)``; :func:`head_parallel_groups` gives them later. Every rank of the world must call this once, at
    the same point (one all-gather of the CP groups' ranks, then ``new_group`` in one order everywhere)."""
    mine = tuple(dist.get_process_group_ranks(cp_group))
    g = int(heads_per_node)
    if g < 1 or len(mine) % g:
        raise InputError(f"head-parallel attention: {g} ranks per node do not divide the CP group of {len(mine)}")
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    me, node_group, across_group = dist.get_rank(), None, None
    for ranks in sorted(set(map(tuple, everyone))):
        for node in range(len(ranks) // g):
            group = dist.new_group(list(ranks[node * g:(node + 1) * g]), backend=backend)
            node_group = group if me in ranks[node * g:(node + 1) * g] else node_group
        for local in range(g):
            group = dist.new_group(list(ranks[local::g]), backend=backend)
            across_group = group if me in ranks[local::g] else across_group
    _GROUPS[mine] = (node_group, across_group)
    return node_group, across_group


def head_parallel_groups(cp_group) -> tuple:
    """This rank's ``(node_group, across_group)`` of ``cp_group`` (:func:`make_head_parallel_groups`)."""
    key = tuple(dist.get_process_group_ranks(cp_group))
    if key not in _GROUPS:
        raise InputError("head-parallel attention (--fcp-node-exchange heads) needs its process groups: call "
                         "make_head_parallel_groups(cp_group, ranks_per_node) on every rank at start-up")
    return _GROUPS[key]


def _check_heads(x: torch.Tensor, g: int, name: str) -> None:
    if x.dim() != 3 or x.shape[1] % g:
        raise InputError(f"head-parallel attention: {name} must be [tokens, heads, head_dim] with heads a multiple of "
                         f"the {g} ranks per node; got {tuple(x.shape)}")


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` ``[g, ...]``: part ``j`` to rank ``j`` of ``group``; returns ``[g, ...]``, part ``l`` from rank ``l``."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after contiguous: empty_like keeps a strided input's strides
    dist.all_to_all_single(out, x, group=group)
    return out


def _to_heads(x: torch.Tensor, group, g: int) -> torch.Tensor:
    tokens, heads, dim = x.shape
    parts = x.reshape(tokens, g, heads // g, dim).transpose(0, 1)  # [g, tokens, heads / g, dim]: part j to rank j
    return _all_to_all(parts, group).reshape(g * tokens, heads // g, dim)


def _to_tokens(x: torch.Tensor, group, g: int) -> torch.Tensor:
    rows, heads, dim = x.shape
    parts = _all_to_all(x.reshape(g, rows // g, heads, dim), group)  # part j: head group j of this rank's tokens
    return parts.transpose(0, 1).reshape(rows // g, g * heads, dim)


class _AllToAll(torch.autograd.Function):
    """:func:`_to_heads` (``to_heads``) or :func:`_to_tokens`; each one's gradient is the other."""

    @staticmethod
    def forward(ctx, x, group, g, to_heads: bool):
        ctx.comm = (group, g, to_heads)
        return (_to_heads if to_heads else _to_tokens)(x, group, g)

    @staticmethod
    def backward(ctx, grad):
        group, g, to_heads = ctx.comm
        return (_to_tokens if to_heads else _to_heads)(grad, group, g), None, None, None


def tokens_to_heads(x: torch.Tensor, node_group) -> torch.Tensor:
    """``[T, heads, dim]`` of this rank's tokens -> ``[g T, heads / g, dim]``: head group ``l`` (this rank's index in
    ``node_group``) of the tokens of all ``g`` ranks of the node, rank 0's first. Differentiable."""
    g = dist.get_world_size(node_group)
    _check_heads(x, g, "the input")
    return _AllToAll.apply(x, node_group, g, True)


def heads_to_tokens(x: torch.Tensor, node_group) -> torch.Tensor:
    """The inverse of :func:`tokens_to_heads`. Differentiable."""
    g = dist.get_world_size(node_group)
    if x.dim() != 3 or x.shape[0] % g:
        raise InputError(f"head-parallel attention: the output must be [g x tokens, heads / g, head_dim] with g = {g}; "
                         f"got {tuple(x.shape)}")
    return _AllToAll.apply(x, node_group, g, False)


def head_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, node_rank_plan, node_group,
                            across_group, softmax_scale: float | None = None, **fcp_kwargs) -> torch.Tensor:
    """FCP attention of this rank's tokens with heads split inside the node (module docstring).

    Args:
        q, k, v: ``[T, heads, head_dim]`` of the rank's tokens (:func:`local_token_index`), every head.
        node_rank_plan: ``node_plan.for_rank(node)`` of the node-sized plan (or its finished schedule).
        node_group: the ``g`` CP ranks of this rank's node, in node order.
        across_group: the CP ranks with this rank's index in their node, one per node, in node order (its size is
            the node plan's CP size).
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        fcp_kwargs: passed on to :func:`~megatron_fcp.attention.engine.fcp_attention` (backend, budget, ...).

    Returns ``[T, heads, head_dim]`` like ``q``.
    """
    g = dist.get_world_size(node_group)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_heads(x, g, name)
    qh, kh, vh = (tokens_to_heads(x, node_group) for x in (q, k, v))
    out = fcp_attention(qh, kh, vh, node_rank_plan, across_group, softmax_scale, **fcp_kwargs)
    return heads_to_tokens(out, node_group)


def split_heads_in_process(parts: list[torch.Tensor], g: int) -> list[list[torch.Tensor]]:
    """What :func:`tokens_to_heads` gives every rank, computed in one process: ``parts[r]`` ``[T, heads, dim]`` of
    CP rank ``r`` (nodes of ``g`` consecutive ranks) -> ``[node][head group]`` ``[g T, heads / g, dim]``."""
    if len(parts) % g:
        raise InputError(f"{len(parts)} ranks do not make nodes of {g}")
    out = []
    for node in range(len(parts) // g):
        whole = torch.cat(parts[node * g:(node + 1) * g])
        _check_heads(whole, g, "the input")
        out.append(list(whole.reshape(whole.shape[0], g, -1, whole.shape[2]).unbind(1)))
    return [[x.contiguous() for x in node] for node in out]


def join_heads_in_process(shards: list[list[torch.Tensor]], g: int) -> list[torch.Tensor]:
    """The inverse of :func:`split_heads_in_process`: ``[node][head group]`` -> per CP rank ``[T, heads, dim]``."""
    parts = []
    for node in shards:
        whole = torch.stack(node, dim=1).reshape(node[0].shape[0], -1, node[0].shape[2])
        parts += list(whole.chunk(g))
    return [x.contiguous() for x in parts]
