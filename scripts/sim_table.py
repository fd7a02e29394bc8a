"""Print the markdown tables of the README from `fcp simulate --json` output.

    .venv/bin/python scripts/sim_table.py out/sim_all.json
"""

import json
import sys


def _fmt(cell: dict | None, *keys: str) -> str:
    if cell is None or cell["num_batches"] == 0:
        return "n/a"
    parts = []
    for key in keys:
        value = cell[key]
        parts.append(f"{value * 100:.2f}%" if key == "pad_frac" else f"{value:.3f}" if "imb" in key else f"{value:.2f}")
    return " / ".join(parts)


def main(path: str) -> None:
    cells = json.load(open(path))["cells"]
    index = {(c["lengths"], c["mask"], c["cp"], c["strategy"]): c for c in cells}
    for lengths, mask in dict.fromkeys((c["lengths"], c["mask"]) for c in cells):
        print(f"\n**{lengths}, {mask}** (imbalance = p95 max/mean of modeled time / of exact pairs; "
              "comm = mean KV bytes per rank / ring's; speedup = ring step time / strategy's; best baseline / FCP = "
              "fastest baseline's step time over FCP's on the same batches, above 1 means FCP is faster; modeled)\n")
        print("| cp | FCP imbalance | FCP pad | FCP comm | FCP speedup | FCP MFU | best baseline / FCP "
              "| magi imbalance | magi comm | magi speedup | hybrid imbalance | hybrid speedup | nocp speedup "
              "| ring imbalance | ring MFU |")
        print("|" + "---|" * 15)
        for cp in sorted({c["cp"] for c in cells if (c["lengths"], c["mask"]) == (lengths, mask)}):
            f, m, h, n, r = (index.get((lengths, mask, cp, s)) for s in ("fcp", "magi", "hybrid", "nocp", "ring"))
            mfu = f"{f['mfu'] * 100:.1f}%" if f else "n/a"
            ring_mfu = f"{r['mfu'] * 100:.1f}%" if r else "n/a"
            lead = min((c["step_vs_fcp"], c["strategy"]) for c in (m, h, n, r) if c and c["num_batches"])
            print(f"| {cp} | {_fmt(f, 'imb_time', 'imb_pairs')} | {_fmt(f, 'pad_frac')} | {_fmt(f, 'comm_vs_ring')} "
                  f"| {_fmt(f, 'speedup_vs_ring')} | {mfu} | {lead[0]:.2f} ({lead[1]}) "
                  f"| {_fmt(m, 'imb_time', 'imb_pairs')} "
                  f"| {_fmt(m, 'comm_vs_ring')} | {_fmt(m, 'speedup_vs_ring')} | {_fmt(h, 'imb_time', 'imb_pairs')} "
                  f"| {_fmt(h, 'speedup_vs_ring')} | {_fmt(n, 'speedup_vs_ring')} | {_fmt(r, 'imb_time', 'imb_pairs')} "
                  f"| {ring_mfu} |")


if __name__ == "__main__":
    main(sys.argv[1])
