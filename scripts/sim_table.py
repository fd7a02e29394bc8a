"""Print the markdown tables of the README from `fcp simulate --json` output: per (distribution, mask) the
step-time table and the key/value memory table.

    .venv/bin/python scripts/sim_table.py out/sim_all.json > docs/simulation_tables.md
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


def _x(cell: dict | None, *keys: str, digits: int = 2) -> str:
    """Figures ``a / b`` with ``digits`` decimals (multiples of own key/values, fractions of ring's)."""
    if cell is None or cell["num_batches"] == 0:
        return "n/a"
    return " / ".join(f"{cell[k]:.{digits}f}" for k in keys)


def _x3(cell: dict | None, key: str) -> str:
    return _x(cell, key, digits=3)


def _budget(data: dict) -> str:
    setting = data.get("kv_budget_tokens", data["config"].get("kv_budget_tokens", "auto"))
    resolved = data.get("kv_budget_tokens_resolved")
    if setting is None:
        return "none (one stage per rank)"
    if setting == "auto":
        return f"auto = {resolved} tokens per stage (the rank's own token slots)"
    return f"{setting} tokens per stage"


def _memory_table(index: dict, lengths: str, mask: str, cps: list[int], budget: str) -> None:
    print(f"\n**{lengths}, {mask}: key/value memory per rank and layer** (key/value budget {budget}; peak = remote "
          "key/values held at once, kept = remote key/values kept from forward for backward, both as multiples of "
          "the rank's own, max over batches and ranks; unbounded = the same with one stage per rank; peak MB = mean "
          "over batches of the largest per-rank peak; grads back = most own key/value gradients returned in one "
          "backward round, x own; bytes = key/values moved per rank forward + backward (receive, fetch again, "
          "gradients back) / ring's; ring and hybrid are not staged; modeled)\n")
    print("| cp | FCP peak / kept | FCP peak MB | FCP unbounded peak / kept | FCP grads back | FCP bytes "
          "| magi peak / kept | magi unbounded peak / kept | magi bytes | hybrid peak / kept | hybrid bytes "
          "| ring peak / kept |")
    print("|" + "---|" * 12)
    for cp in cps:
        f, m, h, r = (index.get((lengths, mask, cp, s)) for s in ("fcp", "magi", "hybrid", "ring"))
        peak_mb = f"{f['peak_kv_mb']:.0f}" if f and f["num_batches"] else "n/a"
        print(f"| {cp} | {_x(f, 'peak_kv_x', 'saved_kv_x')} | {peak_mb} "
              f"| {_x(f, 'peak_kv_x_unbounded', 'saved_kv_x_unbounded')} | {_x(f, 'returned_x')} "
              f"| {_x3(f, 'bytes_vs_ring')} | {_x(m, 'peak_kv_x', 'saved_kv_x')} "
              f"| {_x(m, 'peak_kv_x_unbounded', 'saved_kv_x_unbounded')} | {_x3(m, 'bytes_vs_ring')} "
              f"| {_x(h, 'peak_kv_x', 'saved_kv_x')} | {_x3(h, 'bytes_vs_ring')} "
              f"| {_x(r, 'peak_kv_x', 'saved_kv_x')} |")


def main(path: str) -> None:
    data = json.load(open(path))
    cells = data["cells"]
    budget = _budget(data)
    index = {(c["lengths"], c["mask"], c["cp"], c["strategy"]): c for c in cells}
    for lengths, mask in dict.fromkeys((c["lengths"], c["mask"]) for c in cells):
        print(f"\n**{lengths}, {mask}** (imbalance = p95 max/mean of modeled time / of exact pairs; "
              "comm = mean KV bytes per rank received in forward / ring's; speedup = ring step time / strategy's; "
              "best baseline / FCP = fastest baseline's step time over FCP's on the same batches, above 1 means FCP "
              f"is faster; key/value budget {budget}; modeled)\n")
        print("| cp | FCP imbalance | FCP pad | FCP comm | FCP speedup | FCP MFU | best baseline / FCP "
              "| magi imbalance | magi comm | magi speedup | hybrid imbalance | hybrid speedup | nocp speedup "
              "| ring imbalance | ring MFU |")
        print("|" + "---|" * 15)
        cps = sorted({c["cp"] for c in cells if (c["lengths"], c["mask"]) == (lengths, mask)})
        for cp in cps:
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
        _memory_table(index, lengths, mask, cps, budget)


if __name__ == "__main__":
    main(sys.argv[1])
