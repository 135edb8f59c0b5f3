"""Single-process demo: train a DDPM on the bundled digits, sample from its EMA weights, write a grid PNG.

``python -m ddpm_core.demo --out outputs/demo`` (the Ray pipeline runs the same library distributed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ddpm_core.checkpoint import save_snapshot
from ddpm_core.data import load_dataset, to_model_range, to_uint8
from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion
from ddpm_core.ema import EMA
from ddpm_core.images import save_grid
from ddpm_core.samplers import PerIndexNoise, SamplerConfig, sample
from ddpm_core.training import OptimConfig, make_optimizer, train_step
from ddpm_core.unet import UNet, unet_preset


def train_and_sample(
    out: Path,
    train_images: int,
    batch_size: int,
    num_samples: int,
    seed: int,
    sampler: SamplerConfig,
    log_every: int = 50,
) -> dict:
    """Train on ``builtin:digits`` for ``train_images`` images, then sample; returns a summary dict."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    dataset = load_dataset("builtin:digits")
    data = to_model_range(dataset.images)  # [1797, 1, 8, 8]
    unet_config = unet_preset("digits")
    diffusion_config = DiffusionConfig()
    diffusion = GaussianDiffusion.from_config(diffusion_config)
    model = UNet(unet_config)
    optim = OptimConfig(lr=1e-3, warmup_images=10_000, ema_decay=0.999, ema_warmup=True)
    optimizer, ema = make_optimizer(model, optim), EMA(model, optim.ema_decay, optim.ema_warmup)

    seen, step, start, first_loss, recent = 0, 0, time.time(), None, []
    while seen < train_images:
        batch = data[torch.randint(0, data.shape[0], (batch_size,), generator=generator)]
        result = train_step(model, diffusion, optimizer, batch, optim, seen, ema, generator=generator)
        seen, step = seen + batch_size, step + 1
        recent.append(float(result.loss))
        if step % log_every == 0:
            mean_loss = sum(recent) / len(recent)
            first_loss = mean_loss if first_loss is None else first_loss
            print(
                f"step {step:5d}  images {seen:7d}  loss {mean_loss:.4f}  {seen / (time.time() - start):.0f} img/s",
                flush=True,
            )
            recent = []
    train_seconds = time.time() - start

    save_snapshot(str(out / "snapshot"), ema.model, unet_config, diffusion_config, {"images_seen": seen})
    start = time.time()
    sampled = sample(ema.model, diffusion, (1, 8, 8), PerIndexNoise(seed, range(num_samples)), sampler)
    pixels = to_uint8(sampled.samples)
    save_grid(pixels, str(out / "samples.png"), columns=10)
    data_pixels = dataset.images.astype("float64") / 255.0
    sample_pixels = pixels.astype("float64") / 255.0
    summary = {
        "train_images": seen,
        "train_seconds": round(train_seconds, 1),
        "sample_seconds": round(time.time() - start, 1),
        "first_logged_loss": first_loss,
        "last_logged_loss": sum(recent) / len(recent) if recent else mean_loss,
        "data_pixel_mean": float(data_pixels.mean()),
        "data_pixel_std": float(data_pixels.std()),
        "sample_pixel_mean": float(sample_pixels.mean()),
        "sample_pixel_std": float(sample_pixels.std()),
        "grid": str(out / "samples.png"),
        "snapshot": str(out / "snapshot"),
        "sampler": sampler.to_dict(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder")
    parser.add_argument("--train-images", type=int, default=150_000, help="training length in images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--sampler", choices=["ancestral", "ddim"], default="ancestral")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: all T)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = train_and_sample(
        args.out,
        args.train_images,
        args.batch_size,
        args.num_samples,
        args.seed,
        SamplerConfig(method=args.sampler, num_steps=args.steps),
    )
    print(json.dumps(summary, indent=2))
    print(f"\nSample grid: {summary['grid']}")


if __name__ == "__main__":
    main()
