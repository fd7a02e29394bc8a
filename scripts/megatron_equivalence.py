"""Print the FCP-vs-no-CP training figures the tests assert on: step-1 loss and gradient differences and the
largest loss difference over 20 steps, for each parallel layout and for the staged key/value exchange and
activation recompute layouts (tiny megatron-core GPT on gloo CPU processes); then, for the latter, the attention
memory CP rank 0 measured (largest over steps) next to the planner's model of it.

    .venv/bin/python scripts/megatron_equivalence.py [--steps 20]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from megatron_fcp.cpu_trainer.train import (
    EQUIVALENCE_BASE,
    EQUIVALENCE_LAYOUTS,
    MEMORY_FIGURES,
    STAGED_LAYOUTS,
    baseline_of,
    launch_series,
)


def run_all(named: dict, tmp: Path) -> dict:
    """Records and step-1 gradients of every run, those of equal world size launched in one series."""
    out = {}
    for size in sorted({run.world_size for run in named.values()}):
        group = {name: run for name, run in named.items() if run.world_size == size}
        records = launch_series(list(group.values()), [tmp / f"{name}.json" for name in group], quiet=True)
        for (name, run), rec in zip(group.items(), records, strict=True):
            out[name] = (rec["steps"], torch.load(run.grads_out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=EQUIVALENCE_BASE.steps)
    a = p.parse_args()
    base = replace(EQUIVALENCE_BASE, steps=a.steps)
    tmp = Path(tempfile.mkdtemp(prefix="fcp-equiv-"))
    layouts = {**EQUIVALENCE_LAYOUTS, **STAGED_LAYOUTS}
    named = {name: replace(base, **layout, grads_out=str(tmp / f"{name}.pt")) for name, layout in layouts.items()}
    refs = {f"nocp_dp{baseline_of(run).dp}": baseline_of(run) for run in named.values()}
    results = run_all({**named, **refs}, tmp)
    print("layout                       | step-1 loss rel. diff | step-1 grads rel. diff (worst parameter) | "
          f"max loss rel. diff, steps 1-{a.steps}")
    for name, run in named.items():
        steps, grads = results[name]
        ref_steps, ref_grads = results[f"nocp_dp{baseline_of(run).dp}"]
        rel = [abs(f["loss"] - r["loss"]) / abs(r["loss"]) for f, r in zip(steps, ref_steps, strict=True)]
        worst = max(float((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()) for n in ref_grads)
        print(f"{name:28s} | {rel[0]:21.1e} | {worst:40.1e} | {max(rel):.1e}")

    print("\nattention memory on CP rank 0, largest over the steps, as multiples of the rank's own key/values of one "
          "layer (measured / modeled; '=' where equal at every step). Per layer: kv peak = received key/values held "
          "at once, kept = kept from the layer's forward to its backward, grads = their gradients held at once, "
          "returned = gradients of own key/values coming back at once. All layers: kept = received key/values kept "
          "when the forward ends, held = held at once.")
    print(f"{'layout':28s} | stages | {' | '.join(f'{n:>18s}' for n in MEMORY_FIGURES)}")
    for name in STAGED_LAYOUTS:
        steps = results[name][0]
        own = steps[0]["own_kv_bytes"]
        cells = []
        for n in MEMORY_FIGURES:
            got = max(s["memory"][n] for s in steps) / own
            want = max(s["memory_model"][n] for s in steps) / own
            same = all(s["memory"][n] == s["memory_model"][n] for s in steps)
            cells.append(f"{got:.3f} =" if same else f"{got:.3f} / {want:.3f}")
        stages = max(s["memory_model"]["num_stages"] for s in steps)
        print(f"{name:28s} | {stages:6d} | {' | '.join(f'{c:>18s}' for c in cells)}")


if __name__ == "__main__":
    main()
