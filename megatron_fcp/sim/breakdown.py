"""Where a modeled attention step goes: the step time of a plan split into what the GPUs spend it on.

``cp x T`` GPU-seconds (``T`` the step time, the slowest rank's) are split, averaged over ranks, into:

- ``useful``: the exact query-key pairs at the tensor cores' peak (its share of ``T`` is the modeled MFU);
- ``kernel_ceiling``: the same pairs at the kernel's best efficiency (long segments) minus at peak;
- ``edge_tiles``: partly filled tiles at the edges of every kernel segment;
- ``row_overhead``: the kernel law's fixed cost per query row (short segments are slow; zero without laws);
- ``launches``: the fixed cost per kernel call;
- ``exposed_nvlink`` / ``exposed_ib``: time the rank waits for key/values or gradients over NVLink (latency
  included) / InfiniBand that compute does not hide;
- ``wait_slowest``: time the rank waits for the slowest rank to end the step.

Each part is the difference of two runs of the cost model with one cost taken away (launches zero, row
overhead zero, tiles of zero size, InfiniBand then every link infinitely fast), in that order, so the parts add
up to ``T`` exactly; the split of the exposed communication between the two links depends on that order (the
InfiniBand part is what an infinitely fast InfiniBand would save). Ring plans step in lockstep: a step's
imbalance between ranks is inside its compute parts there. Modeled, like every figure of the cost model.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from megatron_fcp.planner.plan import Plan
from megatron_fcp.planner.stages import DEFAULT_KV_BUDGET
from megatron_fcp.sim.model import HardwareProfile, evaluate

PARTS = ("useful", "kernel_ceiling", "edge_tiles", "row_overhead", "launches", "exposed_nvlink", "exposed_ib",
         "wait_slowest")
FAST = 1e12  # GB/s of a link that takes no time


def _without(hw: HardwareProfile, *, launches=False, row_overhead=False, tiles=False, ib=False, links=False):
    changes = {}
    if launches:
        changes["kernel_launch_us"] = 0.0
    if row_overhead and hw.laws is not None:
        changes["laws"] = {k: dataclasses.replace(law, row_overhead_keys=0.0) for k, law in hw.laws.items()}
    if tiles:
        changes["tile_size"] = 0
    if ib or links:
        changes["ib_gbps_per_direction"] = FAST
    if links:
        changes.update(nvlink_gbps_per_direction=FAST, p2p_latency_us=0.0)
    return dataclasses.replace(hw, **changes)


def _peak_seconds(pairs: np.ndarray, hw: HardwareProfile) -> np.ndarray:
    return pairs * hw.fwd_flops_per_pair * (1 + hw.bwd_flops_factor) / (hw.peak_bf16_dense_tflops * 1e12)


def step_breakdown(plan: Plan, hw: HardwareProfile, kv_budget_tokens=DEFAULT_KV_BUDGET) -> dict[str, float]:
    """Seconds of each part of :data:`PARTS` (mean over ranks; they add up to the step time) plus ``step_s``."""
    real = evaluate(plan, hw, kv_budget_tokens)
    step = real.step_time_s
    no_ib = evaluate(plan, _without(hw, ib=True), kv_budget_tokens).step_s
    no_comm = _without(hw, links=True)
    compute = evaluate(plan, no_comm, kv_budget_tokens).step_s
    no_launch = _without(no_comm, launches=True)
    compute_nl = evaluate(plan, no_launch, kv_budget_tokens).step_s
    no_overhead = _without(no_launch, row_overhead=True)
    compute_no = evaluate(plan, no_overhead, kv_budget_tokens).step_s
    exact = evaluate(plan, _without(no_overhead, tiles=True), kv_budget_tokens).step_s
    useful = _peak_seconds(real.pairs.astype(np.float64), hw)
    parts = {
        "useful": useful, "kernel_ceiling": exact - useful, "edge_tiles": compute_no - exact,
        "row_overhead": compute_nl - compute_no, "launches": compute - compute_nl,
        "exposed_nvlink": no_ib - compute, "exposed_ib": real.step_s - no_ib, "wait_slowest": step - real.step_s,
    }
    out = {name: float(np.mean(value)) for name, value in parts.items()}
    out["step_s"] = step
    return out
