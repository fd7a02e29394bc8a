"""From a run config to command lines: the entry point's arguments, the torchrun command of each node, and the
environment the sbatch script reads.

:func:`entry_args` is the one place a config becomes arguments. On GPU they are those of
``python -m megatron_fcp.megatron.pretrain_gpt`` (:func:`megatron_args`); on CPU those of the gloo trainer
``python -m megatron_fcp.cpu_trainer.worker`` (:func:`worker_args`). The FCP flags come from FCP's settings
(``megatron_fcp.megatron.config``: each setting's flag, worker flag and config key). :func:`megatron_parser` and
:func:`worker_parser` read the arguments back from the same flag tables (for tests and tools; the launcher checks the
config itself). Nothing here imports torch or megatron-core.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from operator import attrgetter
from typing import TYPE_CHECKING

from megatron_fcp.errors import InputError
from megatron_fcp.megatron.config import CONFIG_SETTINGS, FLAG_SETTINGS, MOCK_DOCLENS, MODE, SETTINGS, add_fcp_args
from megatron_fcp.megatron.settings import Setting

if TYPE_CHECKING:
    from megatron_fcp.launch.spec import RunSpec

ENTRY_MODULES = {"gpu": "megatron_fcp.megatron.pretrain_gpt", "cpu": "megatron_fcp.cpu_trainer.worker"}
"""The module torchrun starts on each device."""
MASTER_PORT = 29500
"""The rendezvous port on the first host."""
SWITCH, LIST = "switch", "list"

MEGATRON_FLAGS: dict[str, type | str] = {
    "--num-layers": int, "--hidden-size": int, "--ffn-hidden-size": int, "--num-attention-heads": int,
    "--group-query-attention": SWITCH, "--num-query-groups": int, "--position-embedding-type": str,
    "--rotary-base": int, "--normalization": str, "--norm-epsilon": float, "--attention-dropout": float,
    "--hidden-dropout": float, "--swiglu": SWITCH, "--untie-embeddings-and-output-weights": SWITCH,
    "--disable-bias-linear": SWITCH,
    "--tensor-model-parallel-size": int, "--pipeline-model-parallel-size": int, "--context-parallel-size": int,
    "--sequence-parallel": SWITCH,
    "--seq-length": int, "--max-position-embeddings": int, "--micro-batch-size": int, "--global-batch-size": int,
    "--train-iters": int, "--lr": float, "--min-lr": float, "--lr-warmup-iters": int, "--lr-decay-style": str,
    "--weight-decay": float, "--clip-grad": float, "--adam-beta1": float, "--adam-beta2": float,
    "--bf16": SWITCH, "--fp16": SWITCH, "--use-distributed-optimizer": SWITCH, "--recompute-granularity": str,
    "--recompute-method": str, "--recompute-num-layers": int, "--calculate-per-token-loss": SWITCH,
    "--eval-iters": int, "--eval-interval": int, "--log-interval": int, "--seed": int,
    "--exit-signal-handler": SWITCH, "--distributed-timeout-minutes": int,
    "--data-path": LIST, "--split": str, "--tokenizer-type": str, "--tokenizer-model": str,
    "--reset-position-ids": SWITCH, "--reset-attention-mask": SWITCH, "--eod-mask-loss": SWITCH,
    "--mock-data": SWITCH, "--vocab-size": int,
    "--save": str, "--load": str, "--save-interval": int, "--tensorboard-dir": str,
}
"""The Megatron flags :func:`megatron_args` emits, with how each is read (the FCP flags come from ``add_fcp_args``)."""
FCP_FLAGS: dict[str, type | str] = {
    described.flag: SWITCH if described.switch else described.flag_type or str for described in FLAG_SETTINGS}
"""The flags of ``megatron_fcp.megatron.config.add_fcp_args``, with how each is read (the parser takes them from
``add_fcp_args`` itself)."""


def _worker_flag(described: Setting) -> tuple[str, str, type]:
    """The CPU worker's flag of an FCP setting, taken from its ``context_parallel`` key."""
    return described.worker_flag, f"context_parallel.{described.key}", str


