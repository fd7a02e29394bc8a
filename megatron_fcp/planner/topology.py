"""Where the CP ranks of a group sit: the node of each CP rank, as a plan carries it (``Plan.cp_node``).

The node-aware key/value exchange (docs/node_aware_exchange.md) sends a token over InfiniBand once per node and
forwards it over NVLink inside the node; for that every rank must derive, from the plan alone, which CP ranks share
a node. A layout is an int64 array ``cp_node[r]``: the node of CP rank ``r``, the nodes numbered 0, 1, ... in order
of first appearance (so two groups laid out alike have equal arrays, whatever machines they run on), every node
holding the same number of CP ranks (the relay rules and the cost model assume nodes alike).

Pure: plain numbers in, a read-only array or one :class:`InputError` line out (no torch, no environment, no
Megatron); ``megatron_fcp.megatron.config`` reads the ranks per node at start-up and Megatron's CP group ranks.
"""

from __future__ import annotations

import numbers

import numpy as np

from megatron_fcp.errors import InputError


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def cp_nodes(global_ranks, ranks_per_node) -> np.ndarray:
    """The node of each CP rank (read-only int64 ``[cp]``, nodes numbered 0.. in order of first appearance).

    ``global_ranks``: the CP group's global ranks ordered by CP rank (Megatron's
    ``parallel_state.get_context_parallel_global_ranks()``). ``ranks_per_node``: global ranks (GPUs, processes) per
    node, torchrun's ``LOCAL_WORLD_SIZE``; not CP ranks per node: Megatron orders ranks ``tp-cp-ep-dp-pp`` with TP
    fastest, so a CP group's members are the TP size apart and a node of ``G`` GPUs holds ``G / tp`` of them. Node of
    a rank: ``global_rank // ranks_per_node``. Raises :class:`InputError` (one line) for a ``ranks_per_node`` below
    1, ranks that are not distinct non-negative whole numbers, or nodes that hold different numbers of CP ranks
    (naming the node, its global ranks and both counts).
    """
    if not _whole(ranks_per_node) or ranks_per_node < 1:
        raise InputError(f"ranks_per_node must be a whole number >= 1 (GPUs per node, LOCAL_WORLD_SIZE), got "
                         f"{ranks_per_node!r}")
    ranks = np.asarray(global_ranks)
    if ranks.ndim != 1 or ranks.size == 0 or ranks.dtype.kind not in "iu" or ranks.min() < 0:
        raise InputError(f"the CP group's global ranks must be a non-empty list of whole numbers >= 0, got "
                         f"{_ranks_text(np.asarray(global_ranks).reshape(-1).tolist())}")
    ranks = ranks.astype(np.int64)
    if np.unique(ranks).size != ranks.size:
        raise InputError(f"the CP group's global ranks {_ranks_text(ranks.tolist())} hold a rank twice; pass each CP "
                         "rank's global rank once, ordered by CP rank")
    machine = ranks // ranks_per_node
    _, first, index = np.unique(machine, return_index=True, return_inverse=True)
    renumber = np.empty(first.size, np.int64)
    renumber[np.argsort(first)] = np.arange(first.size)
    node = renumber[index.reshape(-1)]
    counts = np.bincount(node)
    if np.any(counts != counts[0]):
        differs = int(np.flatnonzero(counts != counts[0])[0])
        first_machine, odd_machine = int(machine[node == 0][0]), int(machine[node == differs][0])
        raise InputError(
            f"the CP group of global ranks {_ranks_text(ranks)} spreads over nodes unequally at {ranks_per_node} ranks "
            f"per node: node {first_machine} (global ranks {_span(first_machine, ranks_per_node)}) holds "
            f"{int(counts[0])} of its CP ranks but node {odd_machine} (global ranks "
            f"{_span(odd_machine, ranks_per_node)}) holds {int(counts[differs])}; every node must hold the same "
            f"number: pick a context-parallel x tensor-parallel size that divides the ranks per node or is a multiple "
            f"of it")
    node.setflags(write=False)
    return node


def check_cp_node(cp_node, cp: int) -> np.ndarray:
    """``cp_node`` as a read-only int64 array, checked as a plan's layout (see the module docstring): one entry per CP
    rank, nodes numbered 0.. in order of first appearance, each holding the same number of CP ranks. Raises
    :class:`InputError` (one line) otherwise."""
    node = np.asarray(cp_node)
    if node.ndim != 1 or node.shape[0] != cp or (node.size and node.dtype.kind not in "iu"):
        raise InputError(f"cp_node must list the node of each of the {cp} CP ranks as whole numbers, got "
                         f"{_ranks_text(node.reshape(-1).tolist())} (shape {node.shape}); make it with "
                         "megatron_fcp.planner.topology.cp_nodes")
    node = np.ascontiguousarray(node, dtype=np.int64)
    if node.size and node.min() < 0:
        rank = int(np.flatnonzero(node < 0)[0])
        raise InputError(f"cp_node[{rank}] = {int(node[rank])} is negative; number the nodes 0, 1, ... in order of "
                         "first appearance (megatron_fcp.planner.topology.cp_nodes)")
    seen = np.maximum.accumulate(np.concatenate([[-1], node[:-1]]))  # the highest node before each CP rank
    if np.any(node > seen + 1):
        rank = int(np.flatnonzero(node > seen + 1)[0])
        raise InputError(f"cp_node is not numbered in order of first appearance: CP rank {rank} is on node "
                         f"{int(node[rank])} before node {int(seen[rank]) + 1} appeared; renumber the nodes 0, 1, ... "
                         "as they first appear (megatron_fcp.planner.topology.cp_nodes)")
    counts = np.bincount(node)
    if np.any(counts != counts[0]):
        differs = int(np.flatnonzero(counts != counts[0])[0])
        raise InputError(f"node {differs} holds {_ranks(counts[differs])} but node 0 holds {_ranks(counts[0])}: "
                         f"every node must hold the same number of CP ranks (cp {cp} over {counts.size} nodes); give a "
                         "layout whose nodes hold equal shares")
    node = node.view()
    node.setflags(write=False)
    return node


def num_nodes(cp_node) -> int:
    """Nodes of a layout (``cp_node`` numbered 0.. in order of first appearance)."""
    return int(np.max(cp_node)) + 1 if len(cp_node) else 0


def _ranks(count) -> str:
    return f"{int(count)} CP rank{'' if count == 1 else 's'}"


def _span(machine: int, ranks_per_node: int) -> str:
    return f"{machine * ranks_per_node}-{(machine + 1) * ranks_per_node - 1}"


def _ranks_text(values, limit: int = 8) -> str:
    """``values`` as a short list: at most ``limit`` entries, then how many more."""
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{f', ... ({len(values) - limit} more)' if len(values) > limit else ''}]"
