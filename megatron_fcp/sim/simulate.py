"""The simulator: sample packed micro-batches, plan them with every strategy, model them, summarise.

Per (distribution, CP size, mask, strategy) cell and over ``num_batches`` batches it reports: compute imbalance
(max/mean per rank, in modeled kernel time and in exact pairs; p95 over batches), token imbalance and padding,
key/value bytes received per rank (mean and max, and the mean as a fraction of ring's on the same batch),
modeled attention time per step (one layer, forward + backward) and its ratio to ring, and modeled MFU.
Every time and MFU figure is modeled (see :mod:`megatron_fcp.sim.model`); planning time is measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from megatron_fcp.errors import InputError
from megatron_fcp.planner.api import STRATEGIES, make_plan
from megatron_fcp.planner.plan import Plan
from megatron_fcp.sim.lengths import load_distribution, pack_batches
from megatron_fcp.sim.model import HardwareProfile, PlanCost, evaluate, mfu

METRICS = ("imb_time", "imb_pairs", "imb_tokens", "pad_frac", "recv_mean_mb", "recv_max_mb", "comm_vs_ring",
           "step_ms", "speedup_vs_ring", "step_vs_fcp", "mfu", "plan_ms")


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """What to simulate."""

    lengths: tuple[str, ...]
    """Length sources: shipped names (see ``megatron_fcp.sim.lengths.SHIPPED``) or files."""
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

    def __post_init__(self):
        unknown = set(self.strategies) - set(STRATEGIES)
        if unknown:
            raise InputError(f"unknown strategies {sorted(unknown)}; choose from {', '.join(STRATEGIES)}")
        if not self.cps or any(int(c) != c or c < 1 for c in self.cps):
            raise InputError(f"CP sizes must be integers >= 1, got {self.cps}")
        if self.num_batches < 1 or self.tokens_per_rank < 1:
            raise InputError("num_batches and tokens_per_rank must be >= 1")


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


def _batch_row(plan: Plan, cost: PlanCost, ring: PlanCost, fcp: PlanCost, hw: HardwareProfile,
               plan_s: float) -> dict:
    real = plan.num_real_tokens
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
    }


def _summarise(key: tuple, rows: list[dict]) -> Cell:
    if not rows:
        return Cell(*key, 0, *([float("nan")] * len(METRICS)))
    col = {m: np.array([r[m] for r in rows]) for m in METRICS}
    return Cell(
        *key, len(rows),
        imb_time=float(np.percentile(col["imb_time"], 95)),
        imb_pairs=float(np.percentile(col["imb_pairs"], 95)),
        imb_tokens=float(col["imb_tokens"].mean()),
        pad_frac=float(col["pad_frac"].max()),
        recv_mean_mb=float(col["recv_mean_mb"].mean()),
        recv_max_mb=float(col["recv_max_mb"].mean()),
        comm_vs_ring=float(col["comm_vs_ring"].mean()),
        step_ms=float(col["step_ms"].mean()),
        speedup_vs_ring=float(col["speedup_vs_ring"].mean()),
        step_vs_fcp=float(col["step_vs_fcp"].mean()),
        mfu=float(col["mfu"].mean()),
        plan_ms=float(np.median(col["plan_ms"])),
    )


def simulate_cell(batches: list[np.ndarray], lengths: str, cp: int, tokens_per_rank: int, mask: str,
                  strategies: tuple[str, ...], hw: HardwareProfile) -> list[Cell]:
    """Plan and model every batch of one (distribution, cp, mask) with every strategy."""
    rows: dict[str, list[dict]] = {s: [] for s in strategies}
    for batch in batches:
        planned = {}
        for strategy in dict.fromkeys(("ring", "fcp", *strategies)):
            start = time.perf_counter()
            try:
                plan = make_plan(batch, cp, tokens_per_rank, mask, strategy)
            except InputError:
                continue  # nocp where a document does not fit one rank
            plan_s = time.perf_counter() - start
            planned[strategy] = (plan, evaluate(plan, hw), plan_s)
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
                cells += simulate_cell(batches, lengths, cp, config.tokens_per_rank, mask, config.strategies, hw)
                if progress:
                    done = len(cells) // len(config.strategies)
                    progress(f"[{done}/{todo}] {lengths} cp={cp} {mask}: {time.perf_counter() - start:.1f}s")
    return cells


def cells_to_json(cells: list[Cell], config: SimConfig, hw: HardwareProfile) -> dict:
    """A JSON-ready record of a simulation."""
    return {"config": asdict(config), "hardware": asdict(hw), "modeled": True, "cells": [asdict(c) for c in cells]}


def format_table(cells: list[Cell]) -> str:
    """A terminal table: one block per (distribution, mask), one row per (cp, strategy)."""
    head = (f"{'cp':>4} {'strategy':<8} {'imb_time':>8} {'imb_pair':>8} {'imb_tok':>7} {'pad%':>6} "
            f"{'recv_MB':>8} {'vs_ring':>7} {'step_ms':>9} {'speedup':>7} {'vs_fcp':>6} {'MFU%':>6} {'plan_ms':>7}")
    lines = []
    for (lengths, mask) in dict.fromkeys((c.lengths, c.mask) for c in cells):
        lines += ["", f"{lengths}, {mask} mask (modeled, per layer fwd+bwd; imbalance p95 over batches)", head]
        for c in (c for c in cells if (c.lengths, c.mask) == (lengths, mask)):
            if c.num_batches == 0:
                lines.append(f"{c.cp:>4} {c.strategy:<8} {'n/a: a document is longer than a rank':>50}")
                continue
            lines.append(
                f"{c.cp:>4} {c.strategy:<8} {c.imb_time:>8.3f} {c.imb_pairs:>8.3f} {c.imb_tokens:>7.3f} "
                f"{c.pad_frac * 100:>6.2f} {c.recv_mean_mb:>8.1f} {c.comm_vs_ring:>7.3f} {c.step_ms:>9.2f} "
                f"{c.speedup_vs_ring:>7.2f} {c.step_vs_fcp:>6.2f} {c.mfu * 100:>6.1f} {c.plan_ms:>7.1f}"
            )
    return "\n".join(lines)
