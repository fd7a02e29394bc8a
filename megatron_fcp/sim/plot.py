"""PNG figures of a simulation: per-rank load of one batch and scaling curves over CP sizes; key/value memory
per rank over CP sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.stages import DEFAULT_KV_BUDGET
from megatron_fcp.sim.model import HardwareProfile, evaluate, node_layout
from megatron_fcp.sim.simulate import Cell


def plot_simulation(cells: list[Cell], batch: np.ndarray, cp: int, tokens_per_rank: int, hw: HardwareProfile,
                    out: str | Path, title: str, kv_budget_tokens=DEFAULT_KV_BUDGET) -> Path:
    """Write a two-panel PNG: modeled per-rank attention time of ``batch`` per strategy, and MFU vs CP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(dict.fromkeys(c.strategy for c in cells))
    fig, (ax_bar, ax_scale) = plt.subplots(1, 2, figsize=(15, 5.2))
    _rank_bars(ax_bar, batch, cp, tokens_per_rank, strategies, hw, kv_budget_tokens)
    _scaling(ax_scale, cells, strategies)
    fig.suptitle(title + " (all times and MFU modeled)")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _rank_bars(ax, batch, cp, tokens_per_rank, strategies, hw, kv_budget_tokens) -> None:
    width = 0.8 / len(strategies)
    layout = node_layout(cp, hw)  # as the simulator plans
    for k, strategy in enumerate(strategies):
        try:
            plan = make_plan(batch, cp, tokens_per_rank, "causal", strategy, cp_node=layout)
            cost = evaluate(plan, hw, kv_budget_tokens)
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


def memory_plot_path(out: str | Path) -> Path:
    """Where :func:`plot_memory` goes next to the figure ``out``: ``X.png`` -> ``X_memory.png``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_memory{out.suffix or '.png'}")


_MEMORY_LINES = (("fcp", "peak_kv_x", "fcp (budget)"), ("fcp", "peak_kv_x_unbounded", "fcp unbounded"),
                 ("magi", "peak_kv_x", "magi (budget)"), ("hybrid", "peak_kv_x", "hybrid"),
                 ("ring", "peak_kv_x", "ring"))


def plot_memory(cells: list[Cell], out: str | Path, title: str) -> Path:
    """Write a PNG, one panel per length distribution: the largest remote key/values a rank holds at once (one
    layer, max over batches and ranks) as a multiple of its own, against CP size, per strategy and mask (log y);
    FCP under the budget and without one, and a line at 2x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    dists = list(dict.fromkeys(c.lengths for c in cells))
    ncols = min(len(dists), 2)
    nrows = -(-len(dists) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.2 * ncols, 4.6 * nrows), squeeze=False, sharey=True)
    present = {c.strategy for c in cells}
    for ax, dist in zip(axes.ravel(), dists, strict=False):
        for k, (strategy, field, label) in enumerate(_MEMORY_LINES):
            if strategy not in present:
                continue
            for mask, style in (("causal", "-o"), ("full", "--s")):
                sel = [c for c in cells if (c.lengths, c.strategy, c.mask) == (dist, strategy, mask) and c.num_batches
                       and getattr(c, field) > 0]
                if sel:  # strategies dodged sideways a little: several sit exactly at 2x
                    dodge = 2.0 ** (0.07 * (k - 2) + (0.025 if mask == "full" else -0.025))
                    ax.plot([c.cp * dodge for c in sel], [getattr(c, field) for c in sel], style, color=f"C{k}",
                            markersize=4, linewidth=1.2, label=f"{label} {mask}")
        ax.axhline(2.0, color="black", linewidth=0.8, linestyle=":", label="2x own")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("CP size")
        ax.set_ylabel("peak remote KV per rank / own KV")
        ax.set_title(dist)
        ax.grid(True, which="both", alpha=0.25)
    for ax in axes.ravel()[len(dists):]:
        ax.set_visible(False)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.suptitle(f"Remote key/values held at once per rank and layer, max over batches and ranks ({title}; modeled; "
                 "points dodged sideways)")
    fig.tight_layout(rect=(0, 0.07 if nrows > 1 else 0.12, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
