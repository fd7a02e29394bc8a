"""``python -m megatron_fcp.launch print|check|env CONFIG``: what a run config resolves to, without running it.

- ``print``: the derived sizes and the torchrun command of every node.
- ``check``: exit 0 if the config is fine; otherwise each problem on its own line and exit 2.
- ``env``: the ``KEY=VALUE`` lines the sbatch script reads.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings

from megatron_fcp.errors import InputError
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


COMMANDS = {"print": _print, "check": _check, "env": _env}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("print", help="the derived sizes and the torchrun command of every node")
    show.add_argument("--hosts", help="comma-separated host names, one per node; the first is the master "
                                      "(default node1..nodeN)")
    commands.add_parser("check", help="exit 0, or print each problem and exit 2")
    commands.add_parser("env", help="KEY=VALUE lines for the sbatch script")
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
