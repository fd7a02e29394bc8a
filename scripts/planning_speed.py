"""Planning time per micro-batch at CP 256 x 16K tokens (measured): the plan alone, then with what a rank's data
loader adds for the staged exchange (every rank's pieces, the rank's view, the stage split under the default
budget), and the rank's kernel-call schedule that the first layer builds in the training process.

    .venv/bin/python scripts/planning_speed.py [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

from megatron_fcp.attention.schedule import build_schedule
from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.pairs import MASKS
from megatron_fcp.planner.stages import p2p_memory
from megatron_fcp.sim.lengths import SHIPPED, load_distribution, pack_batches

CP, TOKENS_PER_RANK = 256, 16384


def median_ms(fn, runs: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    print(f"CP {CP} x {TOKENS_PER_RANK} tokens per rank, median (min) of {args.runs} runs, ms")
    print(f"{'lengths':<13} {'mask':<7} {'plan':>13} {'plan+stages':>13} {'schedule':>13}")
    for name in SHIPPED:
        (lens,) = pack_batches(load_distribution(name), CP * TOKENS_PER_RANK, 1, seed=0)
        for mask in MASKS:
            figures = _figures(lens, mask, args.runs)
            print(f"{name:<13} {mask:<7} " + " ".join(f"{m:6.1f} ({lo:5.1f})" for m, lo in figures))


def _figures(lens, mask: str, runs: int):
    def with_stages():
        plan = make_plan(lens, CP, TOKENS_PER_RANK, mask)
        view = plan.for_rank(CP // 2)
        p2p_memory(plan.num_tokens, plan.pieces, "auto")
        return view

    view = with_stages()
    return (median_ms(lambda: make_plan(lens, CP, TOKENS_PER_RANK, mask), runs), median_ms(with_stages, runs),
            median_ms(lambda: build_schedule(view, "cpu", "auto"), runs))

if __name__ == "__main__":
    main()
