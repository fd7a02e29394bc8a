"""Dry-run entry point: stands in for the training entry module to check a launch without training.

    FCP_DRY_RUN=1 scripts/slurm/submit.sh configs/llama3_8b.yaml

``scripts/slurm/fcp.sbatch`` starts ``python -m megatron_fcp.launch.dryrun ENTRY_ARGS`` where it would start
``ENTRY_MODULE``, under either launcher. Each process prints exactly one line::

    dryrun rank=R world=W node=HOST local_rank=L tp=T cp=C dp=D pp=P

with its coordinates in Megatron's default rank order ``tp-cp-ep-dp-pp`` (megatron-core's
``parallel_state.RankGenerator``: the tensor-parallel rank varies fastest, then the context-parallel rank, the
expert rank (size 1 outside MoE layers), the data-parallel rank and the pipeline rank), then exits 0. It checks what
a real start would depend on and exits 2 naming the problem otherwise: the process environment (torchrun's
``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` or srun's ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS``), a world size
equal to the config's, and arguments equal to the config's entry arguments (nothing lost in the shell quoting
between the config and the process). Imports neither torch nor megatron-core.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import warnings
from collections.abc import Mapping

from megatron_fcp.errors import InputError
from megatron_fcp.launch.command import entry_args
from megatron_fcp.launch.spec import load_run_config

PROG = "megatron-fcp dryrun"
ORDER = "tp-cp-ep-dp-pp"
"""megatron-core's default rank order (``initialize_model_parallel(order=...)``), fastest-varying first."""
ENVIRONMENTS = (("RANK", "LOCAL_RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"))
"""Where a process finds (rank, local rank, world size): torchrun's variables first, then srun's."""


def coordinates(rank: int, *, tp: int, cp: int, dp: int, pp: int, ep: int = 1, order: str = ORDER) -> dict[str, int]:
    """The parallel coordinates of global ``rank``: mixed-radix digits of the rank in ``order`` (first name varies
    fastest), as megatron-core's ``RankGenerator`` lays ranks out."""
    sizes = {"tp": tp, "cp": cp, "ep": ep, "dp": dp, "pp": pp}
    names = order.split("-")
    if sorted(names) != sorted(sizes):
        raise ValueError(f"order {order!r} must name each of {', '.join(sizes)} once")
    world = tp * cp * ep * dp * pp
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    coords = {}
    for name in names:
        rank, coords[name] = divmod(rank, sizes[name])
    return coords


def process_ranks(environ: Mapping[str, str]) -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment, else srun's; :class:`InputError` if neither."""
    for names in ENVIRONMENTS:
        if all(name in environ for name in names):
            try:
                rank, local_rank, world = (int(environ[name]) for name in names)
            except ValueError:
                raise InputError(f"{', '.join(f'{n}={environ[n]!r}' for n in names)}: not whole numbers") from None
            return rank, local_rank, world
    raise InputError("no process environment: set by torchrun (RANK, LOCAL_RANK, WORLD_SIZE) or srun "
                     "(SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS)")


def node_name(environ: Mapping[str, str]) -> str:
    """The Slurm node the process runs on (``SLURMD_NODENAME``), else the host name."""
    return environ.get("SLURMD_NODENAME") or socket.gethostname()


def dryrun_line(config: str, args: list[str], environ: Mapping[str, str]) -> str:
    """This process's line; :class:`InputError` if the launch would not start the config's run."""
    with warnings.catch_warnings():  # the sbatch script has reported them once already
        warnings.simplefilter("ignore")
        spec = load_run_config(config)
    rank, local_rank, world = process_ranks(environ)
    p = spec.parallel
    if world != p.world_size:
        raise InputError(f"world size {world}, but {config} has {p.world_size} = parallel.nodes {p.nodes} x "
                         f"parallel.gpus_per_node {p.gpus_per_node}")
    expected = entry_args(spec)
    if args != expected:
        first = next((i for i, (a, b) in enumerate(zip(args, expected, strict=False)) if a != b),
                     min(len(args), len(expected)))
        raise InputError(f"arguments differ from {config}'s entry arguments at position {first}: got "
                         f"{args[first:first + 3]}, expected {expected[first:first + 3]} ({len(args)} vs "
                         f"{len(expected)} arguments)")
    c = coordinates(rank, tp=p.tensor, cp=p.context, dp=p.data_parallel, pp=p.pipeline)
    return (f"dryrun rank={rank} world={world} node={node_name(environ)} local_rank={local_rank} "
            f"tp={c['tp']} cp={c['cp']} dp={c['dp']} pp={c['pp']}")


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--config", default=environ.get("FCP_CONFIG"),
                        help="run config (YAML); default $FCP_CONFIG")
    argv = sys.argv[1:] if argv is None else argv
    # the config's entry arguments follow; only a leading --config belongs to the dry run
    own, rest = (argv[:2], argv[2:]) if argv[:1] == ["--config"] else ([], argv)
    config = parser.parse_args(own).config
    try:
        if not config:
            raise InputError("no run config: set FCP_CONFIG or pass --config CONFIG first")
        line = dryrun_line(config, rest, environ)
    except InputError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return 2
    # one write, so lines of processes sharing a pipe (torchrun's workers) never interleave, even unbuffered
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
