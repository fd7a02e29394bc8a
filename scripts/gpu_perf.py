"""Measured attention kernel performance on one GPU: kernel calibration, then every CP rank's kernel calls of real
plans replayed one after another on the same device (issue "Measured GPU performance").

1. Calibration: the backend's forward and backward calls over a grid of shapes the runtime issues: one-piece calls
   (a causal diagonal block of ``L`` tokens; a full block of ``q`` queries against ``k >= q`` keys) for lengths
   1 to 128K, and many-piece calls (``n`` equal pieces of ``len`` tokens, causal and full).
2. Replay: for each length mix, CP size and mask, one packed micro-batch of ``cp * tokens_per_rank`` tokens is
   planned with every strategy; each rank's calls (``megatron_fcp.bench.replay.rank_calls``: exactly the calls
   ``fcp_attention`` issues for point-to-point and hybrid plans, and ``ring_attention`` steps for ring plans) are
   timed. Each distinct call shape is timed once (forward and backward, median of its samples); a rank's kernel
   time is the sum of its calls' medians. No communication is run or timed. The ideal of a cell is the time of
   one single-GPU varlen call holding every document of the micro-batch, divided by ``cp``. Attention MFU
   (measured compute only) = useful attention FLOPs / (cp x slowest rank's kernel time x peak).
3. Writes ``<prefix>_kernels.json`` (calibration and every replayed shape), ``<prefix>_perf.json`` (per cell and
   strategy; rewritten after every cell, so a run cut short leaves what it measured), ``<prefix>_perf.md`` and
   ``<prefix>_perf.png`` under ``--out-dir``, and prints a summary. Columns from the simulator's hardware
   profile (``--hardware``) are modeled, and labeled so.

Cells run cheapest first (estimated from the calibration's rates); a cell that would end past ``--budget-s`` is
skipped, and the files say which.

    PYTHONPATH=$PWD python3 scripts/gpu_perf.py --out-dir docs/gpu  # the GPU run: one H200, about 6 min
    .venv/bin/python scripts/gpu_perf.py --quick --out-dir /tmp/perf          # every step, tiny, on CPU: seconds
    .venv/bin/python scripts/gpu_perf.py --dry-run --workers 2                # plans and the time estimate only
    .venv/bin/python scripts/gpu_perf.py --from-json docs/gpu/X_perf.json     # markdown and PNG again from JSON

``--quick`` on a GPU is a smoke test of the GPU path in about 20 seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from megatron_fcp.bench.replay import (
    BWD_FLOPS_FACTOR,
    H200_PEAK_BF16_FLOPS,
    BudgetExceeded,
    CallShape,
    KernelTimer,
    RankCalls,
    rank_calls,
    record_calls,
    single_call,
    summarise_cell,
)
from megatron_fcp.data.lengths import load_distribution, pack_batches
from megatron_fcp.errors import InputError
from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.stages import parse_kv_budget

MIXES = ("linux_files", "linux_dirs", "spamassassin", "magi_hist")
STRATEGIES = ("fcp", "ring", "hybrid", "magi")
CAL_LENGTHS = (1, 16, 128, 512, 2048, 8192, 32768, 131072)
CAL_PIECES = ((2048, 8), (512, 32), (128, 128), (64, 256), (16, 1024), (4, 4096))
FULL = dict(lengths=MIXES, cps=(8, 16, 32, 64), masks=("causal", "full"), strategies=STRATEGIES,
            tokens_per_rank=16384, q_heads=32, kv_heads=8, head_dim=128, dtype="bfloat16", cal_lengths=CAL_LENGTHS,
            cal_pieces=CAL_PIECES, warmup=2, min_reps=3, max_reps=5, target_ms=2.0, long_ms=1.0)
"""The GPU run's settings; flags override the first nine (and ``dtype``)."""
QUICK = FULL | dict(lengths=("spamassassin", "linux_files"), cps=(2, 4), tokens_per_rank=256, q_heads=4,
                    kv_heads=2, head_dim=16, cal_lengths=(1, 16, 128), cal_pieces=((8, 16), (2, 64)),
                    warmup=1, min_reps=2, max_reps=3, target_ms=1.0, long_ms=5.0)
"""``--quick``: tiny shapes and plans for CI."""

_T0 = time.monotonic()


def log(msg: str) -> None:
    now = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{now} +{time.monotonic() - _T0:6.1f}s] {msg}", flush=True)


