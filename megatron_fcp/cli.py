"""The ``fcp`` command line: plan micro-batches and compare CP strategies in the simulator."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_fcp.errors import InputError
from megatron_fcp.planner.api import STRATEGIES, STRATEGY_HELP, check_batch, make_plan
from megatron_fcp.planner.checks import plan_problems
from megatron_fcp.planner.pairs import MASKS
from megatron_fcp.sim.lengths import SHIPPED, load_distribution, pack_batches, read_lengths, resolve_lengths_source
from megatron_fcp.sim.model import HARDWARE, evaluate, load_hardware, mfu
from megatron_fcp.sim.simulate import SimConfig, cells_to_json, format_table, simulate


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

    plan = sub.add_parser("plan", help="plan micro-batches and print each rank's share")
    plan.add_argument("--lengths", required=True, help=lengths_help)
    plan.add_argument("--cp", type=int, required=True, help="context-parallel size")
    plan.add_argument("--tokens-per-rank", type=int, required=True, help="tokens per CP rank")
    plan.add_argument("--mask", choices=MASKS, default="causal")
    plan.add_argument("--strategy", choices=tuple(STRATEGIES), default="fcp", help=strategies)
    plan.add_argument("--num-batches", type=int, default=1, help="micro-batches to pack from the distribution")
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument("--as-batch", action="store_true",
                      help="treat the file as ONE micro-batch (its lengths must sum to cp x tokens-per-rank)")
    plan.add_argument("--json", type=Path, help="write the plan(s) as JSON here")
    plan.add_argument("--hardware", default="h100_node", help=f"hardware profile: {', '.join(HARDWARE)} or a YAML")
    plan.add_argument("--ranks", type=int, default=8, help="ranks to print per plan")

    sim = sub.add_parser("simulate", help="compare strategies over CP sizes on a length distribution")
    sim.add_argument("--lengths", required=True, type=lambda s: tuple(s.split(",")),
                     help=lengths_help + " (comma-separated for several)")
    sim.add_argument("--cp", type=_int_list, default=(8, 16, 32, 64, 128, 256), help="CP sizes, e.g. 8,16,32")
    sim.add_argument("--tokens-per-rank", type=int, default=16384)
    sim.add_argument("--masks", type=_name_list(MASKS), default=MASKS, help="causal,full")
    sim.add_argument("--strategies", type=_name_list(tuple(STRATEGIES)), default=tuple(STRATEGIES), help=strategies)
    sim.add_argument("--num-batches", type=int, default=20)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--hardware", default="h100_node", help=f"hardware profile: {', '.join(HARDWARE)} or a YAML")
    sim.add_argument("--json", type=Path, help="write all figures as JSON here")
    sim.add_argument("--plot", type=Path, help="write a PNG: per-rank load of one batch and MFU vs CP")
    sim.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def _cmd_plan(args) -> int:
    hw = load_hardware(args.hardware)
    if args.as_batch:
        batches = [check_batch(read_lengths(resolve_lengths_source(args.lengths)), args.cp, args.tokens_per_rank,
                               args.mask, exact=True)]
    else:
        if args.cp < 1 or args.tokens_per_rank < 1:
            raise InputError("--cp and --tokens-per-rank must be integers >= 1")
        dist = load_distribution(args.lengths)
        batches = pack_batches(dist, args.cp * args.tokens_per_rank, args.num_batches, args.seed)
    records = []
    for i, batch in enumerate(batches):
        plan = make_plan(batch, args.cp, args.tokens_per_rank, args.mask, args.strategy)
        problems = plan_problems(plan)
        cost = evaluate(plan, hw)
        metrics = {
            "imbalance_time": float(cost.compute_s.max() / cost.compute_s.mean()),
            "imbalance_pairs": float(cost.pairs.max() / max(cost.pairs.mean(), 1.0)),
            "num_pad_tokens": int(plan.num_pad_tokens.sum()),
            "recv_kv_tokens_mean": float(plan.recv_tokens.mean()),
            "recv_kv_tokens_max": int(plan.recv_tokens.max()),
            "modeled_step_ms": cost.step_time_s * 1e3,
            "modeled_mfu": mfu(plan, hw, cost),
            "problems": problems,
        }
        print(f"batch {i}: {len(batch)} documents, longest {int(batch.max())}")
        print(plan.describe(args.ranks))
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        records.append(plan.to_dict(metrics))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records[0] if len(records) == 1 else {"plans": records}))
        print(f"wrote {args.json}")
    return 1 if any(r["metrics"]["problems"] for r in records) else 0


def _cmd_simulate(args) -> int:
    hw = load_hardware(args.hardware)
    config = SimConfig(lengths=args.lengths, cps=args.cp, tokens_per_rank=args.tokens_per_rank, masks=args.masks,
                       strategies=args.strategies, num_batches=args.num_batches, seed=args.seed)
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    cells = simulate(config, hw, progress)
    print(format_table(cells))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(cells_to_json(cells, config, hw), indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        _write_plot(args, config, cells, hw)
    return 0


def _write_plot(args, config: SimConfig, cells, hw) -> None:
    from megatron_fcp.sim.plot import plot_simulation

    cp = min(config.cps, key=lambda c: abs(c - 16))
    batch = pack_batches(load_distribution(config.lengths[0]), cp * config.tokens_per_rank, 1, config.seed)[0]
    first = [c for c in cells if c.lengths == config.lengths[0]]
    title = f"{config.lengths[0]}, {config.tokens_per_rank} tokens/rank, {hw.name}"
    print(f"wrote {plot_simulation(first, batch, cp, config.tokens_per_rank, hw, args.plot, title)}")


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
