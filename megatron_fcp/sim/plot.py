"""PNG figures of a simulation: per-rank load of one batch, and scaling curves over CP sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_fcp.planner.api import make_plan
from megatron_fcp.sim.model import HardwareProfile, evaluate
from megatron_fcp.sim.simulate import Cell


def plot_simulation(cells: list[Cell], batch: np.ndarray, cp: int, tokens_per_rank: int, hw: HardwareProfile,
                    out: str | Path, title: str) -> Path:
    """Write a two-panel PNG: modeled per-rank attention time of ``batch`` per strategy, and MFU vs CP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(dict.fromkeys(c.strategy for c in cells))
    fig, (ax_bar, ax_scale) = plt.subplots(1, 2, figsize=(15, 5.2))
    _rank_bars(ax_bar, batch, cp, tokens_per_rank, strategies, hw)
    _scaling(ax_scale, cells, strategies)
    fig.suptitle(title + " (all times and MFU modeled)")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _rank_bars(ax, batch, cp, tokens_per_rank, strategies, hw) -> None:
    width = 0.8 / len(strategies)
    for k, strategy in enumerate(strategies):
        try:
            cost = evaluate(make_plan(batch, cp, tokens_per_rank, "causal", strategy), hw)
        except ValueError:
            continue
        label = f"{strategy} ({cost.step_time_s * 1e3:.1f} ms)"
        ax.bar(np.arange(cp) + k * width, cost.step_s * 1e3, width, label=label, color=f"C{k}")
    ax.set_xlabel("CP rank")
    ax.set_ylabel("modeled attention ms (fwd+bwd, one layer)")
    ax.set_title(f"per-rank load, one micro-batch, cp={cp}, causal")
    ax.legend(fontsize=8)


def _scaling(ax, cells, strategies) -> None:
    for k, strategy in enumerate(strategies):
        for mask, style in (("causal", "-o"), ("full", "--s")):
            sel = [c for c in cells if c.strategy == strategy and c.mask == mask and c.num_batches]
            if sel:
                ax.plot([c.cp for c in sel], [c.mfu * 100 for c in sel], style, color=f"C{k}",
                        label=f"{strategy} {mask}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("CP size")
    ax.set_ylabel("modeled attention MFU %")
    ax.set_title("scaling (mean over micro-batches)")
    ax.legend(fontsize=7, ncol=2)
