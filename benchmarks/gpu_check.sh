#!/usr/bin/env bash
# The prepared GPU check, at most 8 minutes on one GPU: device checks of the trainer, a 2-epoch CIFAR-10 CFF+M and
# BP+CE run on the device, the step benchmark (fused vs per-view, bf16 autocast, compile) and a one-GPU
# two-process layer pipeline.
#
#   benchmarks/gpu_check.sh              # on the GPU; CIFAR-10 from $TIMM_CFF_DATA/cifar10_jpeg if present
#   benchmarks/gpu_check.sh --dry-run    # the same steps on the CPU with tiny sizes (checks the script itself)
#
# Writes everything under ${OUT:-/tmp/gpu_check}; each step prints its wall time.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
DATA=${TIMM_CFF_DATA:-$(cd .. && pwd)/shared/data}
mkdir -p "$OUT"
if [ "${1:-}" = "--dry-run" ]; then
  DEVICE=cpu; SMALL=(--data.train_subset=1100 --data.test_subset=256 --train.max_steps=2 --probe.epochs=1 --data.batch_size=64)
  BENCH=(--batch-size 32 --repeats 2 --warmup 1 --methods cff_2view,cff_2view_unfused,bp --skip-memory)
else
  DEVICE=cuda; SMALL=()
  BENCH=(--batch-size 512 --repeats 5 --methods cff_2view,cff_2view_unfused,cff_1view,bp --skip-memory)
fi
if [ -f "$DATA/cifar10_jpeg/train.npz" ]; then
  DATASET=(--data.dataset=npz --data.root="$DATA/cifar10_jpeg")
else
  echo "no $DATA/cifar10_jpeg: the runs use the bundled MNIST subset"; DATASET=(--data.dataset=mnist_subset --data.stats=mnist --data.crop_padding=2 --model.patch_size=7)
fi
RUN=(--config cifar10_vit128-4-5_rc "${DATASET[@]}" --train.epochs=2 --run.device=$DEVICE
     --run.output="$OUT/runs" --run.quiet=true "${SMALL[@]}")
step() { local name=$1; shift; local t0=$SECONDS; echo "== $name"; "$@"; echo "== $name: $((SECONDS - t0)) s"; }
step "device checks" python benchmarks/gpu_check.py --device $DEVICE
step "CFF+M, 2 epochs" timm-cff train "${RUN[@]}" --run.name=cffm
step "BP+CE, 2 epochs" timm-cff train "${RUN[@]}" --run.name=bp --train.method=bp
step "step benchmark" python benchmarks/run_benchmark.py --device $DEVICE "${BENCH[@]}" --out "$OUT/bench"
step "step benchmark, bf16 autocast" python benchmarks/run_benchmark.py --device $DEVICE "${BENCH[@]}" \
  --autocast-dtype bfloat16 --out "$OUT/bench_bf16"
if [ $DEVICE = cuda ]; then
  step "step benchmark, compile" python benchmarks/run_benchmark.py --device $DEVICE "${BENCH[@]}" --compile \
    --out "$OUT/bench_compile"
fi
# Two processes, one stage group each. NCCL refuses two ranks on one GPU, so with fewer than 2 GPUs the pipeline
# step runs on the CPU (gloo), which still checks the launch, the activation links and the merged checkpoint.
PIPE_DEVICE=$DEVICE
if [ $DEVICE = cuda ] && [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -lt 2 ]; then
  echo "one GPU: the 2-process pipeline runs on the CPU"; PIPE_DEVICE=cpu
fi
step "2-process pipeline" env CUDA_VISIBLE_DEVICES=$([ $PIPE_DEVICE = cpu ] && echo "" || echo "0,1") \
  torchrun --standalone --nproc-per-node 2 -m timm_cff train "${RUN[@]}" --run.name=pipe --run.device=$PIPE_DEVICE \
  --pipeline.stages=2 --train.max_steps=4
timm-cff compare "$OUT"/runs/*
