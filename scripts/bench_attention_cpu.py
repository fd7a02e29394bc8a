"""CPU benchmark: FCP vs ring attention (forward + backward) on one batch, over several gloo processes.

Both strategies run the same kernels (the ``cpu`` backend), merge code and rounds; they differ in placement (the
FCP planner vs the planner's ring placement) and schedule (planned peer-to-peer in stages of at most
``--kv-budget-tokens`` vs ring steps: every other rank's whole buffer, one per round). Per rank it prints the
time inside attention kernels, the time spent waiting for messages, the key/value (and gradient) bytes received,
the total time of the step, and for FCP the time of the plan check (one all-gather confirming every rank holds
the same plan, once per micro-batch), as medians over ``--iters`` timed steps after one warm-up step; then the
FCP/ring ratio of the slowest rank's total. It measures and prints; it asserts nothing about speed.

Each process uses one thread. On a machine with fewer cores than ranks the processes share cores, which
inflates every figure alike; the ratio is the number to read.

    .venv/bin/python scripts/bench_attention_cpu.py --lengths linux_files --cp 4 --tokens-per-rank 2048
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_fcp.attention import P2PExchange, fcp_attention
from megatron_fcp.attention.engine import check_plan_agreement
from megatron_fcp.attention.schedule import cached_schedule
from megatron_fcp.data.lengths import load_distribution, pack_batches
from megatron_fcp.kernels import Backend, get_backend
from megatron_fcp.planner.api import make_plan
from megatron_fcp.planner.stages import parse_kv_budget
from megatron_fcp.testing.layout import join_from_ranks, split_to_ranks
from megatron_fcp.testing.ring import ring_attention, ring_schedule


class TimedBackend(Backend):
    """Counts the seconds spent inside another backend's kernels."""

    def __init__(self, inner: Backend):
        self.inner, self.name, self.seconds = inner, inner.name, 0.0

    def _timed(self, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        self.seconds += time.perf_counter() - start
        return result

    def forward(self, *args):
        return self._timed(self.inner.forward, *args)

    def backward(self, *args):
        return self._timed(self.inner.backward, *args)


class TimedExchange(P2PExchange):
    """Counts the seconds spent blocked waiting for messages."""

    wait_s = 0.0

    def post(self, *args):
        pending = super().post(*args)
        wait = pending.wait

        def timed_wait():
            start = time.perf_counter()
            result = wait()
            self.wait_s += time.perf_counter() - start
            return result

        pending.wait = timed_wait
        return pending


def _worker(rank: int, args, store: str, result_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=args.cp)
    lens = pack_batches(load_distribution(args.lengths), args.cp * args.tokens_per_rank, 1, args.seed)[0]
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    total = int(lens.sum())
    q = torch.randn(total, args.heads, args.head_dim, generator=gen).to(dtype)
    kv = [torch.randn(total, args.kv_heads, args.head_dim, generator=gen).to(dtype) for _ in range(2)]
    dout = torch.randn(total, args.heads, args.head_dim, generator=gen).to(dtype)
    rows, outputs = {}, {}
    for strategy in ("fcp", "ring"):
        plan = make_plan(lens, args.cp, args.tokens_per_rank, args.mask, strategy)
        mine = [split_to_ranks(plan, x)[rank].contiguous() for x in (q, *kv, dout)]
        backend, exchange = TimedBackend(get_backend("cpu")), TimedExchange(timeout_s=600)
        check_s = []
        if strategy == "fcp":
            view = plan.for_rank(rank)
            sched = cached_schedule(view, "cpu", args.kv_budget_tokens)

            def step(x, view=view, sched=sched, backend=backend, exchange=exchange, check_s=check_s):
                start = time.perf_counter()
                check_plan_agreement(sched, exchange, "cpu")
                check_s.append(time.perf_counter() - start)
                return fcp_attention(*x, view, None, backend=backend, exchange=exchange,
                                     kv_budget_tokens=args.kv_budget_tokens, verify_plan=False)
        else:
            ring = ring_schedule(plan, rank, "cpu")

            def step(x, plan=plan, ring=ring, backend=backend, exchange=exchange):
                return ring_attention(*x, plan, exchange, backend=backend, sched=ring)

        samples = []
        for it in range(args.iters + 1):
            x = [t.clone().requires_grad_() for t in mine[:3]]
            backend.seconds, exchange.wait_s = 0.0, 0.0
            exchange.counter.reset()
            dist.barrier()
            start = time.perf_counter()
            out = step(x)
            out.backward(mine[3])
            elapsed = time.perf_counter() - start
            if it > 0:
                samples.append((elapsed, backend.seconds, exchange.wait_s,
                                sum(exchange.counter.received.values())))
        gathered = [None] * args.cp
        dist.all_gather_object(gathered, out.detach())
        outputs[strategy] = join_from_ranks(plan, gathered)
        rows[strategy] = {"total_s": statistics.median(s[0] for s in samples),
                          "kernel_s": statistics.median(s[1] for s in samples),
                          "wait_s": statistics.median(s[2] for s in samples),
                          "recv_mb": samples[-1][3] / 1e6,
                          "check_ms": 1e3 * statistics.median(check_s[1:]) if check_s else 0.0}
    everything = [None] * args.cp
    dist.all_gather_object(everything, rows)
    if rank == 0:
        diff = float((outputs["fcp"].double() - outputs["ring"].double()).abs().max())
        with open(result_path, "w") as f:
            json.dump({"lens": [int(n) for n in lens], "ranks": everything, "max_abs_diff": diff}, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="linux_files", help="shipped distribution name or lengths file")
    ap.add_argument("--cp", type=int, default=4)
    ap.add_argument("--tokens-per-rank", type=int, default=2048)
    ap.add_argument("--mask", default="causal", choices=("causal", "full"))
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--kv-budget-tokens", default="auto",
                    help="FCP key/value tokens per stage: a number, auto (the rank's own tokens) or none")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    args.kv_budget_tokens = parse_kv_budget(args.kv_budget_tokens, "--kv-budget-tokens")
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        mp.start_processes(_worker, args=(args, os.path.join(tmp, "store"), result), nprocs=args.cp,
                           start_method="spawn")
        data = json.load(open(result))
    lens = np.array(data["lens"])
    print(f"{args.lengths}, {args.mask}, cp {args.cp} x {args.tokens_per_rank} tokens: {lens.size} documents "
          f"(longest {lens.max()}), {args.heads}/{args.kv_heads} heads x {args.head_dim}, {args.dtype}, "
          f"forward+backward, median of {args.iters}; FCP key/value budget {args.kv_budget_tokens}")
    print(f"{'strategy':>8} {'rank':>4} {'kernel_s':>9} {'wait_s':>8} {'recv_MB':>8} {'total_s':>8} {'check_ms':>8}")
    slowest = {}
    for strategy in ("fcp", "ring"):
        for r, rows in enumerate(data["ranks"]):
            row = rows[strategy]
            print(f"{strategy:>8} {r:>4} {row['kernel_s']:>9.3f} {row['wait_s']:>8.3f} {row['recv_mb']:>8.2f} "
                  f"{row['total_s']:>8.3f} {row['check_ms']:>8.2f}")
        slowest[strategy] = max(rows[strategy]["total_s"] for rows in data["ranks"])
    check = max(rows["fcp"]["check_ms"] for rows in data["ranks"])
    print(f"slowest rank: fcp {slowest['fcp']:.3f} s, ring {slowest['ring']:.3f} s, "
          f"fcp/ring = {slowest['fcp'] / slowest['ring']:.2f}; outputs agree to {data['max_abs_diff']:.1e}; "
          f"plan check at most {check:.2f} ms per micro-batch ({100 * check / 1e3 / slowest['fcp']:.2f}% of the "
          "FCP attention step)")
    if args.json:
        data.update(args=vars(args), slowest=slowest)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
