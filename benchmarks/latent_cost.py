"""Training cost per image of latent diffusion against pixel diffusion at the same image size, in one run.

Each round times, one after the other on the same machine: the pipeline's training step of the pixel preset on
images (``train_step.measure``), the same step of the latent preset's U-Net on latents of the autoencoder's shape
(the preset's architecture with ``image_size`` and ``in_channels`` following the latents, as the latent path builds
it), and the autoencoder's encoder and decoder without gradients (:class:`ddpm_core.autoencoder.KLAutoencoder`,
randomly initialised: the cost does not depend on the weights). Rounds alternate so that a drift of the machine
falls on both sides; the ratios are per round, with their median and range.

- ``train_ratio``: pixel step time per image / latent step time per image (latents precomputed, as prepare does).
- ``train_ratio_encoding_online``: the same with the encoder's forward pass paid at every step (no precomputation).
- ``encode_images_per_s`` and ``decode_images_per_s``: what prepare pays once per image, and sampling once per sample.

    python benchmarks/latent_cost.py --pixel-preset image256 --latent-preset cifar10 \\
        --autoencoder-blocks 128 256 512 512 --autoencoder-layers 2 --latent-channels 4 --batch 2 --rounds 3 \\
        --windows 3 --out benchmarks/results/latent_cost_256_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import device_name, synchronize, write_result
from train_step import Settings, measure

from ddpm_core.autoencoder import AutoencoderConfig, KLAutoencoder
from ddpm_core.unet import unet_preset


def codec_rates(autoencoder: KLAutoencoder, images: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Images per second of ``encode`` (the posterior's mean) and ``decode`` on ``images [B, C, H, W]``, the median
    of ``repeats`` timed calls after one untimed call."""
    device = images.device
    with torch.no_grad():
        latents = autoencoder.encode(images).mean  # [B, c, H/f, W/f]; also the warm-up
        autoencoder.decode(latents)
        rates = []
        for call in (lambda: autoencoder.encode(images).mean, lambda: autoencoder.decode(latents)):
            times = []
            for _ in range(repeats):
                synchronize(device)
                started = time.perf_counter()
                call()
                synchronize(device)
                times.append(time.perf_counter() - started)
            rates.append(len(images) / statistics.median(times))
    return rates[0], rates[1]


def one_round(pixel: Settings, latent: Settings, autoencoder: KLAutoencoder, batch: int, repeats: int) -> dict:
    """One round: the pixel step, the latent step, then the encoder and decoder."""
    pixel_row = measure(pixel, batch, "eager", None)
    latent_row = measure(latent, batch, "eager", None)
    config = pixel.unet()
    images = torch.rand(batch, config.in_channels, config.image_size, config.image_size, device=pixel.device) * 2 - 1
    encode, decode = codec_rates(autoencoder, images, repeats)
    pixel_s, latent_s = 1 / pixel_row["images_per_s"], 1 / latent_row["images_per_s"]
    return {
        "pixel": pixel_row,
        "latent": latent_row,
        "encode_images_per_s": encode,
        "decode_images_per_s": decode,
        "train_ratio": pixel_s / latent_s,
        "train_ratio_encoding_online": pixel_s / (latent_s + 1 / encode),
    }


def summary(rounds: list[dict]) -> dict:
    """Median and range over rounds of each ratio and rate."""
    keys = ("train_ratio", "train_ratio_encoding_online", "encode_images_per_s", "decode_images_per_s")
    out: dict[str, object] = {}
    for key in keys:
        values = [r[key] for r in rounds]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}
    return out


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixel-preset", default="image256")
    parser.add_argument("--latent-preset", default="cifar10", help="U-Net preset; shape follows the latents")
    parser.add_argument("--autoencoder-blocks", type=int, nargs="+", default=[128, 256, 512, 512])
    parser.add_argument("--autoencoder-layers", type=int, default=2)
    parser.add_argument("--latent-channels", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="pixel training steps per timed window")
    parser.add_argument(
        "--latent-steps", type=int, default=20, help="latent training steps per timed window (a step costs less)"
    )
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed encoder and decoder calls per round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args()


def main() -> None:
    args = parse_arguments()
    device = torch.device(args.device)
    pixel_unet = unet_preset(args.pixel_preset)
    autoencoder_config = AutoencoderConfig(
        in_channels=pixel_unet.in_channels,
        out_channels=pixel_unet.in_channels,
        block_out_channels=tuple(args.autoencoder_blocks),
        layers_per_block=args.autoencoder_layers,
        latent_channels=args.latent_channels,
        norm_num_groups=min(32, *args.autoencoder_blocks),
    )
    channels, side, _ = autoencoder_config.latent_shape(pixel_unet.in_channels, pixel_unet.image_size)
    common = (args.windows, None, 10, 0)
    pixel = Settings(args.pixel_preset, device, args.dtype, args.steps, *common)
    latent_shape = (("image_size", side), ("in_channels", channels))
    latent = Settings(args.latent_preset, device, args.dtype, args.latent_steps, *common, overrides=latent_shape)
    autoencoder = KLAutoencoder(autoencoder_config).to(device).eval()
    header = {
        "benchmark": "latent_cost",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device_name": device_name(device),
        "autoencoder": {
            **autoencoder_config.to_diffusers(),
            "params": sum(p.numel() for p in autoencoder.parameters()),
        },
        "latent_shape": [channels, side, side],
        "batch": args.batch,
    }
    rounds: list[dict] = []
    for index in range(args.rounds):
        rounds.append(one_round(pixel, latent, autoencoder, args.batch, args.repeats))
        write_result(args.out, {**header, "rounds": rounds, "summary": summary(rounds)})
        print(f"round {index + 1}: train ratio {rounds[-1]['train_ratio']:.2f}", flush=True)
    print(markdown(summary(rounds)))


def markdown(result: dict) -> str:
    lines = ["| quantity | median | range |", "|---|---|---|"]
    for key, value in result.items():
        lines.append(f"| {key} | {value['median']:.3g} | {value['min']:.3g} - {value['max']:.3g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
