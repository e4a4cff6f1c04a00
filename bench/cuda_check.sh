#!/usr/bin/env bash
# The checks a CUDA machine runs (CI has no GPU): the GPU half of the test suite, then the
# benchmark on the released model sizes in float32 and in bf16, channels_last on.
#   bash bench/cuda_check.sh [OUTDIR]      (default runs/cuda_check; logs and CSVs go there)
# PYTHON picks the interpreter (default python3). Each part has its own time limit, so one
# that fails or hangs does not take the others with it.
set -u
out=${1:-runs/cuda_check}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

nvidia-smi -L
$python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

# Every test that runs on CUDA: the [cuda] cases of the device-parametrised tests,
# tests/test_cuda.py (CPU against CUDA) and the one-GPU torchrun run (NCCL, SyncBatchNorm).
timeout 240 $python -m pytest -q -p no:cacheprovider -m cuda tests/ 2>&1 | tee "$out/tests.log"

# The released model sizes (batch per GPU as released, or what one GPU holds).
declare -A sizes=(
  [classification]=""
  [segmentation]="model.name=deeplabv3plus_resnet50 data.image_size=513 data.train_size=8 data.val_size=1 batch_size=8"
  [detection]="model.name=fasterrcnn_resnet50_c4 model.min_size=600 model.max_size=1000 data.image_size=600 data.train_size=8 data.val_size=1 batch_size=8 model.trainable_layers=3 model.roi_batch_size=128 model.roi_pool_size=14 model.anchor_sizes=[128,256,512] model.rpn_pre_nms_top_n=[12000,6000] model.rpn_post_nms_top_n=[2000,300]"
)
work=$(mktemp -d)
bench() {  # bench NAME ARGS...: one benchmark run, its rows added to bench_cuda.csv
  local name=$1
  shift
  timeout 150 $python -m bench --device cuda --warmup 3 --repeats 10 --data-root "$work/data" \
    --csv "$work/$name.csv" "$@" 2>&1 | tee -a "$out/bench.log"
  [ -f "$work/$name.csv" ] || return 0
  if [ -f "$out/bench_cuda.csv" ]; then tail -n +2 "$work/$name.csv"; else cat "$work/$name.csv"; fi >> "$out/bench_cuda.csv"
}
for precision in fp32 bf16; do
  for task in classification segmentation detection; do
    # shellcheck disable=SC2086  # the settings are separate words
    bench "$precision-$task" --tasks "$task" --precision "$precision" ${sizes[$task]}
  done
done
# torch.compile (inductor) of the classification model, in bf16.
bench compiled --tasks classification --modes afan --precision bf16 compile=inductor
# A-FAN's strengths one tail pass each against one joined pass (afan.batch_strengths).
bench batched --batched
# Detection's own A-FAN step with its strengths joined (afan.batched, frozen BatchNorm as
# released): against the per-strength step, and against base on the same frozen-BN model.
# shellcheck disable=SC2086
bench batched-detection --batched --tasks detection ${sizes[detection]}
# shellcheck disable=SC2086
bench frozen-detection --tasks detection --modes base,afan ${sizes[detection]} model.norm=frozen afan.batched=true
