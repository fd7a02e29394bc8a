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
    """configs/hardware/h100_published_*.yaml are what scripts/calibrate_published.py writes today."""
    shipped = yaml.safe_load((REPO / f"configs/hardware/h100_published_{kernel}.yaml").read_text())
    fresh = yaml.safe_load(cal.to_yaml(kernel, cal.fit_kernel(data, kernel, PEAK, LAUNCH, TILE), shipped["note"]))
    assert shipped == fresh
