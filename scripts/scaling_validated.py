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
Ulysses all-to-alls inside each node of 8, FCP's staged exchange between nodes on node-sized ranks).
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
"""Strategy names of :mod:`megatron_fcp.sim.published`, FCP's two node exchanges first (``fcp``: ``p2p``, the
default; ``fcp_heads``: ``--fcp-node-exchange heads``)."""
FCP_SETTINGS = ("fcp", "fcp_heads")
"""FCP's rows: one per ``--fcp-node-exchange`` setting. ``FCP`` in the summaries is the better of them per cell (the
setting a run of that mix and CP size would pick); the other strategies are compared with it."""
TIE = 1e-9
"""Relative difference below which two steps count as equal (the same computation: FCP's heads setting on one node
is Ulysses, which USP also is there)."""
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
    if details:  # FCP's communication, means over the batches; its steps and MFU per batch
        row.update({key: float(np.mean([d[key] for d in details])) for key in ("ib_mb_max", "ib_mb_mean",
                                                                                "exposed_ms")})
        row["relayed_grad_x"] = float(np.max([d["relayed_grad_x"] for d in details]))
        row["batch_step_ms"] = [1e3 * (f + b) for f, b in zip(fwd, bwd, strict=True)]
        row["batch_mfu"] = mfu
    return row


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
            return list(pool.map(_cell, work))
    return [_cell(w) for w in work]


def step_ms(rows: list[dict]) -> dict[tuple, dict[str, float]]:
    """Per cell ``(lengths, mask, cp)``: each strategy's step (forward + backward of the slowest rank), ms."""
    step: dict[tuple, dict[str, float]] = {}
    for r in rows:
        step.setdefault((r["lengths"], r["mask"], r["cp"]), {})[r["strategy"]] = r["fwd_ms"] + r["bwd_ms"]
    return step


def fastest(times: dict[str, float]) -> str:
    return min(times, key=times.get)


def fcp_setting(times: dict[str, float]) -> str:
    """FCP's better setting in a cell (:data:`FCP_SETTINGS`, the default where only it was run)."""
    return min((s for s in FCP_SETTINGS if s in times), key=times.get)


def versus_others(times: dict[str, float]) -> tuple[str, float]:
    """FCP's better setting's step over the fastest other strategy's, and that strategy."""
    others = {s: t for s, t in times.items() if s not in FCP_SETTINGS}
    best = fastest(others)
    return best, times[fcp_setting(times)] / others[best]


def scaling_summary(rows: list[dict]) -> list[dict]:
    """Per mix and mask: FCP's MFU at the largest CP over its MFU at the smallest, per setting and for the better
    setting per cell (``fcp_mfu_ratio``; better: the shorter mean step, as the strategies are ranked), against the
    target, and in how many CPs FCP (its better setting) has a
    shorter step than every other strategy, and in how many the same as the fastest of them (:data:`TIE`)."""
    step, out = step_ms(rows), []
    for name in dict.fromkeys(r["lengths"] for r in rows):
        for mask in dict.fromkeys(r["mask"] for r in rows):
            mfu = {(r["strategy"], r["cp"]): r["mfu"] for r in rows if (r["lengths"], r["mask"]) == (name, mask)}
            cps = sorted(cp for s, cp in mfu if s == "fcp")
            settings = {cp: fcp_setting(step[name, mask, cp]) for cp in cps}  # by step, as FCP is compared
            best = {cp: mfu[settings[cp], cp] for cp in cps}
            ratios = [versus_others(step[name, mask, cp])[1] for cp in cps]
            row = {"lengths": name, "mask": mask, "first_cp": cps[0], "last_cp": cps[-1],
                   "fcp_mfu_ratio": best[cps[-1]] / best[cps[0]], "target": SCALING_TARGET.get(name),
                   "settings": [settings[cp] for cp in cps],
                   "fcp_fastest_cells": sum(r < 1.0 - TIE for r in ratios),
                   "fcp_tied_cells": sum(abs(r - 1.0) <= TIE for r in ratios), "cells": len(cps)}
            for s, key in zip(FCP_SETTINGS, ("p2p_mfu_ratio", "heads_mfu_ratio"), strict=True):
                if all((s, cp) in mfu for cp in cps):
                    row[key] = mfu[s, cps[-1]] / mfu[s, cps[0]]
            out.append(row)
    return out


