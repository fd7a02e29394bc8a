"""Kernel time laws fitted to the published FlashAttention figures (megatron_fcp/sim/calibration.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron_fcp.sim import calibration as cal

REPO = Path(__file__).resolve().parents[2]
PEAK, LAUNCH, TILE = 989.4, 10e-6, 128


@pytest.fixture(scope="module")
def data():
    return cal.load_published()


def test_fit_recovers_a_known_law():
    """Figures made from a known law (efficiency 0.5, 100 keys per row) give it back."""
    rows = []
    for causal in (False, True):
        for seqlen in (512, 1024, 4096, 16384):
            paper, work, q_rows = cal.benchmark_shape(seqlen, causal, TILE)
            fpp = 4 * 16 * 128
            law = cal.KernelLaw(0.5, 100.0, 0, 0.0, ())
            seconds = cal.law_seconds(law, "fwd", work, q_rows, fpp, PEAK, LAUNCH)
            rows.append({"seqlen": seqlen, "pass": "fwd", "head_dim": 128, "nheads": 16, "source": "synthetic",
                         "tflops": paper * fpp / seconds / 1e12, "causal": causal})
        fitted = cal.fit_law([r for r in rows if r["causal"] == causal], causal, PEAK, LAUNCH, TILE)
        assert fitted.max_efficiency == pytest.approx(0.5, rel=1e-9)
        assert fitted.row_overhead_keys == pytest.approx(100.0, rel=1e-6)
        assert fitted.max_rel_error < 1e-9


def test_fa2_laws_fit_every_published_figure_within_5_percent(data):
    laws = cal.fit_kernel(data, "fa2", PEAK, LAUNCH, TILE)
    assert set(laws) == {(p, m) for p in cal.PASSES for m in cal.MASKS}
    for key, law in laws.items():
        assert law.points == 6 and law.max_rel_error < 0.05, (key, law)
        assert 0.2 < law.max_efficiency < 0.5, (key, law)  # FA2 on H100: 190-370 of 989 TFLOP/s


def test_derived_causal_backward_reproduces_the_forward_backward_figure(data):
    """3.5 / (1 / fwd + 2.5 / bwd) of the derived backward equals the published forward + backward figure."""
    derived = {r["seqlen"]: r["tflops"] for r in cal.published_points(data, "fa2", "bwd", True)}
    fwd = {r["seqlen"]: r["tflops"] for r in cal.published_points(data, "fa2", "fwd", True)}
    both = {r["seqlen"]: r["tflops"] for r in data["kernel_tflops"]
            if r["kernel"] == "fa2" and r["pass"] == "fwd_bwd" and r["causal"] and r["head_dim"] == 128}
    assert sorted(derived) == [512, 1024, 2048, 4096, 8192, 16384]
    for seqlen, bwd in derived.items():
        assert 3.5 / (1 / fwd[seqlen] + 2.5 / bwd) == pytest.approx(both[seqlen], rel=1e-12)


def test_fa3_has_no_causal_backward_law(data):
    """The FA3 paper publishes no causal backward figure: no law is made up for it."""
    assert ("bwd", "causal") not in cal.fit_kernel(data, "fa3", PEAK, LAUNCH, TILE)


def test_ring_flash_attention_single_gpu_figure_is_predicted(data):
    """The laws were fitted to square, one-document calls; ring-flash-attention's single-GPU varlen figure (225.4
    iterations/s, 8192 tokens of several documents, GQA 32/8) is an independent check: within 10%."""
    anchor = cal.ring_flash_attention_anchor(cal.fit_kernel(data, "fa2", PEAK, LAUNCH, TILE), PEAK, LAUNCH, TILE)
    assert anchor.single_iter_s == pytest.approx(225.4, rel=0.10)
    assert anchor.ring_iter_s < anchor.single_iter_s / 8 * 1.2


@pytest.mark.parametrize("kernel", ["fa2", "fa3"])
def test_shipped_calibration_files_are_current(data, kernel):
    """megatron_fcp/data/kernel_laws/h100_published_*.yaml are what scripts/calibrate_published.py writes today."""
    shipped = yaml.safe_load((REPO / f"megatron_fcp/data/kernel_laws/h100_published_{kernel}.yaml").read_text())
    fresh = yaml.safe_load(cal.to_yaml(kernel, cal.fit_kernel(data, kernel, PEAK, LAUNCH, TILE), shipped["note"]))
    _assert_same_fit(shipped, fresh)


def _assert_same_fit(shipped, fresh, where="file"):
    """Equal structure, equal strings and integers; floats to 1e-9 relative. A least-squares fit is not
    reproducible to the last bit across machines (BLAS builds, CPU kinds: seen in the 16th digit), while a
    stale file differs in the third digit or earlier."""
    if isinstance(shipped, float) or isinstance(fresh, float):
        assert fresh == pytest.approx(shipped, rel=1e-9, abs=1e-12), where
    elif isinstance(shipped, dict) and isinstance(fresh, dict):
        assert sorted(shipped) == sorted(fresh), where
        for key in shipped:
            _assert_same_fit(shipped[key], fresh[key], f"{where}.{key}")
    elif isinstance(shipped, list) and isinstance(fresh, list):
        assert len(shipped) == len(fresh), where
        for i, (a, b) in enumerate(zip(shipped, fresh, strict=True)):
            _assert_same_fit(a, b, f"{where}[{i}]")
    else:
        assert shipped == fresh, where


def test_the_fit_comparison_tolerates_the_last_digits_only():
    """A stale calibration file (a law off in the sixth digit, a source renamed) still fails."""
    law = {"laws": {"fwd_full": {"max_efficiency": 0.38038920371274454, "points": 6, "sources": ["a"]}}}
    _assert_same_fit(law, {"laws": {"fwd_full": {"max_efficiency": 0.38038920371274459, "points": 6,
                                                 "sources": ["a"]}}})
    for stale in ({"laws": {"fwd_full": {"max_efficiency": 0.380389, "points": 6, "sources": ["a"]}}},
                  {"laws": {"fwd_full": {"max_efficiency": 0.38038920371274454, "points": 6, "sources": ["b"]}}},
                  {"laws": {"fwd_full": {"max_efficiency": 0.38038920371274454, "points": 5, "sources": ["a"]}}}):
        with pytest.raises(AssertionError):
            _assert_same_fit(law, stale)


# -- the cost model with laws ------------------------------------------------------------------------------------
def _mimic(hw, row_overhead_keys=0.0):
    """``hw`` with laws that are its fixed efficiencies (no per-row cost): the model must not change."""
    import dataclasses

    laws = {(p, m): cal.KernelLaw(hw.attention_fwd_efficiency if p == "fwd" else hw.attention_bwd_efficiency,
                                  row_overhead_keys, 0, 0.0, ()) for p in cal.PASSES for m in cal.MASKS}
    return dataclasses.replace(hw, kernel_laws="mimic", laws=laws)


def _plans(mask):
    from megatron_fcp.data.lengths import load_distribution, pack_batches
    from megatron_fcp.planner.api import make_plan

    batch = pack_batches(load_distribution("spamassassin"), 8 * 2048, 1, 0)[0]
    return [make_plan(batch, 8, 2048, mask, strategy) for strategy in ("fcp", "magi", "ring", "hybrid")]


def test_laws_equal_to_the_fixed_efficiencies_change_nothing():
    """Point-to-point plans under a full mask (own keys: one call; stages: one call each) give the fixed-efficiency
    figures when the laws are those efficiencies; ring plans nearly (with laws step 0, the rank's own chunks, is
    timed apart from the later steps instead of every step being one cp-th of the work)."""
    import numpy as np

    from megatron_fcp.sim.model import evaluate, load_hardware

    hw = load_hardware("h100_node")
    for plan in _plans("full"):
        fixed, mimic = evaluate(plan, hw), evaluate(plan, _mimic(hw))
        if plan.exchange == "p2p":
            np.testing.assert_allclose(mimic.step_s, fixed.step_s, rtol=1e-12)
            np.testing.assert_allclose(mimic.compute_s, fixed.compute_s, rtol=1e-12)
        elif plan.exchange == "ring":
            np.testing.assert_allclose(mimic.compute_s, fixed.compute_s, rtol=1e-3)  # launches: cp per rank
            np.testing.assert_allclose(mimic.step_s, fixed.step_s, rtol=1e-2)


def test_a_per_row_cost_slows_every_strategy():
    from megatron_fcp.sim.model import evaluate, load_hardware

    hw = load_hardware("h100_node")
    for mask in ("causal", "full"):
        for plan in _plans(mask):
            base, slower = evaluate(plan, _mimic(hw)), evaluate(plan, _mimic(hw, 200.0))
            assert (slower.compute_s >= base.compute_s).all() and slower.step_time_s > base.step_time_s, plan.strategy


def test_calibrated_profiles_load_their_laws():
    from megatron_fcp.sim.model import HARDWARE, load_hardware

    for name in ("h100_node_fa2_published", "h200_node_fa2_published"):
        assert name in HARDWARE
        hw = load_hardware(name)
        assert hw.kernel_laws == "h100_published_fa2" and set(hw.laws) == {(p, m) for p in cal.PASSES
                                                                            for m in cal.MASKS}
    assert load_hardware("h100_node").laws is None


def test_bad_kernel_laws_say_what_is_wrong(tmp_path):
    from megatron_fcp.errors import InputError
    from megatron_fcp.sim.model import load_hardware

    profile = (REPO / "megatron_fcp/data/hardware/h100_node_fa2_published.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(profile.replace("kernel_laws: h100_published_fa2", "kernel_laws: nosuch"))
    with pytest.raises(InputError, match="kernel_laws 'nosuch' is neither a shipped calibration"):
        load_hardware(bad)
    (tmp_path / "three.yaml").write_text("laws:\n  fwd_full: {max_efficiency: 0.4, row_overhead_keys: 0}\n")
    bad.write_text(profile.replace("kernel_laws: h100_published_fa2", "kernel_laws: three.yaml"))
    with pytest.raises(InputError, match="no law for fwd_causal, bwd_full, bwd_causal"):
        load_hardware(bad)


def test_every_shipped_profile_loads_and_a_kernel_law_file_is_named_as_such():
    """Profiles (data/hardware) and kernel laws (data/kernel_laws) live apart; each profile loads, and a law file
    given where a profile is expected says what it is in one line instead of listing missing fields."""
    from megatron_fcp.errors import InputError
    from megatron_fcp.sim.model import HARDWARE, load_hardware

    shipped = sorted(path.stem for path in (REPO / "megatron_fcp/data/hardware").glob("*.yaml"))
    assert shipped == sorted(HARDWARE)
    for name in HARDWARE:
        load_hardware(name)
    with pytest.raises(InputError, match="is a kernel-law file, not a hardware profile") as error:
        load_hardware(REPO / "megatron_fcp/data/kernel_laws/h100_published_fa2.yaml")
    assert "\n" not in str(error.value) and "missing fields" not in str(error.value)


def test_fit_calls_recovers_laws_and_launch_from_measured_shapes():
    """Timings made from known laws and a 12 us launch, over varlen shapes like the GPU script's, give them back."""
    truth = {("fwd", "full"): cal.KernelLaw(0.40, 50.0, 0, 0.0, ()), ("fwd", "causal"): cal.KernelLaw(0.35, 90.0, 0,
             0.0, ()), ("bwd", "full"): cal.KernelLaw(0.33, 130.0, 0, 0.0, ()),
             ("bwd", "causal"): cal.KernelLaw(0.30, 150.0, 0, 0.0, ())}
    launch, fpp = 12e-6, 4 * 32 * 128
    records = []
    for causal in (False, True):
        for q_lens in ([1], [16], [128], [2048], [16384], [256] * 64, [32] * 512, [3000, 50, 7000]):
            k_lens = q_lens if causal else [2 * n for n in q_lens]
            _, work, rows = cal.call_work(q_lens, k_lens, causal, TILE)
            mask = "causal" if causal else "full"
            ms = {p: 1e3 * float(cal.law_seconds(truth[p, mask], p, work, rows, fpp, PEAK, launch)) for p in cal.PASSES}
            records.append({"q_lens": q_lens, "k_lens": k_lens, "causal": causal, "fwd_ms": ms["fwd"],
                            "bwd_ms": ms["bwd"]})
    laws, fitted_launch = cal.fit_calls(records, PEAK, 32, 128, TILE)
    assert fitted_launch == pytest.approx(launch, rel=1e-6)
    for key, law in truth.items():
        assert laws[key].max_efficiency == pytest.approx(law.max_efficiency, rel=1e-6)
        assert laws[key].row_overhead_keys == pytest.approx(law.row_overhead_keys, rel=1e-5)
        assert laws[key].points == 8 and laws[key].max_rel_error < 1e-6
    with pytest.raises(Exception, match="at least 3 shapes"):
        cal.fit_calls(records[:2], PEAK, 32, 128, TILE)


