"""The simulator: sample packed micro-batches, plan them with every strategy, model them, summarise.

Per (distribution, CP size, mask, strategy) cell and over ``num_batches`` batches it reports: compute imbalance
(max/mean per rank, in modeled kernel time and in exact pairs; p95 over batches), token imbalance and padding,
key/value bytes received per rank (mean and max, and the mean as a fraction of ring's on the same batch),
modeled attention time per step (one layer, forward + backward) and its ratio to ring, modeled MFU, and
key/value memory per rank (peak remote key/values held at once and kept for backward, as multiples of the
rank's own, under the key/value budget and without one; key/value gradients returned in one round) with the
bytes moved forward and backward against ring's. Every time, MFU and memory figure is modeled (see
:mod:`megatron_fcp.sim.model`); planning time is measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from megatron_fcp.data.lengths import load_distribution, pack_batches
from megatron_fcp.errors import InputError
from megatron_fcp.planner.api import STRATEGIES, make_plan
from megatron_fcp.planner.pairs import MASKS
from megatron_fcp.planner.plan import Plan
from megatron_fcp.planner.stages import DEFAULT_KV_BUDGET, parse_kv_budget, resolve_kv_budget
from megatron_fcp.sim.model import HardwareProfile, PlanCost, evaluate, mfu, node_layout, plan_memory

METRICS = ("imb_time", "imb_pairs", "imb_tokens", "pad_frac", "recv_mean_mb", "recv_max_mb", "comm_vs_ring",
           "step_ms", "speedup_vs_ring", "step_vs_fcp", "mfu", "plan_ms", "peak_kv_x", "saved_kv_x",
           "peak_kv_x_unbounded", "saved_kv_x_unbounded", "peak_kv_mb", "returned_x", "bytes_vs_ring")
_AGGREGATE = {"imb_time": "p95", "imb_pairs": "p95", "imb_tokens": "mean", "pad_frac": "max", "recv_mean_mb": "mean",
              "recv_max_mb": "mean", "comm_vs_ring": "mean", "step_ms": "mean", "speedup_vs_ring": "mean",
              "step_vs_fcp": "mean", "mfu": "mean", "plan_ms": "median", "peak_kv_x": "max", "saved_kv_x": "max",
              "peak_kv_x_unbounded": "max", "saved_kv_x_unbounded": "max", "peak_kv_mb": "mean",
              "returned_x": "max", "bytes_vs_ring": "mean"}


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """What to simulate: every (length source, mask, CP size, strategy) cell. Validated on creation."""

    lengths: tuple[str, ...]
    """Length sources: shipped names (see ``megatron_fcp.data.lengths.SHIPPED``) or files."""
    cps: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    """CP sizes."""
    tokens_per_rank: int = 16384
    """Tokens per rank; a micro-batch holds ``cp * tokens_per_rank`` tokens."""
    masks: tuple[str, ...] = ("causal", "full")
    """Mask types."""
    strategies: tuple[str, ...] = tuple(STRATEGIES)
    """Strategies to compare (``ring`` is always planned too: it is the reference of the ratios)."""
    num_batches: int = 20
    """Micro-batches per cell."""
    seed: int = 0
    """Seed of the batch sampler."""
    kv_budget_tokens: int | str | None = DEFAULT_KV_BUDGET
    """Key/value tokens per stage of point-to-point plans: a positive integer, ``"auto"`` (the rank's token
    slots) or None (one stage); see :mod:`megatron_fcp.planner.stages`."""

    def __post_init__(self):
        object.__setattr__(self, "kv_budget_tokens", parse_kv_budget(self.kv_budget_tokens, "kv_budget_tokens"))
        unknown = set(self.strategies) - set(STRATEGIES)
        if unknown:
            raise InputError(f"unknown strategies {sorted(unknown)}; choose from {', '.join(STRATEGIES)}")
        if not self.cps or any(int(c) != c or c < 1 for c in self.cps):
            raise InputError(f"CP sizes must be integers >= 1, got {self.cps}")
        if self.num_batches < 1 or self.tokens_per_rank < 1:
            raise InputError("num_batches and tokens_per_rank must be >= 1")
        if not self.lengths:
            raise InputError("name at least one length source (a shipped distribution or a lengths file)")
        if not self.masks or set(self.masks) - set(MASKS):
            raise InputError(f"masks must be some of {', '.join(MASKS)}, got {self.masks}")


@dataclass(frozen=True)
class Cell:
    """Summary of one (distribution, cp, mask, strategy) cell over its batches."""

    lengths: str
    cp: int
    mask: str
    strategy: str
    num_batches: int
    """Batches the strategy could plan (``nocp`` skips batches with a document longer than a rank)."""
    imb_time: float
    """p95 over batches of max/mean modeled kernel time per rank."""
    imb_pairs: float
    """p95 over batches of max/mean exact query-key pairs per rank."""
    imb_tokens: float
    """Mean over batches of max/mean real tokens per rank."""
    pad_frac: float
    """Max over batches of padding slots / all slots."""
    recv_mean_mb: float
    """Mean key/value megabytes received per rank per layer forward (the same volume returns in backward)."""
    recv_max_mb: float
    """Mean over batches of the largest per-rank receive."""
    comm_vs_ring: float
    """Mean per-rank receive as a fraction of ring's on the same batches."""
    step_ms: float
    """Mean modeled attention milliseconds per step (one layer, forward + backward)."""
    speedup_vs_ring: float
    """Mean over batches of ring's modeled step time divided by this strategy's."""
    step_vs_fcp: float
    """Mean over the batches this strategy planned of its modeled step time divided by FCP's on the same batch
    (above 1: FCP is faster). The fair comparison where a strategy (``nocp``) skips batches."""
    mfu: float
    """Mean modeled attention MFU."""
    plan_ms: float
    """Median measured planning milliseconds per micro-batch (this machine's CPU)."""
    peak_kv_x: float
    """Max over batches and ranks of the remote key/values held at once (one layer), over the rank's own."""
    saved_kv_x: float
    """Max over batches and ranks of the remote key/values kept from forward for backward, over the rank's own."""
    peak_kv_x_unbounded: float
    """``peak_kv_x`` without a budget (one stage); equal to ``peak_kv_x`` for ring and hybrid (not staged)."""
    saved_kv_x_unbounded: float
    """``saved_kv_x`` without a budget (one stage); equal to ``saved_kv_x`` for ring and hybrid."""
    peak_kv_mb: float
    """Mean over batches of the largest per-rank peak of remote key/values, in MB of the hardware profile."""
    returned_x: float
    """Max over batches and ranks of the own key/value gradients that come back in one backward round, over
    the rank's own key/values."""
    bytes_vs_ring: float
    """Mean over batches of the key/value bytes a rank moves, forward and backward (receive, refetch, gradients
    sent back), as a fraction of ring's (``3 (cp - 1)`` times its own slots)."""


