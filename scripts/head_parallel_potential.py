"""FCP's two node exchanges side by side, and what choosing between them per micro-batch would give, beside the scaling
table's strategies (modeled; docs/node_aware_exchange.md, "Head-parallel inside the node").

    .venv/bin/python scripts/head_parallel_potential.py      # docs/head_parallel_potential.md

``heads`` (``--fcp-node-exchange heads``, ``megatron_fcp.sim.published.fcp_head_parallel``): inside each node of 8
GPUs, Ulysses all-to-alls turn the node's 8 token shards into 8 head shards of all of the node's tokens; across
nodes, FCP plans node-sized ranks and runs its staged exchange on each head shard, GPU i of a node with GPU i of the
others. One node: plain Ulysses. ``p2p``: FCP's default exchange. The same model, profile and batches as
``scripts/scaling_validated.py`` (seed 0, 2 batches per cell, 16384 tokens per rank), whose strategies each cell
compares with. ``either``: per batch the shorter of FCP's step under p2p and under heads (a choice per micro-batch,
which the runtime does not make: it runs the setting of the run), mean over the batches.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling_validated import CPS, FCP_SETTINGS, HARDWARE, MASKS, REPO, SCALING_TARGET, exact_flops, run  # noqa: E402

from megatron_fcp.data.lengths import SHIPPED, load_distribution, pack_batches  # noqa: E402
from megatron_fcp.sim import published as P  # noqa: E402
from megatron_fcp.sim.model import load_hardware  # noqa: E402

TIE = 1e-9
"""Relative difference below which two steps count as equal (the same computation summed in another order)."""


def mode_cells(lengths, cps, num_batches: int, tokens_per_rank: int, seed: int = 0) -> dict[tuple, dict]:
    """Per cell ``(mix, mask, cp)``: per batch, FCP's step under p2p and under heads (seconds), and the batch's
    FLOPs."""
    hw, x = load_hardware(HARDWARE), P.Extras()
    out = {}
    for name in lengths:
        dist = load_distribution(name)
        for cp in cps:
            batches = pack_batches(dist, cp * tokens_per_rank, num_batches, seed=seed)
            for mask in MASKS:
                p2p, heads, flops = [], [], []
                for lens in batches:
                    t = P.strategy_seconds("fcp", hw, x, lens, cp, mask, tokens_per_rank)
                    d = P.fcp_head_parallel(hw, x, lens, cp, mask, tokens_per_rank)
                    p2p.append(t["fwd"] + t["bwd"])
                    heads.append(d["fwd"] + d["bwd"])
                    flops.append(exact_flops(lens, mask, hw))
                out[name, mask, cp] = {"p2p": p2p, "heads": heads, "flops": flops}
    return out


def table(rows: list[dict], cells: dict[tuple, dict], cps, command: str, elapsed: float) -> str:
    hw = load_hardware(HARDWARE)
    others: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["strategy"] not in FCP_SETTINGS:
            others.setdefault((r["lengths"], r["mask"], r["cp"]), {})[r["strategy"]] = r["fwd_ms"] + r["bwd_ms"]

    def mfu(seconds, cell, cp):
        return float(np.mean([f / (cp * hw.peak_bf16_dense_tflops * 1e12 * s)
                              for f, s in zip(cell["flops"], seconds, strict=True)]))

    lines = [
        "# FCP's node exchanges side by side: p2p, heads, and the better one per micro-batch (modeled)", "",
        f"Command: `{command}` ({elapsed:.0f} s on this project's 2-core CPU machine). Modeled, not measured. "
        "Profile `" + HARDWARE + "`, the model and batches of [scaling_validated.md](scaling_validated.md). `p2p`: "
        "FCP's default exchange (`--fcp-node-exchange p2p`, the scaling table's FCP); `heads`: "
        "`--fcp-node-exchange heads` (`megatron_fcp.sim.published.fcp_head_parallel`: Ulysses all-to-alls inside "
        "each node of 8, FCP's staged exchange across nodes on node-sized ranks, one head shard per GPU); `either`: "
        "per batch the shorter of the two, a choice per micro-batch the runtime does not make (it runs the "
        "setting of the run). Step = forward + backward of the slowest rank, ms, mean over the batches.", "",
        "| mix | mask | cp | FCP p2p | FCP heads | either | fastest other | its step | either / fastest other "
        "| MFU % either |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    wins = ties = 0
    for (name, mask, cp), cell in cells.items():
        p2p, heads = np.array(cell["p2p"]), np.array(cell["heads"])
        either = np.minimum(p2p, heads)
        best = min(others[name, mask, cp], key=others[name, mask, cp].get)
        best_ms = others[name, mask, cp][best]
        ratio = 1e3 * either.mean() / best_ms
        wins += ratio < 1.0 - TIE
        ties += abs(ratio - 1.0) <= TIE
        lines.append(f"| {name} | {mask} | {cp} | {1e3 * p2p.mean():.1f} | {1e3 * heads.mean():.1f} | "
                     f"{1e3 * either.mean():.1f} | {best} | {best_ms:.1f} | {ratio:.3f} | "
                     f"{100 * mfu(either, cell, cp):.1f} |")
    first, last = min(cps), max(cps)
    lines += ["", f"`either` is faster than every other strategy in {wins} of {len(cells)} cells and as fast as the "
              f"fastest in {ties} (one node: heads is Ulysses, which USP also is there).", "",
              f"| mix | mask | FCP p2p, MFU CP {last} / CP {first} | heads | either | target |",
              "|---|---|---|---|---|---|"]
    for name, mask in dict.fromkeys((n, m) for n, m, _ in cells):
        a, b = cells[name, mask, first], cells[name, mask, last]
        row = []
        for pick in (lambda c: c["p2p"], lambda c: c["heads"],
                     lambda c: np.minimum(c["p2p"], c["heads"])):
            row.append(mfu(pick(b), b, last) / mfu(pick(a), a, first))
        lines.append(f"| {name} | {mask} | " + " | ".join(f"{v:.2f}" for v in row)
                     + f" | {SCALING_TARGET.get(name, float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "docs" / "head_parallel_potential.md"))
    p.add_argument("--lengths", default=",".join(SHIPPED))
    p.add_argument("--cp", default=",".join(map(str, CPS)))
    p.add_argument("--num-batches", type=int, default=2)
    p.add_argument("--tokens-per-rank", type=int, default=16384)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    lengths, cps = args.lengths.split(","), [int(c) for c in args.cp.split(",")]
    started = time.perf_counter()
    rows = [r for r in run(lengths, cps, MASKS, args.num_batches, args.tokens_per_rank, args.jobs)
            if r["strategy"] not in FCP_SETTINGS]  # FCP's per batch below; the others' means from the table's run
    cells = mode_cells(lengths, cps, args.num_batches, args.tokens_per_rank)
    command = " ".join(["python scripts/head_parallel_potential.py", *(sys.argv[1:] if argv is None else argv)])
    text = table(rows, cells, cps, command, time.perf_counter() - started)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
