"""Run configs (megatron_fcp.launch): shipped configs load and pass FCP's checks, each misconfiguration is one line
naming its key, the generated command lines read back without loss, and the ``print|check|env`` command."""

import copy
import shlex
import subprocess
import sys
import warnings
from operator import attrgetter
from pathlib import Path

import pytest
import yaml

from megatron_fcp.errors import InputError
from megatron_fcp.launch import ConfigError, command, entry_args, launcher_env, load_run_config, node_commands
from megatron_fcp.launch.__main__ import main
from megatron_fcp.launch.command import megatron_args, megatron_parser, worker_args, worker_parser
from megatron_fcp.megatron.config import CONFIG_SETTINGS, check_fcp_args

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RUN_CONFIGS = sorted(CONFIGS.glob("*.yaml"))


def raw(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def edited(name: str, **edits) -> dict:
    """Config ``name`` with ``section__key=value`` edits (``...`` deletes the key)."""
    config = copy.deepcopy(raw(name))
    for path, value in edits.items():
        *sections, leaf = path.split("__")
        node = config
        for section in sections:
            node = node.setdefault(section, {})
        if value is ...:
            node.pop(leaf)
        else:
            node[leaf] = value
    return config


def problems_of(config) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_run_config(config)
    return caught.value.problems


def test_run_configs_are_shipped():
    assert {p.stem for p in RUN_CONFIGS} >= {"tiny_cpu", "tiny_cpu_ring", "llama3_8b", "llama3_70b"}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_loads_and_its_command_line_passes_fcp_checks(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a shipped config sets no key its run ignores
        spec = load_run_config(path)
    ns = megatron_parser().parse_args(megatron_args(spec))
    check_fcp_args(ns, world_size=spec.parallel.world_size)
    assert spec.parallel.world_size % (spec.parallel.tensor * spec.parallel.context) == 0
    assert spec.global_batch_size % spec.parallel.data_parallel == 0


def test_llama_configs_say_what_the_issue_asks():
    s8, s70 = load_run_config(CONFIGS / "llama3_8b.yaml"), load_run_config(CONFIGS / "llama3_70b.yaml")
    assert (s8.model.num_layers, s8.model.hidden_size, s8.model.ffn_hidden_size) == (32, 4096, 14336)
    assert (s8.model.num_attention_heads, s8.model.query_groups, s8.model.rotary_base) == (32, 8, 500000)
    assert (s8.parallel.nodes, s8.parallel.gpus_per_node, s8.parallel.context, s8.parallel.data_parallel) == (
        32, 8, 8, 32)
    assert (s8.training.seq_length, s8.global_batch_size, s8.training.precision) == (131072, 64, "bf16")
    assert s8.training.distributed_optimizer and s8.context_parallel.mode == "fcp"
    assert (s70.model.num_layers, s70.model.hidden_size, s70.model.ffn_hidden_size) == (80, 8192, 28672)
    assert (s70.parallel.tensor, s70.parallel.context, s70.parallel.data_parallel) == (8, 8, 4)
    assert s70.training.recompute == "full"
    assert load_run_config(CONFIGS / "tiny_cpu_ring.yaml").context_parallel.scheduler == "ring"


# -- one line per misconfiguration, naming its key -------------------------------------------------------------
CASES = {
    "unknown key at the top": ("llama3_8b", {"contaner": {"image": "x"}}, "contaner", "did you mean container?"),
    "unknown key in a section": ("llama3_8b", {"parallel__contxt": 8}, "parallel.contxt", "did you mean context?"),
    "unknown key nested": ("llama3_8b", {"data__tokenizer__modle": "x"}, "data.tokenizer.modle", "did you mean model?"),
    "wrong type": ("llama3_8b", {"parallel__context": "eight"}, "parallel.context", "whole number"),
    "wrong type of a section": ("tiny_cpu", {"model": 5}, "model", "mapping"),
    "missing required key": ("llama3_8b", {"model__num_layers": ...}, "model.num_layers", "required key missing"),
    "missing required section": ("tiny_cpu", {"paths": ...}, "paths", "required key missing"),
    "layout does not divide the GPUs": ("tiny_cpu", {"parallel__context": 8}, "parallel.context",
                                        "does not divide the 4 processes (nodes 2 x gpus_per_node 2)"),
    "seq_length not a multiple of 2 x context": ("llama3_8b", {"training__seq_length": 131000},
                                                 "training.seq_length", "try training.seq_length 131008"),
    "seq_length / context not divisible by tensor": ("llama3_70b", {"training__seq_length": 131088},
                                                     "training.seq_length", "split evenly over parallel.tensor 8"),
    "heads not divisible by query groups": ("llama3_8b", {"model__num_query_groups": 5},
                                            "model.num_attention_heads", "not a multiple of model.num_query_groups"),
    "heads not divisible by tensor": ("llama3_70b", {"model__num_query_groups": 4},
                                      "model.num_attention_heads", "divide by parallel.tensor 8"),
    "global batch not a multiple of micro x dp": ("llama3_8b", {"training__global_batch_size": 48},
                                                  "training.global_batch_size", "(try 64)"),
    "pipeline with fcp": ("llama3_8b", {"parallel__pipeline": 2, "training__global_batch_size": 32},
                          "parallel.pipeline", "does not support pipeline parallelism"),
    "micro batch above 1 with fcp": ("tiny_cpu", {"training__micro_batch_size": 2}, "training.micro_batch_size",
                                     "use training.micro_batch_size 1"),
    "unknown scheduler": ("llama3_8b", {"context_parallel__scheduler": "fcpp"}, "context_parallel.scheduler",
                          "did you mean fcp?"),
    "unknown backend": ("llama3_8b", {"context_parallel__attention_backend": "flash"},
                        "context_parallel.attention_backend", "did you mean flash-attn?"),
    "unknown mode": ("llama3_8b", {"context_parallel__mode": "rings"}, "context_parallel.mode", "one of ring, fcp"),
    "unknown precision": ("llama3_8b", {"training__precision": "bf32"}, "training.precision", "bf16, fp16, fp32"),
    "kv budget below one token": ("llama3_8b", {"context_parallel__kv_budget_tokens": 0},
                                  "context_parallel.kv_budget_tokens", "below one key/value token"),
    "kv budget not a number": ("llama3_8b", {"context_parallel__kv_budget_tokens": "lots"},
                               "context_parallel.kv_budget_tokens", "try auto or 4096"),
    "edge tile not positive": ("llama3_8b", {"context_parallel__edge_cost_tile_size": 0},
                               "context_parallel.edge_cost_tile_size", "positive integer or 'auto'"),
    "unknown shipped length name": ("tiny_cpu", {"data__mock_doclens": "magi"}, "data.mock_doclens",
                                    "did you mean magi_hist?"),
    "blend and mock data at once": ("llama3_8b", {"data__mock_doclens": "linux_files"}, "data", "exactly one"),
    "blend without tokenizer": ("llama3_8b", {"data__tokenizer": ...}, "data.tokenizer", "needs a tokenizer"),
    "mock data without vocabulary": ("llama3_70b", {"model__vocab_size": ...}, "model.vocab_size",
                                     "need a vocabulary size"),
    "mock data with ring mode on GPU": ("llama3_70b", {"context_parallel__mode": "ring"}, "data.mock_doclens",
                                        "no documents"),
    "ring mode on CPU": ("tiny_cpu", {"context_parallel__mode": "ring"}, "context_parallel.mode",
                         "Transformer Engine"),
    "model option the CPU worker lacks": ("tiny_cpu", {"model__swiglu": True}, "model.swiglu", "always uses"),
    "bf16 on CPU": ("tiny_cpu", {"training__precision": "bf16"}, "training.precision", "fp32"),
    "bad mount": ("llama3_8b", {"container__mounts": ["/a:/b,/c:/d"]}, "container.mounts", "without commas"),
    "exchange timeout not positive": ("llama3_8b", {"context_parallel__exchange_timeout_s": 0},
                                      "context_parallel.exchange_timeout_s", "must be > 0 seconds"),
    "exchange timeout as long as the distributed one": (
        "llama3_8b", {"context_parallel__exchange_timeout_s": 600}, "context_parallel.exchange_timeout_s",
        "600 s is not shorter than training.distributed_timeout_minutes 10 (600 s)"),
    "exchange timeout longer than a set distributed one": (
        "llama3_8b", {"context_parallel__exchange_timeout_s": 300, "training__distributed_timeout_minutes": 5},
        "context_parallel.exchange_timeout_s", "raise training.distributed_timeout_minutes to 6 or more"),
}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_each_misconfiguration_is_one_line_naming_its_key(case):
    name, edits, key, fragment = CASES[case]
    problems = problems_of(edited(name, **edits))
    assert len(problems) == 1 and problems[0].startswith(f"{key}: "), problems
    assert "\n" not in problems[0] and fragment in problems[0], problems[0]


def test_config_error_is_an_input_error_with_the_file_first(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(edited("tiny_cpu", parallel__context=3)))
    with pytest.raises(InputError) as caught:
        load_run_config(path)
    err = caught.value
    assert isinstance(err, ConfigError)
    assert str(err).splitlines() == [f"{path}: {len(err.problems)} problem" + "s" * (len(err.problems) > 1),
                                     *err.problems]


def test_every_problem_of_a_config_is_reported():
    config = edited("llama3_8b", model__hiden_size=4096, model__num_query_groups=5, training__lr="fast",
                    training__seq_length=1000, training__global_batch_size=48,
                    context_parallel__scheduler="fcpp", data__mock_doclens="linux_files", extra=1)
    del config["model"]["hidden_size"]
    keys = [p.split(":")[0] for p in problems_of(config)]
    assert sorted(keys) == sorted(["extra", "model.hiden_size", "model.hidden_size", "training.lr",
                                   "context_parallel.scheduler", "training.seq_length", "model.num_attention_heads",
                                   "training.global_batch_size", "data"])


def test_a_broken_key_does_not_bring_follow_on_problems():
    # context "eight" is wrong on its own; the checks that read it (layout, sequence, batch) stay quiet
    assert [p.split(":")[0] for p in problems_of(edited("llama3_8b", parallel__context="eight"))] == [
        "parallel.context"]


def test_yaml_reads_exponents_without_a_dot_as_numbers(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text((CONFIGS / "tiny_cpu.yaml").read_text().replace("lr: 3.0e-3", "lr: 3e-3"))
    assert load_run_config(path).training.lr == pytest.approx(3e-3)


def _warnings(config) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_run_config(config)
    return [str(w.message) for w in caught]


def test_keys_the_run_ignores_are_warned_about():
    assert _warnings(edited("tiny_cpu", training__weight_decay=0.1)) == [
        "run config: training.weight_decay is not used on device cpu: the CPU worker (python -m "
        "megatron_fcp.cpu_trainer.worker) has no such option"]
    ring = _warnings(edited("llama3_8b", context_parallel__mode="ring", context_parallel__exchange_timeout_s=300))
    # one warning per FCP key the config sets: scheduler, attention_backend, kv_budget_tokens, edge_cost_tile_size,
    # planning_workers, node_exchange and the exchange_timeout_s added here
    assert len(ring) == 7 and all("not used with context_parallel.mode ring" in w for w in ring)


# -- command lines -------------------------------------------------------------------------------------------
def _flags(args: list[str]) -> list[str]:
    return [a for a in args if a.startswith("--")]


NOT_ONE_KEY = ("--mock-data", "--data-path", "--global-batch-size", "--tokenizer-type")
"""Flags whose value is not one key's value as it stands (checked one by one below)."""
FLAG_KEYS = {
    "--num-layers": "model.num_layers", "--hidden-size": "model.hidden_size",
    "--ffn-hidden-size": "model.ffn_hidden_size", "--num-attention-heads": "model.num_attention_heads",
    "--num-query-groups": "model.num_query_groups", "--rotary-base": "model.rotary_base",
    "--normalization": "model.normalization", "--norm-epsilon": "model.norm_epsilon",
    "--vocab-size": "model.vocab_size",
    "--tensor-model-parallel-size": "parallel.tensor", "--pipeline-model-parallel-size": "parallel.pipeline",
    "--context-parallel-size": "parallel.context",
    "--seq-length": "training.seq_length", "--micro-batch-size": "training.micro_batch_size",
    "--train-iters": "training.train_iters", "--lr": "training.lr", "--min-lr": "training.min_lr",
    "--lr-warmup-iters": "training.warmup_iters", "--lr-decay-style": "training.lr_decay_style",
    "--weight-decay": "training.weight_decay", "--clip-grad": "training.clip_grad",
    "--adam-beta1": "training.adam_beta1", "--adam-beta2": "training.adam_beta2",
    "--eval-iters": "training.eval_iters", "--eval-interval": "training.eval_interval",
    "--save-interval": "training.save_interval", "--log-interval": "training.log_interval",
    "--seed": "training.seed", "--distributed-timeout-minutes": "training.distributed_timeout_minutes",
    "--split": "data.split", "--tokenizer-model": "data.tokenizer.model", "--fcp-mock-doclens": "data.mock_doclens",
    "--save": "paths.checkpoints", "--load": "paths.checkpoints",
    **{described.flag: f"context_parallel.{described.key}" for described in CONFIG_SETTINGS},
}
"""The config key behind each Megatron or FCP flag whose value comes straight from one key."""


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_megatron_args_read_back_without_loss(path):
    spec = load_run_config(path)
    args = megatron_args(spec)
    flags = _flags(args)
    assert len(flags) == len(set(flags)), flags
    ns = vars(megatron_parser().parse_args(args))  # every flag is known; a leftover token would fail here
    for flag in flags:
        dest = flag[2:].replace("-", "_")
        kind = command.MEGATRON_FLAGS.get(flag) or command.FCP_FLAGS[flag]
        if kind == command.SWITCH:
            assert ns[dest] is True, flag
        elif flag in FLAG_KEYS and flag not in NOT_ONE_KEY:
            value = attrgetter(FLAG_KEYS[flag])(spec)
            assert ns[dest] == kind("none" if value is None else value), flag
    assert ns["global_batch_size"] == spec.global_batch_size
    if spec.data.blend:
        assert ns["data_path"] == [str(x) for pair in spec.data.blend for x in pair]
        assert ns["tokenizer_type"] == spec.data.tokenizer.type
    else:
        assert ns["mock_data"] and ns["tokenizer_type"] == "NullTokenizer"


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_entry_args_are_the_devices_and_read_back(path):
    spec = load_run_config(path)
    if spec.device == "gpu":
        assert entry_args(spec) == megatron_args(spec)
        return
    args = entry_args(spec)
    assert args == worker_args(spec) and len(_flags(args)) == len(command.WORKER_FLAGS)
    ns = vars(worker_parser().parse_args(args))
    for flag, attr, kind in command.WORKER_FLAGS:
        value = attrgetter(attr)(spec)
        assert ns[flag[2:].replace("-", "_")] == kind("none" if value is None else value), flag
    assert ns["records"] == f"{spec.paths.logs}/losses.jsonl"


def test_megatron_args_carry_the_run_settings():
    args = megatron_args(load_run_config(CONFIGS / "llama3_70b.yaml"))
    text = " ".join(args)
    for part in ("--sequence-parallel", "--bf16", "--use-distributed-optimizer", "--calculate-per-token-loss",
                 "--context-parallel-mode fcp", "--fcp-edge-cost-tile-size auto", "--exit-signal-handler",
                 "--attention-dropout 0 --hidden-dropout 0", "--position-embedding-type rope",
                 "--recompute-granularity full", "--mock-data --fcp-mock-doclens linux_files --tokenizer-type "
                 "NullTokenizer --vocab-size 128256", "--save /checkpoints/llama3_70b --load /checkpoints/llama3_70b"):
        assert part in text, part
    blend = " ".join(megatron_args(load_run_config(CONFIGS / "llama3_8b.yaml")))
    assert ("--data-path 0.7 /data/llama3/web_text_document 0.3 /data/llama3/code_text_document" in blend
            and "--reset-position-ids --reset-attention-mask --eod-mask-loss" in blend)
    assert "--sequence-parallel" not in blend


@pytest.mark.parametrize("budget, read", [("none", None), (None, None), ("4096", 4096), (64, 64)])
def test_kv_budget_is_read_as_fcp_reads_it(budget, read):
    spec = load_run_config(edited("tiny_cpu", context_parallel__kv_budget_tokens=budget))
    assert spec.context_parallel.kv_budget_tokens == read
    shown = "none" if read is None else str(read)
    assert entry_args(spec)[entry_args(spec).index("--kv-budget-tokens") + 1] == shown
    ns = megatron_parser().parse_args(megatron_args(spec))
    assert ns.fcp_kv_budget_tokens == shown
    check_fcp_args(ns, world_size=spec.parallel.world_size)


@pytest.mark.parametrize("timeout, minutes", [(None, None), (300, None), (900, 20)])
def test_exchange_timeout_is_opt_in_and_below_the_distributed_timeout(timeout, minutes):
    spec = load_run_config(edited("llama3_8b", context_parallel__exchange_timeout_s=timeout,
                                  training__distributed_timeout_minutes=minutes))
    args = megatron_args(spec)
    assert ("--fcp-exchange-timeout" in args) == (timeout is not None)
    assert ("--distributed-timeout-minutes" in args) == (minutes is not None)
    ns = megatron_parser().parse_args(args)
    assert ns.fcp_exchange_timeout == timeout and ns.distributed_timeout_minutes == minutes
    check_fcp_args(ns, world_size=spec.parallel.world_size)


def test_node_commands_and_hosts():
    spec = load_run_config(CONFIGS / "tiny_cpu.yaml")
    commands = node_commands(spec, ["a", "b"])
    assert commands[1][:13] == ["python", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                                "--node-rank", "1", "--master-addr", "a", "--master-port", "29500"]
    assert commands[1][13:15] == ["-m", "megatron_fcp.cpu_trainer.worker"] and commands[1][15:] == entry_args(spec)
    with pytest.raises(InputError, match="hosts: 3 given for parallel.nodes 2"):
        node_commands(spec, ["a", "b", "c"])


def test_launcher_env_is_shell_safe():
    spec = load_run_config(CONFIGS / "llama3_8b.yaml")
    env = dict(line.split("=", 1) for line in launcher_env(spec))
    assert {k: shlex.split(v)[0] for k, v in env.items() if k != "ENTRY_ARGS"} | {} == {
        "RUN_NAME": "llama3_8b", "DEVICE": "gpu", "NNODES": "32", "GPUS_PER_NODE": "8", "MASTER_PORT": "29500",
        "ENTRY_MODULE": "megatron_fcp.megatron.pretrain_gpt", "CONTAINER_IMAGE": "/shared/images/megatron-fcp.sqsh",
        "CONTAINER_MOUNTS": "/shared/data:/data,/shared/checkpoints:/checkpoints,/shared/logs:/logs",
        "LOG_DIR": "/logs/llama3_8b", "CHECKPOINT_DIR": "/checkpoints/llama3_8b",
        "HOST_LOG_DIR": "/shared/logs/llama3_8b"}
    assert shlex.split(shlex.split(env["ENTRY_ARGS"])[0]) == entry_args(spec)
    no_container = dict(line.split("=", 1) for line in launcher_env(load_run_config(CONFIGS / "tiny_cpu.yaml")))
    assert no_container["CONTAINER_IMAGE"] == "''" and no_container["DEVICE"] == "cpu"


@pytest.mark.parametrize(("path", "mounts", "host"), [
    ("/logs/run", ["/shared/logs:/logs"], "/shared/logs/run"),
    ("/logs", ["/shared/logs/:/logs/:ro"], "/shared/logs"),
    ("/logs2/run", ["/shared/logs:/logs"], "/logs2/run"),  # /logs does not cover /logs2
    ("/a/b/c", ["/x:/a", "/y:/a/b"], "/y/c"),  # the longest mount wins
    ("/a/b", ["/host:/"], "/host/a/b"),
    ("out/logs", ["/x:/out"], "out/logs"),  # relative: the job's folder, not a mount
])
def test_host_path_through_container_mounts(path, mounts, host):
    assert command.host_path(path, mounts) == host


# -- the command ---------------------------------------------------------------------------------------------
def test_print_shows_one_command_per_node(capsys):
    assert main(["print", str(CONFIGS / "llama3_8b.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = "\n".join(line for line in lines if line.startswith("#"))
    assert "world size 256" in header and "data-parallel size 32" in header and "tokens per CP rank 16384" in header
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    assert len(commands) == 32
    assert [c[c.index("--node-rank") + 1] for c in commands] == [str(i) for i in range(32)]
    assert {c[c.index("--master-addr") + 1] for c in commands} == {"node1"}
    args = entry_args(load_run_config(CONFIGS / "llama3_8b.yaml"))
    assert all(c[c.index("-m", 3) + 2:] == args for c in commands)


def test_check_and_env(capsys, tmp_path):
    assert main(["check", str(CONFIGS / "tiny_cpu.yaml")]) == 0
    assert capsys.readouterr().out.startswith(f"{CONFIGS / 'tiny_cpu.yaml'}: ok")
    assert main(["env", str(CONFIGS / "tiny_cpu.yaml")]) == 0
    assert "NNODES=2" in capsys.readouterr().out.splitlines()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(edited("tiny_cpu", parallel__context=3, training__lr="fast")))
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"megatron-fcp launch: error: {bad}: 3 problems"
    assert [line.split(":")[0] for line in err[1:]] == ["training.lr", "parallel.context", "training.seq_length"]


@pytest.mark.parametrize("text", ["parallel: [1, 2\n", "- just\n- a list\n", None])
def test_unreadable_configs_are_one_error(tmp_path, capsys, text):
    path = tmp_path / "broken.yaml"
    if text is not None:
        path.write_text(text)
    assert main(["check", str(path)]) == 2  # an exception would escape main and fail here
    err = capsys.readouterr().err
    assert err.startswith(f"megatron-fcp launch: error: {path}") and "Traceback" not in err


def test_launch_imports_neither_torch_nor_megatron_core():
    code = ("import sys, megatron_fcp.launch.__main__; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _launch_imports() -> dict[str, set[str]]:
    """Each module of megatron_fcp.launch -> the launch modules it imports anywhere (type-hint imports too)."""
    import ast

    folder = Path(__file__).resolve().parents[2] / "megatron_fcp" / "launch"
    names = {path.stem for path in folder.glob("*.py")} - {"__init__", "__main__"}
    graph = {}
    for name in names:
        found = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "megatron_fcp.launch":
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron_fcp.launch."):
                found.add(node.module.rsplit(".", 1)[1])
        graph[name] = found & names
    return graph


def test_launch_modules_import_each_other_without_a_loop():
    graph = _launch_imports()
    assert "command" not in graph["checks"] and "spec" not in graph["checks"]
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import loop: {' -> '.join((*path, name))}"
        if name not in done:
            for imported in graph[name]:
                visit(imported, (*path, name))
            done.add(name)

    for name in graph:
        visit(name, ())


def test_context_parallel_keys_are_fcp_settings():
    from dataclasses import fields

    from megatron_fcp.launch.spec import ContextParallelSpec

    keys = {f.name: f.default for f in fields(ContextParallelSpec)}
    assert keys == {described.key: described.key_default for described in CONFIG_SETTINGS}
    assert keys["mode"] == "fcp" and keys["edge_cost_tile_size"] == "auto"
    worker = {flag: attr for flag, attr, _ in command.WORKER_FLAGS}
    assert worker["--scheduler"] == "context_parallel.scheduler"
    assert worker["--kv-budget-tokens"] == "context_parallel.kv_budget_tokens"
