"""Cost model, simulator and ``fcp`` command line."""

import json

import numpy as np
import pytest

from megatron_fcp.cli import main
from megatron_fcp.errors import InputError
from megatron_fcp.planner.api import make_plan
from megatron_fcp.sim.model import evaluate, load_hardware, mfu, useful_flops
from megatron_fcp.sim.simulate import SimConfig, format_table, simulate

HW = load_hardware("h100_node")


def test_shipped_profiles_load_and_differ_only_in_name():
    h200 = load_hardware("h200_node")
    assert HW.kv_bytes_per_token == 2 * 8 * 128 * 2
    assert h200.peak_bf16_dense_tflops == HW.peak_bf16_dense_tflops
    assert h200.name != HW.name


def test_profile_with_missing_field_is_rejected(tmp_path):
    bad = tmp_path / "hw.yaml"
    bad.write_text("name: x\ngpus_per_node: 8\n")
    with pytest.raises(InputError, match="missing fields"):
        load_hardware(bad)


def test_nocp_has_no_communication_and_step_equals_compute():
    plan = make_plan([100, 200, 300, 424], 2, 512, "causal", "nocp")
    cost = evaluate(plan, HW)
    assert cost.recv_bytes.sum() == 0
    np.testing.assert_allclose(cost.step_s, cost.compute_s, rtol=1e-12)


def test_ring_moves_every_other_ranks_slots():
    cp, tokens = 4, 1024
    plan = make_plan([1000, 3096], cp, tokens, "full", "ring")
    cost = evaluate(plan, HW)
    slots = int(plan.num_tokens[0])
    np.testing.assert_array_equal(cost.recv_bytes, np.full(cp, (cp - 1) * slots * HW.kv_bytes_per_token))


def test_fcp_bytes_equal_plan_volume_and_mfu_is_below_kernel_efficiency():
    plan = make_plan([5000, 100, 200, 2892], 4, 2048, "causal", "fcp")
    cost = evaluate(plan, HW)
    np.testing.assert_array_equal(cost.recv_bytes, plan.recv_tokens * HW.kv_bytes_per_token)
    assert 0 < mfu(plan, HW, cost) < HW.attention_fwd_efficiency
    exact = sum((e * (e + 1) - s * (s + 1)) // 2 for _, d, s, e in plan.q.tolist())
    assert useful_flops(plan, HW) == pytest.approx(exact * HW.fwd_flops_per_pair * (1 + HW.bwd_flops_factor))


def test_tiny_pieces_cost_more_per_pair_than_large_ones():
    tiny = evaluate(make_plan([1] * 1024, 1, 1024, "full", "fcp"), HW)
    large = evaluate(make_plan([1024], 1, 1024, "full", "fcp"), HW)
    assert tiny.compute_s[0] / tiny.pairs[0] > 10 * large.compute_s[0] / large.pairs[0]


def test_simulate_reports_every_strategy_against_ring():
    config = SimConfig(lengths=("spamassassin",), cps=(4,), tokens_per_rank=2048, masks=("causal",), num_batches=2)
    cells = simulate(config, HW)
    by = {c.strategy: c for c in cells}
    assert set(by) == {"fcp", "ring", "hybrid", "magi", "nocp"}
    assert by["ring"].comm_vs_ring == pytest.approx(1.0)
    assert by["ring"].speedup_vs_ring == pytest.approx(1.0)
    assert by["fcp"].pad_frac == 0.0
    assert "fcp" in format_table(cells)


def test_simulate_rejects_unknown_strategy():
    with pytest.raises(InputError, match="unknown strategies"):
        SimConfig(lengths=("spamassassin",), strategies=("zigzag",))


def test_cli_plan_writes_documented_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["plan", "--lengths", "spamassassin", "--cp", "4", "--tokens-per-rank", "1024", "--json", str(out)]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["cp"] == 4 and data["mask"] == "causal"
    assert sum(data["docs"]) == 4 * 1024
    assert {"q", "kv_recv", "num_tokens", "num_pad_tokens"} <= set(data["ranks"][0])
    assert data["metrics"]["problems"] == []
    assert "rank 0" in capsys.readouterr().out


def test_cli_plan_as_batch_requires_exact_sum(tmp_path, capsys):
    lengths = tmp_path / "batch.txt"
    lengths.write_text("# one micro-batch\n100\n200\n")
    assert main(["plan", "--lengths", str(lengths), "--cp", "2", "--tokens-per-rank", "100", "--as-batch"]) == 2
    assert "hold 300 tokens but cp x tokens_per_rank = 2 x 100 = 200" in capsys.readouterr().err
    assert main(["plan", "--lengths", str(lengths), "--cp", "3", "--tokens-per-rank", "100", "--as-batch"]) == 0


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ("# nothing\n", [], "holds no lengths"),
        ("10\n-3\n", [], "negative"),
        ("10\n2.5\n", [], "not an integer"),
        ("10\n", ["--cp", "0"], "cp must be an integer >= 1, got 0"),
    ],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, capsys, content, args, message):
    lengths = tmp_path / "lens.txt"
    lengths.write_text(content)
    argv = ["plan", "--lengths", str(lengths), "--cp", "2", "--tokens-per-rank", "8", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_simulate_writes_plot_and_json(tmp_path):
    png, js = tmp_path / "sim.png", tmp_path / "sim.json"
    argv = ["simulate", "--lengths", "spamassassin", "--cp", "2,4", "--tokens-per-rank", "1024", "--num-batches", "2",
            "--plot", str(png), "--json", str(js), "--quiet"]
    assert main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads(js.read_text())["cells"]) == 2 * 2 * 5
