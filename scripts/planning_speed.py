"""Planning time per micro-batch at CP 256 x 16K tokens (measured), for one rank: the plan; the rank's view of a
plan already made (its pieces, with the staging positions of the ranks it sends to), which its data loader adds;
the rank's stage split and kernel calls (``build_schedule``, which the first layer runs in the training
process); and, for reference, the stage split of every rank (``p2p_memory`` on a plan already made, what the
simulator and ``fcp plan`` report). Each is timed on its own, so the machine's drift between runs does not mix
into the additions.

    .venv/bin/python scripts/planning_speed.py [--runs 7] [--ranks-per-node 8]

With ``--ranks-per-node`` the plans carry that node layout, so the view and the schedule are the node-aware
exchange's (node rings, the round-after relay), as a multi-node run builds them.

With ``--scale`` it prints instead the table of the issue "Bad input, faults and scale limits": the FCP plan
time (median of ``--runs``) and the view time of one rank on it (``view``, as above) of micro-batches of many
short documents, the shipped mixes and an adversarial mix,
with the balance (p95 over ``--batches`` batches of the pairs imbalance max/mean of ``rank_pairs()``) and the
traffic (sum of ``recv_tokens``, mean over the batches) beside. Run it on another checkout of the package with
``PYTHONPATH=<checkout>`` to compare.

    .venv/bin/python scripts/planning_speed.py --scale [--runs 5] [--batches 8] [--only NAME ...]

With ``--against CHECKOUT`` it times another version's planner (``git worktree add CHECKOUT <commit>``) and this one
side by side on the first batch of each scale row, the plan and one rank's view, calls alternating: the ratio
holds on a machine whose speed drifts.

    .venv/bin/python scripts/planning_speed.py --against ../fcp-before [--only NAME ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import sys
import time
import timeit
from pathlib import Path

import numpy as np

from megatron_fcp.attention.schedule import build_schedule
from megatron_fcp.data.lengths import SHIPPED, load_distribution, pack_batches
from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.pairs import MASKS
from megatron_fcp.planner.plan import Plan
from megatron_fcp.planner.stages import p2p_memory

CP, TOKENS_PER_RANK = 256, 16384


def median_ms(fn, runs: int) -> tuple[float, float]:
    """Median and least milliseconds of ``runs`` calls of ``fn``, after one untimed call."""
    times = timeit.repeat(fn, number=1, repeat=runs + 1)[1:]
    return 1e3 * statistics.median(times), 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--scale", action="store_true", help="the short-document scale table instead")
    parser.add_argument("--batches", type=int, default=8, help="batches per mix for balance and traffic (--scale)")
    parser.add_argument("--only", nargs="*", default=None, help="names of the --scale rows to run")
    parser.add_argument("--ranks-per-node", type=int, default=None,
                        help="plan on nodes of this many ranks (the node-aware view and schedule)")
    parser.add_argument("--against", metavar="CHECKOUT", default=None,
                        help="with --scale: time this checkout's planner and CHECKOUT's (a folder holding another "
                             "version's megatron_fcp package) side by side in one process, calls alternating")
    args = parser.parse_args()
    if args.against:
        side_by_side(args.against, args.only)
        return
    if args.scale:
        scale_table(args.runs, args.batches, args.only)
        return
    layout = None if args.ranks_per_node is None else np.arange(CP) // args.ranks_per_node
    print(f"CP {CP} x {TOKENS_PER_RANK} tokens per rank, median (min) of {args.runs} runs, ms"
          + ("" if layout is None else f"; nodes of {args.ranks_per_node} ranks"))
    print(f"{'lengths':<13} {'mask':<7} {'plan':>13} {'view':>13} {'schedule':>13} {'all ranks':>13}")
    for name in SHIPPED:
        (lens,) = pack_batches(load_distribution(name), CP * TOKENS_PER_RANK, 1, seed=0)
        for mask in MASKS:
            figures = _figures(lens, mask, args.runs, layout)
            print(f"{name:<13} {mask:<7} " + " ".join(f"{m:6.1f} ({lo:5.1f})" for m, lo in figures))


def _fresh(plan: Plan) -> Plan:
    """The same plan with nothing cached."""
    return dataclasses.replace(plan)


def _figures(lens, mask: str, runs: int, layout=None):
    plan = make_plan(lens, CP, TOKENS_PER_RANK, mask, cp_node=layout)
    view = plan.for_rank(CP // 2)

    def every_rank():
        fresh = _fresh(plan)
        p2p_memory(fresh.num_tokens, fresh.pieces, "auto")

    return (median_ms(lambda: make_plan(lens, CP, TOKENS_PER_RANK, mask, cp_node=layout), runs),
            median_ms(lambda: _fresh(plan).for_rank(CP // 2), runs),
            median_ms(lambda: build_schedule(view, "cpu", "auto"), runs), median_ms(every_rank, runs))

def _fill(lens: np.ndarray, total: int) -> np.ndarray:
    """The first documents of ``lens`` holding ``total`` tokens, the last one cut to fit."""
    ends = np.cumsum(lens)
    count = int(np.searchsorted(ends, total))
    out = lens[: count + 1].copy()
    out[-1] -= int(ends[count]) - total
    return out[out > 0]


def scale_batches(name: str, num_batches: int) -> list[np.ndarray]:
    """``num_batches`` micro-batches of CP x TOKENS_PER_RANK tokens of the scale table's row ``name``."""
    total = CP * TOKENS_PER_RANK
    if name in SHIPPED:
        return pack_batches(load_distribution(name), total, num_batches, seed=0)
    batches = []
    for seed in range(num_batches):
        rng = np.random.default_rng(seed)
        if name == "ones":
            lens = np.ones(total, np.int64)
        elif name == "x50":
            lens = _fill(np.full(total // 50 + 1, 50, np.int64), total)
        elif name == "x16":
            lens = np.full(total // 16, 16, np.int64)
        elif name == "u1_64":
            lens = _fill(rng.integers(1, 65, total // 16, dtype=np.int64), total)
        elif name == "u1_2":  # the most documents in random length order: 1 or 2 tokens each
            lens = _fill(rng.integers(1, 3, total * 3 // 4, dtype=np.int64), total)
        elif name == "ones_long":  # one-token documents with four of a rank's length, in random order
            lens = rng.permutation(np.concatenate([np.ones(total - 4 * TOKENS_PER_RANK, np.int64),
                                                   np.full(4, TOKENS_PER_RANK, np.int64)]))
        elif name == "ones_mixed":  # nine in ten documents of one token, the rest of 2 to 17, in random order
            lens = np.where(rng.random(total * 6 // 10) < 0.9, 1, rng.integers(2, 18, total * 6 // 10))
            lens = rng.permutation(_fill(lens, total))
        elif name == "adversarial":  # one document of half the batch among documents of 1 to 64 tokens
            short = rng.integers(1, 65, total // 16, dtype=np.int64)
            lens = _fill(np.concatenate([[total // 2], short]), total)
            lens = rng.permutation(lens)
        else:
            raise ValueError(f"unknown scale row {name!r}")
        batches.append(lens)
    return batches


SCALE_ROWS = ("ones", "x50", "u1_64", "x16", *SHIPPED, "adversarial", "u1_2", "ones_long", "ones_mixed")
"""Rows of the scale table: 4,194,304 one-token documents, 50-token documents, documents of 1 to 64 tokens,
16-token documents, the shipped mixes, one document of half the batch among documents of 1 to 64 tokens, and
three batches of millions of documents not in length order (1 or 2 tokens each; one-token documents with four
of 16K; nine in ten of one token and the rest of 2 to 17; all shuffled)."""


def scale_table(runs: int, num_batches: int, only=None) -> None:
    print(f"FCP plan, causal, CP {CP} x {TOKENS_PER_RANK} tokens per rank; plan time median of {runs} (ms); "
          f"balance p95 and traffic mean over {num_batches} batches")
    print(f"{'batch':<13} {'documents':>10} {'plan ms':>9} {'view ms':>9} {'p95 imbalance':>14} {'recv tokens':>13}")
    for name in only or SCALE_ROWS:
        batches = scale_batches(name, 1 if name in ("ones", "x50", "x16") else num_batches)  # the same every time
        lens = batches[0]
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            make_plan(lens, CP, TOKENS_PER_RANK)
            times.append(time.perf_counter() - start)
        plan = make_plan(lens, CP, TOKENS_PER_RANK)
        view_ms, _ = median_ms(lambda plan=plan: _fresh(plan).for_rank(CP // 2), runs)
        imbalance, traffic = [], []
        for index, batch in enumerate(batches):
            plan = make_plan(batch, CP, TOKENS_PER_RANK) if index else make_plan(lens, CP, TOKENS_PER_RANK)
            pairs = plan.rank_pairs()
            imbalance.append(float(pairs.max() / pairs.mean()))
            traffic.append(int(plan.recv_tokens.sum()))
        print(f"{name:<13} {lens.shape[0]:>10} {1e3 * statistics.median(times):>9.1f} {view_ms:>9.1f} "
              f"{np.percentile(imbalance, 95):>14.4f} {statistics.mean(traffic):>13.0f}", flush=True)




def _planner_of(root: str):
    """``make_plan`` of the ``megatron_fcp`` package under ``root``, imported apart from this one."""
    for name in [name for name in sys.modules if name.split(".")[0] == "megatron_fcp"]:
        del sys.modules[name]
    sys.path.insert(0, root)
    try:
        return importlib.import_module("megatron_fcp.planner.api").make_plan
    finally:
        sys.path.pop(0)
        for name in [name for name in sys.modules if name.split(".")[0] == "megatron_fcp"]:
            del sys.modules[name]


def side_by_side(other: str, only=None, runs: int = 9) -> None:
    """Plan time and one rank's view time of the scale rows (first batch of each) by ``other``'s planner and by
    this one, calls alternating, so the machine's drift falls on both alike."""
    if not (Path(other) / "megatron_fcp" / "planner" / "api.py").is_file():
        raise SystemExit(f"--against {other}: no megatron_fcp/planner/api.py there; pass a checkout's root folder")
    here = str(Path(__file__).resolve().parents[1])
    planners = {"against": _planner_of(other), "this": _planner_of(here)}
    print(f"{'batch':<13} {'against ms':>10} {'this ms':>9} {'this/against':>12} {'view against':>12} "
          f"{'view this':>9} {'this/against':>12}   (median of {runs} each, calls alternating)")
    for name in only or SCALE_ROWS:
        lens = scale_batches(name, 1)[0]
        plans = {key: make(lens, CP, TOKENS_PER_RANK) for key, make in planners.items()}  # and a warm-up
        times = {key: [] for key in planners}
        view_times = {key: [] for key in planners}
        for _ in range(runs):
            for key, make in planners.items():
                start = time.perf_counter()
                make(lens, CP, TOKENS_PER_RANK)
                times[key].append(time.perf_counter() - start)
            for key, plan in plans.items():
                fresh = dataclasses.replace(plan)
                start = time.perf_counter()
                fresh.for_rank(CP // 2)
                view_times[key].append(time.perf_counter() - start)
        against, this = (1e3 * statistics.median(times[key]) for key in planners)
        view_against, view_this = (1e3 * statistics.median(view_times[key]) for key in planners)
        print(f"{name:<13} {against:>10.1f} {this:>9.1f} {this / against:>12.2f} {view_against:>12.1f} "
              f"{view_this:>9.1f} {view_this / view_against:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
