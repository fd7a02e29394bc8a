#!/usr/bin/env bash
# Self-check of the local Slurm cluster (start it first: cluster.sh start).
#
#   smoke.sh [gloo] [ranks] [requeue]     (default: all three)
#
#   gloo     2 nodes x 2 tasks: each task prints SLURM_NODEID/PROCID/LOCALID and
#            joins a gloo all_reduce with MASTER_ADDR = first node of the job
#            (needs torch in LOCAL_SLURM_PYTHON, default <repo>/.venv/bin/python)
#   ranks    32 nodes x 8 tasks, --gpus-per-node=8: 256 `bash -c echo` tasks; checks
#            256 distinct ranks, 32 nodes with local ranks 0-7 each, 8 GPUs visible
#   requeue  a job that counts its runs in a file is `scontrol requeue`d while it
#            runs; checks it runs again with SLURM_RESTART_COUNT=1 and completes
#
# Job files and outputs go to $LOCAL_SLURM_DIR/jobs/smoke/. Every wait has a
# timeout; exits non-zero with a message naming the failed check.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
CLUSTER=$HERE/cluster.sh
D=${LOCAL_SLURM_DIR:-/tmp/fcp-slurm}
PY=${LOCAL_SLURM_PYTHON:-$REPO/.venv/bin/python}
NODES=${LOCAL_SLURM_NODES:-32}
OUT=$D/jobs/smoke

say() { echo "smoke: $*"; }
fail() { echo "smoke: FAIL: $*" >&2; return 1; }

# a cluster command, bounded in time
c() { timeout 60 "$CLUSTER" run "$@"; }

submit() { # batch-script [sbatch options...] -> job id
  local script=$1 out
  shift
  out=$(c sbatch --parsable "$@" "$script") || { fail "sbatch $* $script failed: $out"; return 1; }
  echo "${out%%;*}"
}

job_field() { # job id, field name -> value from `scontrol show job -o`
  c scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n1
}

# wait until the job is in a final state; prints the state
wait_job() { # job id, timeout seconds
  local id=$1 deadline=$((SECONDS + $2)) state=
  while ((SECONDS < deadline)); do
    state=$(job_field "$id" JobState)
    case $state in
      COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED)
        echo "$state"
        return 0
        ;;
    esac
    sleep 1
  done
  echo "TIMEOUT_WAITING($state)"
}

show_job() { # job id, output file: print what is known, for failure messages
  echo "--- scontrol show job $1" >&2
  c scontrol show job "$1" >&2 || true
  if [[ -n ${2:-} && -f $2 ]]; then
    echo "--- $2 (last 30 lines)" >&2
    tail -n 30 "$2" >&2
  fi
}

expect_completed() { # job id, timeout, output file, what
  local state
  state=$(wait_job "$1" "$2")
  if [[ $state != COMPLETED ]]; then
    show_job "$1" "$3"
    c scancel "$1" 2>/dev/null || true
    fail "$4: job $1 ended as $state (wanted COMPLETED within $2 s)"
    return 1
  fi
}

# --- (a) gloo all_reduce over 2 nodes x 2 tasks ------------------------------
test_gloo() {
  [[ -x $PY ]] || { fail "gloo: python not found at $PY (set LOCAL_SLURM_PYTHON)"; return 1; }
  cat >"$OUT/gloo.py" <<'EOF'
import datetime, os, socket
import torch
import torch.distributed as dist

rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
print(f"task rank={rank} nodeid={os.environ['SLURM_NODEID']} localid={os.environ['SLURM_LOCALID']}"
      f" node={os.environ['SLURMD_NODENAME']} master={os.environ['MASTER_ADDR']}"
      f" master_ip={socket.gethostbyname(os.environ['MASTER_ADDR'])}", flush=True)
dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=120))
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
expected = world * (world + 1) / 2
assert t.item() == expected, (t.item(), expected)
print(f"allreduce ok rank={rank} sum={t.item():g}", flush=True)
dist.destroy_process_group()
EOF
  cat >"$OUT/gloo.sbatch" <<EOF
