"""Saving a checkpoint on SIGTERM under Slurm.

megatron-core's ``dist_checkpointing`` collects its writers' results through a multiprocessing ``Manager`` queue
(``filesystem_async.get_write_results_queue``), started at the first save as a helper process. Slurm sends SIGTERM
to every process of a job step (time limit with ``--signal``, preemption, ``scontrol requeue``), so a helper that
is running by then dies with the signal, and the save the trainer makes on that same SIGTERM (Megatron's
``--exit-signal-handler``, the CPU worker) fails with ``BrokenPipeError``. :func:`start_checkpoint_results_queue`
starts the helper at start-up with SIGTERM ignored (an ignored signal stays ignored across ``exec``); it ends with
the trainer's normal exit, and Slurm's SIGKILL at the end of the step ends it in any case.
"""

from __future__ import annotations

import signal


def start_checkpoint_results_queue() -> None:
    """Start megatron-core's checkpoint results queue now, its helper process immune to SIGTERM.

    Call before the first checkpoint save; the process's own SIGTERM handler is left as it was."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        filesystem_async.get_write_results_queue()
    finally:
        signal.signal(signal.SIGTERM, previous)
