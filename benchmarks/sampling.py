"""Sampling throughput of the sample stage's own code path (``ddpm_core.samplers.sample`` with per-index noise, in
batches, as one sampling actor runs it), and optionally the feature-extraction throughput of the FID network.

The U-Net is the preset's, freshly initialised: the cost of a step does not depend on the weights. Reports images/s
per sampler and the time for ``--num-samples`` images (measured, not projected: lower ``--num-samples`` for the slow
samplers). ``--dtype bf16`` and ``--compile`` run the network as a sampling actor does with ``sample.bf16_on_gpu``
and ``sample.compile_on_gpu`` (``ddpm_core.samplers.fast_sampling_network``; a compilation counts in the first batch's
time); ``--cuda-graphs`` adds inductor's CUDA graphs to the compiled network (one launch per step).
With ``--inception-weights`` (pt_inception-2015-12-05-6726825d.pth), also times the Inception pool3 extraction of
the generated images, as the evaluate stage does.

    python benchmarks/sampling.py --preset cifar10 --batch 1000 --dtype bf16 \\
        --samplers ddim:100=50000 ancestral:1000=1000 \\
        --out benchmarks/results/sampling_h100.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import device_name, synchronize, write_result

from ddpm_core.data import to_uint8
from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion
from ddpm_core.precision import Precision, autocast_dtype
from ddpm_core.samplers import PerIndexNoise, SamplerConfig, fast_sampling_network, sample
from ddpm_core.unet import UNet, unet_preset


def time_sampler(
    model, diffusion, shape, method: str, steps: int, num_samples: int, batch: int, device
) -> tuple[dict, torch.Tensor]:
    synchronize(device)
    started = time.perf_counter()
    last = None
    for start in range(0, num_samples, batch):
        last = sample(
            model,
            diffusion,
            shape,
            PerIndexNoise(0, range(start, min(start + batch, num_samples)), device),
            SamplerConfig(method=method, num_steps=steps),
        ).samples  # [b, C, H, W]
    synchronize(device)
    seconds = time.perf_counter() - started
    return {
        "method": method,
        "steps": steps,
        "num_samples": num_samples,
        "batch": batch,
        "seconds": seconds,
        "images_per_s": num_samples / seconds,
    }, last


def time_inception(weights: Path, images: torch.Tensor, num_images: int, device) -> dict:
    from ddpm_core.inception import InceptionExtractor, tensors_only_copy

    extractor = InceptionExtractor(tensors_only_copy(weights), "benchmark", device)
    pixels = to_uint8(images)
    repeats = -(-num_images // len(pixels))
    batch = torch.from_numpy(pixels).repeat(repeats, 1, 1, 1)[:num_images].numpy()
    extractor(batch[: extractor.batch_size])  # warm-up
    synchronize(device)
    started = time.perf_counter()
    extractor(batch)
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"num_images": num_images, "seconds": seconds, "images_per_s": num_images / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=[precision.value for precision in Precision],
        default="fp32",
        help="bf16: autocast, as a GPU sampling actor",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile with frozen weights, as sample.compile_on_gpu"
    )
    parser.add_argument("--cuda-graphs", action="store_true", help="with --compile: CUDA graphs replayed per step")
    parser.add_argument(
        "--samplers", nargs="+", default=["ddim:100=50000", "ancestral:1000=1000"], help="method:steps=num_samples"
    )
    parser.add_argument("--inception-weights", type=Path, default=None)
    parser.add_argument("--inception-images", type=int, default=50_000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.cuda_graphs and not args.compile:
        parser.error("--cuda-graphs needs --compile (inductor captures the graphs)")
    device = torch.device(args.device)
    config = unet_preset(args.preset)
    torch.manual_seed(0)
    model = fast_sampling_network(
        UNet(config).to(device).eval(), autocast_dtype(args.dtype), args.compile, args.cuda_graphs
    )
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    shape = (config.in_channels, config.image_size, config.image_size)
    result = {
        "benchmark": "sampling",
        "preset": args.preset,
        "dtype": args.dtype,
        "compile": args.compile,
        "cuda_graphs": args.cuda_graphs,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device_name": device_name(device),
        "rows": [],
        "inception": None,
    }
    images = None
    for spec in args.samplers:
        name, num_samples = spec.split("=")
        method, steps = name.split(":")
        row, images = time_sampler(model, diffusion, shape, method, int(steps), int(num_samples), args.batch, device)
        result["rows"].append(row)
        write_result(args.out, result)  # each sampler's row kept, should a later one run out of time
        print(
            f"{method} {steps} steps: {row['num_samples']} images in {row['seconds']:.1f} s "
            f"({row['images_per_s']:.1f} img/s)",
            flush=True,
        )
    if args.inception_weights is not None:
        result["inception"] = time_inception(args.inception_weights, images, args.inception_images, device)
        print(
            f"Inception features: {args.inception_images} images in {result['inception']['seconds']:.1f} s", flush=True
        )
    write_result(args.out, result)


if __name__ == "__main__":
    main()
