"""The ``fcp`` command line: plan micro-batches and compare CP strategies in the simulator."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from megatron_fcp.data.lengths import SHIPPED, load_distribution, pack_batches, read_lengths, resolve_lengths_source
from megatron_fcp.errors import InputError
from megatron_fcp.paths import folder_write_problem
from megatron_fcp.planner.api import STRATEGIES, STRATEGY_HELP, check_batch, check_sizes, make_plan
from megatron_fcp.planner.checks import plan_problems
from megatron_fcp.planner.pairs import MASKS
from megatron_fcp.planner.stages import DEFAULT_KV_BUDGET, MEMORY_FIELDS, parse_kv_budget
from megatron_fcp.sim.model import HARDWARE, evaluate, load_hardware, mfu
from megatron_fcp.sim.simulate import SimConfig, cells_to_json, format_table, simulate

_MAX_BUDGET = 1 << 40
"""Largest ``--kv-budget-tokens`` (2^40 tokens, more than any rank receives; the memory model doubles it in int64)."""


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _name_list(choices):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return names

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    lengths_help = f"lengths file (one integer per line, '#' lines ignored) or a shipped name: {', '.join(SHIPPED)}"
    strategies = "; ".join(f"{k}: {v}" for k, v in STRATEGY_HELP.items())
    budget_help = ("key/value tokens per stage of the staged exchange of point-to-point plans (fcp, magi): N, "
                   "auto (the rank's token slots: at most 2x its own key/values held from other ranks, 1x kept for "
                   "backward) or none (one stage, nothing fetched again); ring and hybrid are not staged "
                   f"(default {DEFAULT_KV_BUDGET})")

    plan = sub.add_parser("plan", help="plan micro-batches and print each rank's share")
    plan.add_argument("--lengths", required=True, help=lengths_help)
    plan.add_argument("--cp", type=int, required=True, help="context-parallel size")
    plan.add_argument("--tokens-per-rank", type=int, required=True, help="tokens per CP rank")
    plan.add_argument("--mask", choices=MASKS, default="causal")
    plan.add_argument("--strategy", choices=tuple(STRATEGIES), default="fcp", help=strategies)
    plan.add_argument("--num-batches", type=int, default=1, help="micro-batches to pack from the distribution")
    plan.add_argument("--seed", type=int, default=0, help="seed of the packing (a whole number >= 0)")
    plan.add_argument("--as-batch", action="store_true",
                      help="treat the file as ONE micro-batch (its lengths must sum to cp x tokens-per-rank)")
    plan.add_argument("--json", type=Path, help="write the plan(s) as JSON here")
    plan.add_argument("--hardware", default="h100_node", help=f"hardware profile: {', '.join(HARDWARE)} or a YAML")
    plan.add_argument("--ranks", type=int, default=8, metavar="COUNT",
                      help="how many ranks to print per plan (the first COUNT; a count, not rank ids; default 8)")
    plan.add_argument("--kv-budget-tokens", default=DEFAULT_KV_BUDGET, help=budget_help)

    sim = sub.add_parser("simulate", help="compare strategies over CP sizes on a length distribution")
    sim.add_argument("--lengths", required=True, type=lambda s: tuple(s.split(",")),
                     help=lengths_help + " (comma-separated for several)")
    sim.add_argument("--cp", type=_int_list, default=(8, 16, 32, 64, 128, 256), help="CP sizes, e.g. 8,16,32")
    sim.add_argument("--tokens-per-rank", type=int, default=16384)
    sim.add_argument("--masks", type=_name_list(MASKS), default=MASKS, help="causal,full")
    sim.add_argument("--strategies", type=_name_list(tuple(STRATEGIES)), default=tuple(STRATEGIES), help=strategies)
    sim.add_argument("--num-batches", type=int, default=20, help="micro-batches per cell")
    sim.add_argument("--seed", type=int, default=0, help="seed of the packing (a whole number >= 0)")
    sim.add_argument("--hardware", default="h100_node", help=f"hardware profile: {', '.join(HARDWARE)} or a YAML")
    sim.add_argument("--json", type=Path, help="write all figures as JSON here")
    sim.add_argument("--plot", type=Path, help="write a PNG: per-rank load of one batch and MFU vs CP; and next to "
                     "it X_memory.png: peak remote key/values per rank vs CP")
    sim.add_argument("--kv-budget-tokens", default=DEFAULT_KV_BUDGET, help=budget_help)
    sim.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def _memory_metrics(cost, hw) -> dict:
    """``metrics.memory`` of the plan JSON: per-rank lists (tokens), the budget and bytes per token."""
    out = {k: cost.memory[k].tolist() for k in MEMORY_FIELDS}
    out["kv_budget_tokens"] = cost.kv_budget_tokens
    out["kv_bytes_per_token"] = hw.kv_bytes_per_token
    return out


def _max_ratio(mem: dict, key: str) -> float:
    own = [max(o, 1) for o in mem["own_kv_tokens"]]
    return max((v / o for v, o in zip(mem[key], own, strict=True)), default=0.0)


def _budget(text) -> int | str | None:
    """``--kv-budget-tokens`` parsed, refusing numbers above :data:`_MAX_BUDGET`."""
    budget = parse_kv_budget(text, flag="--kv-budget-tokens")
    if isinstance(budget, int) and budget > _MAX_BUDGET:
        raise InputError(f"--kv-budget-tokens {budget} is above {_MAX_BUDGET} (2^40), more than any rank receives; "
                         "use none for one unbounded stage, auto, or a number of tokens such as 4096")
    return budget


def _check_counts(args) -> None:
    """Refuse a negative seed and counts below 1 (one line each, before any work)."""
    if args.seed < 0:
        raise InputError(f"--seed must be a whole number >= 0 (numpy's generator takes no negative seed), got "
                         f"{args.seed}")
    if args.num_batches < 1:
        raise InputError(f"--num-batches must be a whole number >= 1, got {args.num_batches}")
    if getattr(args, "ranks", 1) < 1:
        raise InputError(f"--ranks is how many ranks to print per plan, a whole number >= 1; got {args.ranks}")


def _check_writable(path: Path | None, flag: str) -> None:
    """Refuse ``path`` unless a file can be written there, before any work: its folder is made if missing (as the
    write would) and a scratch file is created in it and removed; the path itself must not be a folder."""
    if path is None:
        return
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; pass a file path")
    err = folder_write_problem(path.parent)
    if err is None and path.exists() and not os.access(path, os.W_OK):
        err = PermissionError(13, "Permission denied")
    if err is not None:
        raise InputError(f"{flag} {path}: cannot write there ({err.strerror or err}); pass a path in a writable "
                         "folder")


def _write_json(path: Path, flag: str, record, indent: int | None = None) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=indent))
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot write it ({err.strerror}); pass a path in a writable folder") from None


def _cmd_plan(args) -> int:
    _check_counts(args)
    budget = _budget(args.kv_budget_tokens)
    hw = load_hardware(args.hardware)
    _check_writable(args.json, "--json")
    if args.as_batch:
        batches = [check_batch(read_lengths(resolve_lengths_source(args.lengths)), args.cp, args.tokens_per_rank,
                               args.mask, exact=True)]
    else:
        check_sizes(args.cp, args.tokens_per_rank)  # before packing cp * tokens_per_rank tokens
        dist = load_distribution(args.lengths)
        batches = pack_batches(dist, args.cp * args.tokens_per_rank, args.num_batches, args.seed)
    records = []
    for i, batch in enumerate(batches):
        plan = make_plan(batch, args.cp, args.tokens_per_rank, args.mask, args.strategy)
        problems = plan_problems(plan)
        cost = evaluate(plan, hw, budget)
        memory = _memory_metrics(cost, hw)
        metrics = {
            "imbalance_time": float(cost.compute_s.max() / cost.compute_s.mean()),
            "imbalance_pairs": float(cost.pairs.max() / max(cost.pairs.mean(), 1.0)),
            "num_pad_tokens": int(plan.num_pad_tokens.sum()),
            "recv_kv_tokens_mean": float(plan.recv_tokens.mean()),
            "recv_kv_tokens_max": int(plan.recv_tokens.max()),
            "modeled_step_ms": cost.step_time_s * 1e3,
            "modeled_mfu": mfu(plan, hw, cost),
            "peak_kv_x": _max_ratio(memory, "peak_remote_kv_tokens"),
            "saved_kv_x": _max_ratio(memory, "saved_remote_kv_tokens"),
            "problems": problems,
        }
        print(f"batch {i}: {len(batch)} documents, longest {int(batch.max())}")
        print(plan.describe(args.ranks))
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        staged = f"kv_budget_tokens={memory['kv_budget_tokens'] or 'none'}" if plan.exchange == "p2p" else \
            f"{plan.exchange}, not staged"
        print(f"  memory per rank ({staged}): remote key/values held at once max {metrics['peak_kv_x']:.2f}x own, "
              f"kept for backward max {metrics['saved_kv_x']:.2f}x own, stages max {max(memory['num_stages'])}, "
              f"{memory['kv_bytes_per_token']:.0f} bytes per key/value token")
        metrics["memory"] = memory
        records.append(plan.to_dict(metrics))
    if args.json:
        _write_json(args.json, "--json", records[0] if len(records) == 1 else {"plans": records})
        print(f"wrote {args.json}")
    return 1 if any(r["metrics"]["problems"] for r in records) else 0


def _cmd_simulate(args) -> int:
    _check_counts(args)
    budget = _budget(args.kv_budget_tokens)
    hw = load_hardware(args.hardware)
    _check_writable(args.json, "--json")
    _check_writable(args.plot, "--plot")
    if args.plot:
        from megatron_fcp.sim.plot import memory_plot_path

        _check_writable(memory_plot_path(args.plot), "--plot")
    for source in args.lengths:  # every name and file, before any cell is simulated
        load_distribution(source)
    config = SimConfig(lengths=args.lengths, cps=args.cp, tokens_per_rank=args.tokens_per_rank, masks=args.masks,
                       strategies=args.strategies, num_batches=args.num_batches, seed=args.seed,
                       kv_budget_tokens=budget)
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    cells = simulate(config, hw, progress)
    print(format_table(cells))
    if args.json:
        _write_json(args.json, "--json", cells_to_json(cells, config, hw), indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        _write_plot(args, config, cells, hw)
    return 0


def _write_plot(args, config: SimConfig, cells, hw) -> None:
    from megatron_fcp.sim.plot import memory_plot_path, plot_memory, plot_simulation

    cp = min(config.cps, key=lambda c: abs(c - 16))
    batch = pack_batches(load_distribution(config.lengths[0]), cp * config.tokens_per_rank, 1, config.seed)[0]
    first = [c for c in cells if c.lengths == config.lengths[0]]
    title = f"{config.lengths[0]}, {config.tokens_per_rank} tokens/rank, {hw.name}"
    path = plot_simulation(first, batch, cp, config.tokens_per_rank, hw, args.plot, title, config.kv_budget_tokens)
    print(f"wrote {path}")
    budget = config.kv_budget_tokens if config.kv_budget_tokens is not None else "none"
    title = f"{config.tokens_per_rank} tokens/rank, key/value budget {budget}"
    print(f"wrote {plot_memory(cells, memory_plot_path(args.plot), title)}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fcp`` console script."""
    args = _parser().parse_args(argv)
    try:
        return _cmd_plan(args) if args.command == "plan" else _cmd_simulate(args)
    except InputError as error:
        print(f"fcp {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
