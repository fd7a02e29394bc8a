"""Saving a checkpoint on SIGTERM under Slurm, and checkpoint helpers that die with their trainer.

megatron-core's ``dist_checkpointing`` collects its writers' results through a multiprocessing ``Manager`` queue
(``filesystem_async.get_write_results_queue``), started at the first save as a helper process. Slurm sends SIGTERM
to every process of a job step (time limit with ``--signal``, preemption, ``scontrol requeue``), so a helper that
is running by then dies with the signal, and the save the trainer makes on that same SIGTERM (Megatron's
``--exit-signal-handler``, the CPU worker) fails with ``BrokenPipeError``. :func:`start_checkpoint_results_queue`
starts the helper at start-up with SIGTERM ignored (an ignored signal stays ignored across ``exec``).

Ignoring SIGTERM must not let the helper outlive its trainer: a trainer killed (SIGKILL, a crash) would leave it
running under PID 1, with multiprocessing's resource tracker (which lives until every holder of its pipe is gone),
both holding the job's output pipe, so ``torchrun ... | tee`` never returns. So the helper asks the kernel for
SIGKILL when its parent dies (``PR_SET_PDEATHSIG``; where there is no ``prctl``, a thread polling its parent);
once it is gone, the resource tracker sees the end of its pipe and exits too. A normal exit of the trainer shuts
the helper down as before.
"""

from __future__ import annotations

import os
import signal
import threading
import time

PR_SET_PDEATHSIG = 1
"""``prctl`` option (linux/prctl.h): the signal a process gets when its parent thread dies."""


def _set_parent_death_signal(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)`` for this process; False where unavailable (not Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    os._exit(1)


def die_with_parent(parent_pid: int) -> None:
    """Initializer of a helper process: SIGKILL this process when ``parent_pid`` (its parent) dies, whatever
    signals it ignores. The kernel sends it (``PR_SET_PDEATHSIG``) when the parent's thread that started this process
    ends, so start helpers from the main thread; elsewhere a daemon thread polls the parent."""
    if not _set_parent_death_signal(signal.SIGKILL):
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="die-with-parent").start()
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def start_checkpoint_results_queue() -> None:
    """Start megatron-core's checkpoint results queue now, its helper process immune to SIGTERM and killed when the
    calling process dies (:func:`die_with_parent`).

    Call from the main thread, before the first checkpoint save; the process's own SIGTERM handler is left as it
    was. Does nothing if the queue is already running."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:  # what get_write_results_queue does (a spawned Manager's queue), plus the initializer
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
        filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager (and its process) alive
    finally:
        signal.signal(signal.SIGTERM, previous)
