#!/usr/bin/env bash
# GPU checks in one go, for a machine with one CUDA GPU (under 8 minutes on an H200). Run from the repository root:
#     OUT=/some/folder bash benchmarks/gpu_check.sh
# It runs: the tests marked `gpu`; fp32 vs bf16 loss agreement on a fixed batch; steps/s, peak memory and MFU of a
# ViT-B/16 + BERT-base-sized dual encoder at batch 256 in bf16, with and without torch.compile (gpu_train.py); and
# the contrastive-loss kernels' GPU goals (gpu_loss.py). Results: JSON files and logs in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
VOCAB=()
$PY -c "import cn_clip" 2>/dev/null || VOCAB=(--vocab pkg:vlalign/assets/demo_vocab.txt)  # cn-clip ships the default vocab

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
$PY -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())" \
  > "$OUT/versions.txt" 2>&1

status=0
run() {  # run NAME TIMEOUT CMD...: log to $OUT/NAME.log, keep going on failure
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s"
  [ $rc -eq 0 ] || status=1
}

# deterministic cuBLAS for the bit-exact resume test (test_a_bf16_stage_interrupted_then_rerun_...[cuda])
run gpu_tests 150 env CUBLAS_WORKSPACE_CONFIG=:4096:8 \
  $PY -m pytest -q -m gpu -p no:cacheprovider tests/vlalign/train/test_engine.py tests/vlalign/losses
run gpu_train 300 $PY benchmarks/gpu_train.py --batch 256 --steps 20 "${VOCAB[@]}" --out "$OUT/gpu_train.json"
run gpu_loss 150 $PY benchmarks/gpu_loss.py --quick --out "$OUT/gpu_loss.json"
exit $status