#!/bin/bash
set -euo pipefail
MASTER_ADDR=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n1)
export MASTER_ADDR MASTER_PORT=\$((20000 + SLURM_JOB_ID % 20000))
echo "batch on \$SLURMD_NODENAME nodes=\$SLURM_JOB_NODELIST master=\$MASTER_ADDR:\$MASTER_PORT"
getent hosts "\$MASTER_ADDR"
export OMP_NUM_THREADS=1
srun --kill-on-bad-exit=1 "$PY" "$OUT/gloo.py"
EOF
  local id out=$OUT/gloo.out
  id=$(submit "$OUT/gloo.sbatch" -J smoke-gloo -N 2 --ntasks-per-node=2 -t 10 -o "$out") || return 1
  say "gloo: job $id (2 nodes x 2 tasks, torch gloo all_reduce)"
  expect_completed "$id" 300 "$out" gloo || return 1
  local got
  got=$(grep -c '^allreduce ok' "$out" || true)
  if [[ $got != 4 ]] || [[ $(grep '^task ' "$out" | sed 's/.*\(nodeid=[0-9]*\) \(localid=[0-9]*\).*/\1 \2/' | sort -u | wc -l) != 4 ]] \
    || ! grep -q '^task rank=0 nodeid=0 localid=0 node=node[0-9]* master=node[0-9]* master_ip=127.0.0.1' "$out"; then
    show_job "$id" "$out"
    fail "gloo: expected 4 tasks on 2 nodes x 2 local ids, each 'allreduce ok'; got $got"
    return 1
  fi
  say "gloo: ok ($(grep -m1 '^batch on' "$out"))"
}

# --- (b) 32 nodes x 8 tasks with 8 fake GPUs per node -------------------------
test_ranks() {
  local ppn=8 total
  total=$((NODES * ppn))
  cat >"$OUT/ranks.sbatch" <<'EOF'
#!/bin/bash
set -euo pipefail
echo "batch SLURM_JOB_GPUS=${SLURM_JOB_GPUS:-unset} nodes=$SLURM_JOB_NODELIST"
srun bash -c 'echo "rank=$SLURM_PROCID node=$SLURMD_NODENAME nodeid=$SLURM_NODEID local=$SLURM_LOCALID cvd=${CUDA_VISIBLE_DEVICES:-unset} job_gpus=${SLURM_JOB_GPUS:-unset}"'
EOF
  local id out=$OUT/ranks.out
  id=$(submit "$OUT/ranks.sbatch" -J smoke-ranks -N "$NODES" --ntasks-per-node=$ppn \
    --gpus-per-node=8 -t 10 -o "$out") || return 1
  say "ranks: job $id ($NODES nodes x $ppn tasks = $total, --gpus-per-node=8)"
  expect_completed "$id" 300 "$out" ranks || return 1
  local report
  report=$(awk -v total="$total" -v nodes="$NODES" -v ppn="$ppn" '
    /^rank=/ {
      n++
      for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
      if (f["rank"] in rank) dup++
      rank[f["rank"]] = 1
      node[f["node"]]++
      pair[f["node"] " " f["local"]]++
      if (f["local"] < 0 || f["local"] >= ppn) bad_local++
      if (f["cvd"] != "0,1,2,3,4,5,6,7") bad_gpu++
    }
    END {
      nn = 0; for (k in node) { nn++; if (node[k] != ppn) bad_node++ }
      np = 0; for (k in pair) np++
      for (r = 0; r < total; r++) if (!(r in rank)) missing++
      printf "lines=%d nodes=%d node_local_pairs=%d dup_ranks=%d missing_ranks=%d bad_local=%d bad_node=%d bad_gpu=%d\n",
        n, nn, np, dup, missing, bad_local, bad_node, bad_gpu
      exit !(n == total && nn == nodes && np == total && !dup && !missing && !bad_local && !bad_node && !bad_gpu)
    }' "$out") || {
    show_job "$id" "$out"
    fail "ranks: wanted $total distinct ranks, $NODES nodes x local ranks 0-$((ppn - 1)), CUDA_VISIBLE_DEVICES=0,...,7: $report"
    return 1
  }
  say "ranks: ok ($report; $(grep -m1 '^rank=0 ' "$out"))"
}

