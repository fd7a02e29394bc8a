"""The project's scaling table (attention MFU per strategy, CP 8 to 256, the shipped mixes, causal and full) with the
model that was checked against MagiAttention's published H100 benchmark. Modeled, not measured.

    .venv/bin/python scripts/scaling_validated.py                  # docs/scaling_validated.{md,json,png}
    .venv/bin/python scripts/scaling_validated.py --small --out-dir out   # the CI case (CP 8 and 16, one batch)

Model: the strategies of megatron_fcp/sim/published.py with their added costs (``published.Extras``: partial-output
merging and gradient accumulation, the SMs that NCCL kernels hold while they overlap attention, rendezvous, host
issue rate; docs/model_vs_published.md) on the hardware profile ``h100_node_fa3_published`` (H100 nodes of 8,
NVLink and one 400 Gb/s NIC per GPU, FA3 kernel laws fitted to published figures, the layer of Llama-3 70B: GQA
64:8, head dim 128, bf16). The batches: --num-batches packed micro-batches of CP x --tokens-per-rank tokens per
mix (``data.lengths.pack_batches``, seed 0 or --seed), the same batches for every strategy. Each cell: MFU = the
exact pairs' FLOPs (forward 4 x pairs x heads x head dim, backward 2.5 times that) over (CP x peak x (forward +
backward seconds of the slowest rank, each pass's slowest apart)), mean over the batches. FCP above 8 ranks: the
node-aware exchange the runtime runs on nodes of 8 (``planner.relay``: a key/value taken from a node-mate that
holds it in the round before, gradients summed in a node-mate's next stage; ``planner.node_ring``: a document that
a node receives from two or more other nodes staged as a ring over its receivers there, so each of its key/values
crosses into the node once). ``fcp_heads``: FCP under ``--fcp-node-exchange heads`` (``published.fcp_head_parallel``:
Ulysses all-to-alls inside each node of 8, FCP's staged exchange between nodes on node-sized ranks). ``fcp_auto``:
FCP under ``--fcp-node-exchange auto``, which runs each micro-batch under the one of the two whose modeled step is
shorter (``megatron.batch.plan_micro_batch``; p2p on a tie): per batch the shorter of the two rows' steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from megatron_fcp.data.lengths import SHIPPED, load_distribution, pack_batches
from megatron_fcp.sim import published as P
from megatron_fcp.sim.model import HardwareProfile, load_hardware

REPO = Path(__file__).resolve().parents[1]
HARDWARE = "h100_node_fa3_published"
STRATEGIES = ("fcp", "fcp_heads", "magi_attn-native", "magi_attn-a2av", "hybrid_dcp", "usp", "ulysses",
              "ring_allgather", "ring_p2p")
"""Strategy names of :mod:`megatron_fcp.sim.published` modeled per cell, FCP's two node exchanges first (``fcp``:
``p2p``, the default; ``fcp_heads``: ``--fcp-node-exchange heads``)."""
AUTO = "fcp_auto"
"""FCP under ``--fcp-node-exchange auto``: per batch the shorter of the ``fcp`` and ``fcp_heads`` steps (p2p on a
tie), as the data hook picks it (:func:`auto_rows`). ``FCP`` in the summaries; the other strategies are compared with
it."""
FCP_SETTINGS = ("fcp", "fcp_heads", AUTO)
"""FCP's rows: one per ``--fcp-node-exchange`` setting."""
TABLE = (AUTO, *STRATEGIES)
"""The columns of the per-mix tables."""
TIE = 1e-9
"""Relative difference below which two steps count as equal."""
CPS = (8, 16, 32, 64, 128, 256)
MASKS = ("causal", "full")
SCALING_TARGET = {"linux_files": 0.90, "magi_hist": 0.90, "spamassassin": 0.85, "linux_dirs": 0.85}
"""The scaling issue's targets: FCP's MFU at CP 256 over its MFU at CP 8, per mix (both masks)."""


def exact_flops(lens: np.ndarray, mask: str, hw: HardwareProfile) -> float:
    """FLOPs of the exact attention pairs of documents ``lens``, forward plus backward."""
    lens = np.asarray(lens, np.float64)
    pairs = float((lens * (lens + 1) / 2).sum() if mask == "causal" else (lens * lens).sum())
    return pairs * hw.fwd_flops_per_pair * (1.0 + hw.bwd_flops_factor)