# -- the plans and their calls (CPU; in worker processes on a GPU run) ---------------------------------------------
def derive_cell(lengths: str, cp: int, tokens_per_rank: int, mask: str, strategies: tuple[str, ...], seed: int,
                kv_budget, hardware: str | None) -> dict:
    """Plan one micro-batch with every strategy and list every rank's calls, compactly: the distinct shapes once and
    per rank the indices of its forward and backward calls."""
    batch = pack_batches(load_distribution(lengths), cp * tokens_per_rank, 1, seed)[0]
    shapes: dict[CallShape, int] = {}
    plans = {}
    ideal = single_call(batch, mask)
    for strategy in strategies:
        start = time.perf_counter()
        try:
            plan = make_plan(batch, cp, tokens_per_rank, mask, strategy)
        except InputError as err:
            plans[strategy] = {"error": str(err)}
            continue
        plan_s = time.perf_counter() - start
        calls = rank_calls(plan, kv_budget)
        pairs = sum(s.pairs for rc in calls for s in rc.forward)
        ranks = [([shapes.setdefault(s, len(shapes)) for s in rc.forward],
                  [shapes.setdefault(s, len(shapes)) for s in rc.backward]) for rc in calls]
        plans[strategy] = {"ranks": ranks, "exchange": plan.exchange, "plan_s": plan_s,
                           "derive_s": time.perf_counter() - start - plan_s,
                           "num_pad_tokens": int(plan.num_pad_tokens.sum()),
                           "pairs_match": pairs == ideal.pairs,
                           "modeled": _modeled(plan, hardware, kv_budget),
                           # the same with the kernel laws fitted to published figures: the "before" of the
                           # model-against-measurement comparison, per rank (compute_ms) beside the measured times
                           "modeled_published_laws": _modeled(plan, PUBLISHED_LAWS, kv_budget)}
    return {"lengths": lengths, "cp": cp, "mask": mask, "doc_lens": [int(n) for n in batch if n > 0],
            "shapes": list(shapes), "plans": plans}


PUBLISHED_LAWS = "h200_node_fa2_published"  # cost model profile with FA2 laws fitted to published H100 figures


def _modeled(plan, hardware: str | None, kv_budget) -> dict | None:
    """The simulator's modeled step and compute (``megatron_fcp.sim.model.evaluate``), or None."""
    if not hardware:
        return None
    try:
        from megatron_fcp.sim.model import evaluate, load_hardware

        cost = evaluate(plan, load_hardware(hardware), kv_budget)
        return {"step_ms": float(cost.step_time_s * 1e3), "compute_max_ms": float(cost.compute_s.max() * 1e3),
                "compute_ms": [float(v * 1e3) for v in cost.compute_s], "exchange_modeled_as": plan.exchange}
    except Exception as err:  # the model is optional here; its API may move
        return {"error": f"{type(err).__name__}: {err}"}


def expand(cell: dict, strategy: str) -> list[RankCalls]:
    shapes = cell["shapes"]
    return [RankCalls(r, tuple(shapes[i] for i in fwd), tuple(shapes[i] for i in bwd))
            for r, (fwd, bwd) in enumerate(cell["plans"][strategy]["ranks"])]


# -- calibration -------------------------------------------------------------------------------------------------
def calibration_shapes(lengths, pieces) -> list[tuple[str, CallShape]]:
    out = [("one-piece", CallShape.uniform(1, n, causal=True)) for n in lengths]
    out += [("one-piece", CallShape.uniform(1, q, k)) for q in lengths for k in lengths if k >= q]
    out += [("many-piece", CallShape.uniform(n, m, causal=c)) for n, m in pieces for c in (True, False)]
    return out


def calibration_rows(timer: KernelTimer, shapes) -> list[dict]:
    rows = []
    for kind, shape in shapes:
        timing = timer.cache.get(shape)
        for pass_ in ("fwd", "bwd"):
            row = {"kind": kind, "num_segments": shape.num_segments, "q_len": shape.q_lens[0],
                   "k_len": shape.k_lens[0], "causal": shape.causal, "pass": pass_, "pairs": shape.pairs}
            if timing is None:
                row["error"] = timer.failed.get(shape, "not timed (budget)")
            else:
                ms = timing.ms(pass_)
                row |= {"median_ms": ms, "reps": timing.fwd_reps if pass_ == "fwd" else timing.bwd_reps,
                        "tflops": shape.flops(timer.q_heads, timer.head_dim, pass_) / (ms * 1e-3) / 1e12}
            rows.append(row)
    return rows


