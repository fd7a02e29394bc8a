#!/usr/bin/env bash
# Every GPU check of the Megatron-integration issue, in one run on a single-GPU machine (see docs/gpu_runs.md).
# Needs: python3 with torch and CUDA; megatron-core 0.19.2 importable (wheels in .whl/ are installed if present).
# Writes logs to $OUT (or ./gpu_out). Continues past a failing check and prints a summary.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
python3 -m megatron_fcp.megatron.dataset_helpers  # the Makefile megatron.training's start-up runs (see module)
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__)" \
  | tee -a "$OUT/device.txt"

status=()
run() {  # name, timeout, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" 2>&1 | grep -v -i "warning" | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}; status+=("$name rc=$rc"); echo "=== $name rc=$rc"
}

# 1. Attention kernels and the four-rank FCP attention step on the GPU (torch-flash; te/flash-attn skip if absent).
[ "${SKIP_GPU_TESTS:-0}" = 1 ] || run gpu_tests 240 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/unit/test_gpu_backends.py

# 2. The training entry point, single GPU, CP=1 with the FCP spec (local spec: no Transformer Engine there).
MODEL=(--num-layers 4 --hidden-size 512 --num-attention-heads 8 --group-query-attention --num-query-groups 4
  --ffn-hidden-size 2048 --seq-length 8192 --max-position-embeddings 8192 --position-embedding-type rope
  --no-rope-fusion --attention-dropout 0 --hidden-dropout 0 --transformer-impl local --bf16
  --micro-batch-size 1 --global-batch-size 4 --train-iters 30 --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine
  --lr-warmup-iters 3 --weight-decay 0.1 --clip-grad 1.0 --tokenizer-type NullTokenizer --vocab-size 4096
  --mock-data --eval-iters 0 --eval-interval 1000 --log-interval 5 --calculate-per-token-loss
  --no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-persist-layer-norm --seed 1234)
run smoke_fcp 200 torchrun --nproc-per-node 1 -m megatron_fcp.megatron.pretrain_gpt "${MODEL[@]}" \
  --context-parallel-mode fcp --context-parallel-size 1 --fcp-mock-doclens linux_files --fcp-planning-workers 2

# 3. Megatron's own path through the same entry point (ring mode, CP=1, Megatron's mock GPT data).
run smoke_ring 150 torchrun --nproc-per-node 1 -m megatron_fcp.megatron.pretrain_gpt "${MODEL[@]}" \
  --context-parallel-mode ring --context-parallel-size 1

printf '%s\n' "${status[@]}" | tee "$OUT/summary.txt"
