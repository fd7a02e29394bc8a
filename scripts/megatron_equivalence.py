"""Print the FCP-vs-no-CP training figures the tests assert on: step-1 loss and gradient differences and the
largest loss difference over 20 steps, for each parallel layout (tiny megatron-core GPT on gloo CPU processes).

    .venv/bin/python scripts/megatron_equivalence.py [--steps 20]
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from megatron_fcp.cpu_demo.train import EQUIVALENCE_BASE, EQUIVALENCE_LAYOUTS, baseline_of, launch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=EQUIVALENCE_BASE.steps)
    a = p.parse_args()
    base = replace(EQUIVALENCE_BASE, steps=a.steps)
    tmp = Path(tempfile.mkdtemp(prefix="fcp-equiv-"))
    refs = {}
    print("layout               | step-1 loss rel. diff | step-1 grads rel. diff (worst parameter) | "
          f"max loss rel. diff, steps 1-{a.steps}")
    for name, layout in EQUIVALENCE_LAYOUTS.items():
        run = replace(base, **layout, grads_out=str(tmp / f"{len(refs)}-{layout}.pt"))
        ref = baseline_of(run)
        if ref.dp not in refs:
            refs[ref.dp] = (launch(ref, tmp / f"ref{ref.dp}.json", quiet=True)["steps"], torch.load(ref.grads_out))
        ref_steps, ref_grads = refs[ref.dp]
        steps, grads = launch(run, tmp / "fcp.json", quiet=True)["steps"], torch.load(run.grads_out)
        rel = [abs(f["loss"] - r["loss"]) / abs(r["loss"]) for f, r in zip(steps, ref_steps, strict=True)]
        worst = max(float((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()) for n in ref_grads)
        print(f"{name:20s} | {rel[0]:21.1e} | {worst:40.1e} | {max(rel):.1e}")


if __name__ == "__main__":
    main()