def _ratio_max(num: np.ndarray, den: np.ndarray) -> float:
    return float((num / np.maximum(den, 1)).max(initial=0.0))


def _batch_row(plan: Plan, cost: PlanCost, ring: PlanCost, fcp: PlanCost, hw: HardwareProfile,
               plan_s: float) -> dict:
    real = plan.num_real_tokens
    mem = cost.memory
    own = mem["own_kv_tokens"]
    unbounded = plan_memory(plan, None) if plan.exchange == "p2p" else mem
    ring_moved = ring.moved_bytes.mean()
    return {
        "imb_time": float(cost.compute_s.max() / cost.compute_s.mean()),
        "imb_pairs": float(cost.pairs.max() / max(cost.pairs.mean(), 1.0)),
        "imb_tokens": float(real.max() / real.mean()),
        "pad_frac": float(plan.num_pad_tokens.sum() / plan.num_tokens.sum()),
        "recv_mean_mb": float(cost.recv_bytes.mean() / 1e6),
        "recv_max_mb": float(cost.recv_bytes.max() / 1e6),
        "comm_vs_ring": float(cost.recv_bytes.mean() / ring.recv_bytes.mean()) if plan.cp > 1 else 0.0,
        "step_ms": cost.step_time_s * 1e3,
        "speedup_vs_ring": ring.step_time_s / cost.step_time_s,
        "step_vs_fcp": cost.step_time_s / fcp.step_time_s,
        "mfu": mfu(plan, hw, cost),
        "plan_ms": plan_s * 1e3,
        "peak_kv_x": _ratio_max(mem["peak_remote_kv_tokens"], own),
        "saved_kv_x": _ratio_max(mem["saved_remote_kv_tokens"], own),
        "peak_kv_x_unbounded": _ratio_max(unbounded["peak_remote_kv_tokens"], own),
        "saved_kv_x_unbounded": _ratio_max(unbounded["saved_remote_kv_tokens"], own),
        "peak_kv_mb": float(mem["peak_remote_kv_tokens"].max(initial=0)) * hw.kv_bytes_per_token / 1e6,
        "returned_x": _ratio_max(mem["peak_returned_grad_tokens"], own),
        "bytes_vs_ring": float(cost.moved_bytes.mean() / ring_moved) if ring_moved > 0 else 0.0,
    }


