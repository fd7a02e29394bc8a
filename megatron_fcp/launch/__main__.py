"""``python -m megatron_fcp.launch print|check|env|rehearse CONFIG``: a run config, resolved and checked, no training.

- ``print``: the derived sizes and the torchrun command of every node.
- ``check``: exit 0 if the config is fine; otherwise each problem on its own line and exit 2.
- ``env``: the ``KEY=VALUE`` lines the sbatch script reads.
- ``rehearse``: the run's data path on this machine, no GPU needed (:mod:`megatron_fcp.launch.rehearse`); a data
  path the cluster would reject fails with the training entry point's own line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings

from megatron_fcp.errors import InputError
from megatron_fcp.launch import rehearse
from megatron_fcp.launch.command import MASTER_PORT, entry_module, launcher_env, node_commands
from megatron_fcp.launch.spec import RunSpec, load_run_config

PROG = "megatron-fcp launch"


def summary(spec: RunSpec) -> list[str]:
    """The derived sizes of a run, as ``#`` comment lines."""
    p, t = spec.parallel, spec.training
    steps = spec.global_batch_size // (t.micro_batch_size * p.data_parallel)
    return [
        f"# run {spec.name} (device {spec.device}): world size {p.world_size} = {p.nodes} nodes x "
        f"{p.gpus_per_node} processes per node",
        f"# data-parallel size {p.data_parallel} = {p.world_size} / (tensor {p.tensor} x pipeline {p.pipeline} x "
        f"context {p.context})",
        f"# tokens per CP rank {spec.tokens_per_cp_rank} = seq_length {t.seq_length} / context {p.context}; global "
        f"batch {spec.global_batch_size} = {steps} micro-batches of {t.micro_batch_size} on each of {p.data_parallel} "
        "data-parallel ranks",
    ]


def _print(spec: RunSpec, args) -> list[str]:
    hosts = args.hosts.split(",") if args.hosts else None
    commands = node_commands(spec, hosts)
    master = commands[0][commands[0].index("--master-addr") + 1]
    lines = summary(spec) + [f"# {entry_module(spec)} on each node (master {master}:{MASTER_PORT}), node rank 0 "
                             f"to {spec.parallel.nodes - 1}:"]
    return lines + [shlex.join(command) for command in commands]


def _check(spec: RunSpec, args) -> list[str]:
    return [f"{args.config}: ok"] + summary(spec)


def _env(spec: RunSpec, args) -> list[str]:
    return launcher_env(spec)


def _rehearse(spec: RunSpec, args) -> list[str]:
    options = rehearse.Options(data=args.data, samples=args.samples, null_tokenizer=args.null_tokenizer,
                               cache_dir=args.cache_dir, hardware=args.hardware)
    return rehearse.rehearse(args.config, spec, options)


COMMANDS = {"print": _print, "check": _check, "env": _env, "rehearse": _rehearse}
ENTRY_PROG = "megatron-fcp"
"""How the training entry point names itself in its error lines (``rehearse`` repeats them word for word)."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_rehearse(commands) -> None:
    sub = commands.add_parser("rehearse", help="run the data path of the config on this machine (no GPU): "
                                               "datasets, FCP data hooks of every CP rank, memory")
    sub.add_argument("--data", metavar="PREFIX", help="indexed dataset (PREFIX.bin, PREFIX.idx) instead of the "
                                                      "config's data.blend")
    sub.add_argument("--samples", type=_positive, default=rehearse.DEFAULT_SAMPLES,
                     help=f"micro-batches each CP rank reads (default {rehearse.DEFAULT_SAMPLES})")
    sub.add_argument("--null-tokenizer", type=_positive, metavar="VOCAB",
                     help="read the data with Megatron's NullTokenizer of VOCAB ids (end of document: VOCAB - 1) "
                          "instead of the config's tokenizer, e.g. where that is not on this machine")
    sub.add_argument("--cache-dir", metavar="DIR", help="Megatron's dataset index cache (--data-cache-path); "
                                                        "default a temporary folder, removed afterwards")
    sub.add_argument("--hardware", default=rehearse.DEFAULT_HARDWARE,
                     help="hardware profile of the modeled attention times (megatron_fcp.sim; default "
                          f"{rehearse.DEFAULT_HARDWARE})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("print", help="the derived sizes and the torchrun command of every node")
    show.add_argument("--hosts", help="comma-separated host names, one per node; the first is the master "
                                      "(default node1..nodeN)")
    commands.add_parser("check", help="exit 0, or print each problem and exit 2")
    commands.add_parser("env", help="KEY=VALUE lines for the sbatch script")
    _add_rehearse(commands)
    for sub in commands.choices.values():
        sub.add_argument("config", help="run config (YAML)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            spec = load_run_config(args.config)
        for warning in caught:
            print(f"{PROG}: warning: {warning.message}", file=sys.stderr)
        lines = COMMANDS[args.command](spec, args)
    except rehearse.EntryPointError as err:  # the training entry point's line, word for word
        print(f"{ENTRY_PROG}: error: {err}", file=sys.stderr, flush=True)
        return 2
    except InputError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:  # e.g. piped into head: the rest is not wanted
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (Python's own recipe: no second error at exit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
