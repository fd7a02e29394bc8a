"""The CPU demo's output: a verdict against a stated tolerance, a word on the no-CP reference, no third-party
notices, records kept where asked (a short demo: 2 gloo processes, then 1)."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

from megatron_fcp.cpu_trainer.__main__ import LOSS_TOLERANCE, main  # noqa: E402

ARGS = ["--cp", "2", "--steps", "2", "--seq-length", "256", "--doclens", "magi_hist"]


def test_demo_says_pass_against_its_tolerance_and_keeps_records_only_when_asked(tmp_path, capfd):
    assert main([*ARGS, "--out", str(tmp_path / "kept")]) == 0
    captured = capfd.readouterr()
    out = captured.out
    assert "Apex is not installed" not in out + captured.err  # third-party notices filtered in every process
    verdict = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(verdict) == 1 and verdict[0].startswith("PASS") and f"tolerance {LOSS_TOLERANCE:g}" in verdict[0]
    assert "not a benchmark" in out
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["fcp.json", "nocp.json"]
    assert f"records: {tmp_path / 'kept'}" in out
