#!/usr/bin/env bash
# Submit a run config as a Slurm job of scripts/slurm/fcp.sbatch; prints the job id.
#
#   scripts/slurm/submit.sh CONFIG [sbatch options...]
#   scripts/slurm/submit.sh configs/llama3_8b.yaml --time 04:00:00 --account myacct
#   FCP_DRY_RUN=1 scripts/slurm/submit.sh configs/llama3_8b.yaml     # one line per process, no training
#
# Reads the config's nodes, processes per node, run name and log folder with `python -m megatron_fcp.launch
# env CONFIG` and calls
#   sbatch --nodes N [--gpus-per-node G] --job-name NAME --output LOGS/%j/slurm.out \
#          --export=ALL,FCP_CONFIG=...,FCP_REPO=...,FCP_LOG_DIR=... [sbatch options...] fcp.sbatch
# (--gpus-per-node on device gpu only; options given here come after, so they win). The job's log folder
# LOGS/<job id> has to exist before the job starts (Slurm opens --output first, and makes no folders): the job is
# submitted held, the folder made, then the job released. LOGS is the config's paths.logs as seen from this
# host: relative to the current folder, and through the container mounts when the run uses the config's image.
# Relative paths in the config are relative to the current folder, where the job runs.
#
# Environment: FCP_PYTHON (python with megatron-fcp's requirements, default python3), FCP_LOG_DIR (log folder
# instead of the config's), FCP_CONTAINER=0 (no container), and everything fcp.sbatch reads (FCP_LAUNCHER,
# FCP_DRY_RUN, ...): the job gets this environment (--export=ALL).
set -euo pipefail

die() {
  echo "submit.sh: error: $*" >&2
  exit 2
}

(($# >= 1)) || die "usage: $0 CONFIG [sbatch options...]"
[[ $1 != -h && $1 != --help ]] || {
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
}
config=$1
shift
[[ -f $config && -r $config ]] || die "$config: no readable run config"
config=$(realpath "$config")
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
sbatch_script=$repo/scripts/slurm/fcp.sbatch
python=${FCP_PYTHON:-python3}
export FCP_REPO=${FCP_REPO:-$repo}

launch_env=$(PYTHONPATH="$FCP_REPO${PYTHONPATH:+:$PYTHONPATH}" "$python" -m megatron_fcp.launch env "$config") \
  || die "could not read $config with $python -m megatron_fcp.launch env (set FCP_PYTHON to a python with the" \
    "project's requirements, e.g. $repo/.venv/bin/python)"
eval "$launch_env" # RUN_NAME DEVICE NNODES GPUS_PER_NODE ... LOG_DIR, shell-quoted by the launcher

if [[ -n ${FCP_LOG_DIR:-} ]]; then
  log_root=$FCP_LOG_DIR
elif [[ -n $CONTAINER_IMAGE && ${FCP_CONTAINER:-1} != 0 ]]; then
  log_root=$HOST_LOG_DIR # the config's log folder through the container mounts
else
  log_root=$LOG_DIR
fi
mkdir -p "$log_root"
log_root=$(realpath "$log_root")
for value in "$config" "$FCP_REPO" "$log_root"; do
  [[ $value != *,* ]] || die "$value: a path with a comma cannot pass through sbatch --export"
done

args=(--parsable --hold --nodes "$NNODES" --job-name "$RUN_NAME" --output "$log_root/%j/slurm.out"
  --export="ALL,FCP_CONFIG=$config,FCP_REPO=$FCP_REPO,FCP_LOG_DIR=$log_root")
[[ $DEVICE != gpu ]] || args+=(--gpus-per-node "$GPUS_PER_NODE")
out=$(sbatch "${args[@]}" "$@" "$sbatch_script") || die "sbatch failed: $out"
job=${out%%;*}
[[ $job =~ ^[0-9]+$ ]] || die "sbatch said: $out"
if ! mkdir -p "$log_root/$job"; then
  scancel "$job" || true
  die "could not make the job's log folder $log_root/$job; job $job cancelled"
fi
held=0
for arg in "$@"; do [[ $arg == --hold || $arg == -H ]] && held=1; done
if ((held)); then
  echo "submit.sh: job $job stays held (--hold given): scontrol release $job" >&2
else
  scontrol release "$job" || die "scontrol release $job failed (the job is held)"
fi
echo "submit.sh: job $job: $RUN_NAME, $NNODES nodes x $GPUS_PER_NODE, output $log_root/$job/slurm.out" >&2
echo "$job"