def test_fit_measured_script_writes_a_loadable_profile(tmp_path, load_script):
    """scripts/fit_measured.py on a kernels file in gpu_perf.py's layout (totals per call) recovers the laws that
    made its timings and writes a profile the cost model loads with them."""
    import json

    from megatron_fcp.sim.model import load_hardware

    law = cal.KernelLaw(0.42, 80.0, 0, 0.0, ())
    columns = ["causal", "num_segments", "num_q", "num_k", "max_q", "max_k", "pairs", "fwd_ms", "bwd_ms",
               "fwd_reps", "bwd_reps"]
    rows = []
    for causal in (False, True):
        for q_lens in ([1], [64], [512], [4096], [32768], [128] * 100, [700, 9000]):
            k_lens = q_lens if causal else [3 * n for n in q_lens]
            exact, work, n_q = cal.call_work(q_lens, k_lens, causal, TILE)
            ms = [1e3 * float(cal.law_seconds(law, p, work, n_q, 4 * 32 * 128, PEAK, 20e-6)) for p in cal.PASSES]
            rows.append([causal, len(q_lens), sum(q_lens), sum(k_lens), max(q_lens), max(k_lens), exact, *ms, 3, 3])
    kernels = {"device": "NVIDIA test", "torch": "x", "replay_columns": columns, "replay": rows,
               "config": {"peak_tflops": PEAK, "q_heads": 32, "head_dim": 128, "dtype": "bfloat16", "backend": "t"}}
    path = tmp_path / "k.json"
    path.write_text(json.dumps(kernels))
    script = load_script("fit_measured")
    script.main([str(path), "--name", "test_laws", "--out", str(tmp_path)])
    hw = load_hardware(tmp_path / "test_laws_node.yaml")
    assert hw.kernel_launch_us == pytest.approx(20.0, abs=0.01)
    for key in hw.laws:
        assert hw.laws[key].max_efficiency == pytest.approx(0.42, rel=1e-5)
        assert hw.laws[key].row_overhead_keys == pytest.approx(80.0, rel=1e-4)
