"""Public entry point of the planner: validate a micro-batch and plan it with a named strategy."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable

import numpy as np

from megatron_fcp.errors import InputError
from megatron_fcp.planner.baselines import plan_hybrid, plan_magi, plan_nocp, plan_ring
from megatron_fcp.planner.fcp import FcpOptions, plan_fcp
from megatron_fcp.planner.pairs import MASKS
from megatron_fcp.planner.plan import Plan
from megatron_fcp.planner.topology import check_cp_node

PlannerFn = Callable[[np.ndarray, int, int, str], Plan]

STRATEGIES: dict[str, PlannerFn] = {
    "fcp": plan_fcp,
    "ring": plan_ring,
    "hybrid": plan_hybrid,
    "magi": plan_magi,
    "nocp": plan_nocp,
}
"""Strategy name -> planner. ``fcp`` is this project; the others are the baselines it is measured against."""

STRATEGY_HELP = {
    "fcp": "FCP: density-balanced sharding cut at any token, exact token counts, point-to-point key/value exchange",
    "ring": "ring CP as Transformer Engine runs packed (THD) batches: 2*cp chunks per document, KV ring",
    "hybrid": "Megatron hybrid/dynamic CP: power-of-two CP group per document, ring inside the group",
    "magi": "MagiAttention-style: equal fixed-size chunks, min-heap dispatch, equal chunks per rank",
    "nocp": "no CP splitting: whole documents per rank (reference; only where every document fits a rank)",
}


MAX_CP = 1 << 16
"""Largest context-parallel size the planner accepts (65,536 ranks)."""
MAX_TOKENS_PER_RANK = 1 << 24
"""Largest number of token slots per rank the planner accepts (16,777,216 tokens)."""
MAX_TOTAL_TOKENS = 1 << 32
"""Largest ``cp * tokens_per_rank`` the planner accepts (4,294,967,296 tokens). The number of documents of a
micro-batch is bounded by it as well (see :data:`MIN_DOCS_BOUND`; empty entries count too), so every
array the planner builds stays within a few tens of GiB at worst and far below int64 in its sums."""
MIN_DOCS_BOUND = 1 << 20
"""Entries (empty documents included) a micro-batch may hold: ``max(cp * tokens_per_rank, MIN_DOCS_BOUND)``."""


def check_sizes(cp, tokens_per_rank) -> None:
    """Check ``cp`` and ``tokens_per_rank`` against the planner's bounds (:data:`MAX_CP`,
    :data:`MAX_TOKENS_PER_RANK`, :data:`MAX_TOTAL_TOKENS`); raise a one-line :class:`InputError` otherwise.

    Cheap: call it before packing a micro-batch of ``cp * tokens_per_rank`` tokens.
    """
    _check_int("cp", cp, minimum=1)
    _check_int("tokens_per_rank", tokens_per_rank, minimum=1)
    if cp > MAX_CP:
        raise InputError(f"cp={cp} is above the largest supported CP size {MAX_CP}; use a smaller --cp")
    if tokens_per_rank > MAX_TOKENS_PER_RANK:
        raise InputError(f"tokens_per_rank={tokens_per_rank} is above the largest supported {MAX_TOKENS_PER_RANK}; "
                         "use a smaller --tokens-per-rank")
    if cp * tokens_per_rank > MAX_TOTAL_TOKENS:
        raise InputError(f"cp x tokens_per_rank = {cp} x {tokens_per_rank} = {cp * tokens_per_rank} tokens is above "
                         f"the largest supported micro-batch of {MAX_TOTAL_TOKENS} tokens; use a smaller --cp or "
                         "--tokens-per-rank")


def check_batch(doc_lens, cp, tokens_per_rank, mask: str = "causal", exact: bool = False) -> np.ndarray:
    """Validate one micro-batch and return its lengths as int64; raise :class:`InputError` naming the problem.

    ``exact=True`` requires the lengths to fill ``cp * tokens_per_rank`` exactly (no padding). ``cp``,
    ``tokens_per_rank`` and their product are bounded (:func:`check_sizes`), and so is the number of documents.
    """
    check_sizes(cp, tokens_per_rank)
    if mask not in MASKS:
        raise InputError(f"mask {mask!r} is not supported; use one of: {', '.join(MASKS)}")
    capacity = cp * tokens_per_rank
    num_docs = len(doc_lens) if isinstance(doc_lens, (list, tuple)) else np.size(doc_lens)
    if num_docs > max(capacity, MIN_DOCS_BOUND):
        raise InputError(f"the micro-batch has {num_docs} document lengths but cp x tokens_per_rank = {capacity} "
                         "token slots; pass at most one length per token slot (drop empty documents)")
    lens, longest = _as_lengths(doc_lens)
    # no int64 wrap-around on absurd lengths (Python ints where one is above the capacity); with every length at
    # most the capacity (<= 2**32) and at most 2**32 entries, an unsigned 64-bit sum is exact
    if longest > capacity:
        total = sum(lens.tolist())
    elif not exact and lens.shape[0] * longest <= capacity:
        total = 0  # cannot exceed the capacity: not summed
    else:  # int64 cannot wrap where the count times the longest is below 2**63
        total = int(lens.sum() if lens.shape[0] * longest < 1 << 63 else lens.sum(dtype=np.uint64))
    if total > capacity or (exact and total != capacity):
        raise InputError(
            f"the documents hold {total} tokens but cp x tokens_per_rank = {cp} x {tokens_per_rank} = {capacity}; "
            "a micro-batch must fill the CP group exactly (pack documents to that size, or change "
            "--tokens-per-rank)" + ("" if exact else " and may not exceed it")
        )
    return lens


def make_plan(doc_lens, cp: int, tokens_per_rank: int, mask: str = "causal", strategy: str = "fcp",
              options: FcpOptions | None = None, cp_node=None) -> Plan:
    """Plan one micro-batch of documents ``doc_lens`` on ``cp`` ranks of ``tokens_per_rank`` token slots.

    ``options`` tunes the ``fcp`` strategy (the baselines take none). ``cp_node``: the node of each CP rank
    (:func:`megatron_fcp.planner.topology.cp_nodes`), carried by the plan (:attr:`Plan.cp_node`, in its digest);
    the placement does not depend on it. None: no layout (plan and digest as without the argument).
    """
    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    if options is not None and strategy != "fcp":
        raise InputError(f"planner options apply to the fcp strategy only, not to {strategy!r}")
    lens = check_batch(doc_lens, cp, tokens_per_rank, mask)
    if cp_node is not None:  # before the planning work, which a bad layout would waste
        cp_node = check_cp_node(cp_node, int(cp))
    if options is not None:
        plan = plan_fcp(lens, int(cp), int(tokens_per_rank), mask, options)
    else:
        plan = STRATEGIES[strategy](lens, int(cp), int(tokens_per_rank), mask)
    # tokens_per_rank: so the checker sees the request
    return dataclasses.replace(plan, tokens_per_rank=int(tokens_per_rank), cp_node=cp_node)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")


INT64_MAX = np.iinfo(np.int64).max


def _as_lengths(doc_lens) -> tuple[np.ndarray, int]:
    """The lengths as a new int64 array, and the longest; raise :class:`InputError` on anything but
    non-negative integers in a flat list."""
    raw = np.asarray(doc_lens)
    if raw.dtype == object and raw.ndim == 1:  # Python ints beyond uint64 (and mixed types) stay objects
        huge = [(index, value) for index, value in enumerate(raw.tolist())
                if isinstance(value, numbers.Integral) and value > INT64_MAX]
        if huge:
            raise _too_long(*huge[0])
    if raw.dtype.kind == "u" and raw.size and raw.max() > INT64_MAX:  # Python ints in [2**63, 2**64)
        index = int(np.argmax(raw > INT64_MAX))
        raise _too_long(index, int(raw[index]))
    if raw.ndim != 1:
        raise InputError(f"document lengths must be a flat list of integers, got an array of shape {raw.shape}")
    if raw.size == 0:
        raise InputError("the micro-batch has no documents; pass at least one document length")
    if raw.dtype.kind == "f":
        fractional = raw[~np.isfinite(raw) | (raw != np.floor(raw))]
        if fractional.size:
            raise InputError(f"document lengths must be integers; got {fractional[0].item()!r}")
    elif raw.dtype.kind not in "iu":
        raise InputError(f"document lengths must be integers; got values like {raw.tolist()[:3]!r}")
    lens = raw.astype(np.int64)  # a copy: the plan is a value, apart from the caller's array
    # one pass for both ends: read unsigned, a negative length lies above every non-negative one
    longest = int(lens.view(np.uint64).max())
    if longest > INT64_MAX:
        raise InputError(f"document lengths must be >= 0; got {int(lens[lens < 0][0])} at index "
                         f"{int(np.flatnonzero(lens < 0)[0])}")
    return lens, longest


def _too_long(index: int, value: int) -> InputError:
    return InputError(f"document length {value} at index {index} is above the largest integer the planner holds "
                      f"({INT64_MAX}); pass real document lengths (at most cp x tokens_per_rank tokens in all)")
