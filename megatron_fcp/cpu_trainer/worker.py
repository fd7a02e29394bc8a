"""The CPU trainer as a ``torchrun`` worker: one process of a multi-node run launched by Slurm (or by hand).

    python -m torch.distributed.run --nnodes 2 --nproc-per-node 2 --node-rank I --master-addr HOST \\
        -m megatron_fcp.cpu_trainer.worker --cp 4 --steps 20 --seq-length 1024 --doclens magi_hist \\
        --checkpoints CKPT --save-interval 5 --records LOGS/losses.jsonl

Ranks, world size and the rendezvous come from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``); the process group is gloo. The plans place the CP ranks on nodes of
``--ranks-per-node`` processes, by default of torchrun's ``LOCAL_WORLD_SIZE`` (one machine can emulate nodes:
``--nproc-per-node 4 ... --ranks-per-node 2`` is 2 nodes x 2). The run resumes from the latest checkpoint in
``--checkpoints`` (``latest_step.txt`` names it) and saves one every ``--save-interval`` steps, like Megatron's
``--save``/``--load``/``--save-interval``; on SIGTERM (Slurm's ``--signal``, a preemption, ``scontrol requeue``)
it saves after the step it is in and exits 0, like Megatron's ``--exit-signal-handler``. Rank 0 appends one
JSON line per step to ``--records``, so the losses of every attempt of a requeued job end in one file.

Faults end the process with one line: a checkpoint folder that cannot be written, a ``--records`` file that cannot
be appended to, or no intact checkpoint to resume from (exit 2, before training); a damaged latest checkpoint (an
unreadable marker, a missing folder, a file that differs from its checksum) is skipped for the previous intact one
with a warning; a collective that fails or waits longer than ``--collective-timeout`` seconds (a stopped or lost
peer) names the step and what it waited for (exit 1).
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_fcp.cpu_trainer.train import (
    MODES,
    RECOMPUTE,
    CollectiveFailure,
    RunConfig,
    check_nodes,
    check_paths,
    latest_checkpoint,
    train_in_group,
)
from megatron_fcp.errors import InputError
from megatron_fcp.megatron.config import SETTINGS

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_fcp.cpu_trainer.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, default="fcp")
    for name, default in (("cp", 4), ("tp", 1), ("dp", 1), ("steps", 30), ("seq-length", 2048),
                          ("num-layers", 2), ("hidden-size", 64), ("num-heads", 4), ("num-query-groups", 2),
                          ("ffn-hidden-size", 256), ("vocab-size", 256), ("seed", 1234), ("save-interval", 0),
                          ("planning-workers", 0)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--collective-timeout", type=float, default=RunConfig.collective_timeout_s, metavar="SECONDS",
                   help="the longest any collective (all-reduce, barrier, checkpoint save, start-up) waits for the "
                        "other ranks before the run stops with one line naming it (default %(default)g)")
    p.add_argument("--doclens", default="linux_files", help="shipped length distribution or a lengths file")
    for described in SETTINGS.values():  # FCP's settings the worker takes: --scheduler, --kv-budget-tokens, ...
        if described.worker_flag:
            p.add_argument(described.worker_flag, default=described.default, choices=described.choices,
                           metavar=described.metavar, help=described.help)
    p.add_argument("--recompute", choices=RECOMPUTE, default="none")
    p.add_argument("--checkpoints", default=None, help="checkpoint folder: resume from its latest, save into it")
    p.add_argument("--records", default=None, help="JSON lines file rank 0 appends one record per step to")
    return p


def run_config(args: argparse.Namespace, first_step: int, load_dir: str | None) -> RunConfig:
    """The :class:`RunConfig` of the parsed flags, continuing after the checkpoint found (if any)."""
    return RunConfig(mode=args.mode, cp=args.cp, tp=args.tp, dp=args.dp, steps=args.steps - first_step + 1,
                     seq_length=args.seq_length, doclens=args.doclens, num_layers=args.num_layers,
                     hidden_size=args.hidden_size, num_heads=args.num_heads, num_query_groups=args.num_query_groups,
                     ffn_hidden_size=args.ffn_hidden_size, vocab_size=args.vocab_size, lr=args.lr, seed=args.seed,
                     planning_workers=args.planning_workers, scheduler=args.scheduler,
                     save_dir=args.checkpoints, save_interval=args.save_interval, load_dir=load_dir,
                     first_step=first_step, kv_budget_tokens=args.kv_budget_tokens, recompute=args.recompute,
                     records=args.records, collective_timeout_s=args.collective_timeout,
                     ranks_per_node=args.ranks_per_node, node_exchange=args.node_exchange)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    try:
        if missing:
            raise InputError(f"{', '.join(missing)} not set: launch with torchrun (python -m torch.distributed.run) "
                             "or set the torch.distributed environment")
        rank = int(os.environ["RANK"])

        def warn(message: str) -> None:  # once per job, not once per process
            if rank == 0:
                print(f"megatron-fcp worker: warning: {message}", file=sys.stderr, flush=True)

        latest = latest_checkpoint(args.checkpoints, warn) if args.checkpoints else None
        first_step = 1 if latest is None else latest[0] + 1
        if first_step > args.steps:
            print(f"megatron-fcp worker: checkpoint of step {latest[0]} already covers --steps {args.steps}")
            return 0
        run = run_config(args, first_step, None if latest is None else str(latest[1]))
        if int(os.environ["WORLD_SIZE"]) != run.world_size:
            raise InputError(f"the run needs {run.world_size} processes (dp x tp x cp), torchrun started "
                             f"{os.environ['WORLD_SIZE']}")
        check_paths(run, rank)
        check_nodes(run)
    except InputError as err:
        print(f"megatron-fcp worker: error: {err}", file=sys.stderr, flush=True)
        return 2
    try:
        train_in_group(run)
    except CollectiveFailure as err:
        print(f"megatron-fcp worker: error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
