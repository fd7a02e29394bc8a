"""Faults of the CPU trainer: a peer that stops in a checkpoint save, helpers outliving a killed worker, damaged
checkpoints (marker, folder, bytes) and unwritable paths. Each ends in one line, in bounded time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from megatron_fcp.cpu_trainer import train, worker  # noqa: E402
from megatron_fcp.cpu_trainer.train import (  # noqa: E402
    LATEST,
    MANIFEST,
    CheckpointError,
    RunConfig,
    check_paths,
    checkpoint_folder,
    latest_checkpoint,
    write_manifest,
)
from megatron_fcp.errors import InputError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--cp", "2", "--seq-length", "256", "--doclens", "magi_hist", "--num-layers", "1", "--hidden-size", "32",
        "--num-heads", "2", "--num-query-groups", "1", "--ffn-hidden-size", "64", "--vocab-size", "64"]
"""Worker flags of a tiny 2-process run."""
TINY_RUN = RunConfig(cp=2, seq_length=256, doclens="magi_hist", num_layers=1, hidden_size=32, num_heads=2,
                     num_query_groups=1, ffn_hidden_size=64, vocab_size=64, steps=2)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- (1) a peer stops inside a checkpoint save ---------------------------------------------------------------------
STALLING_WORKER = """
import os, sys, time
from megatron.core import dist_checkpointing  # on every rank: the same start-up time before the rendezvous

if os.environ["RANK"] == os.environ["STALL_RANK"]:
    def stall(*args, **kwargs):  # a peer that stops inside the save (hung filesystem, SIGSTOP, ...)
        open(os.environ["STALL_MARK"], "w").close()
        time.sleep(3600)

    dist_checkpointing.save = stall
