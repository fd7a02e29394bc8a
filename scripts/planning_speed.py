"""Planning time per micro-batch at CP 256 x 16K tokens (measured), for one rank: the plan; the rank's view of a
plan already made (its pieces, with the staging positions of the ranks it sends to), which its data loader adds;
the rank's stage split and kernel calls (``build_schedule``, which the first layer runs in the training
process); and, for reference, the stage split of every rank (``p2p_memory`` on a plan already made, what the
simulator and ``fcp plan`` report). Each is timed on its own, so the machine's drift between runs does not mix
into the additions.

    .venv/bin/python scripts/planning_speed.py [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import timeit

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
    args = parser.parse_args()
    print(f"CP {CP} x {TOKENS_PER_RANK} tokens per rank, median (min) of {args.runs} runs, ms")
    print(f"{'lengths':<13} {'mask':<7} {'plan':>13} {'view':>13} {'schedule':>13} {'all ranks':>13}")
    for name in SHIPPED:
        (lens,) = pack_batches(load_distribution(name), CP * TOKENS_PER_RANK, 1, seed=0)
        for mask in MASKS:
            figures = _figures(lens, mask, args.runs)
            print(f"{name:<13} {mask:<7} " + " ".join(f"{m:6.1f} ({lo:5.1f})" for m, lo in figures))


def _fresh(plan: Plan) -> Plan:
    """The same plan with nothing cached."""
    return Plan(strategy=plan.strategy, cp=plan.cp, mask=plan.mask, doc_lens=plan.doc_lens, q=plan.q, kv=plan.kv,
                num_pad_tokens=plan.num_pad_tokens, exchange=plan.exchange, notes=plan.notes)


def _figures(lens, mask: str, runs: int):
    plan = make_plan(lens, CP, TOKENS_PER_RANK, mask)
    view = plan.for_rank(CP // 2)

    def every_rank():
        fresh = _fresh(plan)
        p2p_memory(fresh.num_tokens, fresh.pieces, "auto")

    return (median_ms(lambda: make_plan(lens, CP, TOKENS_PER_RANK, mask), runs),
            median_ms(lambda: _fresh(plan).for_rank(CP // 2), runs),
            median_ms(lambda: build_schedule(view, "cpu", "auto"), runs), median_ms(every_rank, runs))

if __name__ == "__main__":
    main()
