#!/usr/bin/env bash
# The image's smoke command (its default CMD): the stack's versions, FCP and its Megatron entry point import, the
# shipped run configs check, one micro-batch plans. Exits non-zero on the first failure.
# Works on a CPU machine too (Transformer Engine and flash-attn are then reported, not required);
# FCP_SMOKE_REQUIRE_GPU_STACK=1, which the image sets, requires a CUDA build of torch and Transformer Engine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}

echo "== stack"
"$PYTHON" -W ignore - <<'EOF'
import importlib.metadata as md
import os
import sys

from packaging.requirements import Requirement

require_gpu_stack = os.environ.get("FCP_SMOKE_REQUIRE_GPU_STACK") == "1"
problems = []


def show(label, value):
    print(f"{label:18s} {value}")


def fail_if_problems():
    for problem in problems:
        print(f"smoke: FAILED: {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)


def installed(*names):
    """Version of the first installed distribution among names, or None (from metadata: importing TE needs CUDA)."""
    for name in names:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            pass
    return None


import torch

gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
show("python", sys.version.split()[0])
show("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'}, {gpus} GPU(s) visible)")
if require_gpu_stack and torch.version.cuda is None:
    problems.append("torch is a CPU build")

# megatron-core must satisfy the project's own pin (read from the installed metadata, not repeated here).
pins = [Requirement(r) for r in md.requires("megatron-fcp") or []]
pin = next((r for r in pins if r.name == "megatron-core"), None)
mcore = installed("megatron-core")
show("megatron-core", f"{mcore or 'not installed'} (project pin: {pin.specifier if pin else 'none'})")
if pin is None or mcore is None or mcore not in pin.specifier:
    problems.append(f"megatron-core {mcore} does not meet the project's pin {pin}")

te = installed("transformer_engine", "transformer-engine")
fa = installed("flash_attn", "flash-attn")
show("transformer_engine", te or "not installed")
show("flash_attn", fa or "not installed")
if require_gpu_stack and te is None:
    problems.append("Transformer Engine is not installed")

import megatron_fcp

show("megatron_fcp", f"{megatron_fcp.__version__} ({os.path.dirname(megatron_fcp.__file__)})")
fail_if_problems()  # before the slow imports below

# The training path: the Megatron adapter and its entry point import, and the install step has run.
import megatron_fcp.megatron.model
import megatron_fcp.megatron.pretrain_gpt
from megatron_fcp.errors import InputError
from megatron_fcp.kernels import BackendUnavailable, get_backend
from megatron_fcp.megatron import dataset_helpers

try:
    dataset_helpers.check()
except InputError as err:
    problems.append(str(err))

# Attention backends load only with a GPU (torch-flash, flash-attn, te); their constructors import the packages.
names = ["cpu"] + (["torch-flash", "flash-attn", "te"] if gpus else [])
for name in names:
    try:
        get_backend(name)
        show(f"backend {name}", "ok")
    except BackendUnavailable as err:
        show(f"backend {name}", f"unavailable: {err}")
        if require_gpu_stack and name in ("torch-flash", "te"):
            problems.append(f"attention backend {name} is unavailable")
if not gpus:
    show("other backends", "not tried: no GPU visible (torch-flash, flash-attn and te need one)")
fail_if_problems()
EOF

echo "== run configs"
for config in configs/tiny_cpu.yaml configs/llama3_8b.yaml; do
    "$PYTHON" -m megatron_fcp.launch check "$config"
done

echo "== plan"
fcp plan --lengths linux_files --cp 8 --tokens-per-rank 16384 --num-batches 1 --ranks 2

# The trainer a Slurm job of configs/tiny_cpu.yaml starts (its entry module and arguments, from the launch), under
# torchrun as fcp.sbatch starts it: 2 CPU processes at CP 2 for a few steps, then 1 process without CP on the same
# model and data; each step's loss must match (the arguments given after the config's override them).
FCP_SMOKE_STEPS=${FCP_SMOKE_STEPS:-4}
echo "== training: $FCP_SMOKE_STEPS steps of configs/tiny_cpu.yaml's trainer, CP 2 on 2 CPU processes, against no CP"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
launch_env=$("$PYTHON" -m megatron_fcp.launch env configs/tiny_cpu.yaml)
eval "$launch_env"
entry_args=()
# shellcheck disable=SC2153 # ENTRY_ARGS and ENTRY_MODULE come from the launch env above
eval "entry_args=($ENTRY_ARGS)"
# rendezvous and gloo on the loopback address (a container's host name may not resolve)
train() {
    local processes=$1 name=$2 port
    shift 2
    port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore GLOO_SOCKET_IFNAME=lo "$PYTHON" -m torch.distributed.run --nnodes 1 \
        --node-rank 0 --master-addr 127.0.0.1 --master-port "$port" --nproc-per-node "$processes" \
        -m "$ENTRY_MODULE" "${entry_args[@]}" --steps "$FCP_SMOKE_STEPS" --save-interval 0 \
        --checkpoints "$scratch/$name/checkpoints" --records "$scratch/$name.jsonl" "$@"
}
train 2 cp2 --cp 2
train 1 nocp --cp 1 --mode nocp
"$PYTHON" - "$scratch/cp2.jsonl" "$scratch/nocp.jsonl" "$FCP_SMOKE_STEPS" <<'EOF'
import json
import sys

tolerance = 1e-5
cp2, nocp = ([json.loads(line) for line in open(path) if line.strip()] for path in sys.argv[1:3])
steps = int(sys.argv[3])
if [s["step"] for s in cp2] != list(range(1, steps + 1)) or [s["step"] for s in nocp] != [s["step"] for s in cp2]:
    sys.exit(f"smoke: FAILED: steps recorded: CP 2 {[s['step'] for s in cp2]}, no CP {[s['step'] for s in nocp]}")
diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(cp2, nocp)]
rel = max(d / abs(b["loss"]) for d, b in zip(diffs, nocp))
for a, b, d in zip(cp2, nocp, diffs):
    print(f"step {a['step']}: loss CP 2 {a['loss']:.8f}  no CP {b['loss']:.8f}  difference {d:.1e}")
verdict = "ok" if max(diffs) <= tolerance and rel <= tolerance else "FAILED"
print(f"largest loss difference against no CP over {steps} steps: {max(diffs):.1e} (relative {rel:.1e}); "
      f"tolerance {tolerance:g}: {verdict}")
if verdict != "ok":
    sys.exit(f"smoke: FAILED: CP 2's loss differs from no CP's by {max(diffs):.1e} (relative {rel:.1e})")
EOF

echo "smoke: ok"