def not_fastest(rows: list[dict]) -> list[dict]:
    """The cells where FCP (its better setting) is not faster than every other strategy: the fastest other one and
    FCP's step over its (1.000 within :data:`TIE`: the same step)."""
    out = []
    for (name, mask, cp), times in step_ms(rows).items():
        best, ratio = versus_others(times)
        if ratio >= 1.0 - TIE:
            out.append({"lengths": name, "mask": mask, "cp": cp, "fastest": best, "fcp_over_fastest": ratio,
                        "fcp_setting": fcp_setting(times)})
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
             "FCP runs one of two node exchanges, set per run (`--fcp-node-exchange`): `fcp` = `p2p` (the default: "
             "the staged point-to-point exchange between CP ranks, node rings and relays) and `fcp_heads` = `heads` "
             "(heads split inside each node by all-to-alls, the staged exchange between nodes; on one node it is "
             "Ulysses). `FCP` below is the better of the two per cell (the setting a run of that mix and CP size "
             "would take; `p`/`h` per CP from the first), compared with every other strategy.", "",
             "| mix | mask | FCP MFU at last CP / first CP | p2p alone | heads alone | target (scaling issue) "
             "| setting per CP | FCP faster than all others in | as fast as the fastest in |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        target = "-" if s["target"] is None else f"{s['target']:.2f}"
        alone = [f"{s[k]:.2f}" if k in s else "-" for k in ("p2p_mfu_ratio", "heads_mfu_ratio")]
        lines.append(f"| {s['lengths']} | {s['mask']} | {s['fcp_mfu_ratio']:.2f} (CP {s['last_cp']} / "
                     f"{s['first_cp']}) | {alone[0]} | {alone[1]} | {target} | "
                     f"{''.join('h' if x == 'fcp_heads' else 'p' for x in s['settings'])} | "
                     f"{s['fcp_fastest_cells']} of {s['cells']} CPs | {s['fcp_tied_cells']} |")
    losses, step = not_fastest(rows), step_ms(rows)
    num_cells = len({(r["lengths"], r["mask"], r["cp"]) for r in rows})
    lines += ["", f"## Cells where FCP is not faster than every other strategy: {len(losses)} of {num_cells}", ""]
    if losses:
        lines += ["| mix | mask | cp | fastest other | FCP step / its step | FCP setting |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {c['lengths']} | {c['mask']} | {c['cp']} | {c['fastest']} | {c['fcp_over_fastest']:.3f} | "
                  f"{c['fcp_setting']} |" for c in losses]
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
    lines += [f"| {r['lengths']} | {r['mask']} | {r['cp']} | {'heads' if r['strategy'] == 'fcp_heads' else 'p2p'} "
              f"| {r['fwd_ms'] + r['bwd_ms']:.1f} | {r['exposed_ms']:.1f} | {r['ib_mb_max']:.0f} | "
              f"{r['ib_mb_mean']:.0f} | {r['relayed_grad_x']:.2f} |" for r in fcp_rows]
    for name in dict.fromkeys(r["lengths"] for r in rows):
        for mask in dict.fromkeys(r["mask"] for r in rows):
            cell = {(r["strategy"], r["cp"]): r for r in rows if (r["lengths"], r["mask"]) == (name, mask)}
            cps = sorted({cp for _, cp in cell})
            lines += ["", f"## {name}, {mask}: MFU % (step ms = forward + backward of the slowest rank)", "",
                      "| cp | " + " | ".join(STRATEGIES) + " | fastest |", "|---" * (len(STRATEGIES) + 2) + "|"]
            for cp in cps:
                here = {s: cell[(s, cp)] for s in STRATEGIES if (s, cp) in cell}
                cells = [f"{100 * here[s]['mfu']:.1f} ({here[s]['fwd_ms'] + here[s]['bwd_ms']:.1f})" if s in here
                         else "n/a" for s in STRATEGIES]
                lines.append(f"| {cp} | " + " | ".join(cells) + f" | {fastest(step[name, mask, cp])} |")
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
            for k, strategy in enumerate(STRATEGIES):
                sel = sorted((r for r in rows if (r["lengths"], r["mask"], r["strategy"]) == (name, mask, strategy)),
                             key=lambda r: r["cp"])
                ax.plot([r["cp"] for r in sel], [100 * r["mfu"] for r in sel], "-o", color=f"C{k}", markersize=3,
                        label=strategy, linewidth=2.5 if strategy in FCP_SETTINGS else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{name}, {mask}", fontsize=10)
            ax.set_xlabel("CP size")
            ax.set_ylabel("attention MFU % (modeled)")
            ax.grid(True, alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, ncol=len(STRATEGIES), fontsize=8, loc="lower center")
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
                             STRATEGIES.index(r["strategy"])))
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