WORKER_FLAGS: tuple[tuple[str, str, type], ...] = (
    ("--cp", "parallel.context", int), ("--tp", "parallel.tensor", int), ("--dp", "parallel.data_parallel", int),
    ("--steps", "training.train_iters", int), ("--seq-length", "training.seq_length", int),
    ("--doclens", "data.mock_doclens", str), _worker_flag(SETTINGS["scheduler"]),
    ("--num-layers", "model.num_layers", int), ("--hidden-size", "model.hidden_size", int),
    ("--num-heads", "model.num_attention_heads", int), ("--num-query-groups", "model.query_groups", int),
    ("--ffn-hidden-size", "model.ffn_hidden_size", int), ("--vocab-size", "model.vocab_size", int),
    ("--lr", "training.lr", float), ("--seed", "training.seed", int),
    _worker_flag(SETTINGS["kv_budget_tokens"]), _worker_flag(SETTINGS["ranks_per_node"]),
    _worker_flag(SETTINGS["node_exchange"]),
    ("--checkpoints", "paths.checkpoints", str), ("--save-interval", "training.save_interval", int),
    ("--records", "paths.records", str),
)
"""The CPU worker's flags: (flag, attribute of the RunSpec it is taken from, how it is read)."""

def _text(value) -> str:
    return "none" if value is None else str(value)


def _flatten(pairs: list[tuple[str, object]]) -> list[str]:
    """``[(flag, value)]`` -> argument list, each flag read as its table says (a switch's value is None)."""
    args: list[str] = []
    for flag, value in pairs:
        kind = MEGATRON_FLAGS.get(flag) or FCP_FLAGS[flag]
        if kind == SWITCH:
            assert value is None, f"{flag} is a switch"
            args.append(flag)
        elif kind == LIST:
            args += [flag, *(_text(v) for v in value)]
        else:
            args += [flag, _text(value)]
    return args


def _model_pairs(spec: RunSpec) -> list:
    m = spec.model
    pairs = [("--num-layers", m.num_layers), ("--hidden-size", m.hidden_size),
             ("--ffn-hidden-size", m.ffn_hidden_size), ("--num-attention-heads", m.num_attention_heads)]
    if m.query_groups != m.num_attention_heads:
        pairs += [("--group-query-attention", None), ("--num-query-groups", m.query_groups)]
    pairs += [("--position-embedding-type", "rope"), ("--rotary-base", m.rotary_base),
              ("--normalization", m.normalization), ("--norm-epsilon", m.norm_epsilon),
              ("--attention-dropout", "0"), ("--hidden-dropout", "0")]
    switches = {"--swiglu": m.swiglu, "--untie-embeddings-and-output-weights": not m.tie_embeddings,
                "--disable-bias-linear": not m.bias}
    return pairs + [(flag, None) for flag, on in switches.items() if on]


def _parallel_pairs(spec: RunSpec) -> list:
    p = spec.parallel
    pairs = [("--tensor-model-parallel-size", p.tensor), ("--pipeline-model-parallel-size", p.pipeline),
             ("--context-parallel-size", p.context)]
    return pairs + [("--sequence-parallel", None)] * (p.tensor > 1)


RECOMPUTE_PAIRS = {"none": [], "selective": [("--recompute-granularity", "selective")],
                   "full": [("--recompute-granularity", "full"), ("--recompute-method", "uniform"),
                            ("--recompute-num-layers", 1)]}
PRECISION_PAIRS = {"bf16": [("--bf16", None)], "fp16": [("--fp16", None)], "fp32": []}


