#!/usr/bin/env bash
# Every GPU benchmark in one go (about 10 minutes on one H100), on a machine with one NVIDIA GPU and torch installed:
# nothing is installed from the network. Run from the repository root; results go to benchmarks/results/gpu/
# (JSON, with the device name), tables to stdout. Rows that cannot run here say why and are left "not measured".
#
#   bash benchmarks/gpu.sh [path/to/pt_inception-2015-12-05-6726825d.pth]
#
# SECTIONS picks a part (default all: "train sample peer"), e.g. to stay inside a 10-minute command limit per call:
#   SECTIONS=train bash benchmarks/gpu.sh; SECTIONS="sample peer" bash benchmarks/gpu.sh weights.pth
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=benchmarks/results/gpu
SECTIONS=" ${SECTIONS:-train sample peer} "
mkdir -p "$OUT"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name())"

if [[ "$SECTIONS" == *" train "* ]]; then
  # Training step, CIFAR-10 preset, batch 128, bf16 autocast: eager / channels_last / compile / both.
  # MFU against 790 TFLOP/s (an H100's dense bf16); pass PEAK_TFLOPS for another GPU.
  timeout 420 python benchmarks/train_step.py --preset cifar10 --batch 128 --dtype bf16 --steps 50 --windows 3 \
    --variants eager channels_last compile channels_last+compile \
    --peak-tflops "${PEAK_TFLOPS:-790}" --out "$OUT/train_step_cifar10_bf16.json" || echo "train_step: failed or timed out"
  # With two or more GPUs, the same step data-parallel over all of them (NCCL): communication time and its exposed
  # cost, with and without DDP's gradient-bucket views and static graph.
  GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
  if [[ "$GPUS" -ge 2 ]]; then
    timeout 300 python benchmarks/train_step.py --preset cifar10 --batch $((128 * GPUS)) --dtype bf16 --steps 50 --windows 3 \
      --variants eager bucket_view+static_graph --world-size "$GPUS" --peak-tflops "${PEAK_TFLOPS:-790}" \
      --out "$OUT/train_step_cifar10_bf16_ddp.json" || echo "train_step (DDP): failed or timed out"
  else
    echo "train_step (DDP): not measured (one GPU: no gradient communication)"
  fi
fi

if [[ "$SECTIONS" == *" sample "* ]]; then
  # Sampling: 50,000 CIFAR-10-size images with DDIM-100, and 1,000 (one batch; images/s holds for 50k) with 1000
  # ancestral steps, bf16 autocast as the sample actors run on a GPU (sample.bf16_on_gpu), plus Inception feature
  # extraction of 50,000 images when the weights file is given. Each sampler's row is written as soon as it is timed.
  INCEPTION=()
  if [[ $# -ge 1 ]]; then INCEPTION=(--inception-weights "$1" --inception-images 50000); fi
  timeout 420 python benchmarks/sampling.py --preset cifar10 --batch 1000 --dtype bf16 --samplers ddim:100=50000 ancestral:1000=1000 \
    "${INCEPTION[@]}" --out "$OUT/sampling_cifar10.json" || echo "sampling: failed or timed out"
fi

if [[ "$SECTIONS" == *" peer "* ]]; then
  # Our U-Net against diffusers' UNet2DModel at matched architecture (needs diffusers).
  if python -c "import diffusers" 2>/dev/null; then
    timeout 300 python benchmarks/unet_throughput.py --device cuda --variants eager channels_last --out "$OUT/unet_throughput.json" || echo "unet_throughput: failed"
  else
    echo "unet_throughput: not measured (diffusers is not installed)"
  fi
fi
