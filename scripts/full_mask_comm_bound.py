"""Lower bound on full-mask communication for a simulated cell, by mixed-integer programming (needs scipy).

Under a full mask a piece of ``x`` tokens of a document of length ``L`` costs exactly ``x * L`` query-key pairs
wherever it sits, and every rank holding part of the document receives the rest of it. So the fewest key/value
tokens any plan can move is the optimum of

    minimise   sum over large documents d and ranks r of  L_d * y[d, r]   (minus sum of L_d)
    subject to sum_r x[d, r] = L_d                 every token placed
               sum_d x[d, r] <= tokens_per_rank    token room
               sum_d L_d * x[d, r] <= cap * mean   pair imbalance at most `cap`
               x[d, r] <= min(L_d, tokens_per_rank) * y[d, r],   y binary (large documents only)

Documents of at most ``--free`` tokens may be split at no cost, and kernel edge work is ignored; both only
relax the problem, so the optimum stays a lower bound for any plan with pair imbalance <= cap on each batch.
One bound is printed per imbalance cap (``--cap``), next to FCP's figure on the same batches, all as
fractions of ring's. Takes about 4 s per batch and cap on 2 cores.

    .venv/bin/pip install scipy
    .venv/bin/python scripts/full_mask_comm_bound.py --lengths linux_files --cp 8
"""

import argparse

import numpy as np

from megatron_fcp.data.lengths import load_distribution, pack_batches
from megatron_fcp.planner.api import make_plan


def comm_bound(lens: np.ndarray, cp: int, tokens_per_rank: int, cap: float, free: int) -> float:
    """Least total key/value tokens received, summed over ranks (the MILP's dual bound)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    lens = lens[lens > 0].astype(np.float64)
    large = np.flatnonzero(lens > free)
    nd, nl = lens.shape[0], large.shape[0]
    nx, ny = nd * cp, nl * cp  # x[d, r] at d * cp + r, then y[i, r] for large document i
    room = np.minimum(lens, tokens_per_rank)
    cost = np.zeros(nx + ny)
    cost[nx:] = np.repeat(lens[large], cp)
    rows, lo, hi = [], [], []

    def add(coeffs: dict[int, float] | np.ndarray, low: float, high: float) -> None:
        row = np.zeros(nx + ny)
        if isinstance(coeffs, dict):
            row[list(coeffs)] = list(coeffs.values())
        else:
            row[:] = coeffs
        rows.append(row)
        lo.append(low)
        hi.append(high)

    for d in range(nd):
        add({d * cp + r: 1.0 for r in range(cp)}, lens[d], lens[d])
    mean_pairs = float((lens**2).sum()) / cp
    for r in range(cp):
        tokens, pairs = np.zeros(nx + ny), np.zeros(nx + ny)
        tokens[r:nx:cp], pairs[r:nx:cp] = 1.0, lens
        add(tokens, 0.0, tokens_per_rank)
        add(pairs, 0.0, cap * mean_pairs)
    for i, d in enumerate(large):
        for r in range(cp):
            add({d * cp + r: 1.0, nx + i * cp + r: -room[d]}, -np.inf, 0.0)
    res = milp(cost, constraints=LinearConstraint(np.array(rows), lo, hi),
               integrality=np.r_[np.zeros(nx), np.ones(ny)],
               bounds=Bounds(np.zeros(nx + ny), np.r_[np.repeat(room, cp), np.ones(ny)]),
               options={"time_limit": 120, "mip_rel_gap": 1e-3})
    if res.status not in (0, 1) or res.mip_dual_bound is None:
        raise RuntimeError(f"MILP failed: {res.message}")
    return float(res.mip_dual_bound - lens[large].sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="linux_files")
    ap.add_argument("--cp", type=int, default=8)
    ap.add_argument("--tokens-per-rank", type=int, default=16384)
    ap.add_argument("--num-batches", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cap", default="1.0,1.02,1.03,1.05",
                    help="largest pair imbalances (max/mean) allowed per batch, comma-separated: one bound each")
    ap.add_argument("--free", type=int, default=1024, help="documents this short split at no cost (relaxation)")
    args = ap.parse_args()
    batches = pack_batches(load_distribution(args.lengths), args.cp * args.tokens_per_rank, args.num_batches,
                           args.seed)
    caps = [float(c) for c in args.cap.split(",")]
    bound, fcp = [], []
    print("fractions of ring's key/value tokens; bound at pair imbalance cap " + ", ".join(map(str, caps)))
    for i, lens in enumerate(batches):
        ring = make_plan(lens, args.cp, args.tokens_per_rank, "full", "ring").recv_tokens.sum()
        plan = make_plan(lens, args.cp, args.tokens_per_rank, "full", "fcp")
        bound.append([comm_bound(lens, args.cp, args.tokens_per_rank, cap, args.free) / ring for cap in caps])
        fcp.append(plan.recv_tokens.sum() / ring)
        pairs = plan.rank_pairs()
        print(f"batch {i:2d}: bound {' '.join(f'{b:.3f}' for b in bound[-1])}  fcp {fcp[-1]:.3f} "
              f"(fcp pair imbalance {pairs.max() / pairs.mean():.3f})", flush=True)
    mean = np.mean(bound, axis=0)
    print(f"mean over {len(batches)} batches: bound {' '.join(f'{b:.3f}' for b in mean)}  fcp {np.mean(fcp):.3f}")


if __name__ == "__main__":
    main()
