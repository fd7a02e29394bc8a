"""``python -m megatron_fcp.cpu_trainer``: a tiny megatron-core GPT trained with FCP CP=N on CPU processes, then
the same run without CP, and the comparison (see README, "Install and run the demo")."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from megatron_fcp.cpu_trainer.train import (
    MEMORY_FIGURES,
    RECOMPUTE,
    RunConfig,
    baseline_of,
    check_nodes,
    fcp_config,
    launch,
)
from megatron_fcp.data.lengths import SHIPPED, load_distribution
from megatron_fcp.errors import InputError
from megatron_fcp.megatron.config import SCHEDULERS, SETTINGS
from megatron_fcp.paths import folder_write_problem
from megatron_fcp.planner.stages import DEFAULT_KV_BUDGET, parse_kv_budget

MEMORY_LABELS = {"kv_peak": "received key/values held at once, per layer",
                 "kv_kept": "received key/values kept from a layer's forward to its backward",
                 "grad_peak": "gradients of received key/values held at once, per layer",
                 "returned_peak": "gradients of own key/values coming back held at once, per layer",
                 "kv_kept_all_layers": "received key/values kept for backward by all layers together",
                 "kv_held_all_layers": "received key/values held at once, all layers together"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_fcp.cpu_trainer", description=__doc__)
    p.add_argument("--cp", type=int, default=4, help="context-parallel size (CPU processes), default 4")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-length", type=int, default=4096, help="tokens per packed micro-batch over the CP group")
    p.add_argument("--doclens", default="linux_files",
                   help=f"document lengths: {', '.join(SHIPPED)} or a lengths file")
    p.add_argument("--scheduler", default=SETTINGS["scheduler"].default, choices=SCHEDULERS,
                   help=f"block placement: {', '.join(SCHEDULERS)}")
    p.add_argument("--planning-workers", type=int, default=0,
                   help="data-loader worker processes that plan ahead (default 0: plan in the training process, "
                        "which is cheaper than extra processes on a 2-core machine)")
    p.add_argument("--kv-budget-tokens", default=DEFAULT_KV_BUDGET, metavar="N|auto|none",
                   help="FCP's key/value exchange travels in stages of at most N tokens: at most 2 stages held at "
                        "once and 1 kept for backward per layer (auto, default: the rank's own tokens; none: one "
                        "unbounded stage)")
    p.add_argument("--recompute", choices=RECOMPUTE, default="none",
                   help="Megatron's activation recompute in the FCP run: selective recomputes core attention, full "
                        "every whole layer (uniform, 1 layer per checkpoint)")
    p.add_argument("--ranks-per-node", default=None, metavar="N",
                   help="processes per emulated node, which place the CP ranks on nodes in every plan (--cp 4 "
                        "--ranks-per-node 2: 2 nodes x 2); default: LOCAL_WORLD_SIZE if set, else one node")
    p.add_argument("--out", default=None, help="folder for the per-step JSON records, kept (default: a temporary "
                                              "folder, removed at the end)")
    a = p.parse_args(argv)
    try:
        budget = parse_kv_budget(a.kv_budget_tokens, flag="--kv-budget-tokens")
        run = RunConfig(cp=a.cp, steps=a.steps, seq_length=a.seq_length, doclens=a.doclens, scheduler=a.scheduler,
                        planning_workers=a.planning_workers, kv_budget_tokens=budget, recompute=a.recompute,
                        ranks_per_node=a.ranks_per_node)
        check_before_spawning(run, a.out)
    except InputError as err:
        p.error(str(err))
    with tempfile.TemporaryDirectory(prefix="fcp-demo-") as scratch:
        return _run(run, budget, Path(a.out or scratch), keep=a.out is not None)


LOSS_TOLERANCE = 1e-5
"""Largest relative difference of a step's loss from the run without CP that passes (the tolerance
``tests/unit/test_megatron_training.py`` holds the staged-exchange and recompute runs to)."""


def _run(run: RunConfig, budget, out: Path, keep: bool) -> int:
    print(f"== FCP: tiny GPT (megatron-core, {run.num_layers} layers, hidden {run.hidden_size}), CP={run.cp} on "
          f"{run.world_size} CPU processes (gloo), {run.seq_length}-token packed batches from '{run.doclens}', "
          f"key/value budget {budget if budget is not None else 'none'}"
          f"{f' ({run.seq_length // run.cp} tokens)' if budget == 'auto' else ''}, recompute {run.recompute}")
    fcp = launch(run, out / "fcp.json")["steps"]
    print("== the same run without CP (1 process, Megatron's own attention with a document mask)")
    print("   (a correctness reference, not a benchmark: one process computes every CP rank's share with dense "
          "seq x seq masked scores; its step times say nothing about CP's speed)")
    ref = launch(baseline_of(run), out / "nocp.json")["steps"]
    print("\n== comparison (loss: per-token mean over the global batch)")
    print(f" step | loss FCP CP={run.cp} | loss no CP  | rel. diff")
    worst = 0.0
    for f, r in zip(fcp, ref, strict=True):
        rel = abs(f["loss"] - r["loss"]) / abs(r["loss"])
        worst = max(worst, rel)
        print(f" {f['step']:4d} | {f['loss']:.8f}   | {r['loss']:.8f}  | {rel:.1e}")
    steady = fcp[2:] if len(fcp) > 3 else fcp  # the first steps include process and worker start-up
    step_s = np.median([s["step_s"] for s in steady])
    plan_s = np.median([s["plan_s"] for s in steady])
    wait_s = np.median([s["loader_wait_s"] for s in steady])
    where = (f"ahead, in {run.planning_workers} data-loader worker(s)" if run.planning_workers
             else "in the training process, inside the data-loader wait")
    worst_wait = max(s["loader_wait_s"] / s["step_s"] for s in steady)
    worst_plan = max(s["plan_s"] / s["step_s"] for s in steady)
    verdict = "PASS" if worst <= LOSS_TOLERANCE else "FAIL"
    print(f"\n{verdict}: largest relative loss difference over {len(fcp)} steps {worst:.1e} "
          f"({'<=' if verdict == 'PASS' else '>'} the tolerance {LOSS_TOLERANCE:g})")
    print(f"median per step (steps 3+): step {1e3 * step_s:.1f} ms | planning {1e3 * plan_s:.2f} ms "
          f"({100 * plan_s / step_s:.1f}% of the step; {where}) | data-loader wait "
          f"{1e3 * wait_s:.2f} ms ({100 * wait_s / step_s:.1f}% of the step)")
    print(f"largest share of a step (steps 3+): planning {100 * worst_plan:.1f}%, data-loader wait "
          f"{100 * worst_wait:.1f}%")
    print(f"FCP plan figures, mean over steps: attention-pairs imbalance "
          f"{np.mean([s['pairs_imbalance'] for s in fcp]):.3f}, key/value traffic "
          f"{100 * np.mean([s['comm_vs_ring'] for s in fcp]):.1f}% of ring CP's, "
          f"{np.mean([s['docs'] for s in fcp]):.1f} documents per micro-batch")
    if fcp and "memory" in fcp[0]:
        print_memory_summary(fcp)
    print(f"records: {out}" if keep else "records: not kept (pass --out FOLDER to keep them)")
    return 0 if verdict == "PASS" else 1


MAX_PROCESSES = 64
"""Most CPU processes the demo starts (``--cp``): each one is a whole Python with torch and megatron-core."""
MAX_SEQ_LENGTH = 1 << 15
"""Longest ``--seq-length``: the no-CP reference run holds dense ``seq_length x seq_length`` attention scores
(4 GiB per head at this length in float32)."""


def check_before_spawning(run: RunConfig, out: str | None) -> None:
    """Everything the spawned processes would fail on, checked here first (InputError, one line): the document
    lengths (a shipped name, or a file that exists and parses), FCP's settings, the process count and the records
    folder ``out`` (made here if missing; it must be a writable folder)."""
    if run.world_size > MAX_PROCESSES:
        raise InputError(f"--cp {run.cp} would start {run.world_size} CPU processes, above {MAX_PROCESSES}; use a "
                         "smaller --cp (the demo's point is the same loss, not scale)")
    if run.seq_length > MAX_SEQ_LENGTH:
        raise InputError(f"--seq-length {run.seq_length} is above {MAX_SEQ_LENGTH}: the no-CP reference run holds "
                         "dense seq_length x seq_length attention scores; use a shorter --seq-length")
    try:
        load_distribution(run.doclens)
    except InputError as err:
        raise InputError(f"--doclens: {err}") from None
    fcp_config(run)
    check_nodes(run)
    err = folder_write_problem(out) if out is not None else None
    if err is not None:
        raise InputError(f"--out {out}: cannot make the records folder or write in it ({err.strerror or err}); "
                         "pass a writable folder")


def print_memory_summary(steps: list[dict]) -> None:
    """The largest per-step attention memory figures of rank 0, measured and modeled, and whether they agree."""
    own = steps[0]["own_kv_bytes"]
    stages = max(s["memory_model"]["num_stages"] for s in steps)
    print(f"attention memory on CP rank 0, largest over steps (own key/values of a layer: {own / 1024:.1f} KiB; "
          f"up to {stages} stage{'s' if stages > 1 else ''} per layer):")
    differ = []
    for name in MEMORY_FIGURES:
        got = max(s["memory"][name] for s in steps)
        want = max(s["memory_model"][name] for s in steps)
        print(f"  {MEMORY_LABELS[name]:<66s} {got / 1024:8.1f} KiB {got / own:5.2f}x own | model "
              f"{want / 1024:8.1f} KiB {want / own:5.2f}x")
        differ += [name] if any(s["memory"][name] != s["memory_model"][name] for s in steps) else []
    print("measured and modeled agree at every step" if not differ else
          f"measured and modeled differ at some step in: {', '.join(differ)}")


if __name__ == "__main__":
    raise SystemExit(main())