def rates(rows: list[dict], min_ms: float = 1.0) -> dict[str, float]:
    """Achieved FLOP/s per pass over the calibration calls of at least ``min_ms`` (all if none is that long)."""
    out = {}
    for pass_ in ("fwd", "bwd"):
        timed = [r for r in rows if r["pass"] == pass_ and "median_ms" in r]
        long = [r for r in timed if r["median_ms"] >= min_ms] or timed
        ms = sum(r["median_ms"] for r in long)
        flops = sum(r["tflops"] * 1e12 * r["median_ms"] * 1e-3 for r in long)
        out[pass_] = flops / (ms * 1e-3) if ms > 0 else 1e12
    return out


def estimate_s(shapes, timer: KernelTimer, rate: dict[str, float], overhead_ms: float) -> float:
    """Seconds the timer will take for ``shapes`` not yet timed, at ``rate`` FLOP/s per pass."""
    total_ms = 0.0
    for shape in shapes:
        if shape in timer.cache or shape in timer.failed:
            continue
        for pass_ in ("fwd", "bwd"):
            ms = shape.flops(timer.q_heads, timer.head_dim, pass_) / rate[pass_] * 1e3 + overhead_ms
            runs, _ = timer.runs(ms)
            total_ms += runs * max(ms, overhead_ms)
        total_ms += 4 * overhead_ms  # the call's cumulative lengths, synchronisations
    return total_ms / 1e3


