"""End-to-end: a tiny megatron-core GPT trained with FCP against the same model without CP (float64-free, fp32).

Each run is real training on gloo CPU processes (megatron_fcp.cpu_demo.train): same model, data and seed.
Targets (issue "Megatron-LM integration"): step-1 loss within 1e-6 relative, step-1 gradients within 1e-5
(every parameter, gathered over TP), loss within 1e-4 through step 20; checkpoints interchange both ways.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

from megatron_fcp.cpu_demo import train  # noqa: E402
from megatron_fcp.cpu_demo.train import RunConfig, baseline_of, launch  # noqa: E402

BASE, LAYOUTS = train.EQUIVALENCE_BASE, train.EQUIVALENCE_LAYOUTS
STEPS = BASE.steps


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs launched once per module, by name."""
    root = tmp_path_factory.mktemp("runs")
    cache = {}

    def get(name: str, run: RunConfig) -> tuple[dict, dict]:
        if name not in cache:
            run = replace(run, grads_out=str(root / f"{name}.grads.pt"))
            steps = launch(run, root / f"{name}.json", quiet=True)["steps"]
            cache[name] = (steps, torch.load(run.grads_out))
        return cache[name]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fcp_training_matches_training_without_cp(runs, layout):
    run = replace(BASE, **LAYOUTS[layout])
    ref = baseline_of(run)
    fcp_steps, fcp_grads = runs(layout, run)
    ref_steps, ref_grads = runs(f"nocp_dp{ref.dp}", ref)
    assert len(fcp_steps) == len(ref_steps) == STEPS
    assert _rel(fcp_steps[0]["loss"], ref_steps[0]["loss"]) <= 1e-6
    assert fcp_steps[0]["tokens"] == ref_steps[0]["tokens"], "both runs must count the same loss tokens"
    assert set(fcp_grads) == set(ref_grads)
    worst = max(float((fcp_grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()) for n in ref_grads)
    assert worst <= 1e-5, f"step-1 gradients differ by {worst:.2e} (relative, worst parameter)"
    drift = max(_rel(f["loss"], r["loss"]) for f, r in zip(fcp_steps, ref_steps, strict=True))
    assert drift <= 1e-4, f"loss drifted {drift:.2e} (relative) within {STEPS} steps"


@pytest.mark.parametrize("first", ["fcp", "nocp"])
def test_checkpoints_interchange_between_fcp_and_no_cp(tmp_path, first):
    """Save after step 2 in one mode, load in the other, continue: steps 3-4 match the uninterrupted run."""
    fcp = replace(BASE, cp=2, steps=4)
    nocp = baseline_of(fcp)
    saver, loader = (fcp, nocp) if first == "fcp" else (nocp, fcp)
    ckpt = str(tmp_path / "ckpt")
    whole = launch(replace(saver, save_dir=ckpt, save_after_step=2), tmp_path / "saver.json", quiet=True)["steps"]
    resumed = launch(replace(loader, load_dir=ckpt, first_step=3, steps=2), tmp_path / "loader.json",
                     quiet=True)["steps"]
    assert [s["step"] for s in resumed] == [3, 4]
    for want, got in zip(whole[2:], resumed, strict=True):
        assert _rel(got["loss"], want["loss"]) <= 1e-5, (want, got)


def test_entry_point_rejects_misconfiguration_with_one_line():
    """The real entry point (Megatron's argument parser): exit code 2 and one line, before any training."""
    argv = [sys.executable, "-W", "ignore", "-m", "megatron_fcp.megatron.pretrain_gpt", "--num-layers", "2",
            "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "1024", "--max-position-embeddings",
            "1024", "--micro-batch-size", "1", "--context-parallel-mode", "fcp", "--context-parallel-size", "4",
            "--calculate-per-token-loss", "--mock-data", "--fcp-mock-doclens", "linux_files",
            "--position-embedding-type", "rope", "--attention-dropout", "0", "--group-query-attention",
            "--num-query-groups", "3"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WORLD_SIZE": "4"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megatron-fcp: error:")]
    assert len(errors) == 1 and "--num-query-groups 3" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
