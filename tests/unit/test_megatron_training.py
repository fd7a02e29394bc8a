"""End-to-end: a tiny megatron-core GPT trained with FCP against the same model without CP (float64-free, fp32).

Each run is real training on gloo CPU processes (megatron_fcp.cpu_trainer.train): same model, data and seed.
Targets (issue "Megatron-LM integration"): step-1 loss within 1e-6 relative, step-1 gradients within 1e-5
(every parameter, gathered over TP), loss within 1e-4 through step 20; checkpoints interchange both ways. The
staged key/value exchange (a small budget) and activation recompute (selective: core attention; full: whole
layers) hold the loss within 1e-5 at every step, and rank 0's measured attention memory equals the planner's model
and stays within the budget.
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

from megatron_fcp.cpu_trainer import train  # noqa: E402
from megatron_fcp.cpu_trainer.train import RunConfig, baseline_of, kv_bytes_per_token, launch, launch_series  # noqa: E402

BASE, LAYOUTS, STAGED = train.EQUIVALENCE_BASE, train.EQUIVALENCE_LAYOUTS, train.STAGED_LAYOUTS
HEADS = train.HEAD_PARALLEL_LAYOUTS
STEPS = BASE.steps


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


class _Runs:
    """Runs launched once per module, by name; :meth:`together` launches several in one set of processes."""

    def __init__(self, root):
        self.root, self.cache = root, {}

    def _prepare(self, name: str, run: RunConfig) -> RunConfig:
        return replace(run, grads_out=str(self.root / f"{name}.grads.pt"),
                       tensorboard_dir=str(self.root / f"{name}.tb"))

    def together(self, named: dict[str, RunConfig]) -> None:
        """Launch the runs not launched yet, those of equal world size in one series (saves process start-ups)."""
        todo = {name: self._prepare(name, run) for name, run in named.items() if name not in self.cache}
        for size in sorted({run.world_size for run in todo.values()}):
            group = {name: run for name, run in todo.items() if run.world_size == size}
            records = launch_series(list(group.values()), [self.root / f"{name}.json" for name in group], quiet=True)
            for (name, run), rec in zip(group.items(), records, strict=True):
                self.cache[name] = (rec["steps"], torch.load(run.grads_out))

    def __call__(self, name: str, run: RunConfig) -> tuple[list[dict], dict]:
        if name not in self.cache:
            run = self._prepare(name, run)
            steps = launch(run, self.root / f"{name}.json", quiet=True)["steps"]
            self.cache[name] = (steps, torch.load(run.grads_out))
        return self.cache[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _Runs(tmp_path_factory.mktemp("runs"))


def _ref(run: RunConfig) -> str:
    """The name of ``run``'s no-CP baseline: ``nocp_dp{N}``, with the data seed where it is not the base run's."""
    ref = baseline_of(run)
    return f"nocp_dp{ref.dp}" + ("" if ref.seed == BASE.seed else f"_seed{ref.seed}")


def _with_baselines(layouts: dict[str, dict]) -> dict[str, RunConfig]:
    """The runs of ``layouts`` and their no-CP baselines (:func:`_ref`), by name."""
    named = {name: replace(BASE, **kw) for name, kw in layouts.items()}
    return {**named, **{_ref(run): baseline_of(run) for run in named.values()}}


def _assert_matches_no_cp(fcp_steps, fcp_grads, ref_steps, ref_grads, loss_tol: float) -> None:
    assert len(fcp_steps) == len(ref_steps) == STEPS
    assert _rel(fcp_steps[0]["loss"], ref_steps[0]["loss"]) <= 1e-6
    assert fcp_steps[0]["tokens"] == ref_steps[0]["tokens"], "both runs must count the same loss tokens"
    assert set(fcp_grads) == set(ref_grads)
    worst = max(float((fcp_grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()) for n in ref_grads)
    assert worst <= 1e-5, f"step-1 gradients differ by {worst:.2e} (relative, worst parameter)"
    drift = [_rel(f["loss"], r["loss"]) for f, r in zip(fcp_steps, ref_steps, strict=True)]
    assert max(drift) <= loss_tol, f"loss differs by {max(drift):.2e} (relative) at step {drift.index(max(drift)) + 1}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fcp_training_matches_training_without_cp(runs, layout):
    runs.together(_with_baselines(LAYOUTS))  # the first case launches every layout, equal process counts together
    run = replace(BASE, **LAYOUTS[layout])
    ref = baseline_of(run)
    _assert_matches_no_cp(*runs(layout, run), *runs(_ref(run), ref), loss_tol=1e-4)


@pytest.mark.parametrize("layout", ["cp2", "cp4"])
def test_cpu_run_writes_fcp_figures_to_tensorboard_and_its_log_line(runs, layout):
    """Rank 0's TensorBoard event files hold every FCP figure (the names Megatron's log line and TensorBoard use) at
    every step, equal to the step records; the step's log line shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_fcp.megatron.step import FIGURES

    runs.together(_with_baselines(LAYOUTS))
    steps, _ = runs(layout, replace(BASE, **LAYOUTS[layout]))
    events = EventAccumulator(str(runs.root / f"{layout}.tb"))
    events.Reload()
    assert set(FIGURES) | {"lm loss"} <= set(events.Tags()["scalars"])
    for name in FIGURES:
        scalars = events.Scalars(name)
        assert [s.step for s in scalars] == [rec["step"] for rec in steps]
        for got, rec in zip(scalars, steps, strict=True):
            assert got.value == pytest.approx(rec["fcp"][name], rel=1e-6, abs=1e-6), (name, rec["step"])
    assert all(rec["fcp"]["fcp kv sent MiB"] > 0 and rec["fcp"]["fcp kv received MiB"] > 0 for rec in steps[1:])
    assert all(1.0 <= rec["fcp"]["fcp planned imbalance"] < 2.0 for rec in steps)
    line = train.figures_line(steps[-1]["fcp"])
    for label in ("fcp imbalance", "kv sent", "received", "exchange wait", "planning"):
        assert label in line