def _training_pairs(spec: RunSpec) -> list:
    t = spec.training
    pairs = [("--seq-length", t.seq_length), ("--max-position-embeddings", t.seq_length),
             ("--micro-batch-size", t.micro_batch_size), ("--global-batch-size", spec.global_batch_size),
             ("--train-iters", t.train_iters), ("--lr", t.lr), ("--min-lr", t.min_lr),
             ("--lr-warmup-iters", t.warmup_iters), ("--lr-decay-style", t.lr_decay_style),
             ("--weight-decay", t.weight_decay), ("--clip-grad", t.clip_grad), ("--adam-beta1", t.adam_beta1),
             ("--adam-beta2", t.adam_beta2), *PRECISION_PAIRS.get(t.precision, []),
             *RECOMPUTE_PAIRS.get(t.recompute, []), ("--calculate-per-token-loss", None),
             ("--eval-iters", t.eval_iters), ("--eval-interval", t.eval_interval),
             ("--log-interval", t.log_interval), ("--seed", t.seed), ("--exit-signal-handler", None)]
    if t.distributed_timeout_minutes is not None:
        pairs.append(("--distributed-timeout-minutes", t.distributed_timeout_minutes))
    return pairs + [("--use-distributed-optimizer", None)] * t.distributed_optimizer


def _data_pairs(spec: RunSpec) -> list:
    d, pairs = spec.data, []
    if d.blend is not None:
        pairs += [("--data-path", tuple(str(x) for pair in d.blend for x in pair)), ("--split", d.split)]
        if d.tokenizer is not None:
            pairs += [("--tokenizer-type", d.tokenizer.type), ("--tokenizer-model", d.tokenizer.model)]
        pairs += [("--reset-position-ids", None), ("--reset-attention-mask", None), ("--eod-mask-loss", None)]
    if d.mock_doclens is not None:
        pairs += [("--mock-data", None)]
        if spec.context_parallel.mode == "fcp":
            pairs += [(MOCK_DOCLENS.flag, d.mock_doclens)]
        pairs += [("--tokenizer-type", "NullTokenizer")]
        if spec.model.vocab_size is not None:
            pairs += [("--vocab-size", spec.model.vocab_size)]
    return pairs


def _setting_pairs(described: Setting, value) -> list:
    """The flag of an FCP setting for ``value``: a switch when on; nothing when unset and unset by default."""
    if described.switch:
        return [(described.flag, None)] if value else []
    if value is None and described.default is None:
        return []
    return [(described.flag, value)]


def _context_parallel_pairs(spec: RunSpec) -> list:
    c = spec.context_parallel
    pairs = [(MODE.flag, c.mode)]
    if c.mode != "fcp":
        return pairs  # ring: Megatron's own path, which reads none of the --fcp-* flags
    for described in CONFIG_SETTINGS:
        if described is not MODE:
            pairs += _setting_pairs(described, getattr(c, described.key))
    return pairs


def _path_pairs(spec: RunSpec) -> list:
    p = spec.paths
    return [("--save", p.checkpoints), ("--load", p.checkpoints), ("--save-interval", spec.training.save_interval),
            ("--tensorboard-dir", p.tensorboard)]


def megatron_args(spec: RunSpec) -> list[str]:
    """The arguments of ``python -m megatron_fcp.megatron.pretrain_gpt`` for ``spec`` (any device: on CPU they are
    what the launcher's checks read, since the CPU worker runs the same FCP hooks)."""
    return _flatten([*_model_pairs(spec), *_parallel_pairs(spec), *_training_pairs(spec), *_data_pairs(spec),
                     *_context_parallel_pairs(spec), *_path_pairs(spec)])


def worker_args(spec: RunSpec) -> list[str]:
    """The arguments of the CPU trainer ``python -m megatron_fcp.cpu_trainer.worker`` for ``spec``."""
    return [token for flag, attr, _ in WORKER_FLAGS for token in (flag, _text(attrgetter(attr)(spec)))]


def entry_args(spec: RunSpec) -> list[str]:
    """The entry point's arguments for ``spec``: the only place a run config becomes a command line."""
    return megatron_args(spec) if spec.device == "gpu" else worker_args(spec)


def entry_module(spec: RunSpec) -> str:
    return ENTRY_MODULES[spec.device]


