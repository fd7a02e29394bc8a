"""FCP's Megatron options, start-up checks and data hooks (no megatron-core needed)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from megatron_namespace import args

from megatron_fcp.errors import InputError
from megatron_fcp.megatron.batch import (
    STATS,
    MockDocumentDataset,
    decode_rank_plan,
    doc_lengths_from_positions,
    encode_rank_plan,
    plan_micro_batch,
    rank_sample,
)
from megatron_fcp.megatron.config import TILE_FLAG, FcpConfig, add_fcp_args, check_fcp_args, fcp_config_from_args
from megatron_fcp.planner.stages import p2p_memory


def test_good_configuration_passes_and_ring_mode_is_left_to_megatron():
    check_fcp_args(args(), world_size=16)
    check_fcp_args(args(context_parallel_mode="ring", calculate_per_token_loss=False), world_size=3)


@pytest.mark.parametrize("changes, world, needle", [
    ({}, 12, "does not divide the 12 launched processes"),
    ({"pipeline_model_parallel_size": 2}, 16, "pipeline parallelism"),
    ({"calculate_per_token_loss": False}, 16, "--calculate-per-token-loss"),
    ({"micro_batch_size": 2}, 16, "--micro-batch-size 1"),
    ({"seq_length": 4098}, 16, "not a multiple of --context-parallel-size"),
    ({"seq_length": 4100, "context_parallel_size": 2, "tensor_model_parallel_size": 8}, 16,
     "split evenly over --tensor-model-parallel-size"),
    ({"fcp_edge_cost_tile_size": "big"}, 16, "positive integer or 'auto'"),
    ({"num_query_groups": 3}, 16, "not a multiple of --num-query-groups 3"),
    ({"num_query_groups": 1}, 16, "must both divide by --tensor-model-parallel-size 2"),
    ({"attention_dropout": 0.1}, 16, "--attention-dropout 0"),
    ({"position_embedding_type": "learned_absolute"}, 16, "rope or none"),
    ({"reset_position_ids": False}, 16, "document boundaries"),
    ({"mock_data": True, "fcp_mock_doclens": None}, 16, "--fcp-mock-doclens"),
    ({"attention_backend": "AttnBackend.local"}, 16, "--attention-backend local"),
    ({"multi_latent_attention": True}, 16, "drop --multi-latent-attention"),
    ({"fcp_exchange_timeout": 600.0}, 16, "--fcp-exchange-timeout 600 s is not shorter than "
                                          "--distributed-timeout-minutes 10 (600 s)"),
])
def test_misconfigurations_get_one_line_naming_the_fix(changes, world, needle):
    with pytest.raises(InputError) as err:
        check_fcp_args(args(**changes), world_size=world)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_flags_parse_through_the_extra_args_hook():
    parser = add_fcp_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--context-parallel-mode", "fcp", "--fcp-scheduler", "magi",
                            "--fcp-edge-cost-tile-size", "256"])
    assert (ns.context_parallel_mode, ns.fcp_scheduler, ns.fcp_edge_cost_tile_size) == ("fcp", "magi", "256")
    with pytest.raises(SystemExit):
        parser.parse_args(["--context-parallel-mode", "zigzag"])


def test_old_block_size_flag_still_sets_the_tile_with_a_deprecation_warning():
    parser = add_fcp_args(argparse.ArgumentParser())
    with pytest.warns(FutureWarning, match="--fcp-block-size is deprecated.*--fcp-edge-cost-tile-size"):
        ns = parser.parse_args(["--context-parallel-mode", "fcp", "--fcp-block-size", "64"])
    ns.context_parallel_size, ns.seq_length = 4, 4096
    assert fcp_config_from_args(ns).tile_size == 64
    action = next(a for a in parser._actions if TILE_FLAG in a.option_strings)
    assert "tile" in action.help and "any token" in action.help


def test_each_flag_is_made_from_its_setting():
    from megatron_fcp.megatron.config import FLAG_SETTINGS, SETTINGS

    actions = {a.option_strings[0]: a for a in add_fcp_args(argparse.ArgumentParser())._actions if a.option_strings
               and a.option_strings[0] != "-h"}
    assert [flag for flag in actions if flag != "--fcp-block-size"] == [x.flag for x in FLAG_SETTINGS]
    for described in FLAG_SETTINGS:
        action = actions[described.flag]
        assert (action.default, action.help, action.dest) == (described.default, described.help, described.dest)
    ns = argparse.Namespace(context_parallel_size=4, seq_length=4096)  # every FCP flag left out: the defaults
    assert fcp_config_from_args(ns) == FcpConfig(cp=4, seq_length=4096)
    assert FcpConfig(cp=4, seq_length=4096).tile_size == 128 and SETTINGS["tile_size"].default == "auto"


@pytest.mark.parametrize("changes, needle", [
    ({"cp": 0}, "--context-parallel-size must be a whole number >= 1, got 0"),
    ({"seq_length": 4095}, "--seq-length 4095 is not a multiple of --context-parallel-size 4"),
    ({"seq_length": 2.5}, "--seq-length must be a whole number >= 1"),
    ({"tile_size": True}, "--fcp-edge-cost-tile-size must be a positive integer or 'auto', got True"),
    ({"mask": "sliding"}, "mask must be one of causal, full"),
    ({"scheduler": "nocp"}, "--fcp-scheduler must be one of fcp, ring"),
    ({"backend": "cudnn"}, "--fcp-attention-backend must be one of auto, cpu, flash-attn"),
    ({"kv_budget_tokens": "0"}, "--fcp-kv-budget-tokens 0 is below one key/value token"),
    ({"exchange_timeout_s": 0}, "--fcp-exchange-timeout must be > 0 seconds"),
    ({"planning_workers": -1}, "--fcp-planning-workers must be >= 0"),
])
def test_fcp_config_validates_each_field_naming_its_flag(changes, needle):
    with pytest.raises(InputError) as err:
        FcpConfig(**{"cp": 4, "seq_length": 4096, **changes})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_fcp_config_parses_budget_strings_and_documents_every_field():
    import dataclasses

    assert FcpConfig(cp=2, seq_length=256, kv_budget_tokens=" 64 ").kv_budget_tokens == 64
    assert FcpConfig(cp=2, seq_length=256, kv_budget_tokens="none").kv_budget_tokens is None
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(FcpConfig))).body[0].body
    documented = {node.target.id for node, after in zip(body, body[1:], strict=False)
                  if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                  and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)}
    for field in dataclasses.fields(FcpConfig):
        assert field.name in documented, f"FcpConfig.{field.name} has no docstring"


@pytest.mark.parametrize("value, want", [("auto", "auto"), ("none", None), ("None", None), ("64", 64),
                                         (" 4096 ", 4096), (None, None), (128, 128)])
def test_kv_budget_flag_takes_tokens_auto_or_none(value, want):
    check_fcp_args(args(fcp_kv_budget_tokens=value), world_size=16)
    ns = add_fcp_args(argparse.ArgumentParser()).parse_args(
        ["--context-parallel-mode", "fcp"] + ([] if value is None else ["--fcp-kv-budget-tokens", str(value)]))
    ns.context_parallel_size, ns.seq_length = 4, 4096
    want_parsed = "auto" if value is None else want  # the flag's default is auto
    assert fcp_config_from_args(ns).kv_budget_tokens == want_parsed


@pytest.mark.parametrize("value, needle", [("0", "--fcp-kv-budget-tokens 0 is below one key/value token"),
                                           ("-8", "--fcp-kv-budget-tokens -8 is below one key/value token"),
                                           ("1.5", "got '1.5' (try auto or 4096)"),
                                           ("lots", "got 'lots' (try auto or 4096)")])
def test_bad_kv_budget_gets_one_line_naming_the_flag(value, needle):
    with pytest.raises(InputError) as err:
        check_fcp_args(args(fcp_kv_budget_tokens=value), world_size=16)
    assert needle in str(err.value) and "--fcp-kv-budget-tokens" in str(err.value) and "\n" not in str(err.value)


def test_kv_budget_flag_defaults_to_auto_and_says_what_it_bounds():
    parser = add_fcp_args(argparse.ArgumentParser())
    assert parser.parse_args([]).fcp_kv_budget_tokens == "auto"
    action = next(a for a in parser._actions if "--fcp-kv-budget-tokens" in a.option_strings)
    assert all(word in action.help for word in ("2 stages", "kept", "auto", "none"))


@pytest.mark.parametrize("budget", [32, "auto", None])
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_demo_memory_model_from_a_rank_view_is_the_plans(budget, recompute):
    """The demo models a rank's attention memory from its plan view alone: the same as the whole plan's figures."""
    from megatron_fcp.cpu_trainer.train import modeled_memory

    lens = doc_lengths_from_positions(MockDocumentDataset(3, 4096, "linux_files", vocab_size=10, seed=5)[2]
                                      ["position_ids"])
    plan = plan_micro_batch(lens, FcpConfig(cp=4, seq_length=4096))
    whole = p2p_memory(plan.num_tokens, plan.pieces, budget)
    for r in range(4):
        got = modeled_memory(plan.for_rank(r), budget, bytes_per_token=10, num_layers=3, recompute=recompute)
        saved = int(whole["saved_remote_kv_tokens"][r])
        assert got == {"kv_peak": 10 * int(whole["peak_remote_kv_tokens"][r]), "kv_kept": 10 * saved,
                       "grad_peak": 10 * int(whole["peak_grad_tokens"][r]),
                       "returned_peak": 10 * int(whole["peak_returned_grad_tokens"][r]),
                       "kv_kept_all_layers": 0 if recompute == "full" else 30 * saved,
                       "kv_held_all_layers": 10 * int(whole["peak_remote_kv_tokens"][r])
                       + (0 if recompute == "full" else 20 * saved),
                       "num_stages": int(whole["num_stages"][r])}


def test_doc_lengths_from_positions():
    assert doc_lengths_from_positions([0, 1, 2, 0, 1, 0]).tolist() == [3, 2, 1]
    assert doc_lengths_from_positions([5, 6, 0, 1]).tolist() == [2, 2]  # a document continued from before
    with pytest.raises(InputError, match="per-document counters"):
        doc_lengths_from_positions([0, 1, 3, 4])


@pytest.mark.parametrize("scheduler", ["fcp", "ring", "magi", "hybrid"])
def test_rank_samples_cover_every_token_once_with_its_label_and_position(scheduler):
    cfg = FcpConfig(cp=4, seq_length=2048, scheduler=scheduler, debug_checks=True)
    sample = MockDocumentDataset(3, 2048, "magi_hist", vocab_size=1000, seed=7)[2]
    seen = np.zeros(2048, int)
    # the global token index of each local token, recovered from (tokens, labels, positions) by the plan
    for r in range(4):
        part = rank_sample(sample, cfg, r, with_plan_view=True)
        view = decode_rank_plan(part["fcp_plan"])
        assert view.cp_rank == r and part["tokens"].shape == (view.num_tokens,)
        if scheduler == "fcp":
            assert view.num_tokens == cfg.tokens_per_rank
        lens = doc_lengths_from_positions(sample["position_ids"])
        offsets = np.concatenate([[0], np.cumsum(lens)])
        index = np.concatenate([np.arange(offsets[d] + s, offsets[d] + e) for d, s, e in view.q])
        real = index.shape[0]
        seen[index] += 1
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert np.array_equal(part[key][:real], sample[key][index]), key
        assert not part["loss_mask"][real:].any(), "padding slots must not count in the loss"
        assert part["fcp_stats"].shape == (len(STATS),) and part["fcp_stats"][0] >= 0
        assert part["fcp_schedule"].dtype == np.int64 and part["fcp_schedule"].ndim == 1
    assert (seen == 1).all()


def test_every_rank_plans_the_same_micro_batch_without_talking():
    cfg = FcpConfig(cp=8, seq_length=8192)
    data = MockDocumentDataset(2, 8192, "linux_files", vocab_size=100, seed=3)
    again = MockDocumentDataset(2, 8192, "linux_files", vocab_size=100, seed=3)
    lens = doc_lengths_from_positions(data[1]["position_ids"])
    assert np.array_equal(lens, doc_lengths_from_positions(again[1]["position_ids"]))
    assert plan_micro_batch(lens, cfg) == plan_micro_batch(lens.copy(), cfg)


def test_rank_plan_round_trips_through_its_int64_encoding():
    plan = plan_micro_batch([3000, 500, 12, 1, 0, 583], FcpConfig(cp=4, seq_length=4096))
    for r in range(4):
        assert decode_rank_plan(encode_rank_plan(plan.for_rank(r))) == plan.for_rank(r)
    with pytest.raises(InputError, match="not made by FcpBatchDataset"):
        decode_rank_plan(encode_rank_plan(plan.for_rank(0))[:-1])


def test_bad_samples_are_named():
    cfg = FcpConfig(cp=2, seq_length=16)
    with pytest.raises(InputError, match="no position_ids"):
        rank_sample({"tokens": np.zeros(16), "labels": np.zeros(16), "loss_mask": np.ones(16)}, cfg, 0)
    sample = MockDocumentDataset(1, 8, "spamassassin", vocab_size=10)[0]
    with pytest.raises(InputError, match="--seq-length is 16"):
        rank_sample(sample, cfg, 0)


def test_backend_choices_are_the_attention_backends():
    from megatron_fcp.kernels import BACKENDS
    from megatron_fcp.megatron.config import BACKENDS as FLAG_CHOICES

    assert FLAG_CHOICES == BACKENDS


def test_dataset_helpers_makefile_lets_megatrons_start_up_build_pass(tmp_path):
    """megatron.training runs `make` in megatron/core/datasets at start-up; the wheel ships no Makefile there."""
    import shutil
    import subprocess

    from megatron_fcp.megatron import dataset_helpers

    with pytest.raises(InputError, match="no compiled helpers_cpp"):
        dataset_helpers.install_makefile(tmp_path)
    (tmp_path / "helpers_cpp.cpython-312-x86_64-linux-gnu.so").write_bytes(b"")
    assert dataset_helpers.install_makefile(tmp_path).startswith("wrote")
    assert "nothing to do" in dataset_helpers.install_makefile(tmp_path)
    if shutil.which("make"):
        assert subprocess.run(["make", "-C", str(tmp_path)], capture_output=True).returncode == 0
        (tmp_path / "helpers_cpp.cpython-312-x86_64-linux-gnu.so").unlink()
        assert subprocess.run(["make", "-C", str(tmp_path)], capture_output=True).returncode != 0


def test_auto_plans_each_micro_batch_for_the_exchange_the_model_finds_shorter():
    """--fcp-node-exchange auto: per micro-batch the plan of the CP ranks (p2p) or of the nodes (heads), whichever
    the cost model gives the shorter step; every rank picks the same, ships the tokens of the picked plan (each token
    once over the CP group) and says which it picked in its stats. Both occur on these mixes at CP 16 (2 nodes)."""
    from megatron_fcp.attention.head_parallel import local_token_index
    from megatron_fcp.data.lengths import load_distribution, pack_batches
    from megatron_fcp.megatron.batch import node_exchange_steps

    cp, per_rank = 16, 4096
    nodes = tuple(r // 8 for r in range(cp))
    auto, p2p, heads = (FcpConfig(cp=cp, seq_length=cp * per_rank, cp_node=nodes, node_exchange=x)
                        for x in ("auto", "p2p", "heads"))
    assert auto.heads_per_node == heads.heads_per_node == 8 and p2p.heads_per_node == 1
    picked = set()
    for name in ("spamassassin", "magi_hist"):
        for lens in pack_batches(load_distribution(name), cp * per_rank, 2, seed=0):
            plan = plan_micro_batch(lens, auto)
            p2p_plan, node_plan = plan_micro_batch(lens, p2p), plan_micro_batch(lens, heads)
            assert node_plan.cp == 2 and p2p_plan.cp == cp
            steps = node_exchange_steps(lens, p2p_plan, node_plan, auto)
            want = "heads" if steps["heads"] < steps["p2p"] else "p2p"
            assert plan == (node_plan if want == "heads" else p2p_plan)
            assert auto.heads_split(plan.cp) == (8 if want == "heads" else 1)
            picked.add(want)
            sample = {"tokens": np.arange(lens.sum()), "labels": np.arange(lens.sum()) + 1,
                      "loss_mask": np.ones(lens.sum()),
                      "position_ids": np.concatenate([np.arange(n) for n in lens])}
            seen = np.zeros(lens.sum(), int)
            for r in (0, 5, 8, 15):
                part = rank_sample(sample, auto, r)
                assert part["fcp_stats"][STATS.index("heads_exchange")] == float(want == "heads")
                index = local_token_index(plan, 8, r) if want == "heads" else plan.token_index(r)
                assert np.array_equal(part["tokens"][:index.shape[0]], index)
            for r in range(cp):
                index = local_token_index(plan, 8, r) if want == "heads" else plan.token_index(r)
                seen[index] += 1
            assert (seen == 1).all()
    assert picked == {"p2p", "heads"}, picked


def test_attention_shape_comes_from_megatrons_model_flags():
    # 8 heads, 4 query groups, TP 2: per rank 4 and 2, of hidden 1024 / 8 heads
    assert fcp_config_from_args(args(hidden_size=1024)).attention_shape == (4, 2, 128)
    assert fcp_config_from_args(args(hidden_size=1024, kv_channels=96)).attention_shape == (4, 2, 96)
    assert fcp_config_from_args(args(hidden_size=1024, group_query_attention=False)).attention_shape == (4, 4, 128)
    assert fcp_config_from_args(args(hidden_size=1024, num_query_groups=3)).attention_shape is None  # checked apart
    assert fcp_config_from_args(args()).attention_shape is None  # no hidden size, no kv channels: the profile's
