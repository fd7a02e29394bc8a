"""``python -m megatron_fcp.cpu_demo``: a tiny megatron-core GPT trained with FCP CP=N on CPU processes, then
the same run without CP, and the comparison (see README, "Quickstart")."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from megatron_fcp.cpu_demo.train import RunConfig, baseline_of, launch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_fcp.cpu_demo", description=__doc__)
    p.add_argument("--cp", type=int, default=4, help="context-parallel size (CPU processes), default 4")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-length", type=int, default=4096, help="tokens per packed micro-batch over the CP group")
    p.add_argument("--doclens", default="linux_files",
                   help="document lengths: linux_files, linux_dirs, spamassassin, magi_hist or a file")
    p.add_argument("--scheduler", default="fcp", help="block placement: fcp, ring, hybrid or magi")
    p.add_argument("--planning-workers", type=int, default=0,
                   help="data-loader worker processes that plan ahead (default 0: plan in the training process, "
                        "which is cheaper than extra processes on a 2-core machine)")
    p.add_argument("--out", default=None, help="folder for the per-step JSON records (default: a temp folder)")
    a = p.parse_args(argv)
    run = RunConfig(cp=a.cp, steps=a.steps, seq_length=a.seq_length, doclens=a.doclens, scheduler=a.scheduler,
                    planning_workers=a.planning_workers)
    out = Path(a.out or tempfile.mkdtemp(prefix="fcp-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"== FCP: tiny GPT (megatron-core, {run.num_layers} layers, hidden {run.hidden_size}), CP={run.cp} on "
          f"{run.world_size} CPU processes (gloo), {run.seq_length}-token packed batches from '{run.doclens}'")
    fcp = launch(run, out / "fcp.json")["steps"]
    print("== the same run without CP (1 process, Megatron's own attention with a document mask)")
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
    print(f"\nlargest relative loss difference over {len(fcp)} steps: {worst:.1e}")
    print(f"median per step (steps 3+): step {1e3 * step_s:.1f} ms | planning {1e3 * plan_s:.2f} ms "
          f"({100 * plan_s / step_s:.1f}% of the step; {where}) | data-loader wait "
          f"{1e3 * wait_s:.2f} ms ({100 * wait_s / step_s:.1f}% of the step)")
    print(f"largest share of a step (steps 3+): planning {100 * worst_plan:.1f}%, data-loader wait "
          f"{100 * worst_wait:.1f}%")
    print(f"FCP plan figures, mean over steps: attention-pairs imbalance "
          f"{np.mean([s['pairs_imbalance'] for s in fcp]):.3f}, key/value traffic "
          f"{100 * np.mean([s['comm_vs_ring'] for s in fcp]):.1f}% of ring CP's, "
          f"{np.mean([s['docs'] for s in fcp]):.1f} documents per micro-batch")
    print(f"records: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