def _summarise(key: tuple, rows: list[dict]) -> Cell:
    if not rows:
        return Cell(*key, 0, **dict.fromkeys(METRICS, float("nan")))
    reduce = {"p95": lambda x: np.percentile(x, 95), "mean": np.mean, "max": np.max, "median": np.median}
    return Cell(*key, len(rows), **{m: float(reduce[_AGGREGATE[m]](np.array([r[m] for r in rows]))) for m in METRICS})


def simulate_cell(batches: list[np.ndarray], lengths: str, cp: int, tokens_per_rank: int, mask: str,
                  strategies: tuple[str, ...], hw: HardwareProfile, kv_budget_tokens=DEFAULT_KV_BUDGET
                  ) -> list[Cell]:
    """Plan and model every batch of one (distribution, cp, mask) with every strategy (point-to-point plans
    under ``kv_budget_tokens`` per stage; above one node of the profile, ``gpus_per_node`` consecutive ranks each,
    with the node-aware exchange the runtime runs there: :mod:`megatron_fcp.planner.relay`, node rings)."""
    rows: dict[str, list[dict]] = {s: [] for s in strategies}
    cp_node = node_layout(cp, hw)
    for batch in batches:
        planned = {}
        for strategy in dict.fromkeys(("ring", "fcp", *strategies)):
            start = time.perf_counter()
            try:
                plan = make_plan(batch, cp, tokens_per_rank, mask, strategy, cp_node=cp_node)
            except InputError:
                continue  # nocp where a document does not fit one rank
            plan_s = time.perf_counter() - start
            planned[strategy] = (plan, evaluate(plan, hw, kv_budget_tokens), plan_s)
        ring, fcp = planned["ring"][1], planned["fcp"][1]
        for strategy in strategies:
            if strategy in planned:
                plan, cost, plan_s = planned[strategy]
                rows[strategy].append(_batch_row(plan, cost, ring, fcp, hw, plan_s))
    return [_summarise((lengths, cp, mask, s), rows[s]) for s in strategies]


def simulate(config: SimConfig, hw: HardwareProfile, progress: Callable[[str], None] | None = None) -> list[Cell]:
    """Run every cell of ``config``; ``progress`` receives one line per finished cell."""
    cells: list[Cell] = []
    todo = len(config.lengths) * len(config.cps) * len(config.masks)
    for lengths in config.lengths:
        dist = load_distribution(lengths)
        for cp in config.cps:
            batches = pack_batches(dist, cp * config.tokens_per_rank, config.num_batches, config.seed)
            for mask in config.masks:
                start = time.perf_counter()
                cells += simulate_cell(batches, lengths, cp, config.tokens_per_rank, mask, config.strategies, hw,
                                       config.kv_budget_tokens)
                if progress:
                    done = len(cells) // len(config.strategies)
                    progress(f"[{done}/{todo}] {lengths} cp={cp} {mask}: {time.perf_counter() - start:.1f}s")
    return cells