# --- (c) requeue a running job -----------------------------------------------
test_requeue() {
  local counter=$OUT/requeue.counter log=$OUT/requeue.log
  rm -f "$counter" "$log"
  cat >"$OUT/requeue.sbatch" <<EOF
#!/bin/bash
set -euo pipefail
n=\$(( \$(cat "$counter" 2>/dev/null || echo 0) + 1 ))
echo "\$n" >"$counter"
echo "run=\$n restart=\${SLURM_RESTART_COUNT:-0} node=\$SLURMD_NODENAME" | tee -a "$log"
if (( \${SLURM_RESTART_COUNT:-0} >= 1 )); then exit 0; fi
sleep 600   # first run: wait to be requeued
EOF
  local id out=$OUT/requeue.out deadline
  id=$(submit "$OUT/requeue.sbatch" -J smoke-requeue -N 1 -n 1 --requeue --open-mode=append -t 15 -o "$out") || return 1
  say "requeue: job $id"
  deadline=$((SECONDS + 120))
  until [[ $(cat "$counter" 2>/dev/null) == 1 && $(job_field "$id" JobState) == RUNNING ]]; do
    if ((SECONDS >= deadline)); then
      show_job "$id" "$out"
      fail "requeue: first run of job $id did not start within 120 s"
      return 1
    fi
    sleep 1
  done
  local t0=$SECONDS
  c scontrol requeue "$id" || { fail "requeue: scontrol requeue $id failed"; return 1; }
  expect_completed "$id" 300 "$out" requeue || return 1
  local restarts
  restarts=$(job_field "$id" Restarts)
  if [[ $(cat "$counter") != 2 || $restarts != 1 ]] || ! grep -q '^run=1 restart=0 ' "$log" \
    || ! grep -q '^run=2 restart=1 ' "$log"; then
    show_job "$id" "$out"
    fail "requeue: wanted 2 runs (restart 0 then 1) and Restarts=1; counter=$(cat "$counter") Restarts=$restarts log: $(tr '\n' ';' <"$log")"
    return 1
  fi
  say "requeue: ok (ran twice, SLURM_RESTART_COUNT=1 on the second run, $((SECONDS - t0)) s from requeue to completion)"
}

main() {
  local tests=("$@") t passed=0 failed=0 failures=()
  ((${#tests[@]})) || tests=(gloo ranks requeue)
  for t in "${tests[@]}"; do
    [[ $t == gloo || $t == ranks || $t == requeue ]] || { echo "usage: $0 [gloo] [ranks] [requeue]" >&2; exit 2; }
  done
  "$CLUSTER" status >/dev/null || { echo "smoke: FAIL: cluster not running; start it: $CLUSTER start" >&2; exit 1; }
  c getent hosts node1 >/dev/null || { echo "smoke: FAIL: node1 does not resolve inside the cluster" >&2; exit 1; }
  rm -rf "$OUT"
  mkdir -p "$OUT"
  for t in "${tests[@]}"; do
    local t0=$SECONDS
    if "test_$t"; then
      passed=$((passed + 1))
    else
      failed=$((failed + 1))
      failures+=("$t")
    fi
    say "$t took $((SECONDS - t0)) s"
  done
  echo "smoke: $passed passed, $failed failed"
  ((failed == 0)) || { echo "smoke: FAIL: ${failures[*]} (outputs in $OUT, logs in $D/log)" >&2; exit 1; }
}

main "$@"
