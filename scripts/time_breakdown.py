"""Where the modeled step time goes, per strategy, CP size and shipped length mix (causal mask by default).

    .venv/bin/python scripts/time_breakdown.py                 # docs/time_breakdown.md and docs/time_breakdown.png

Each cell: the mean over --num-batches packed micro-batches of megatron_fcp.sim.breakdown.step_breakdown (parts
of the step in percent: useful work at peak = MFU, kernel below peak on long segments, edge tiles, per-row
kernel overhead, launches, exposed NVLink and InfiniBand communication, waiting for the slowest rank), with the
hardware profile named by --hardware (default: H100 with FlashAttention-2 laws fitted to published figures).
Above one node of the profile (``gpus_per_node`` consecutive ranks each) the point-to-point plans run the
node-aware exchange the runtime runs there (megatron_fcp.planner.relay, node rings). Modeled, not measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from megatron_fcp.data.lengths import SHIPPED, load_distribution, pack_batches
from megatron_fcp.errors import InputError
from megatron_fcp.planner.api import make_plan
from megatron_fcp.sim.breakdown import PARTS, step_breakdown
from megatron_fcp.sim.model import load_hardware, node_layout

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("fcp", "ring", "hybrid", "magi")
LABELS = {"useful": "useful (MFU)", "kernel_ceiling": "kernel below peak", "edge_tiles": "edge tiles",
          "row_overhead": "per-row kernel cost", "launches": "launches", "exposed_nvlink": "exposed NVLink",
          "exposed_ib": "exposed InfiniBand", "wait_slowest": "waiting for slowest rank"}


def run(lengths, cps, mask, hardware, tokens_per_rank, num_batches, seed, progress=print) -> list[dict]:
    hw = load_hardware(hardware)
    rows = []
    for name in lengths:
        dist = load_distribution(name)
        for cp in cps:
            batches = pack_batches(dist, cp * tokens_per_rank, num_batches, seed)
            layout = node_layout(cp, hw)
            for strategy in STRATEGIES:
                start, parts = time.perf_counter(), []
                for batch in batches:
                    try:
                        plan = make_plan(batch, cp, tokens_per_rank, mask, strategy, cp_node=layout)
                        parts.append(step_breakdown(plan, hw))
                    except InputError:
                        break
                if len(parts) < len(batches):
                    continue
                mean = {k: float(np.mean([p[k] for p in parts])) for k in (*PARTS, "step_s")}
                share = {k: float(np.mean([p[k] / p["step_s"] for p in parts])) for k in PARTS}
                rows.append({"lengths": name, "cp": cp, "mask": mask, "strategy": strategy, "step_ms":
                             1e3 * mean["step_s"], "share": share})
                progress(f"{name} cp={cp} {strategy}: step {1e3 * mean['step_s']:.2f} ms, MFU "
                         f"{100 * share['useful']:.1f}% ({time.perf_counter() - start:.1f} s)")
    return rows


def markdown(rows: list[dict], hardware: str, command: str) -> str:
    head = ["# Where the step time goes (modeled)", "",
            f"Command: `{command}`. Hardware profile `{hardware}`. Percent of the step time (the slowest rank's), "
            "averaged over ranks and micro-batches; the parts add up to 100 (megatron_fcp/sim/breakdown.py says "
            "how each is measured on the model). Above one node of the profile the point-to-point plans (fcp, "
            "magi) run the node-aware exchange the runtime runs there (node rings, the round-after relay). "
            "Modeled, not measured.", ""]
    cols = " | ".join(LABELS[p] for p in PARTS)
    lines = []
    for name in dict.fromkeys(r["lengths"] for r in rows):
        lines += [f"## {name}", "", f"| cp | strategy | step ms | {cols} |", "|" + "---|" * (3 + len(PARTS))]
        for r in (r for r in rows if r["lengths"] == name):
            cells = " | ".join(f"{100 * r['share'][p]:.1f}" for p in PARTS)
            lines.append(f"| {r['cp']} | {r['strategy']} | {r['step_ms']:.2f} | {cells} |")
        lines.append("")
    return "\n".join(head + lines)


def plot(rows: list[dict], path: Path, hardware: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["lengths"] for r in rows))
    fig, axes = plt.subplots(len(names), 1, figsize=(14, 3.2 * len(names)), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, name in zip(axes[:, 0], names, strict=True):
        cells = [r for r in rows if r["lengths"] == name]
        x = np.arange(len(cells))
        bottom = np.zeros(len(cells))
        for i, part in enumerate(PARTS):
            values = np.array([100 * r["share"][part] for r in cells])
            ax.bar(x, values, bottom=bottom, color=colors[i], label=LABELS[part], width=0.8)
            bottom += values
        ax.set_xticks(x, [f"{r['strategy']}\n{r['cp']}" for r in cells], fontsize=7)
        ax.set_ylabel("% of step")
        ax.set_ylim(0, 100)
        ax.set_title(f"{name}, {cells[0]['mask']} mask: step time by part (modeled, {hardware})", fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, ncol=len(PARTS), fontsize=7, loc="upper center")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default=",".join(SHIPPED))
    p.add_argument("--cp", default="8,16,32,64,128,256")
    p.add_argument("--mask", default="causal", choices=("causal", "full"))
    p.add_argument("--hardware", default="h100_node_fa2_published")
    p.add_argument("--tokens-per-rank", type=int, default=16384)
    p.add_argument("--num-batches", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "docs/time_breakdown"), help="path prefix of the .md/.json/.png")
    args = p.parse_args(argv)
    rows = run(args.lengths.split(","), [int(c) for c in args.cp.split(",")], args.mask, args.hardware,
               args.tokens_per_rank, args.num_batches, args.seed)
    out = Path(args.out)
    command = "python scripts/time_breakdown.py" + ("" if argv is None else " " + " ".join(argv))
    out.with_suffix(".md").write_text(markdown(rows, args.hardware, command) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"hardware": args.hardware, "rows": rows}, indent=1) + "\n")
    plot(rows, out.with_suffix(".png"), args.hardware)
    print(f"wrote {out}.md, .json, .png")


if __name__ == "__main__":
    main()
