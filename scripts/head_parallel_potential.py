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
from scaling_validated import CPS, FCP_SETTINGS, HARDWARE, MASKS, REPO, SCALING_TARGET, run  # noqa: E402

from megatron_fcp.data.lengths import SHIPPED  # noqa: E402

TIE = 1e-9
"""Relative difference below which two steps count as equal (the same computation summed in another order)."""


def mode_cells(rows: list[dict]) -> dict[tuple, dict]:
    """Per cell ``(mix, mask, cp)`` of the table's rows: FCP's step under p2p and under heads per batch (ms), and
    its MFU per batch under each."""
    out: dict[tuple, dict] = {}
    for r in rows:
        if r["strategy"] in FCP_SETTINGS:
            key = "p2p" if r["strategy"] == "fcp" else "heads"
            cell = out.setdefault((r["lengths"], r["mask"], r["cp"]), {})
            cell[key], cell[f"{key}_mfu"] = r["batch_step_ms"], r["batch_mfu"]
    return out


def table(rows: list[dict], cps, command: str, elapsed: float) -> str:
    cells = mode_cells(rows)
    others: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["strategy"] not in FCP_SETTINGS:
            others.setdefault((r["lengths"], r["mask"], r["cp"]), {})[r["strategy"]] = r["fwd_ms"] + r["bwd_ms"]

    def either(cell):  # per batch the shorter step, and its MFU
        heads = np.array(cell["heads"]) < np.array(cell["p2p"])
        return (np.where(heads, cell["heads"], cell["p2p"]),
                np.where(heads, cell["heads_mfu"], cell["p2p_mfu"]))

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
        step, mfu = either(cell)
        best = min(others[name, mask, cp], key=others[name, mask, cp].get)
        best_ms = others[name, mask, cp][best]
        ratio = step.mean() / best_ms
        wins += ratio < 1.0 - TIE
        ties += abs(ratio - 1.0) <= TIE
        lines.append(f"| {name} | {mask} | {cp} | {np.mean(cell['p2p']):.1f} | {np.mean(cell['heads']):.1f} | "
                     f"{step.mean():.1f} | {best} | {best_ms:.1f} | {ratio:.3f} | {100 * mfu.mean():.1f} |")
    first, last = min(cps), max(cps)
    lines += ["", f"`either` is faster than every other strategy in {wins} of {len(cells)} cells and as fast as the "
              f"fastest in {ties} (one node: heads is Ulysses, which USP also is there).", "",
              f"| mix | mask | FCP p2p, MFU CP {last} / CP {first} | heads | either | target |",
              "|---|---|---|---|---|---|"]
    for name, mask in dict.fromkeys((n, m) for n, m, _ in cells):
        a, b = cells[name, mask, first], cells[name, mask, last]
        row = [np.mean(b[f"{k}_mfu"]) / np.mean(a[f"{k}_mfu"]) for k in ("p2p", "heads")]
        row.append(either(b)[1].mean() / either(a)[1].mean())
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
    rows = run(lengths, cps, MASKS, args.num_batches, args.tokens_per_rank, args.jobs)
    rows.sort(key=lambda r: (lengths.index(r["lengths"]), r["cp"], MASKS.index(r["mask"])))  # run puts large CPs first
    command = " ".join(["python scripts/head_parallel_potential.py", *(sys.argv[1:] if argv is None else argv)])
    text = table(rows, cps, command, time.perf_counter() - started)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