def applies(strategy: str, cp: int, hw: HardwareProfile) -> bool:
    """Ulysses splits the query heads over the ranks: at most one rank per query head."""
    return strategy != "ulysses" or cp <= hw.num_heads


def _cell(args) -> dict:
    """(lengths, mask, cp, strategy, batches, tokens_per_rank, hop) -> the cell's figures, means over the batches
    (``hop``: FCP with the same-round hop, a design the runtime does not run)."""
    name, mask, cp, strategy, batches, tokens_per_rank, hop = args
    hw, extras = load_hardware(HARDWARE), P.Extras()
    fwd, bwd, mfu, details = [], [], [], []
    for lens in batches:
        if strategy == "fcp":  # its step and what the step spends on communication, from one model run
            details.append(P.fcp_details(hw, extras, lens, cp, mask, tokens_per_rank, hop))
            seconds = details[-1]
        elif strategy == "fcp_heads":
            details.append(P.fcp_head_parallel_details(hw, extras, lens, cp, mask, tokens_per_rank))
            seconds = details[-1]
        else:
            seconds = P.strategy_seconds(strategy, hw, extras, lens, cp, mask, tokens_per_rank)
        step = float(seconds["fwd"] + seconds["bwd"])
        fwd.append(float(seconds["fwd"]))
        bwd.append(float(seconds["bwd"]))
        mfu.append(exact_flops(lens, mask, hw) / (cp * hw.peak_bf16_dense_tflops * 1e12 * step))
    row = {"lengths": name, "mask": mask, "cp": cp, "strategy": strategy, "fwd_ms": 1e3 * float(np.mean(fwd)),
           "bwd_ms": 1e3 * float(np.mean(bwd)), "mfu": float(np.mean(mfu)), "batches": len(batches)}
    if details:  # FCP's communication, means over the batches; its steps, MFU and communication per batch
        row.update({key: float(np.mean([d[key] for d in details])) for key in COMM})
        row["relayed_grad_x"] = float(np.max([d["relayed_grad_x"] for d in details]))
        row["batch_fwd_ms"] = [1e3 * f for f in fwd]
        row["batch_step_ms"] = [1e3 * (f + b) for f, b in zip(fwd, bwd, strict=True)]
        row["batch_mfu"] = mfu
        row["batch_comm"] = [{key: d[key] for key in (*COMM, "relayed_grad_x")} for d in details]
    return row


COMM = ("ib_mb_max", "ib_mb_mean", "exposed_ms")
"""FCP's communication figures per row (means over the batches)."""


def auto_rows(rows: list[dict]) -> list[dict]:
    """Per cell with both FCP rows, the ``fcp_auto`` row: each batch under the setting with the shorter step (p2p on
    a tie, as ``megatron.batch.plan_micro_batch`` picks), its figures the means of the picked batches' (the relayed
    gradients: their most); ``heads_batches``: the batches that took ``heads``."""
    by_cell = {(r["lengths"], r["mask"], r["cp"], r["strategy"]): r for r in rows}
    out = []
    for (name, mask, cp, strategy), p2p in by_cell.items():
        heads = by_cell.get((name, mask, cp, "fcp_heads"))
        if strategy != "fcp" or heads is None:
            continue
        picked = [h if h["step"] < p["step"] else p
                  for p, h in zip(_batches(p2p), _batches(heads), strict=True)]
        fwd = [b["fwd"] for b in picked]
        step = [b["step"] for b in picked]
        comm = [b["comm"] for b in picked]
        out.append({"lengths": name, "mask": mask, "cp": cp, "strategy": AUTO, "fwd_ms": float(np.mean(fwd)),
                    "bwd_ms": float(np.mean(step) - np.mean(fwd)), "mfu": float(np.mean([b["mfu"] for b in picked])),
                    "batches": len(picked), "heads_batches": sum(b["heads"] for b in picked),
                    **{key: float(np.mean([c[key] for c in comm])) for key in COMM},
                    "relayed_grad_x": float(np.max([c["relayed_grad_x"] for c in comm])),
                    "batch_fwd_ms": fwd, "batch_step_ms": step, "batch_mfu": [b["mfu"] for b in picked],
                    "batch_comm": comm})
    return out


def _batches(row: dict) -> list[dict]:
    return [{"fwd": f, "step": t, "mfu": m, "comm": c, "heads": row["strategy"] == "fcp_heads"}
            for f, t, m, c in zip(row["batch_fwd_ms"], row["batch_step_ms"], row["batch_mfu"], row["batch_comm"],
                                  strict=True)]


