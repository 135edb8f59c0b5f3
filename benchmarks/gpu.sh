#!/usr/bin/env bash
# Every GPU benchmark in one go, within 6 minutes on one GPU: the steps' time limits add up to 360 s (a machine with
# several GPUs adds 120 s of data-parallel rows). Every script rewrites its JSON after each row, so a step cut short
# keeps what it finished; inductor's cache (TORCHINDUCTOR_CACHE_DIR) makes a second run's compilations short. Needs torch only (the GPU image's
# torch 2.11 + CUDA was the one measured); diffusers (0.36) for the peer rows and the Inception weights file for the
# feature rows are optional. Installs nothing. Run from the repository root; JSON (with the device name) goes to
# benchmarks/results/gpu/, tables to stdout.
#
#   bash benchmarks/gpu.sh [path/to/pt_inception-2015-12-05-6726825d.pth]
#
# SECTIONS picks parts (default "train sample peer"); PEAK_TFLOPS the dense bf16 peak for MFU (790: measured on
# these machines). Rows that cannot run here say why and are left "not measured".
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/benchmarks/results/gpu/.inductor-cache}"
OUT=benchmarks/results/gpu
SECTIONS=" ${SECTIONS:-train sample peer} "
PEAK="${PEAK_TFLOPS:-790}"
mkdir -p "$OUT"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(), 'torch', torch.__version__)" || exit 1

if [[ "$SECTIONS" == *" train "* ]]; then
  # The pipeline's own step, CIFAR-10 preset, paper batch 128, bf16 autocast: eager, compiled (the default on GPUs,
  # train.compile_on_gpu) and compiled in NHWC, with the 12 heaviest kernels of each (layout conversions, fp32 GEMMs,
  # attention).
  timeout 120 python benchmarks/train_step.py --preset cifar10 --batch 128 --dtype bf16 --steps 30 --windows 3 \
    --variants eager compile channels_last+compile --kernels 12 --peak-tflops "$PEAK" \
    --out "$OUT/train_step_cifar10_bf16.json" || echo "train_step: failed or timed out (finished rows kept)"
  # Data parallel: the paper's global batch of 128 over 8 GPUs is 16 per GPU. The per-GPU rate at 16/32/64 images
  # (128 above), eager: each batch size would be a compilation of its own.
  timeout 30 python benchmarks/train_step.py --preset cifar10 --batch 16 32 64 --dtype bf16 --steps 30 --windows 3 \
    --variants eager --peak-tflops "$PEAK" \
    --out "$OUT/train_step_cifar10_bf16_per_gpu_batch.json" || echo "train_step (batch sweep): failed or timed out"
  GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
  if [[ "$GPUS" -ge 2 ]]; then
    timeout 120 python benchmarks/train_step.py --preset cifar10 --batch $((16 * GPUS)) $((128 * GPUS)) --dtype bf16 \
      --steps 30 --windows 3 --variants eager --world-size "$GPUS" --peak-tflops "$PEAK" \
      --out "$OUT/train_step_cifar10_bf16_ddp.json" || echo "train_step (DDP): failed or timed out"
  else
    echo "train_step (DDP): not measured (one GPU: no gradient communication)"
  fi
fi

if [[ "$SECTIONS" == *" sample "* ]]; then
  # DDIM-100 at batch 1000 under bf16 autocast, as the sample actors run it on a GPU: eager, compiled (the default,
  # sample.compile_on_gpu) and compiled with CUDA graphs; a compilation counts in the first batch's time. The time of
  # 50,000 images from these 2,000 is a projection, not a measurement: FULL=1 samples all 50,000 (minutes more).
  N=${FULL:+50000}
  LIMIT=${FULL:+600}
  timeout 30 python benchmarks/sampling.py --preset cifar10 --batch 1000 --dtype bf16 --samplers "ddim:100=1000" \
    --out "$OUT/sampling_cifar10_eager.json" || echo "sampling (eager): failed or timed out"
  timeout ${LIMIT:-70} python benchmarks/sampling.py --preset cifar10 --batch 1000 --dtype bf16 --compile \
    --samplers "ddim:100=${N:-2000}" --out "$OUT/sampling_cifar10_compile.json" || echo "sampling (compile): failed or timed out"
  INCEPTION=()
  if [[ $# -ge 1 ]]; then INCEPTION=(--inception-weights "$1" --inception-images 50000); fi
  timeout ${LIMIT:-70} python benchmarks/sampling.py --preset cifar10 --batch 1000 --dtype bf16 --compile --cuda-graphs \
    --samplers "ddim:100=${N:-2000}" "${INCEPTION[@]}" --out "$OUT/sampling_cifar10_compile_cuda_graphs.json" \
    || echo "sampling (compile + CUDA graphs): failed or timed out"
fi

if [[ "$SECTIONS" == *" peer "* ]]; then
  # Our U-Net against diffusers' UNet2DModel at matched architecture, both compiled, bf16 (needs diffusers).
  if python -c "import diffusers" 2>/dev/null; then
    timeout 40 python benchmarks/unet_throughput.py --device cuda --presets cifar10 --variants bf16+compile \
      --repeats 2 --out "$OUT/unet_throughput.json" || echo "unet_throughput: failed or timed out"
  else
    echo "unet_throughput: not measured (diffusers is not installed)"
  fi
fi
