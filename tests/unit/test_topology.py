"""The CP group's node layout (step 1 of docs/node_aware_exchange.md): ``cp_nodes`` from Megatron's global ranks,
the plan's ``cp_node`` (validation, digest, JSON, rank views), the ``ranks_per_node`` setting (Megatron flag, launch
config key, CPU worker flag) and its start-up checks, and the CPU trainer's wiring of the layout into its plans."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from megatron_namespace import args

from megatron_fcp.cpu_trainer.train import RunConfig, check_nodes, fcp_config
from megatron_fcp.errors import InputError
from megatron_fcp.launch import ConfigError, load_run_config
from megatron_fcp.launch.command import megatron_args, megatron_parser, worker_args, worker_parser
from megatron_fcp.megatron.batch import decode_rank_plan, encode_rank_plan, plan_micro_batch
from megatron_fcp.megatron.config import (
    LOCAL_WORLD_SIZE,
    SETTINGS,
    FcpConfig,
    add_fcp_args,
    check_fcp_args,
    fcp_config_from_args,
    megatron_cp_groups,
    resolve_ranks_per_node,
)
from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.plan import Plan
from megatron_fcp.planner.topology import cp_nodes

EXAMPLE = ([500, 3, 0, 480, 97, 450, 300], 4, 512)
"""The micro-batch of test_planner.py: 4 ranks of 512 slots."""
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def one_line(err: pytest.ExceptionInfo, *words: str) -> str:
    text = str(err.value)
    assert "\n" not in text and all(word in text for word in words), text
    return text


# -- cp_nodes: Megatron's CP groups on nodes ----------------------------------------------------------------------
@pytest.mark.parametrize("world, tp, cp, per_node, layout", [
    (8, 1, 8, 4, [0, 0, 0, 0, 1, 1, 1, 1]),  # TP 1: CP ranks are consecutive global ranks
    (8, 1, 4, 2, [0, 0, 1, 1]),
    (16, 2, 4, 4, [0, 0, 1, 1]),  # TP 2: CP ranks 2 apart, a node of 4 GPUs holds 2 of them
    (16, 2, 8, 8, [0, 0, 0, 0, 1, 1, 1, 1]),
    (16, 2, 2, 8, [0, 0]),  # the CP group inside one node
    (16, 4, 2, 2, [0, 1]),  # TP across nodes: one CP rank per node
])
def test_every_megatron_cp_group_gets_the_same_layout(world, tp, cp, per_node, layout):
    from megatron_fcp.launch.dryrun import coordinates  # megatron-core's rank layout, written independently

    groups = megatron_cp_groups(world, tp, cp)
    assert groups.shape == (world // cp, cp) and sorted(groups.reshape(-1).tolist()) == list(range(world))
    for group in groups:  # one CP group: the same TP, DP and PP coordinates, CP coordinates 0, 1, ... in order
        where = [coordinates(int(rank), tp=tp, cp=cp, dp=world // (tp * cp), pp=1) for rank in group]
        assert [c["cp"] for c in where] == list(range(cp))
        assert len({(c["tp"], c["dp"], c["pp"]) for c in where}) == 1
    for group in groups:
        nodes = cp_nodes(group, per_node)
        assert nodes.dtype == np.int64 and nodes.tolist() == layout and not nodes.flags.writeable


def test_nodes_are_numbered_in_order_of_first_appearance():
    assert cp_nodes([12, 13, 8, 9], 4).tolist() == [0, 0, 1, 1]  # node 3 first, then node 2
    assert cp_nodes(np.array([40, 41, 42, 43], np.uint32), 2).tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("ranks, per_node, words", [
    ([0, 1, 2], 2, ("node 0 (global ranks 0-1) holds 2", "node 1 (global ranks 2-3) holds 1", "same number")),
    ([0, 2, 4], 4, ("global ranks [0, 2, 4]", "at 4 ranks per node", "node 1 (global ranks 4-7) holds 1")),
    ([0, 1], 0, ("ranks_per_node must be a whole number >= 1", "LOCAL_WORLD_SIZE", "got 0")),
    ([0, 1], -4, ("got -4",)),
    ([0, 1], True, ("got True",)),
    ([0, 1], 2.0, ("got 2.0",)),
    ([0, 0], 2, ("hold a rank twice",)),
    ([0, -1], 2, ("whole numbers >= 0",)),
    ([], 2, ("non-empty",)),
])
def test_bad_layouts_are_one_line_naming_the_node_and_the_counts(ranks, per_node, words):
    with pytest.raises(InputError) as err:
        cp_nodes(ranks, per_node)
    one_line(err, *words)


# -- the plan's cp_node ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cp_node, words", [
    ([0, 0, 1], ("4 CP ranks", "(shape (3,))")),
    ([[0, 0], [1, 1]], ("shape (2, 2)",)),
    ([0.0, 0.0, 1.0, 1.0], ("whole numbers",)),
    ([0, -1, 1, 1], ("cp_node[1] = -1 is negative",)),
    ([1, 1, 0, 0], ("CP rank 0 is on node 1 before node 0 appeared",)),
    ([0, 0, 2, 2], ("CP rank 2 is on node 2 before node 1 appeared",)),
    ([0, 0, 0, 1], ("node 1 holds 1 CP rank but node 0 holds 3 CP ranks", "same number of CP ranks")),
])
def test_plan_rejects_a_bad_layout_with_one_line(cp_node, words):
    plan = make_plan(*EXAMPLE)
    with pytest.raises(InputError) as err:  # an InputError is a ValueError, as Plan's other checks raise
        dataclasses.replace(plan, cp_node=cp_node)
    one_line(err, *words)
    with pytest.raises(InputError):
        make_plan(*EXAMPLE, cp_node=cp_node)


def test_layout_is_read_only_and_changes_nothing_else():
    bare = make_plan(*EXAMPLE)
    nodes = [0, 0, 1, 1]
    plan = make_plan(*EXAMPLE, cp_node=nodes)
    assert plan.cp_node.dtype == np.int64 and plan.cp_node.tolist() == nodes
    with pytest.raises(ValueError, match="read-only"):
        plan.cp_node[0] = 1
    for field in ("q_rows", "kv", "num_pad_tokens", "doc_lens"):
        assert np.array_equal(getattr(plan, field), getattr(bare, field)), field
    assert plan.tokens_per_rank == bare.tokens_per_rank and bare.cp_node is None
    assert dataclasses.replace(plan, cp_node=None) == bare


def test_digest_holds_the_layout_only_when_given():
    bare = make_plan(*EXAMPLE)
    assert make_plan(*EXAMPLE, cp_node=None).digest == bare.digest  # no layout: the digest plans always had
    two = make_plan(*EXAMPLE, cp_node=[0, 0, 1, 1])
    four = make_plan(*EXAMPLE, cp_node=[0, 1, 2, 3])
    one = make_plan(*EXAMPLE, cp_node=[0, 0, 0, 0])
    assert len({bare.digest, two.digest, four.digest, one.digest}) == 4
    assert two != bare and two != four and hash(two) != hash(bare)
    assert make_plan(*EXAMPLE, cp_node=np.array([0, 0, 1, 1], np.int32)) == two
    assert all(two.for_rank(r).plan_digest == two.digest for r in range(4))


@pytest.mark.parametrize("cp_node", [None, [0, 0, 1, 1]])
def test_layout_round_trips_through_json_and_rank_views(cp_node):
    plan = make_plan(*EXAMPLE, cp_node=cp_node)
    data = json.loads(plan.to_json())
    assert ("cp_node" in data) == (cp_node is not None)  # plans without a layout: the JSON they always had
    again = Plan.from_dict(data)
    assert again == plan and again.digest == plan.digest
    for r in range(plan.cp):
        view = plan.for_rank(r)
        assert view.cp_node == (None if cp_node is None else tuple(cp_node))
        assert view.node == (None if cp_node is None else cp_node[r])
        assert decode_rank_plan(encode_rank_plan(view)) == view
    text = plan.describe()
    assert ("nodes=2" in text and "rank 2 (node 1):" in text) if cp_node else "node" not in text


# -- the ranks_per_node setting ---------------------------------------------------------------------------------


def test_flag_parses_and_defaults_to_unset():
    described = SETTINGS["ranks_per_node"]
    assert (described.flag, described.key, described.worker_flag) == ("--fcp-ranks-per-node", "ranks_per_node",
                                                                       "--ranks-per-node")
    assert all(word in described.help for word in ("LOCAL_WORLD_SIZE", "one node", "not CP ranks per node"))
    parser = add_fcp_args(argparse.ArgumentParser())
    assert parser.parse_args([]).fcp_ranks_per_node is None
    ns = parser.parse_args(["--context-parallel-mode", "fcp", "--fcp-ranks-per-node", "8"])
    ns.context_parallel_size, ns.seq_length = 4, 4096
    cfg = fcp_config_from_args(ns)
    assert cfg.ranks_per_node == 8 and cfg.cp_node is None
    assert FcpConfig(cp=4, seq_length=4096, ranks_per_node="none").ranks_per_node is None


@pytest.mark.parametrize("value", [0, -2, "0", "two", 1.5, True])
def test_bad_value_is_one_line_naming_the_flag(value):
    with pytest.raises(InputError) as err:
        FcpConfig(cp=4, seq_length=4096, ranks_per_node=value)
    one_line(err, "--fcp-ranks-per-node must be a whole number >= 1, or unset")
    with pytest.raises(InputError) as err:
        check_fcp_args(args(fcp_ranks_per_node=value), world_size=16)
    one_line(err, "--fcp-ranks-per-node")


@pytest.mark.parametrize("changes, env, world, words", [
    ({"fcp_ranks_per_node": 3}, None, 16, ("--fcp-ranks-per-node 3 does not divide the 16 launched processes",)),
    ({"fcp_ranks_per_node": 4, "context_parallel_size": 3, "seq_length": 4098}, None, 12,
     ("--fcp-ranks-per-node 4:", "global ranks [0, 2, 4]", "node 1 (global ranks 4-7) holds 1")),
    ({}, "6", 24, ("LOCAL_WORLD_SIZE 6:", "(read from the environment; --fcp-ranks-per-node N overrides it)")),
    ({}, "eight", 16, ("LOCAL_WORLD_SIZE='eight' in the environment is not a whole number", "--fcp-ranks-per-node N")),
])
def test_start_up_check_names_an_unequal_or_impossible_layout(monkeypatch, changes, env, world, words):
    monkeypatch.delenv(LOCAL_WORLD_SIZE, raising=False)
    if env is not None:
        monkeypatch.setenv(LOCAL_WORLD_SIZE, env)
    with pytest.raises(InputError) as err:
        check_fcp_args(args(**changes), world_size=world)
    one_line(err, *words)


@pytest.mark.parametrize("env, flag, want", [(None, None, (None, "")), ("8", None, (8, LOCAL_WORLD_SIZE)),
                                             ("8", 4, (4, "--fcp-ranks-per-node")), (" ", None, (None, ""))])
def test_ranks_per_node_comes_from_the_flag_then_local_world_size(monkeypatch, env, flag, want):
    environ = {} if env is None else {LOCAL_WORLD_SIZE: env}
    assert resolve_ranks_per_node(flag, "--fcp-ranks-per-node", environ) == want
    monkeypatch.delenv(LOCAL_WORLD_SIZE, raising=False)
    if env is not None:
        monkeypatch.setenv(LOCAL_WORLD_SIZE, env)
    check_fcp_args(args(fcp_ranks_per_node=flag), world_size=16)  # TP 2 x CP 4 on 8- or 4-GPU nodes: equal halves


def test_with_nodes_puts_the_megatron_groups_layout_into_the_plans():
    cfg = FcpConfig(cp=4, seq_length=2048, ranks_per_node=4)
    group = megatron_cp_groups(16, 2, 4)[1]  # TP rank 1 of the first replica: global ranks 1, 3, 5, 7
    placed = cfg.with_nodes(group)
    assert placed.cp_node == (0, 0, 1, 1) and dataclasses.replace(placed, cp_node=None) == cfg
    assert FcpConfig(cp=4, seq_length=2048).with_nodes(group, environ={}).cp_node is None
    assert FcpConfig(cp=4, seq_length=2048).with_nodes(group, {LOCAL_WORLD_SIZE: "2"}).cp_node == (0, 1, 2, 3)
    lens = [700, 300, 1048]
    assert plan_micro_batch(lens, placed).cp_node.tolist() == [0, 0, 1, 1]
    assert plan_micro_batch(lens, placed) != plan_micro_batch(lens, cfg)
    with pytest.raises(InputError) as err:
        FcpConfig(cp=3, seq_length=3072, ranks_per_node=2).with_nodes([0, 1, 2])
    one_line(err, "--fcp-ranks-per-node 2:", "node 1 (global ranks 2-3) holds 1")


# -- the launch config key and the CPU worker flag --------------------------------------------------------------
def tiny_cpu(**context_parallel) -> dict:
    config = copy.deepcopy(yaml.safe_load((CONFIGS / "tiny_cpu.yaml").read_text()))
    config["context_parallel"].update(context_parallel)
    return config


def test_every_worker_setting_is_in_the_launchers_worker_flags():
    from megatron_fcp.launch.command import WORKER_FLAGS

    launched = {flag: key for flag, key, _ in WORKER_FLAGS}
    for described in SETTINGS.values():
        if described.worker_flag:
            assert launched[described.worker_flag] == f"context_parallel.{described.key}"


@pytest.mark.parametrize("value, flags", [(None, []), (2, ["--fcp-ranks-per-node", "2"])])
def test_launch_key_reaches_both_entry_points(value, flags):
    spec = load_run_config(tiny_cpu(ranks_per_node=value))  # 2 nodes x 2 processes, CP 4
    assert spec.context_parallel.ranks_per_node == value
    megatron = megatron_args(spec)
    assert [a for a in megatron if a == "--fcp-ranks-per-node"] == flags[:1]
    ns = megatron_parser().parse_args(megatron)
    assert fcp_config_from_args(ns).ranks_per_node == value
    worker = worker_args(spec)
    assert worker[worker.index("--ranks-per-node") + 1] == ("none" if value is None else "2")
    assert vars(worker_parser().parse_args(worker))["ranks_per_node"] == ("none" if value is None else "2")


@pytest.mark.parametrize("edits, key, words", [
    ({"ranks_per_node": 0}, "context_parallel.ranks_per_node", ("must be a whole number >= 1",)),
    ({"ranks_per_node": 3}, "context_parallel.ranks_per_node",
     ("3 does not divide the 4 processes (nodes 2 x gpus_per_node 2)",)),
])
def test_launch_config_refuses_a_bad_value_naming_its_key(edits, key, words):
    with pytest.raises(ConfigError) as err:
        load_run_config(tiny_cpu(**edits))
    assert any(p.startswith(f"{key}: ") and all(w in p for w in words) for p in err.value.problems), \
        err.value.problems


def test_launch_config_checks_the_nodes_torchrun_will_announce():
    config = tiny_cpu()
    config["parallel"].update(nodes=3, context=3)  # 6 processes, CP 3 on nodes of 2: 2 + 1 ranks
    config["training"]["seq_length"] = 1020
    with pytest.raises(ConfigError) as err:
        load_run_config(config)
    assert any(p.startswith("parallel.context: parallel.gpus_per_node 2:") and "holds 1" in p
               for p in err.value.problems), err.value.problems


def test_cpu_worker_run_validates_its_layout():
    from megatron_fcp.cpu_trainer import worker

    ns = worker._parser().parse_args(["--cp", "4", "--ranks-per-node", "2"])
    run = worker.run_config(ns, 1, None)
    assert run.ranks_per_node == 2
    assert worker.run_config(worker._parser().parse_args(["--ranks-per-node", "none"]), 1, None).ranks_per_node is None
    assert fcp_config(run, [0, 1, 2, 3]).cp_node == (0, 0, 1, 1)
    assert fcp_config(run).cp_node is None  # before the process groups: no layout yet
    with pytest.raises(InputError) as err:
        RunConfig(cp=4, ranks_per_node=3)
    one_line(err, "RunConfig: ranks_per_node 3 does not divide the 4 processes (dp x tp x cp)")
    with pytest.raises(InputError) as err:
        RunConfig(cp=4, ranks_per_node=0)
    one_line(err, "RunConfig: ranks_per_node must be a whole number >= 1")
    check_nodes(RunConfig(cp=4), environ={LOCAL_WORLD_SIZE: "2"})
    with pytest.raises(InputError) as err:
        check_nodes(RunConfig(cp=4), environ={LOCAL_WORLD_SIZE: "3"})
    one_line(err, "LOCAL_WORLD_SIZE 3 does not divide the 4 processes", "--ranks-per-node")
    assert RunConfig(mode="nocp", ranks_per_node=3).ranks_per_node == 3  # the no-CP reference plans nothing


@pytest.mark.parametrize("argv, env, words", [
    (["--ranks-per-node", "3"], None, ("RunConfig: ranks_per_node 3 does not divide the 2 processes",)),
    (["--ranks-per-node", "0"], None, ("ranks_per_node must be a whole number >= 1",)),
    ([], "4", ("LOCAL_WORLD_SIZE 4 does not divide the 2 processes", "--ranks-per-node")),
])
def test_cpu_worker_stops_on_a_bad_layout_with_one_line_before_training(monkeypatch, capsys, argv, env, words):
    from megatron_fcp.cpu_trainer import worker

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(LOCAL_WORLD_SIZE, raising=False)
    if env is not None:
        monkeypatch.setenv(LOCAL_WORLD_SIZE, env)
    monkeypatch.setattr(worker, "train_in_group", lambda run: pytest.fail("training started"))
    assert worker.main(["--cp", "2", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megatron-fcp worker: error: "), err
    assert all(word in err[0] for word in words), err


@pytest.mark.distributed
@pytest.mark.slow
def test_cpu_trainer_plans_with_the_layout_and_trains_the_same(tmp_path, monkeypatch):
    """4 gloo processes as 2 emulated nodes of 2: every step's plans carry the layout (the CP ranks' plan check
    agreed on digests that hold it), key/values and gradients are forwarded between node-mates, and the losses are
    those of the same run without a layout: the first bit for bit (forward moves the same key/values into the same
    buffers), the next within 1e-6 (node-mates' partial gradients are summed in another order)."""
    pytest.importorskip("megatron.core")
    from megatron_fcp.cpu_trainer.train import launch_series

    monkeypatch.delenv(LOCAL_WORLD_SIZE, raising=False)
    tiny = RunConfig(cp=4, seq_length=512, doclens="magi_hist", num_layers=1, hidden_size=32, num_heads=2,
                     num_query_groups=1, ffn_hidden_size=64, vocab_size=64, steps=2)
    nodes, plain = launch_series([dataclasses.replace(tiny, ranks_per_node=2), tiny],
                                 [tmp_path / "nodes.json", tmp_path / "plain.json"], quiet=True)
    assert nodes["run"]["ranks_per_node"] == 2
    assert [s["cp_node"] for s in nodes["steps"]] == [[0, 0, 1, 1]] * 2
    assert [s["cp_node"] for s in plain["steps"]] == [None] * 2
    first, second = ([s["loss"] for s in run["steps"]] for run in (nodes, plain))
    assert first[0] == second[0]
    assert abs(first[1] - second[1]) <= 1e-6 * abs(second[1])