MEASURED_AS_MODELED = ("kv_peak", "kv_kept", "grad_peak", "returned_peak", "kv_kept_all_layers", "kv_held_all_layers")


@pytest.mark.parametrize("layout", list(STAGED))
def test_staged_exchange_and_recompute_match_training_without_cp(runs, layout):
    """A small key/value budget (several stages on most ranks), selective and full recompute: the same training as
    without CP, and the attention memory rank 0 measured over every step is the planner's model of it."""
    runs.together(_with_baselines(STAGED))  # the first case launches every layout, equal process counts together
    run = replace(BASE, **STAGED[layout])
    ref = baseline_of(run)
    fcp_steps, fcp_grads = runs(layout, run)
    _assert_matches_no_cp(fcp_steps, fcp_grads, *runs(_ref(run), ref), loss_tol=1e-5)

    budget = run.kv_budget_tokens if isinstance(run.kv_budget_tokens, int) else run.seq_length // run.cp
    per_token = kv_bytes_per_token(run)
    for step in fcp_steps:
        got, model = step["memory"], step["memory_model"]
        mismatch = {name: (got[name], model[name]) for name in MEASURED_AS_MODELED if got[name] != model[name]}
        assert not mismatch, f"step {step['step']}: measured vs modeled bytes differ: {mismatch}"
        assert got["kv_peak"] <= 2 * budget * per_token and got["kv_kept"] <= budget * per_token, step["step"]
        if run.recompute != "none":  # recompute keeps nothing of the exchange from the forward to the backward
            assert got["kv_kept_all_layers"] == 0
    assert max(step["memory"]["kv_peak"] for step in fcp_steps) > 0, "the meter saw no received key/values"
    if run.kv_budget_tokens == train.SMALL_KV_BUDGET:
        staged = sum(step["memory_model"]["num_stages"] > 1 for step in fcp_steps)
        assert staged >= 3 * STEPS // 4, f"only {staged} of {STEPS} steps received in more than one stage"


@pytest.mark.parametrize("layout", list(HEADS))
def test_head_parallel_exchange_matches_training_without_cp(runs, layout):
    """--fcp-node-exchange heads (heads split inside each emulated node by all-to-alls, the staged exchange between
    nodes; one node: Ulysses): the same training as without CP, and the attention memory rank 0 measured is the
    planner's model of its node's plan on its share of the heads, within the 2x / 1x bound of its own key/values."""
    runs.together(_with_baselines(HEADS))
    run = replace(BASE, **HEADS[layout])
    ref = baseline_of(run)
    fcp_steps, fcp_grads = runs(layout, run)
    _assert_matches_no_cp(fcp_steps, fcp_grads, *runs(_ref(run), ref), loss_tol=1e-5)
    if run.node_exchange == "auto":  # the exchange picked per micro-batch: both ran, each matching the model
        picked = [step["fcp"]["fcp heads exchange"] for step in fcp_steps]
        assert set(picked) == {0.0, 1.0}, picked
    nodes = run.cp // (run.ranks_per_node or run.cp)
    if nodes == 1:  # nothing crosses between nodes: no exchange to measure
        assert all("memory" not in step for step in fcp_steps)
        return
    own = train.own_kv_bytes(run)
    for step in fcp_steps:
        got, model = step["memory"], step["memory_model"]
        mismatch = {name: (got[name], model[name]) for name in MEASURED_AS_MODELED if got[name] != model[name]}
        assert not mismatch, f"step {step['step']}: measured vs modeled bytes differ: {mismatch}"
        assert got["kv_peak"] <= 2 * own and got["kv_kept"] <= own, step["step"]
    assert max(step["memory"]["kv_peak"] for step in fcp_steps) > 0, "the meter saw no received key/values"


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


@pytest.mark.parametrize("wrong, needle", [
    (["--group-query-attention", "--num-query-groups", "3"], "--num-query-groups 3"),
    (["--fcp-kv-budget-tokens", "0"], "--fcp-kv-budget-tokens 0"),
])
def test_entry_point_rejects_misconfiguration_with_one_line(wrong, needle):
    """The real entry point (Megatron's argument parser): exit code 2 and one line, before any training."""
    argv = [sys.executable, "-W", "ignore", "-m", "megatron_fcp.megatron.pretrain_gpt", "--num-layers", "2",
            "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "1024", "--max-position-embeddings",
            "1024", "--micro-batch-size", "1", "--context-parallel-mode", "fcp", "--context-parallel-size", "4",
            "--calculate-per-token-loss", "--mock-data", "--fcp-mock-doclens", "linux_files",
            "--position-embedding-type", "rope", "--attention-dropout", "0", *wrong]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WORLD_SIZE": "4"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megatron-fcp: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