def run(lengths, cps, masks, num_batches: int, tokens_per_rank: int, jobs: int, hop: bool = False, seed: int = 0
        ) -> list[dict]:
    hw = load_hardware(HARDWARE)
    work = []
    for name in lengths:
        dist = load_distribution(name)
        for cp in cps:
            batches = pack_batches(dist, cp * tokens_per_rank, num_batches, seed=seed)
            work += [(name, mask, cp, s, batches, tokens_per_rank, hop) for mask in masks for s in STRATEGIES
                     if applies(s, cp, hw)]
    work.sort(key=lambda w: -w[2])  # the large cells first
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            rows = list(pool.map(_cell, work))
    else:
        rows = [_cell(w) for w in work]
    return rows + auto_rows(rows)


def step_ms(rows: list[dict]) -> dict[tuple, dict[str, float]]:
    """Per cell ``(lengths, mask, cp)``: each strategy's step (forward + backward of the slowest rank), ms."""
    step: dict[tuple, dict[str, float]] = {}
    for r in rows:
        step.setdefault((r["lengths"], r["mask"], r["cp"]), {})[r["strategy"]] = r["fwd_ms"] + r["bwd_ms"]
    return step


def fastest(times: dict[str, float]) -> str:
    return min(times, key=times.get)


def fcp_step(times: dict[str, float]) -> float:
    """FCP's step in a cell: ``fcp_auto``'s (the shorter setting's where only the two were run)."""
    return times[AUTO] if AUTO in times else min(times[s] for s in FCP_SETTINGS if s in times)


def versus_others(times: dict[str, float]) -> tuple[str, float]:
    """FCP's step over the fastest other strategy's, and that strategy."""
    others = {s: t for s, t in times.items() if s not in FCP_SETTINGS}
    best = fastest(others)
    return best, fcp_step(times) / others[best]


def scaling_summary(rows: list[dict]) -> list[dict]:
    """Per mix and mask: FCP's (``fcp_auto``'s) MFU at the largest CP over its MFU at the smallest, and each setting's
    own ratio beside it, against the target; per CP the batches that ran ``heads``; and in how many CPs FCP has a
    shorter step than every other strategy, and in how many the same as the fastest of them (:data:`TIE`)."""
    step, out = step_ms(rows), []
    for name in dict.fromkeys(r["lengths"] for r in rows):
        for mask in dict.fromkeys(r["mask"] for r in rows):
            here = [r for r in rows if (r["lengths"], r["mask"]) == (name, mask)]
            mfu = {(r["strategy"], r["cp"]): r["mfu"] for r in here}
            auto = {r["cp"]: r for r in here if r["strategy"] == AUTO}
            cps = sorted(auto)
            ratios = [versus_others(step[name, mask, cp])[1] for cp in cps]
            row = {"lengths": name, "mask": mask, "first_cp": cps[0], "last_cp": cps[-1],
                   "fcp_mfu_ratio": mfu[AUTO, cps[-1]] / mfu[AUTO, cps[0]], "target": SCALING_TARGET.get(name),
                   "heads_batches": [auto[cp]["heads_batches"] for cp in cps], "batches": auto[cps[0]]["batches"],
                   "fcp_fastest_cells": sum(r < 1.0 - TIE for r in ratios),
                   "fcp_tied_cells": sum(abs(r - 1.0) <= TIE for r in ratios), "cells": len(cps)}
            for s, key in (("fcp", "p2p_mfu_ratio"), ("fcp_heads", "heads_mfu_ratio")):
                row[key] = mfu[s, cps[-1]] / mfu[s, cps[0]]
            out.append(row)
    return out


def not_fastest(rows: list[dict]) -> list[dict]:
    """The cells where FCP (``fcp_auto``) is not faster than every other strategy: the fastest other one and FCP's
    step over its (1.000 within :data:`TIE`: the same step)."""
    out = []
    for (name, mask, cp), times in step_ms(rows).items():
        best, ratio = versus_others(times)
        if ratio >= 1.0 - TIE:
            out.append({"lengths": name, "mask": mask, "cp": cp, "fastest": best, "fcp_over_fastest": ratio})
    return sorted(out, key=lambda c: -c["fcp_over_fastest"])