def cells_to_json(cells: list[Cell], config: SimConfig, hw: HardwareProfile) -> dict:
    """A JSON-ready record of a simulation (``kv_budget_tokens``: the setting; ``kv_budget_tokens_resolved``:
    tokens per stage of point-to-point plans, whose ranks all hold ``tokens_per_rank`` slots; null: one stage)."""
    hardware = asdict(hw)
    if hardware.get("laws"):  # keyed by (kernel, direction) tuples: JSON keys must be text
        hardware["laws"] = {"/".join(key): law for key, law in hardware["laws"].items()}
    return {"config": asdict(config), "hardware": hardware, "modeled": True,
            "kv_budget_tokens": config.kv_budget_tokens,
            "kv_budget_tokens_resolved": resolve_kv_budget(config.kv_budget_tokens, config.tokens_per_rank),
            "kv_bytes_per_token": hw.kv_bytes_per_token, "cells": [asdict(c) for c in cells]}


def format_table(cells: list[Cell]) -> str:
    """A terminal table: one block per (distribution, mask), one row per (cp, strategy). Memory columns: remote
    key/values per rank held at once (``kv_pk``) and kept for backward (``kv_kp``) as multiples of its own, the
    same without a budget (``unb_pk``, ``unb_kp``), own gradients back in one round (``ret``) and bytes moved
    forward + backward against ring's (``B/ring``)."""
    head = (f"{'cp':>4} {'strategy':<8} {'imb_time':>8} {'imb_pair':>8} {'imb_tok':>7} {'pad%':>6} "
            f"{'recv_MB':>8} {'vs_ring':>7} {'step_ms':>9} {'speedup':>7} {'vs_fcp':>6} {'MFU%':>6} {'plan_ms':>7} "
            f"{'kv_pk':>6} {'kv_kp':>6} {'unb_pk':>6} {'unb_kp':>6} {'pk_MB':>7} {'ret':>5} {'B/ring':>6}")
    lines = []
    for (lengths, mask) in dict.fromkeys((c.lengths, c.mask) for c in cells):
        lines += ["", f"{lengths}, {mask} mask (modeled, per layer fwd+bwd; imbalance p95 over batches; key/value "
                      "memory per rank as multiples of its own, max over batches)", head]
        for c in (c for c in cells if (c.lengths, c.mask) == (lengths, mask)):
            if c.num_batches == 0:
                lines.append(f"{c.cp:>4} {c.strategy:<8} {'n/a: a document is longer than a rank':>50}")
                continue
            lines.append(
                f"{c.cp:>4} {c.strategy:<8} {c.imb_time:>8.3f} {c.imb_pairs:>8.3f} {c.imb_tokens:>7.3f} "
                f"{c.pad_frac * 100:>6.2f} {c.recv_mean_mb:>8.1f} {c.comm_vs_ring:>7.3f} {c.step_ms:>9.2f} "
                f"{c.speedup_vs_ring:>7.2f} {c.step_vs_fcp:>6.2f} {c.mfu * 100:>6.1f} {c.plan_ms:>7.1f} "
                f"{c.peak_kv_x:>6.2f} {c.saved_kv_x:>6.2f} {c.peak_kv_x_unbounded:>6.2f} "
                f"{c.saved_kv_x_unbounded:>6.2f} {c.peak_kv_mb:>7.1f} {c.returned_x:>5.2f} {c.bytes_vs_ring:>6.3f}"
            )
    return "\n".join(lines)
