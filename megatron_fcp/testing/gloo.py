"""Run a function on every rank of a gloo process group of ``world`` spawned processes (the distributed tests).

Each process initialises the group from a file store, runs ``target(rank, world)`` and records ``ok`` or its
traceback; :func:`run_on_gloo` raises one ``AssertionError`` listing the ranks that failed (or left no result:
crashed or hung past the timeout). The processes end with ``os._exit(0)``, skipping the group's teardown, so a
case that leaves a message posted (a silent peer) does not hang the exit.
"""

from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, target, store_path: str, result_dir: str) -> None:
    torch.set_num_threads(1)
    status = "ok"
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
        target(rank, world)
    except BaseException:
        status = traceback.format_exc()
    with open(os.path.join(result_dir, f"rank{rank}"), "w") as f:
        f.write(status)
    os._exit(0)


def run_on_gloo(target, world: int, timeout_s: float = 600) -> None:
    """``target(rank, world)`` (a module-level function: it is pickled to the spawned processes) on ``world`` gloo
    processes; raises ``AssertionError`` with each failing rank's traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_entry, args=(r, world, target, os.path.join(tmp, "store"), tmp))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=timeout_s)
        results = {}
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}")
            results[r] = open(path).read() if os.path.exists(path) else "no result (crashed or hung)"
        for p in procs:
            if p.is_alive():
                p.kill()
    failed = {r: msg for r, msg in results.items() if msg != "ok"}
    assert not failed, "\n".join(f"rank {r}:\n{msg}" for r, msg in failed.items())
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
