"""Slurm launch (scripts/slurm/submit.sh, fcp.sbatch) on a real local Slurm cluster of 32 emulated nodes
(scripts/slurm/local_cluster/cluster.sh, 8 CPUs and 8 fake GPUs each).

- A: the Llama-3-8B config, unchanged, in dry-run mode: 256 processes each print their rank and Megatron
  coordinates; one task per GPU (srun launcher) on 32 nodes, and torchrun per node on a 2-node variant.
- B: the tiny CPU configs, unchanged, train 2 nodes x 2 processes at CP 4 on gloo; the job's losses equal the
  run without context parallelism.
- C: a job requeued mid-run (``scontrol requeue``) saves on Slurm's SIGTERM, starts again, resumes from the
  checkpoint it saved, and each step after resuming has the uninterrupted run's loss; the same for a job warned
  of its time limit (the USR1 that ``--signal=B:USR1@300`` sends), which requeues itself.

The cluster needs root on Linux and Debian's slurm packages (installed by the fixture through apt if missing);
elsewhere the cluster tests skip, unless FCP_REQUIRE_SLURM=1 (set by .ci/run), where they fail instead.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pytest
import yaml

from megatron_fcp.launch import entry_args, load_run_config
from megatron_fcp.launch.dryrun import coordinates

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
REQUIRED = os.environ.get("FCP_REQUIRE_SLURM") == "1"
CONFIGS = REPO / "configs"
CLUSTER_SH = REPO / "scripts/slurm/local_cluster/cluster.sh"
SUBMIT_SH = REPO / "scripts/slurm/submit.sh"
SBATCH = REPO / "scripts/slurm/fcp.sbatch"
NODES = 32
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
DRYRUN = re.compile(r"^dryrun rank=(\d+) world=(\d+) node=(\S+) local_rank=(\d+) tp=(\d+) cp=(\d+) dp=(\d+) "
                    r"pp=(\d+)$")


def _why_no_cluster() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the local Slurm cluster needs Linux"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (mount namespace, mknod, daemons)"
    if not (shutil.which("slurmctld") or shutil.which("apt-get")):
        return "the local Slurm cluster needs slurmctld installed, or apt-get to install it"
    for tool in ("nsenter", "unshare"):
        if not shutil.which(tool):
            return f"the local Slurm cluster needs {tool} (util-linux)"
    return None


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _ports() -> dict[str, str]:
    """Controller and node ports no other cluster on this machine uses: the default block, else the next free."""
    for base in range(16800, 30000, 200):
        ctld, node0 = base + 17, base + 200 - NODES - 1
        if all(_free(p) for p in [ctld, *range(node0 + 1, node0 + NODES + 1)]):
            return {"LOCAL_SLURM_CTLD_PORT": str(ctld), "LOCAL_SLURM_NODE_PORT0": str(node0)}
    raise RuntimeError("no free block of ports for a local Slurm cluster")


@dataclass
class Cluster:
    """A running local cluster: commands run inside it (``cluster.sh run``), where node names resolve."""

    env: dict[str, str]

    def run(self, *cmd, timeout: float = 60, cwd: Path | None = None, env: dict | None = None, check: bool = True):
        return subprocess.run([str(CLUSTER_SH), "run", *map(str, cmd)], env={**self.env, **(env or {})}, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout, check=check)

    def submit(self, config: Path, cwd: Path, **fcp_env: str) -> int:
        """Job id of ``submit.sh config`` run from ``cwd`` with the node Python and ``fcp_env``."""
        result = self.run(SUBMIT_SH, config, cwd=cwd, env={"FCP_PYTHON": sys.executable, **fcp_env}, check=False)
        assert result.returncode == 0, f"submit.sh failed:\n{result.stdout}{result.stderr}"
        return int(result.stdout.strip())

    def job(self, job: int) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job(job).get("JobState", "")
            if state in FINAL_STATES:
                return state
            time.sleep(1)
        self.run("scancel", job, check=False)
        return f"still {state or 'unknown'} after {timeout:.0f} s (cancelled)"

    def finish(self, job: int, output: Path, timeout: float) -> str:
        """Wait for ``job`` to complete; its output (``slurm.out``) text."""
        state = self.wait(job, timeout)
        text = output.read_text() if output.exists() else f"(no {output})"
        assert state == "COMPLETED", f"job {job}: {state}; {self.job(job)}\n--- {output}:\n{text[-4000:]}"
        return text


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = _why_no_cluster()
    if why and REQUIRED:
        pytest.fail(f"FCP_REQUIRE_SLURM=1 but {why}")
    if why:
        pytest.skip(why)
    env = {**os.environ, "LOCAL_SLURM_DIR": str(tmp_path_factory.mktemp("slurm") / "cluster"),
           "LOCAL_SLURM_CRED_EXPIRE": "10", **_ports()}  # requeued jobs start again after 10 s

    def sh(command: str, timeout: float) -> None:
        result = subprocess.run([str(CLUSTER_SH), command], env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"cluster.sh {command} failed:\n{result.stdout}{result.stderr}"

    sh("install", 900)
    try:
        sh("start", 300)
        yield Cluster(env)
    finally:
        sh("clean", 120)


def _log(root: Path, job: int) -> Path:
    return root / str(job) / "slurm.out"


def _dryrun_lines(text: str) -> list[tuple]:
    """The processes' dry-run lines, as (rank, world, node, local_rank, tp, cp, dp, pp); every line that mentions
    dryrun must be one (no interleaved writes)."""
    lines = [line for line in text.splitlines() if "dryrun" in line and not line.startswith("fcp.sbatch:")]
    bad = [line for line in lines if not DRYRUN.match(line)]
    assert not bad, f"{len(bad)} malformed dry-run lines, e.g. {bad[:3]}"
    return [tuple(int(v) if v.isdigit() else v for v in DRYRUN.match(line).groups()) for line in lines]


def _check_layout(records: list[tuple], config: Path) -> None:
    """One line per rank; ranks fill the job's nodes in order, local ranks 0..G-1 on each; the coordinates are
    Megatron's order and each (tp, cp, dp, pp) appears once."""
    p = load_run_config(config).parallel
    world, per_node = p.world_size, p.gpus_per_node
    assert len(records) == world, f"{len(records)} dry-run lines, want {world}"
    by_rank = {r[0]: r for r in records}
    assert sorted(by_rank) == list(range(world)), "each rank 0..world-1 exactly once"
    assert {r[1] for r in records} == {world}
    nodes = sorted({r[2] for r in records}, key=lambda name: int(re.sub(r"\D", "", name) or 0))
    assert len(nodes) == p.nodes, f"{len(nodes)} nodes, want {p.nodes}"
    for rank, (_, _, node, local, tp, cp, dp, pp) in sorted(by_rank.items()):
        assert (node, local) == (nodes[rank // per_node], rank % per_node), by_rank[rank]
        want = coordinates(rank, tp=p.tensor, cp=p.context, dp=p.data_parallel, pp=p.pipeline)
        assert (tp, cp, dp, pp) == (want["tp"], want["cp"], want["dp"], want["pp"]), by_rank[rank]
    coords = sorted(r[4:] for r in records)
    assert coords == sorted(itertools.product(range(p.tensor), range(p.context), range(p.data_parallel),
                                              range(p.pipeline))), "each (tp, cp, dp, pp) exactly once"


def _config_copy(source: str, folder: Path, **sections) -> Path:
    """``configs/SOURCE.yaml`` with ``section={key: value}`` (or ``key=value``) edits, written to ``folder``."""
    config = yaml.safe_load((CONFIGS / f"{source}.yaml").read_text())
    for section, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    path = folder / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# -- without a cluster ------------------------------------------------------------------------------------------
def test_dryrun_coordinates_are_megatron_core_rank_order():
    """The dry run's (tp, cp, dp, pp) of each rank is its place in megatron-core's own rank groups."""
    ps = pytest.importorskip("megatron.core.parallel_state")
    for tp, cp, dp, pp in itertools.product([1, 2], [1, 2, 8], [1, 3], [1, 2]):
        generator = ps.RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
        for name in ("tp", "cp", "dp", "pp"):
            for group in generator.get_ranks(name):
                others = [{k: v for k, v in coordinates(r, tp=tp, cp=cp, dp=dp, pp=pp).items() if k != name}
                          for r in group]
                assert [coordinates(r, tp=tp, cp=cp, dp=dp, pp=pp)[name] for r in group] == list(range(len(group)))
                assert all(o == others[0] for o in others), (name, group)


def test_dryrun_reads_torchrun_then_srun_environment(capsys):
    from megatron_fcp.launch.dryrun import main

    config = CONFIGS / "llama3_8b.yaml"
    args = ["--config", str(config), *entry_args(load_run_config(config))]
    assert main(args, {"RANK": "13", "LOCAL_RANK": "5", "WORLD_SIZE": "256", "SLURMD_NODENAME": "node2"}) == 0
    assert capsys.readouterr().out == "dryrun rank=13 world=256 node=node2 local_rank=5 tp=0 cp=5 dp=1 pp=0\n"
    assert main(args, {"SLURM_PROCID": "255", "SLURM_LOCALID": "7", "SLURM_NTASKS": "256",
                       "SLURMD_NODENAME": "node32"}) == 0
    assert capsys.readouterr().out == "dryrun rank=255 world=256 node=node32 local_rank=7 tp=0 cp=7 dp=31 pp=0\n"
    assert main(args, {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "16"}) == 2
    assert "world size 16, but" in capsys.readouterr().err
    assert main([*args, "--extra"], {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "256"}) == 2
    assert "arguments differ" in capsys.readouterr().err
    assert main(args[2:], {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "256"}) == 2
    assert "no run config: set FCP_CONFIG" in capsys.readouterr().err


def test_sbatch_without_config_says_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FCP_", "SLURM_"))} | {"SLURM_JOB_ID": "7"}
    result = subprocess.run(["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "FCP_CONFIG is not set" in result.stderr, result.stderr
    env["FCP_CONFIG"] = "missing.yaml"
    result = subprocess.run(["bash", str(SBATCH)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "FCP_CONFIG=missing.yaml: no readable file" in result.stderr, result.stderr


# -- A: the 8B config's launch, dry run -------------------------------------------------------------------------
def test_llama3_8b_dry_run_one_task_per_gpu(cluster, tmp_path):
    """The unchanged 32-node config, one srun task per GPU: 256 ranks from SLURM_PROCID/LOCALID/NTASKS."""
    config, logs = CONFIGS / "llama3_8b.yaml", tmp_path / "logs"
    job = cluster.submit(config, tmp_path, FCP_DRY_RUN="1", FCP_CONTAINER="0", FCP_LAUNCHER="srun",
                         FCP_LOG_DIR=str(logs))
    records = _dryrun_lines(cluster.finish(job, _log(logs, job), timeout=300))
    _check_layout(records, config)
    p = load_run_config(config).parallel
    assert (p.tensor, p.context, p.data_parallel, p.pipeline) == (1, 8, 32, 1)
    assert all(tp == 0 and pp == 0 and cp == local and dp == rank // 8
               for rank, _, _, local, tp, cp, dp, pp in records), "a CP group is the 8 GPUs of one node"
    assert (logs / str(job) / "config.yaml").read_text() == config.read_text()


def test_llama3_8b_dry_run_torchrun_per_node(cluster, tmp_path):
    """torchrun per node (the default launcher) on a 2-node variant of the 8B config (32 torchrun agents importing
    torch take about 2.5 minutes of the 2 cores this runs on): ranks from torchrun's RANK/LOCAL_RANK."""
    config = _config_copy("llama3_8b", tmp_path, name="llama3_8b_2nodes", parallel={"nodes": 2})
    logs = tmp_path / "logs"
    job = cluster.submit(config, tmp_path, FCP_DRY_RUN="1", FCP_CONTAINER="0", FCP_LOG_DIR=str(logs))
    text = cluster.finish(job, _log(logs, job), timeout=180)
    assert "launcher torchrun" in text
    _check_layout(_dryrun_lines(text), config)


# -- the batch script's command lines, with stand-ins for srun and scontrol (no cluster) ------------------------
def _fake_job(folder: Path, config: Path, **env: str) -> tuple[int, list[str], list[str], dict[str, str], str]:
    """Run fcp.sbatch as job 4321 on node[1-2] outside Slurm: ``srun`` records its options and runs the task
    command as task 3 (node 1, local rank 1) of 4, the task's python records its arguments and environment.
    Returns (exit status, srun options, task arguments, task environment, the script's output)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] && printf "node%s\\n" 1 2\n')
    (bin_dir / "srun").write_text(f"""#!/bin/bash
opts=()
while [[ $1 == --* ]]; do opts+=("$1"); shift; done
printf '%s\\n' "${{opts[@]}}" >{folder}/srun.opts
SLURM_NODEID=1 SLURM_PROCID=3 SLURM_LOCALID=1 SLURM_NTASKS=4 exec "$@"
""")
    (bin_dir / "python").write_text(f"""#!/bin/bash
[[ $1 == -m && $2 == megatron_fcp.launch ]] && exec {sys.executable} "$@"
printf '%s\\0' "$@" >{folder}/task.argv
env -0 >{folder}/task.env
""")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FCP_", "SLURM_", "NCCL_", "CUDA_", "TORCH_"))}
    job_env = base | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4321", "SLURM_NNODES": "2",
                      "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_SUBMIT_DIR": str(folder), "FCP_CONFIG": str(config),
                      "FCP_REPO": str(REPO), "FCP_PYTHON": str(bin_dir / "python"),
                      "FCP_CONTAINER_PYTHON": str(bin_dir / "python")} | env
    result = subprocess.run(["bash", str(SBATCH)], env=job_env, cwd=folder, capture_output=True, text=True,
                            timeout=60)
    opts = (folder / "srun.opts").read_text().split("\n")[:-1] if (folder / "srun.opts").exists() else []
    argv = (folder / "task.argv").read_text().split("\0")[:-1] if (folder / "task.argv").exists() else []
    task_env = dict(item.split("=", 1) for item in (folder / "task.env").read_text().split("\0")[:-1] if "=" in item) \
        if (folder / "task.env").exists() else {}
    return result.returncode, opts, argv, task_env, result.stdout + result.stderr


def test_sbatch_header_follows_megatron_conventions():
    header = [line.split(None, 1)[1] for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert {"--ntasks-per-node=1", "--requeue", "--open-mode=append", "--signal=B:USR1@300"} <= set(header)
    assert not any(option.startswith(("--nodes", "--gpus")) for option in header), "sizes come from submit.sh"


def test_sbatch_torchrun_launcher_in_the_config_container(tmp_path):
    """torchrun per node inside the config's container: pyxis flags, the node rank from the task's SLURM_NODEID,
    the log folder on the host side of the container mounts."""
    config = _config_copy("tiny_cpu", tmp_path, paths={"logs": "/logs/tiny", "checkpoints": "/ckpt/tiny"},
                          container={"image": "/images/fcp.sqsh", "mounts": [f"{tmp_path}/shared_logs:/logs"]})
    rc, opts, argv, env, out = _fake_job(tmp_path, config)
    assert rc == 0, out
    assert opts == ["--kill-on-bad-exit=1", "--nodes=2", "--container-image=/images/fcp.sqsh",
                    "--container-workdir=/opt/megatron-fcp", f"--container-mounts={tmp_path}/shared_logs:/logs",
                    "--ntasks=2", "--ntasks-per-node=1"]
    args = entry_args(load_run_config(config))
    assert argv == ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", "1",
                    "--master-addr", "node1", "--master-port", str(20000 + 4321 % 10000), "-m",
                    "megatron_fcp.cpu_trainer.worker", *args]
    assert (tmp_path / "shared_logs/tiny/4321/config.yaml").read_text() == config.read_text()
    assert env["NCCL_IB_SL"] == "1" and env["NCCL_IB_TIMEOUT"] == "19" and env["TORCH_NCCL_AVOID_RECORD_STREAMS"] == "1"
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in env, "CPU run"
    assert env["PYTHONPATH"].split(":")[0] == str(REPO) and env["FCP_CONFIG"] == str(config)


def test_sbatch_srun_launcher_dry_run_without_container(tmp_path):
    """One task per GPU: RANK/LOCAL_RANK/WORLD_SIZE from SLURM_PROCID/LOCALID/NTASKS; FCP_CONTAINER=0 drops the
    image; the dry run replaces the entry module; set NCCL variables are kept, CUDA_DEVICE_MAX_CONNECTIONS on GPU."""
    config = _config_copy("llama3_8b", tmp_path, name="llama3_8b_2nodes",
                          parallel={"nodes": 2, "gpus_per_node": 2, "context": 2}, training={"global_batch_size": 8})
    rc, opts, argv, env, out = _fake_job(tmp_path, config, FCP_LAUNCHER="srun", FCP_CONTAINER="0", FCP_DRY_RUN="1",
                                         FCP_LOG_DIR=str(tmp_path / "logs"), NCCL_IB_SL="3", FCP_MASTER_PORT="6000")
    assert rc == 0, out
    assert opts == ["--kill-on-bad-exit=1", "--nodes=2", "--ntasks=4", "--ntasks-per-node=2"]
    assert argv == ["-m", "megatron_fcp.launch.dryrun", *entry_args(load_run_config(config))]
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("3", "1", "4", "2")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("node1", "6000")
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and env["NCCL_IB_SL"] == "3" and env["NCCL_IB_TIMEOUT"] == "19"
    assert (tmp_path / "logs/4321/config.yaml").exists()
    assert "launcher srun" in out and "container none" in out


def _usr1_job(folder: Path, scancel_returns_after: float = 0.0, **env: str) -> tuple[int, str, list[str]]:
    """fcp.sbatch outside Slurm with stand-ins that record their calls: srun runs until scancel is called, and
    the script gets SIGUSR1 (Slurm's time-limit warning) once srun runs. scancel returns that many seconds after
    asking srun to stop (with a delay, srun ends while the script's trap still runs). Returns (exit status,
    output, calls)."""
    bin_dir, calls, stop = folder / "bin", folder / "calls", folder / "stop"
    bin_dir.mkdir()
    stand_ins = {
        "scontrol": f'echo "scontrol $*" >>{calls}; [[ "$1 $2" == "show hostnames" ]] && echo node1; exit 0',
        "scancel": f'echo "scancel $*" >>{calls}; touch {stop}; sleep {scancel_returns_after}',
        "srun": f'echo srun >>{calls}; while [[ ! -e {stop} ]]; do sleep 0.05; done; exit 1',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FCP_", "SLURM_"))}
    job_env = base | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_NNODES": "2",
                      "SLURM_JOB_NODELIST": "node[1-2]", "FCP_CONFIG": str(CONFIGS / "tiny_cpu.yaml"),
                      "FCP_REPO": str(REPO), "FCP_PYTHON": sys.executable, "FCP_LOG_DIR": str(folder / "logs")} | env
    proc = subprocess.Popen(["bash", str(SBATCH)], env=job_env, cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (calls.exists() and "srun" in calls.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=60)[0]
    return proc.returncode, out, calls.read_text().splitlines()


@pytest.mark.parametrize("scancel_returns_after", [0.0, 0.5], ids=["srun_ends_after_the_trap", "during_the_trap"])
def test_sbatch_time_limit_warning_stops_tasks_then_requeues(tmp_path, scancel_returns_after):
    """USR1: SIGTERM to the job's tasks with scancel (not to srun, which would end the step at once), wait for
    srun to end, then `scontrol requeue` the job, whatever the tasks' exit status (torchrun exits 1 on SIGTERM).
    The status is srun's even when srun ends while the trap runs (the trap's cut-short wait returns 138)."""
    rc, out, calls = _usr1_job(tmp_path, scancel_returns_after)
    assert calls[-3:] == ["srun", "scancel --signal=TERM 77", "scontrol requeue 77"], (calls, out)
    assert "time limit near (USR1)" in out and "tasks ended with exit status 1" in out
    assert "requeueing job 77 to resume from its latest checkpoint (restart 1)" in out and rc == 1


def test_sbatch_time_limit_requeues_at_most_max_restarts(tmp_path):
    rc, out, calls = _usr1_job(tmp_path, SLURM_RESTART_COUNT="3", FCP_MAX_RESTARTS="3")
    assert calls[-2:] == ["srun", "scancel --signal=TERM 77"], (calls, out)
    assert "not requeued: the job has restarted 3 times (FCP_MAX_RESTARTS=3)" in out


# -- B and C: the CPU worker trains under Slurm -------------------------------------------------------------------
TINY = ("tiny_cpu", "tiny_cpu_ring")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _steps(path: Path) -> list[dict]:
    """The records rank 0 appended (one JSON object per step), in file order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _worker_run(config: Path):
    """The RunConfig the CPU worker starts for ``config`` (its own parser reading the config's entry arguments)."""
    from megatron_fcp.cpu_trainer import worker

    return worker.run_config(worker._parser().parse_args(entry_args(load_run_config(config))), 1, None)


def _no_files(run):
    """``run`` writing and reading nothing (no checkpoints, no records)."""
    names = {f.name for f in fields(run)}
    return replace(run, **{name: None for name in ("save_dir", "load_dir", "records") if name in names})


@pytest.fixture(scope="module")
def tiny_jobs(cluster, tmp_path_factory):
    """The tiny CPU configs, unchanged, submitted together, each from its own launch folder (their paths are
    relative to it); while they run, the no-CP run of the same model and data in-process. Returns
    ({name: (job, launch folder, slurm.out text)}, no-CP steps)."""
    pytest.importorskip("megatron.core")
    from megatron_fcp.cpu_trainer.train import baseline_of, launch

    folders = {name: tmp_path_factory.mktemp(name) for name in TINY}
    jobs = {name: cluster.submit(CONFIGS / f"{name}.yaml", folders[name]) for name in TINY}
    run = _worker_run(CONFIGS / "tiny_cpu.yaml")
    no_cp = launch(_no_files(baseline_of(run)), tmp_path_factory.mktemp("nocp") / "nocp.json", quiet=True)["steps"]
    done = {}
    for name, job in jobs.items():
        logs = folders[name] / load_run_config(CONFIGS / f"{name}.yaml").paths.logs
        done[name] = (job, folders[name], cluster.finish(job, _log(logs, job), timeout=300))
    return done, no_cp


@pytest.mark.parametrize("name", TINY)
def test_tiny_cpu_job_trains_like_no_cp(tiny_jobs, name):
    """2 nodes x 2 gloo processes at CP 4 (torchrun per node): 20 steps, each loss the no-CP run's (rel 1e-5)."""
    jobs, no_cp = tiny_jobs
    job, folder, text = jobs[name]
    spec = load_run_config(CONFIGS / f"{name}.yaml")
    assert f"attempt 1 of run {name} (cpu) on 2 nodes x 2 processes" in text and "launcher torchrun" in text
    steps = _steps(folder / spec.paths.logs / "losses.jsonl")
    assert [s["step"] for s in steps] == list(range(1, spec.training.train_iters + 1)) == [s["step"] for s in no_cp]
    drift = [_rel(s["loss"], r["loss"]) for s, r in zip(steps, no_cp, strict=True)]
    worst = drift.index(max(drift))
    assert max(drift) <= 1e-5, f"{name}: loss differs from no-CP by {max(drift):.2e} at step {worst + 1}"
    assert (folder / spec.paths.checkpoints).is_dir()
    # the job's own log folder (LOGS/<job id>/slurm.out) has rank 0's line per step, the same losses (6 decimals)
    printed = [(int(m[1]), float(m[2])) for m in re.finditer(r"\] step +(\d+) +loss ([0-9.]+)", text)]
    assert [step for step, _ in printed] == [s["step"] for s in steps]
    assert all(abs(loss - s["loss"]) <= 5e-7 for (_, loss), s in zip(printed, steps, strict=True))


def _interrupted_job(cluster, tiny_jobs, folder: Path, name: str, interrupt) -> tuple[list, list, str, int]:
    """tiny_cpu saving only on SIGTERM (save_interval 100 > its 20 steps), interrupted by ``interrupt(job)`` once its
    records reach step 7. Returns (steps of the first attempt, steps after it, slurm.out, job id), each step's loss
    checked against the uninterrupted job's (rel 1e-5)."""
    jobs, _ = tiny_jobs
    uninterrupted = {s["step"]: s["loss"] for s in _steps(jobs["tiny_cpu"][1] / "out/tiny_cpu/logs/losses.jsonl")}
    config = _config_copy("tiny_cpu", folder, name=name, training={"save_interval": 100},
                          paths={"checkpoints": "out/checkpoints", "logs": "out/logs"})
    records = folder / "out/logs/losses.jsonl"
    job = cluster.submit(config, folder)
    deadline = time.monotonic() + 240
    for polls in itertools.count():  # the records every 0.1 s (steps take a few tenths), the job every 2 s
        if max((s["step"] for s in _steps(records)), default=0) >= 7:
            break
        if polls % 20 == 0:
            state = cluster.job(job).get("JobState")
            assert state in ("PENDING", "RUNNING", "CONFIGURING") and time.monotonic() < deadline, \
                f"job {job} {state} before its records reached step 7: {_steps(records)}"
        time.sleep(0.1)
    interrupt(job)
    while (info := cluster.job(job)).get("JobState") != "PENDING":  # the first attempt has ended (10 s to restart)
        assert info.get("JobState") in ("RUNNING", "COMPLETING", "REQUEUED") and time.monotonic() < deadline, info
        time.sleep(0.2)
    first = _steps(records)
    text = cluster.finish(job, _log(folder / "out/logs", job), timeout=300)
    second = _steps(records)[len(first):]
    assert cluster.job(job).get("Restarts") == "1"
    assert f"attempt 1 of run {name}" in text and f"attempt 2 of run {name}" in text, text[-3000:]
    for s in first + second:
        assert _rel(s["loss"], uninterrupted[s["step"]]) <= 1e-5, (s["step"], s["loss"], uninterrupted[s["step"]])
    return first, second, text, job


def _resumed_where_it_stopped(first: list, second: list, text: str) -> None:
    """The first attempt trained steps 1..k, saved on SIGTERM after step k, and the second trained k+1..20."""
    k = len(first)
    assert [s["step"] for s in first] == list(range(1, k + 1)) and 7 <= k < 20, [s["step"] for s in first]
    assert f"stopping after step {k} on SIGTERM (checkpoint saved: True)" in text, text[-3000:]
    assert [s["step"] for s in second] == list(range(k + 1, 21)), "resumed from the checkpoint saved on SIGTERM"


def test_requeued_job_saves_on_sigterm_and_resumes(cluster, tiny_jobs, tmp_path):
    """`scontrol requeue` mid-run: Slurm's SIGTERM reaches every process of the job, the workers save after their
    step (the checkpoint writer's helper survives the signal), Slurm starts the job again, and it resumes from that
    checkpoint with the uninterrupted job's losses."""
    first, second, text, _ = _interrupted_job(cluster, tiny_jobs, tmp_path, "tiny_cpu_requeue",
                                              lambda job: cluster.run("scontrol", "requeue", job))
    _resumed_where_it_stopped(first, second, text)


def test_job_warned_of_its_time_limit_requeues_itself(cluster, tiny_jobs, tmp_path):
    """The USR1 that `--signal=B:USR1@300` sends the batch shell before the time limit (sent here with scancel
    --batch, as slurmctld does): the script has the tasks save and stop, then requeues the job, which resumes."""
    first, second, text, job = _interrupted_job(
        cluster, tiny_jobs, tmp_path, "tiny_cpu_time_limit",
        lambda job: cluster.run("scancel", "--batch", "--signal=USR1", job))
    assert "time limit near (USR1)" in text and f"requeueing job {job} to resume" in text, text[-3000:]
    _resumed_where_it_stopped(first, second, text)