# -- reports -----------------------------------------------------------------------------------------------------
def cell_result(cell: dict, strategies, timer: KernelTimer, peak: float) -> dict:
    ideal = single_call(cell["doc_lens"], cell["mask"])
    lens = np.asarray(cell["doc_lens"])
    out = {"lengths": cell["lengths"], "cp": cell["cp"], "mask": cell["mask"], "num_docs": int(lens.size),
           "longest_doc": int(lens.max()), "status": "done", "strategies": {}}
    if ideal not in timer.cache:
        out["status"] = "incomplete"
        out["ideal_error"] = timer.failed.get(ideal, "not timed")
    for strategy in strategies:
        info = cell["plans"][strategy]
        if "error" in info:
            out["strategies"][strategy] = {"error": info["error"]}
            continue
        calls = expand(cell, strategy)
        missing = {s for rc in calls for s in rc.shapes if s not in timer.cache}
        row = {"exchange": info["exchange"], "num_pad_tokens": info["num_pad_tokens"],
               "plan_ms": info["plan_s"] * 1e3, "pairs_match_single_call": info["pairs_match"]}
        if missing or ideal not in timer.cache:
            failed = [timer.failed[s] for s in missing if s in timer.failed]
            row["error"] = (f"{len(missing)} call shapes not timed" + (f"; e.g. {failed[0]}" if failed else ""))
            out["status"] = "incomplete"
        else:
            row |= summarise_cell(calls, timer.cache, ideal, timer.q_heads, timer.head_dim, peak)
            modeled = info.get("modeled")
            if modeled and "error" not in modeled:
                exposed = max(0.0, modeled["step_ms"] - modeled["compute_max_ms"])
                row["modeled"] = modeled | {"exposed_comm_ms": exposed, "mfu_with_modeled_comm": row["useful_flops"] / (
                    cell["cp"] * (row["slowest_ms"] + exposed) * 1e-3 * peak)}
            elif modeled:
                row["modeled"] = modeled
        out["strategies"][strategy] = row
    return out


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [f"# Measured attention kernel performance: {report['device']}", "",
             f"{report['date']}; torch {report['torch']}; backend `{cfg['backend']}`, {cfg['dtype']}, "
             f"{cfg['q_heads']} query / {cfg['kv_heads']} key-value heads, head dim {cfg['head_dim']}; "
             f"{cfg['tokens_per_rank']} tokens per rank; key/value budget {cfg['kv_budget_tokens']}; seed "
             f"{cfg['seed']} (one micro-batch per cell). Command: `{report['command']}`.", "",
             "What is measured: every CP rank's attention kernel calls (forward and backward, one layer) replayed on "
             "this one device, exactly the calls the runtime issues for the plan (`fcp_attention`'s stages for fcp, "
             "magi and hybrid; `ring_attention`'s steps for ring). Hybrid plans run on the point-to-point engine as "
             "FCP runs them, not stepped as Megatron's per-group ring. Each distinct call shape is timed once "
             f"({report['timing_policy']}); **a rank's time is the sum of its calls' medians**. No communication, "
             "gathers or merges are included. *ideal* = one single-GPU varlen call of every document of the "
             "micro-batch, divided by cp. *MFU* = useful attention FLOPs (FlashAttention convention: 4 x visible "
             f"pairs x heads x head dim forward, {BWD_FLOPS_FACTOR}x that backward) / (cp x slowest rank x "
             f"{cfg['peak_tflops']:.1f} TFLOP/s). *imbalance* = slowest / mean rank.", ""]
    if cfg.get("hardware"):
        lines += [f"Columns marked *modeled* come from the simulator's cost model (`megatron_fcp.sim.model.evaluate`, "
                  f"profile `{cfg['hardware']}`), not from this run: *modeled step* is the model's attention step "
                  "(compute with communication overlapped), *exposed comm* = modeled step - modeled slowest compute, "
                  "and *MFU + modeled comm* uses measured slowest + modeled exposed comm. The model steps hybrid as "
                  "a group ring.", ""]
    cells = report["cells"]
    for lengths in dict.fromkeys(c["lengths"] for c in cells):
        for mask in dict.fromkeys(c["mask"] for c in cells):
            group = [c for c in cells if c["lengths"] == lengths and c["mask"] == mask]
            if not group:
                continue
            lines += [f"## {lengths}, {mask} mask", "",
                      "| cp | strategy | slowest ms | mean ms | imbalance | ideal ms | slowest / ideal | MFU % "
                      "| ideal MFU % | calls / rank | modeled step ms | modeled exposed comm ms "
                      "| MFU + modeled comm % |", "|" + "---|" * 13]
            for c in sorted(group, key=lambda c: c["cp"]):
                if c["status"] == "skipped":
                    lines.append(f"| {c['cp']} | all | skipped: {c.get('reason', '')} |" + " |" * 10)
                    continue
                for strategy, r in c["strategies"].items():
                    if "error" in r:
                        lines.append(f"| {c['cp']} | {strategy} | {r['error']} |" + " |" * 10)
                        continue
                    m = r.get("modeled") or {}
                    lines.append(
                        f"| {c['cp']} | {strategy} | {r['slowest_ms']:.2f} | {r['mean_ms']:.2f} | "
                        f"{r['imbalance']:.3f} | {r['ideal_ms']:.2f} | {r['slowest_vs_ideal']:.3f} | "
                        f"{_pct(r['mfu'])} | {_pct(r['ideal_mfu'])} | {r['max_calls_per_rank']} | "
                        f"{m.get('step_ms', float('nan')):.2f} | {m.get('exposed_comm_ms', float('nan')):.2f} | "
                        f"{_pct(m.get('mfu_with_modeled_comm'))} |")
            lines.append("")
    lines += ["## Kernel calibration (one call, median; TFLOP/s by the FlashAttention convention)", "",
              "| kind | pieces | q len | k len | mask | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    rows = report["calibration"]
    for fwd, bwd in zip(rows[0::2], rows[1::2], strict=True):
        mask = "causal" if fwd["causal"] else "full"
        if "median_ms" not in fwd:
            lines.append(f"| {fwd['kind']} | {fwd['num_segments']} | {fwd['q_len']} | {fwd['k_len']} | {mask} | "
                         f"{fwd['error']} | | | |")
            continue
        lines.append(f"| {fwd['kind']} | {fwd['num_segments']} | {fwd['q_len']} | {fwd['k_len']} | {mask} | "
                     f"{fwd['median_ms']:.4g} | {fwd['tflops']:.1f} | {bwd['median_ms']:.4g} | {bwd['tflops']:.1f} |")
    lines += ["", f"Run: {report['summary']}", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed: no PNG (run --from-json on the perf JSON where it is)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in report["cells"] if c["status"] != "skipped"]
    mixes = list(dict.fromkeys(c["lengths"] for c in cells))
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    axes = axes.ravel()
    colors = dict(zip((*STRATEGIES, "ideal"), ("C0", "C1", "C2", "C3", "k"), strict=True))
    for ax, mix in zip(axes, mixes[:5], strict=False):
        for mask, style in (("causal", "-"), ("full", "--")):
            group = sorted((c for c in cells if c["lengths"] == mix and c["mask"] == mask), key=lambda c: c["cp"])
            for strategy in (*STRATEGIES, "ideal"):
                pts = []
                for c in group:
                    r = next((r for r in c["strategies"].values() if "ideal_mfu" in r), None) \
                        if strategy == "ideal" else c["strategies"].get(strategy)
                    if r and "mfu" in r:
                        pts.append((c["cp"], 100 * (r["ideal_mfu"] if strategy == "ideal" else r["mfu"])))
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, marker="o", color=colors.get(strategy, "C4"),
                            label=f"{strategy} {mask}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mix}: attention MFU, measured kernels")
        ax.set_xlabel("CP size")
        ax.set_ylabel("MFU % (slowest rank)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
    ax = axes[-1]
    rows = [r for r in report["calibration"] if r["kind"] == "one-piece" and "median_ms" in r
            and r["q_len"] == r["k_len"]]
    for causal in (True, False):
        for pass_, style in (("fwd", "-"), ("bwd", "--")):
            pts = sorted((r["q_len"], r["tflops"]) for r in rows if r["causal"] == causal and r["pass"] == pass_)
            if pts:
                ax.plot(*zip(*pts, strict=True), style, marker="o", label=f"{'causal' if causal else 'full'} {pass_}")
    ax.set_xscale("log", base=2)
    ax.set_title("one-piece calls, q = k tokens")
    ax.set_xlabel("tokens")
    ax.set_ylabel("TFLOP/s")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    for extra in axes[len(mixes[:5]):-1]:
        extra.axis("off")
    fig.suptitle(f"{report['device']}: measured attention kernel time per rank (no communication), "
                 f"{report['config']['tokens_per_rank']} tokens per rank")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_reports(report: dict, kernels: dict | None, out_dir: Path, prefix: str, final: bool) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{prefix}_perf.json"]
    paths[0].write_text(json.dumps(report, indent=1))
    if kernels is not None:
        paths.append(out_dir / f"{prefix}_kernels.json")
        paths[-1].write_text(json.dumps(kernels))
    if final:
        paths.append(out_dir / f"{prefix}_perf.md")
        paths[-1].write_text(markdown(report))
        png = plot(report, out_dir / f"{prefix}_perf.png")
        paths += [png] if png else []
    return paths


def summary_lines(report: dict) -> list[str]:
    lines = []
    for c in report["cells"]:
        head = f"{c['lengths']:<12} cp={c['cp']:<3} {c['mask']:<6}"
        if c["status"] == "skipped":
            lines.append(f"{head} skipped ({c.get('reason', '')})")
            continue
        parts = []
        for strategy, r in c["strategies"].items():
            parts.append(f"{strategy} n/a" if "error" in r else
                         f"{strategy} {r['slowest_ms']:.2f}ms imb {r['imbalance']:.2f} MFU {_pct(r['mfu'])}%")
        ideal = next((r for r in c["strategies"].values() if "ideal_ms" in r), None)
        if ideal:
            parts.append(f"ideal {ideal['ideal_ms']:.2f}ms MFU {_pct(ideal['ideal_mfu'])}%")
        lines.append(f"{head} " + " | ".join(parts))
    return lines


# -- the run -----------------------------------------------------------------------------------------------------
def _device_slug(device: torch.device) -> tuple[str, str]:
    if device.type != "cuda":
        return "cpu", "CPU"
    name = torch.cuda.get_device_name(device)
    match = re.search(r"\b([a-z]{1,2}\d{2,4})\b", name.lower().replace("nvidia", ""))
    return (match.group(1) if match else "gpu"), name


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes and plans, for CI (CPU: a few seconds)")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--backend", default=None, help="kernel backend (default: torch-flash on CUDA, cpu on CPU)")
    ap.add_argument("--dtype", default=None, help="bfloat16 (default; float32 with --quick on CPU) or float16")
    ap.add_argument("--lengths", help=f"length mixes, comma-separated (default {','.join(MIXES)})")
    ap.add_argument("--cps", help="CP sizes, comma-separated (default 8,16,32,64)")
    ap.add_argument("--masks", help="default causal,full")
    ap.add_argument("--strategies", help=f"default {','.join(STRATEGIES)}")
    ap.add_argument("--tokens-per-rank", type=int, help="default 16384")
    ap.add_argument("--q-heads", type=int, help="default 32")
    ap.add_argument("--kv-heads", type=int, help="default 8")
    ap.add_argument("--head-dim", type=int, help="default 128")
    ap.add_argument("--kv-budget-tokens", default="auto", help="key/value tokens per stage (auto: a rank's own)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the micro-batch sampler")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="stop starting new work after this many seconds (files hold what was measured)")
    ap.add_argument("--peak-tflops", type=float, default=H200_PEAK_BF16_FLOPS / 1e12)
    ap.add_argument("--hardware", default="h200_node",
                    help="simulator profile for the modeled columns ('' for none)")
    ap.add_argument("--workers", type=int, default=None, help="processes that plan (default: min(8, cores - 1) "
                    "on CUDA, 0 = in this process on CPU)")
    ap.add_argument("--no-calibration", action="store_true")
    ap.add_argument("--dry-run", action="store_true",
                    help="plan, list the calls and estimate the device time at --assume-tflops; time nothing")
    ap.add_argument("--assume-tflops", default="300,240", help="forward,backward TFLOP/s for --dry-run")
    ap.add_argument("--check-calls", action="store_true",
                    help="also record every plan's calls from the real runtime on CPU and compare (small plans only; "
                         "on by default with --quick)")
    ap.add_argument("--out-dir", type=Path, default=Path("docs/gpu"))
    ap.add_argument("--prefix", default=None, help="file name prefix (default: <date>_<device>)")
    ap.add_argument("--from-json", type=Path, default=None, help="rewrite the markdown and PNG from a perf JSON")
    return ap


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def main(argv: list[str] | None = None) -> int:
    global _T0
    _T0 = time.monotonic()
    args = _parser().parse_args(argv)
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        prefix = args.from_json.name.removesuffix("_perf.json")
        for p in write_reports(report, None, args.from_json.parent, prefix, final=True):
            log(f"wrote {p}")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if args.quick and not cuda:
        torch.set_num_threads(1)  # tiny CPU calls: one thread is many times faster, and steadier
    cfg = dict(QUICK if args.quick else FULL)
    for key, parse in (("lengths", _names), ("cps", lambda t: tuple(int(c) for c in _names(t))), ("masks", _names),
                       ("strategies", _names), ("tokens_per_rank", int), ("q_heads", int), ("kv_heads", int),
                       ("head_dim", int), ("dtype", str)):
        if getattr(args, key) is not None:
            cfg[key] = parse(getattr(args, key))
    cfg["backend"] = args.backend or ("torch-flash" if cuda else "cpu")
    if args.quick and not cuda and args.dtype is None:
        cfg["dtype"] = "float32"  # the CPU kernel computes 16-bit inputs in float32 anyway
    cfg |= {"kv_budget_tokens": parse_kv_budget(args.kv_budget_tokens, "--kv-budget-tokens"), "seed": args.seed,
            "peak_tflops": args.peak_tflops, "hardware": args.hardware or None, "device": str(device)}
    kv_budget = cfg["kv_budget_tokens"]
    slug, device_name = _device_slug(device)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")  # noqa: UP017 (any python3 of a GPU box)
    prefix = args.prefix or f"{date}_{slug}"
    deadline = _T0 + args.budget_s
    workers = args.workers if args.workers is not None else (min(8, (os.cpu_count() or 2) - 1) if cuda else 0)
    log(f"device {device_name}, backend {cfg['backend']}, {cfg['dtype']}, budget {args.budget_s:.0f}s, "
        f"{workers} planning workers; writing {args.out_dir}/{prefix}_*")

    # 1. plans, in worker processes while the device calibrates (spawned: CUDA and fork do not mix)
    keys = [(m, cp, mask) for m in cfg["lengths"] for cp in cfg["cps"] for mask in cfg["masks"]]
    derive_args = {k: (k[0], k[1], cfg["tokens_per_rank"], k[2], cfg["strategies"], args.seed, kv_budget,
                       cfg["hardware"]) for k in keys}
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers else None
    futures: dict[tuple, Future] = {k: pool.submit(derive_cell, *a) for k, a in derive_args.items()} if pool else {}

    # 2. device warm-up and calibration
    timer = KernelTimer(cfg["backend"], device, cfg["q_heads"], cfg["kv_heads"], cfg["head_dim"],
                        getattr(torch, cfg["dtype"]), warmup=cfg["warmup"], min_reps=cfg["min_reps"],
                        max_reps=cfg["max_reps"], target_ms=cfg["target_ms"], long_ms=cfg["long_ms"])
    policy = (f"forward and backward each: a first timed call; if it took at least {cfg['long_ms']} ms it is the "
              f"result, else {cfg['warmup'] - 1} more untimed calls and then {cfg['min_reps']} to {cfg['max_reps']} "
              f"timed calls (about {cfg['target_ms']} ms), median; "
              + ("CUDA events" if cuda else "perf_counter on the CPU"))
    if not args.dry_run:
        timer.backend.check(*timer._inputs(CallShape.uniform(1, 128))[:2])
        warm = CallShape.uniform(4, 1024, causal=True)
        for _ in range(3):
            timer.cache.pop(warm, None)
            timer.time(warm)
        timer.cache.pop(warm)
        if cuda:  # a second of steady work first, so that the first calls timed do not see idle clocks
            q, k, v, _ = timer._inputs(CallShape.uniform(1, 8192))
            call, until = CallShape.uniform(1, 8192).varlen_call(device), time.monotonic() + 1.0
            while time.monotonic() < until:
                timer.backend.forward(q, k, v, call, timer.scale)
                torch.cuda.synchronize(device)
    timer.deadline = deadline
    cal_shapes = [] if args.no_calibration or args.dry_run else calibration_shapes(cfg["cal_lengths"],
                                                                                   cfg["cal_pieces"])
    if cal_shapes:
        timer.reserve(max(s.num_q for _, s in cal_shapes), max(s.num_k for _, s in cal_shapes))
    log(f"calibration: {len(cal_shapes)} shapes")
    for i, (_, shape) in enumerate(cal_shapes):
        try:
            t = timer.try_time(shape)
        except BudgetExceeded:
            log("budget spent during calibration")
            break
        if t and (t.fwd_ms + t.bwd_ms > 50 or i == len(cal_shapes) - 1):
            log(f"  {shape.describe()}: fwd {t.fwd_ms:.3f} ms, bwd {t.bwd_ms:.3f} ms")
    cal_rows = calibration_rows(timer, cal_shapes)
    rate = rates(cal_rows) if cal_rows else {"fwd": 1e12, "bwd": 1e12}
    if args.dry_run:
        rate = dict(zip(("fwd", "bwd"), (float(x) * 1e12 for x in args.assume_tflops.split(",")), strict=True))
    overhead_ms = 0.1 if cuda or args.dry_run else 0.05
    log(f"calibration done; rates of calls >= 1 ms: fwd {rate['fwd'] / 1e12:.4g}, bwd {rate['bwd'] / 1e12:.4g} "
        "TFLOP/s")

    # 3. every plan's calls
    cells = {}
    for k in keys:
        cells[k] = futures[k].result() if pool else derive_cell(*derive_args[k])
    if pool:
        pool.shutdown()
    bad = [(k, s) for k, c in cells.items() for s, p in c["plans"].items() if "error" not in p and not p["pairs_match"]]
    if bad:
        log(f"WARNING: calls whose pairs do not add up to the batch's: {bad}")
    derive_s = sum(p.get("derive_s", 0) + p.get("plan_s", 0) for c in cells.values() for p in c["plans"].values())
    log(f"planned {len(cells)} cells x {len(cfg['strategies'])} strategies ({derive_s:.1f} CPU s)")
    if args.check_calls or args.quick:
        for k, c in cells.items():
            for s in cfg["strategies"]:
                if "error" in c["plans"][s]:
                    continue
                plan = make_plan(np.array(c["doc_lens"]), k[1], cfg["tokens_per_rank"], k[2], s)
                if record_calls(plan, kv_budget) != expand(c, s):
                    raise SystemExit(f"calls of {k} {s} differ from the runtime's recorded calls")
        log("every plan's calls equal the calls recorded from the runtime")

    def shapes_of(c):
        return {*c["shapes"], single_call(c["doc_lens"], c["mask"])}

    if not args.dry_run:
        timer.reserve(max(s.num_q for c in cells.values() for s in shapes_of(c)),
                      max(s.num_k for c in cells.values() for s in shapes_of(c)))
        if cuda:
            log(f"inputs and output scratch: {torch.cuda.memory_reserved(device) / 2**30:.1f} GiB cached")
    estimates = {k: estimate_s(shapes_of(c), timer, rate, overhead_ms) for k, c in cells.items()}
    total_est = sum(estimates.values())
    log(f"replay: {len(set().union(*(shapes_of(c) for c in cells.values())))} distinct call shapes, estimated "
        f"{total_est:.0f}s at the calibration's rates; {deadline - time.monotonic():.0f}s of budget left")

    if args.dry_run:
        for k in sorted(keys, key=lambda k: estimates[k]):
            log(f"  {k[0]:<12} cp={k[1]:<3} {k[2]:<6}: {len(shapes_of(cells[k]))} shapes, estimated "
                f"{estimates[k]:.1f}s")
        return 0

    # 4. replay, cheapest cell first
    report = {"device": device_name, "date": date, "torch": torch.__version__, "config": cfg,
              "command": "python3 scripts/gpu_perf.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "timing_policy": policy, "calibration": cal_rows, "rates_tflops": {p: r / 1e12 for p, r in rate.items()},
              "cells": [], "summary": ""}
    results: dict[tuple, dict] = {}
    stopped = False
    spent_s = estimated_s = 0.0  # of the cells done: their estimates scale the next ones' by spent / estimated
    for k in sorted(keys, key=lambda k: estimates[k]):
        c = cells[k]
        raw = estimate_s(shapes_of(c), timer, rate, overhead_ms)
        est = raw * (max(spent_s / estimated_s, 0.5) if estimated_s > 1.0 else 1.0)
        if stopped or time.monotonic() + est > deadline:
            results[k] = {"lengths": k[0], "cp": k[1], "mask": k[2], "status": "skipped",
                          "reason": f"time budget (estimated {est:.0f}s)"}
            log(f"skip {k[0]} cp={k[1]} {k[2]}: estimated {est:.0f}s, {deadline - time.monotonic():.0f}s left")
            continue
        start = last = time.monotonic()
        todo = sorted(shapes_of(c), key=lambda s: -s.pairs)
        try:
            for i, shape in enumerate(todo):
                timer.try_time(shape)
                if time.monotonic() - last > 30:
                    last = time.monotonic()
                    log(f"  {k[0]} cp={k[1]} {k[2]}: {i + 1} of {len(todo)} shapes")
        except BudgetExceeded:
            stopped = True
            log("time budget spent inside a cell: stopping")
        results[k] = cell_result(c, cfg["strategies"], timer, args.peak_tflops * 1e12)
        spent_s += time.monotonic() - start
        estimated_s += raw
        if stopped:
            results[k]["status"] = "incomplete"
        report["cells"] = [results[x] for x in keys if x in results]
        line = summary_lines({"cells": [results[k]]})[0]
        log(f"{line}  [{time.monotonic() - start:.1f}s, estimated {est:.1f}s]")
        write_reports(report, None, args.out_dir, prefix, final=False)

    done = sum(r["status"] == "done" for r in results.values())
    report["cells"] = [results[x] for x in keys]
    report["summary"] = (f"{done} of {len(keys)} cells complete; {len(timer.cache)} call shapes timed in "
                         f"{timer.busy_s:.0f}s of device time; {len(timer.failed)} failed; whole run "
                         f"{time.monotonic() - _T0:.0f}s")
    kernels = {"device": device_name, "date": date, "torch": torch.__version__, "config": cfg,
               "timing_policy": policy, "calibration": cal_rows,
               "replay_columns": ["causal", "num_segments", "num_q", "num_k", "max_q", "max_k", "pairs", "fwd_ms",
                                  "bwd_ms", "fwd_reps", "bwd_reps"],
               "replay": [[*s.summary().values(), round(t.fwd_ms, 5), round(t.bwd_ms, 5), t.fwd_reps, t.bwd_reps]
                          for s, t in timer.cache.items()],
               "failed": [[s.describe(), why] for s, why in timer.failed.items()]}
    paths = write_reports(report, kernels, args.out_dir, prefix, final=True)
    print("\n".join(["", "Slowest rank's kernel time (fwd+bwd, one layer), imbalance, measured attention MFU:",
                     *summary_lines(report), "", report["summary"]]))
    for p in paths:
        log(f"wrote {p}")
    return 0 if done == len(keys) else 2


if __name__ == "__main__":
    sys.exit(main())