from megatron_fcp.cpu_trainer import worker
sys.exit(worker.main(sys.argv[1:]))
"""


def test_peer_stopped_in_a_checkpoint_save_ends_the_run_within_the_timeout(tmp_path):
    """Rank 1 stops inside the save after step 1: rank 0 gives up after the collective timeout with one line naming
    the step, the save and rank 1 (before: silent until gloo's 30-minute default)."""
    timeout_s, mark = 10, tmp_path / "stalled"
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()),
           "STALL_RANK": "1", "STALL_MARK": str(mark), "PYTHONWARNINGS": "ignore"}
    argv = [*TINY, "--steps", "3", "--checkpoints", str(tmp_path / "ckpt"), "--save-interval", "1",
            "--collective-timeout", str(timeout_s)]
    procs = [subprocess.Popen([sys.executable, "-c", STALLING_WORKER, *argv], env={**env, "RANK": str(rank)},
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    try:
        deadline = time.monotonic() + 240
        while not mark.exists():
            assert procs[0].poll() is None and time.monotonic() < deadline, procs[0].communicate()
            time.sleep(0.1)
        stalled = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout_s + 60)
        waited = time.monotonic() - stalled
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    assert procs[0].returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("megatron-fcp worker: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    line = errors[0]
    assert "rank 0: step 1: checkpoint save into" in line and "step_000001" in line, line
    assert "waiting for rank 1" in line and f"collective timeout {timeout_s} s" in line, line
    assert timeout_s - 1 <= waited <= timeout_s + 30, f"rank 0 ended {waited:.1f} s after rank 1 stopped: {line}"
    assert not (tmp_path / "ckpt" / LATEST).exists(), "no marker names the unfinished save"


def test_collective_timeout_is_validated():
    with pytest.raises(InputError, match="collective_timeout_s"):
        RunConfig(collective_timeout_s=0)


# -- (2) the checkpoint helper dies with its worker ----------------------------------------------------------------
HELPER_PARENT = """
import os, signal, sys, time
from multiprocessing import resource_tracker
import psutil
from megatron_fcp.megatron.signals import start_checkpoint_results_queue

before = set(psutil.Process().children())
start_checkpoint_results_queue()
helper, = [p for p in set(psutil.Process().children()) - before if "spawn_main" in " ".join(p.cmdline())]
print(helper.pid, resource_tracker._resource_tracker._pid, flush=True)
time.sleep(3600)
"""


def test_checkpoint_helper_dies_with_its_worker():
    """SIGKILL the process that started the results queue: its helper (which ignores SIGTERM) and multiprocessing's
    resource tracker are gone within seconds, instead of living on under PID 1 holding the output pipe."""
    psutil = pytest.importorskip("psutil")
    parent = subprocess.Popen([sys.executable, "-c", HELPER_PARENT], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2, pids
        helper = psutil.Process(pids[0])
        assert helper.is_running()
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in pids if psutil.pid_exists(pid)
                     and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
            time.sleep(0.1)
        assert not alive, f"still running after their worker was killed: {alive} (helper, resource tracker)"
    finally:
        parent.kill()
        for pid in pids if "pids" in locals() else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# -- (3) the marker: garbage, empty, naming a missing folder -------------------------------------------------------
def _fake_checkpoint(root: Path, step: int, with_manifest: bool = True) -> Path:
    folder = checkpoint_folder(root, step)
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(bytes(range(256)) * 4)
    (folder / "optimizer.pt").write_bytes(b"adam" * 10)
    if with_manifest:
        write_manifest(folder)
    return folder


@pytest.mark.parametrize("marker, problem", [("garbage\n", "holds 'garbage'"), ("", "is empty"),
                                             ("1000\n", "step_001000 does not exist")])
def test_bad_marker_falls_back_to_the_previous_intact_checkpoint(tmp_path, marker, problem):
    _fake_checkpoint(tmp_path, 2)
    newest = _fake_checkpoint(tmp_path, 4)
    (tmp_path / LATEST).write_text(marker)
    warnings = []
    assert latest_checkpoint(tmp_path, warnings.append) == (4, newest)
    assert len(warnings) == 1 and problem in warnings[0] and LATEST in warnings[0] and str(newest) in warnings[0]


def test_marker_naming_a_missing_folder_with_nothing_else_is_one_error(tmp_path):
    (tmp_path / LATEST).write_text("1000\n")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*step_001000 does not exist"):
        latest_checkpoint(tmp_path, pytest.fail)


def test_unfinished_save_and_old_checkpoints(tmp_path):
    """A folder without checksums newer than the marker's (a save cut short) is never taken; the checkpoint the marker
    names is taken even without checksums (an older version's), unverified; no checkpoint at all: a fresh start."""
    assert latest_checkpoint(tmp_path, pytest.fail) is None
    old = _fake_checkpoint(tmp_path, 2, with_manifest=False)
    (tmp_path / LATEST).write_text("2\n")
    _fake_checkpoint(tmp_path, 3, with_manifest=False)
    assert latest_checkpoint(tmp_path, pytest.fail) == (2, old)


# -- (4) a flipped byte in a saved .distcp --------------------------------------------------------------------------
def _flip(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_in_a_saved_checkpoint_is_never_resumed_silently(tmp_path):
    """A real 2-process run saving after steps 1 and 2: flip one byte of step 2's ``__0_0.distcp``: resuming falls
    back to step 1 with a warning naming both; flip step 1's too: one error line naming the file; loading the damaged
    folder directly: one error line before any process starts."""
    ckpt = tmp_path / "ckpt"
    train.launch(replace(TINY_RUN, save_dir=str(ckpt), save_interval=1, collective_timeout_s=60),
                 tmp_path / "run.json", quiet=True)
    assert (ckpt / LATEST).read_text() == "2\n"
    for step in (1, 2):
        assert (checkpoint_folder(ckpt, step) / MANIFEST).is_file()
        assert "__0_0.distcp" in (checkpoint_folder(ckpt, step) / MANIFEST).read_text()
    assert latest_checkpoint(ckpt, pytest.fail) == (2, checkpoint_folder(ckpt, 2))

    damaged = checkpoint_folder(ckpt, 2) / "__0_0.distcp"
    _flip(damaged)
    warnings = []
    assert latest_checkpoint(ckpt, warnings.append) == (1, checkpoint_folder(ckpt, 1))
    assert len(warnings) == 1 and str(damaged) in warnings[0] and "sha256" in warnings[0], warnings
    assert str(checkpoint_folder(ckpt, 1)) in warnings[0]

    with pytest.raises(InputError, match=f"cannot load checkpoint: {damaged} does not match its sha256"):
        train.launch(replace(TINY_RUN, load_dir=str(checkpoint_folder(ckpt, 2)), first_step=3),
                     tmp_path / "never.json", quiet=True)

    _flip(checkpoint_folder(ckpt, 1) / "__0_0.distcp")
    with pytest.raises(CheckpointError) as err:
        latest_checkpoint(ckpt, pytest.fail)
    assert "no intact checkpoint" in str(err.value) and str(damaged) in str(err.value)
    assert "\n" not in str(err.value)


# -- (5) unwritable checkpoint folder, records in a missing folder: one line at start-up --------------------------
def _read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write into: read-only by its mode, or (as root, who ignores modes) a path below
    a regular file."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        (tmp_path / "file").write_text("")
        return tmp_path / "file" / "ckpt"
    return folder


def _worker_main(monkeypatch, argv: list[str]) -> int:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setattr(worker, "train_in_group", lambda run: pytest.fail("training started"))
    return worker.main([*TINY, *argv])


@pytest.mark.parametrize("what", ["checkpoints", "records"])
def test_unwritable_paths_stop_the_worker_with_one_line_before_training(tmp_path, monkeypatch, capsys, what):
    if what == "checkpoints":
        argv, needle = ["--checkpoints", str(_read_only_folder(tmp_path)), "--save-interval", "5"], "save_dir"
    else:
        argv, needle = ["--records", str(tmp_path / "missing" / "losses.jsonl")], "records"
    assert _worker_main(monkeypatch, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"megatron-fcp worker: error: {needle} "), err


def test_unwritable_paths_are_checked_before_launch(tmp_path):
    with pytest.raises(InputError, match="records .*missing.*does not exist"):
        train.launch(replace(TINY_RUN, records=str(tmp_path / "missing" / "r.jsonl")), tmp_path / "x.json")
    with pytest.raises(InputError, match="save_dir .*cannot write checkpoints"):
        check_paths(replace(TINY_RUN, save_dir=str(_read_only_folder(tmp_path))))
