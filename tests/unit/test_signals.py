"""The save on SIGTERM under Slurm: megatron-core's checkpoint results queue outlives the signal."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("megatron.core")
psutil = pytest.importorskip("psutil")

# SIGTERM to every child of this process (what Slurm does to every process of a job step), then use the queue
PROGRAM = """
import os, signal, sys
import psutil
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron_fcp.megatron.signals import start_checkpoint_results_queue

handler = lambda signum, frame: None
signal.signal(signal.SIGTERM, handler)
for mode in ("shielded", "plain"):
    filesystem_async._results_queue = None  # a fresh queue, as in a new process
    before = set(psutil.Process().children())
    if mode == "shielded":
        start_checkpoint_results_queue()
        assert signal.getsignal(signal.SIGTERM) is handler, "the caller's SIGTERM handler is restored"
    queue = filesystem_async.get_write_results_queue()
    helpers = [p for p in set(psutil.Process().children()) - before if "spawn_main" in " ".join(p.cmdline())]
    assert len(helpers) == 1, "the queue runs in one helper process"  # (beside multiprocessing's resource tracker)
    for helper in helpers:
        os.kill(helper.pid, signal.SIGTERM)
    # plain: wait until the helper has died of it; shielded: it must still be alive after a grace period
    gone, alive = psutil.wait_procs(helpers, timeout=2 if mode == "shielded" else 60)
    assert (alive if mode == "shielded" else gone), (mode, gone, alive)
    try:
        queue.put({"rank": 0})
        print(mode, "queue", queue.get(timeout=10))
    except (OSError, EOFError) as err:
        print(mode, "broken", type(err).__name__)
"""


def test_checkpoint_queue_started_early_outlives_sigterm():
    """Started by :func:`start_checkpoint_results_queue`, the helper survives SIGTERM; started the usual way (at the
    first save), it dies with it: the failure seen under Slurm, where the save on SIGTERM hit BrokenPipeError."""
    result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()[-2:]
    assert lines[0] == "shielded queue {'rank': 0}"
    assert lines[1].startswith("plain broken"), lines