class StrictParser(argparse.ArgumentParser):
    """An argument parser that raises :class:`InputError` instead of printing usage and exiting."""

    def error(self, message):
        raise InputError(f"{self.prog}: {message}")


def megatron_parser() -> StrictParser:
    """Reads :func:`megatron_args` back: :data:`MEGATRON_FLAGS` plus ``add_fcp_args`` (Megatron's names)."""
    parser = StrictParser(prog="pretrain_gpt", add_help=False, allow_abbrev=False)
    for flag, kind in MEGATRON_FLAGS.items():
        if kind == SWITCH:
            parser.add_argument(flag, action="store_true")
        elif kind == LIST:
            parser.add_argument(flag, nargs="+")
        else:
            parser.add_argument(flag, type=kind)
    add_fcp_args(parser)
    return parser


def worker_parser() -> StrictParser:
    """Reads :func:`worker_args` back from :data:`WORKER_FLAGS`."""
    parser = StrictParser(prog="cpu_trainer.worker", add_help=False, allow_abbrev=False)
    for flag, _, kind in WORKER_FLAGS:
        parser.add_argument(flag, type=kind, required=True)
    return parser


def node_commands(spec: RunSpec, hosts: Sequence[str] | None = None) -> list[list[str]]:
    """The torchrun command of each node (argument lists, node rank 0 first); ``hosts`` default node1..nodeN,
    the first is the rendezvous host."""
    nodes = spec.parallel.nodes
    hosts = list(hosts) if hosts else [f"node{i + 1}" for i in range(nodes)]
    if len(hosts) != nodes:
        raise InputError(f"hosts: {len(hosts)} given for parallel.nodes {nodes}; give one host per node")
    head = ["python", "-m", "torch.distributed.run", "--nnodes", str(nodes),
            "--nproc-per-node", str(spec.parallel.gpus_per_node)]
    tail = ["--master-addr", hosts[0], "--master-port", str(MASTER_PORT), "-m", entry_module(spec),
            *entry_args(spec)]
    return [[*head, "--node-rank", str(rank), *tail] for rank in range(nodes)]


def host_path(path: str, mounts: Sequence[str]) -> str:
    """Where the container path ``path`` lies on the host, through ``SRC:DST[:FLAGS]`` bind mounts: the mount
    with the longest ``DST`` covering ``path`` wins; ``path`` itself when none covers it."""
    best_dst, best_src = "", ""
    for mount in mounts:
        src, dst = mount.split(":")[:2]
        dst = dst.rstrip("/") or "/"
        covers = path == dst or path.startswith(dst if dst == "/" else dst + "/")
        if covers and len(dst) > len(best_dst):
            best_dst, best_src = dst, src
    if not best_dst:
        return path
    rest, src = path[len(best_dst):].lstrip("/"), best_src.rstrip("/")
    return f"{src}/{rest}" if rest else src or "/"


def launcher_env(spec: RunSpec) -> list[str]:
    """``KEY=VALUE`` lines for the sbatch script, each value shell-quoted (``ENTRY_ARGS`` holds the arguments
    shell-quoted and joined: expand it with ``eval "set -- $ENTRY_ARGS"``)."""
    container = spec.container
    values = {
        "RUN_NAME": spec.name, "DEVICE": spec.device, "NNODES": spec.parallel.nodes,
        "GPUS_PER_NODE": spec.parallel.gpus_per_node, "MASTER_PORT": MASTER_PORT,
        "ENTRY_MODULE": entry_module(spec), "ENTRY_ARGS": shlex.join(entry_args(spec)),
        "CONTAINER_IMAGE": container.image if container else "",
        "CONTAINER_MOUNTS": ",".join(container.mounts) if container else "",
        "LOG_DIR": spec.paths.logs, "CHECKPOINT_DIR": spec.paths.checkpoints,
        # the log folder on the host when the run uses its container (the batch script writes there)
        "HOST_LOG_DIR": host_path(spec.paths.logs, container.mounts) if container else spec.paths.logs,
    }
    return [f"{key}={shlex.quote(str(value))}" for key, value in values.items()]