def markdown(rows: list[dict], summary: list[dict], command: str, elapsed: float, num_batches: int,
             tokens_per_rank: int, seed: int = 0) -> str:
    lines = ["# Scaling with the validated model (modeled)", "",
             f"Command: `{command}` ({elapsed:.0f} s on this project's 2-core CPU machine). Modeled, not measured.",
             "", __doc__.split("\n\n", 2)[2].strip(), "",
             f"{num_batches} batch(es) per cell (seed {seed}), {tokens_per_rank} tokens per rank. MFU in percent; "
             "`n/a`: the "
             "strategy does not apply (Ulysses above 64 ranks: one query head per rank at most).", "",
             "## FCP's scaling and rank", "",
             "FCP has two node exchanges (`--fcp-node-exchange`): `fcp` = `p2p` (the default: the staged "
             "point-to-point exchange between CP ranks, node rings and relays) and `fcp_heads` = `heads` (heads "
             "split inside each node by all-to-alls, the staged exchange between nodes; on one node: Ulysses' "
             "all-to-alls around FCP's own call). `FCP` below is `fcp_auto` = `auto`, which runs each micro-batch "
             "under the one whose modeled step is shorter; the column `heads batches` counts, per CP from the "
             "first, the batches that took `heads`. Compared with every other strategy.", "",
             "| mix | mask | FCP MFU at last CP / first CP | p2p alone | heads alone | target (scaling issue) "
             "| heads batches per CP | FCP faster than all others in | as fast as the fastest in |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        target = "-" if s["target"] is None else f"{s['target']:.2f}"
        lines.append(f"| {s['lengths']} | {s['mask']} | {s['fcp_mfu_ratio']:.2f} (CP {s['last_cp']} / "
                     f"{s['first_cp']}) | {s['p2p_mfu_ratio']:.2f} | {s['heads_mfu_ratio']:.2f} | {target} | "
                     f"{' '.join(str(n) for n in s['heads_batches'])} of {s['batches']} | "
                     f"{s['fcp_fastest_cells']} of {s['cells']} CPs | {s['fcp_tied_cells']} |")
    losses, step = not_fastest(rows), step_ms(rows)
    num_cells = len({(r["lengths"], r["mask"], r["cp"]) for r in rows})
    lines += ["", f"## Cells where FCP is not faster than every other strategy: {len(losses)} of {num_cells}", ""]
    if losses:
        lines += ["| mix | mask | cp | fastest other | FCP step / its step |", "|---|---|---|---|---|"]
        lines += [f"| {c['lengths']} | {c['mask']} | {c['cp']} | {c['fastest']} | {c['fcp_over_fastest']:.3f} |"
                  for c in losses]
    closest = sorted(((versus_others(t)[1], cell, versus_others(t)[0]) for cell, t in step.items()), reverse=True)
    lines += ["", "The closest cells (FCP's step over the fastest other strategy's):", "",
              "| mix | mask | cp | fastest other | FCP step / its step |", "|---|---|---|---|---|"]
    lines += [f"| {cell[0]} | {cell[1]} | {cell[2]} | {best} | {ratio:.3f} |" for ratio, cell, best in closest[:8]]
    fcp_rows = [r for r in rows if r["strategy"] in FCP_SETTINGS]
    lines += ["", "## FCP's communication", "",
              "InfiniBand MB a GPU receives per step (key/values forward and again in backward, and gradients; the "
              "most over the GPUs, and the mean) and exposed communication: the step minus the same step with every "
              "transfer free (ms), beside the step (ms). Means over the batches; the last column: the most "
              "node-mates' partial gradients one rank receives in a backward round (the only buffer the node-aware "
              "exchange adds), over its own key/values, the most over the batches. Under `heads` a GPU receives its "
              "head shard of what its node receives, and the all-to-alls count as communication too.", "",
              "| mix | mask | cp | setting | step ms | exposed ms | IB MB per GPU, max | IB MB per GPU, mean | relayed "
              "gradients / own |",
              "|---|---|---|---|---|---|---|---|---|"]
    names = {"fcp": "p2p", "fcp_heads": "heads", AUTO: "auto"}
    lines += [f"| {r['lengths']} | {r['mask']} | {r['cp']} | {names[r['strategy']]} "
              f"| {r['fwd_ms'] + r['bwd_ms']:.1f} | {r['exposed_ms']:.1f} | {r['ib_mb_max']:.0f} | "
              f"{r['ib_mb_mean']:.0f} | {r['relayed_grad_x']:.2f} |" for r in fcp_rows]
    for name in dict.fromkeys(r["lengths"] for r in rows):
        for mask in dict.fromkeys(r["mask"] for r in rows):
            cell = {(r["strategy"], r["cp"]): r for r in rows if (r["lengths"], r["mask"]) == (name, mask)}
            cps = sorted({cp for _, cp in cell})
            lines += ["", f"## {name}, {mask}: MFU % (step ms = forward + backward of the slowest rank)", "",
                      "| cp | " + " | ".join(TABLE) + " | fastest other |", "|---" * (len(TABLE) + 2) + "|"]
            for cp in cps:
                here = {s: cell[(s, cp)] for s in TABLE if (s, cp) in cell}
                cells = [f"{100 * here[s]['mfu']:.1f} ({here[s]['fwd_ms'] + here[s]['bwd_ms']:.1f})" if s in here
                         else "n/a" for s in TABLE]
                lines.append(f"| {cp} | " + " | ".join(cells) + f" | {versus_others(step[name, mask, cp])[0]} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, masks = list(dict.fromkeys(r["lengths"] for r in rows)), list(dict.fromkeys(r["mask"] for r in rows))
    fig, axes = plt.subplots(len(masks), len(names), figsize=(5 * len(names), 4 * len(masks)), squeeze=False)
    for i, mask in enumerate(masks):
        for j, name in enumerate(names):
            ax = axes[i, j]
            for k, strategy in enumerate(TABLE):
                sel = sorted((r for r in rows if (r["lengths"], r["mask"], r["strategy"]) == (name, mask, strategy)),
                             key=lambda r: r["cp"])
                ax.plot([r["cp"] for r in sel], [100 * r["mfu"] for r in sel], "-o", color=f"C{k}", markersize=3,
                        label=strategy, linewidth=2.5 if strategy == AUTO else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{name}, {mask}", fontsize=10)
            ax.set_xlabel("CP size")
            ax.set_ylabel("attention MFU % (modeled)")
            ax.grid(True, alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, ncol=len(TABLE), fontsize=8, loc="lower center")
    fig.suptitle(f"Modeled attention MFU per strategy ({HARDWARE}, published.Extras)", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=str(REPO / "docs"))
    p.add_argument("--lengths", default=",".join(SHIPPED))
    p.add_argument("--cp", default=",".join(map(str, CPS)))
    p.add_argument("--num-batches", type=int, default=2)
    p.add_argument("--tokens-per-rank", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the packed batches (the committed table: 0; others check it on batches it never saw)")
    p.add_argument("--small", action="store_true", help="the CI case: CP 8 and 16, one batch, no plot")
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--same-round-hop", action="store_true",
                   help="FCP with the same-round hop as well (docs/node_aware_exchange.md step 5: a design the "
                        "runtime does not run; write it to another --out-dir)")
    args = p.parse_args(argv)
    if args.small:
        args.cp, args.num_batches = "8,16", 1
    lengths = [name.strip() for name in args.lengths.split(",")]
    unknown = [name for name in lengths if name not in SHIPPED]
    if unknown:
        p.error(f"--lengths: unknown mix {unknown[0]!r}; choose from {', '.join(SHIPPED)}")
    cps = [int(c) for c in args.cp.split(",")]
    started = time.perf_counter()
    rows = run(lengths, cps, MASKS, args.num_batches, args.tokens_per_rank, args.jobs, args.same_round_hop, args.seed)
    rows.sort(key=lambda r: (lengths.index(r["lengths"]), MASKS.index(r["mask"]), r["cp"],
                             TABLE.index(r["strategy"])))
    summary = scaling_summary(rows)
    elapsed = time.perf_counter() - started
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python scripts/scaling_validated.py", *(sys.argv[1:] if argv is None else argv)])
    (out / "scaling_validated.json").write_text(json.dumps({"hardware": HARDWARE, "rows": rows, "summary": summary,
                                                            "not_fastest": not_fastest(rows)}, indent=1) + "\n")
    (out / "scaling_validated.md").write_text(markdown(rows, summary, command, elapsed, args.num_batches,
                                                       args.tokens_per_rank, args.seed) + "\n")
    if not args.small:
        plot(rows, out / "scaling_validated.png")
    print(f"wrote {out}/scaling_validated.md, .json{'' if args.small else ', .png'} in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
