"""Planning speed: FCP plans one large micro-batch (cp=256 x 16384 tokens per rank) in tens of milliseconds,
including what a rank's data loader does with the plan for the staged exchange (the pieces of every rank, the
rank's view, and the stage split under the default budget).

The target is 50 ms per micro-batch; the bound here is 150 ms so that a busy CI machine does not fail it.
"""

import statistics
import time

import pytest

from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.pairs import MASKS
from megatron_fcp.planner.stages import p2p_memory
from megatron_fcp.sim.lengths import load_distribution, pack_batches

CP, TOKENS_PER_RANK = 256, 16384
BOUND_S = 0.150
RUNS = 5


def median_seconds(fn, runs: int = RUNS) -> float:
    """Median wall time of ``runs`` calls of ``fn`` (one untimed warm-up call first)."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.fixture(scope="module", params=["spamassassin", "linux_files", "linux_dirs", "magi_hist"])
def micro_batch(request):
    """One packed micro-batch of CP x TOKENS_PER_RANK tokens from a shipped distribution: (name, lengths)."""
    (lens,) = pack_batches(load_distribution(request.param), CP * TOKENS_PER_RANK, 1, seed=0)
    assert int(lens.sum()) == CP * TOKENS_PER_RANK
    return request.param, lens


@pytest.mark.parametrize("mask", MASKS)
def test_fcp_plans_a_cp256_micro_batch_quickly(micro_batch, mask):
    name, lens = micro_batch

    def plan_and_stage():
        plan = make_plan(lens, CP, TOKENS_PER_RANK, mask, "fcp")
        plan.for_rank(CP // 2)  # cuts every rank's receives into pieces
        return p2p_memory(plan.num_tokens, plan.pieces, "auto")  # the stage split of every rank

    seconds = median_seconds(plan_and_stage)
    assert seconds <= BOUND_S, f"{name} {mask}: median {seconds * 1e3:.1f} ms > {BOUND_S * 1e3:.0f} ms"
