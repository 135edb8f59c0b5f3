"""Training and sampling throughput of our U-Net against diffusers' UNet2DModel at matched architecture.

Both networks are built with the same widths, depth, attention resolutions (single-head), GroupNorm groups and
dropout, and timed alternately in one process so that machine noise hits both alike. Training = forward, backward
and an AdamW step on the eps-MSE loss; sampling = one no-grad forward (one denoising step). Reports the median of
the repeats and the ratio ours / diffusers (> 1: ours is faster).

    python benchmarks/unet_throughput.py --out benchmarks/results/unet_throughput_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel

from common import device_name, synchronize, write_result
from ddpm_core.unet import UNet, UNetConfig, unet_preset

# batch sizes per preset and device type: big enough to be representative, small enough for a 2-core CPU
BATCH = {("digits", "cpu"): (128, 256), ("cifar10", "cpu"): (8, 16),
         ("digits", "cuda"): (512, 1024), ("cifar10", "cuda"): (128, 256)}


def diffusers_twin(config: UNetConfig) -> UNet2DModel:
    """A UNet2DModel with the same architecture as our U-Net config (the diffusers 'google/ddpm-*' layout)."""
    resolutions = [config.image_size // 2**level for level in range(len(config.channel_mult))]
    attention = [resolution in config.attention_resolutions for resolution in resolutions]
    widths = [config.base_channels * m for m in config.channel_mult]
    assert len(set(widths[i] for i, a in enumerate(attention) if a)) <= 1, "single-head twin needs one attention width"
    head_dim = next((w for w, a in zip(widths, attention) if a), widths[-1])
    return UNet2DModel(
        sample_size=config.image_size, in_channels=config.in_channels, out_channels=config.in_channels,
        layers_per_block=config.num_res_blocks, block_out_channels=tuple(widths),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        norm_num_groups=config.norm_groups, dropout=config.dropout, attention_head_dim=head_dim,
        add_attention=True, norm_eps=1e-6,
    )



def time_training(model, forward, batch: int, config: UNetConfig, device, repeats: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    model.train()
    rates = []
    for repeat in range(repeats + 1):  # the first is a warm-up
        synchronize(device)
        start = time.perf_counter()
        loss = (forward(model, x, t) - x).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(device)
        if repeat:
            rates.append(batch / (time.perf_counter() - start))
    return rates


@torch.no_grad()
def time_sampling(model, forward, batch: int, config: UNetConfig, device, repeats: int) -> list[float]:
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size, device=device)
    t = torch.full((batch,), 500, device=device)
    model.eval()
    rates = []
    for repeat in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        forward(model, x, t)
        synchronize(device)
        if repeat:
            rates.append(batch / (time.perf_counter() - start))
    return rates


def ours_forward(model, x, t):
    return model(x, t)


def diffusers_forward(model, x, t):
    return model(x, t).sample


def measure(preset: str, device: torch.device, repeats: int) -> dict:
    config = unet_preset(preset)
    torch.manual_seed(0)
    models = {"ours": (UNet(config).to(device), ours_forward), "diffusers": (diffusers_twin(config).to(device), diffusers_forward)}
    train_batch, sample_batch = BATCH[(preset, device.type)]
    rates = {name: {"train": [], "sample": []} for name in models}
    for _ in range(repeats):  # alternate the two networks
        for name, (model, forward) in models.items():
            rates[name]["train"] += time_training(model, forward, train_batch, config, device, 1)
            rates[name]["sample"] += time_sampling(model, forward, sample_batch, config, device, 1)
    row = {"preset": preset, "device": device.type, "train_batch": train_batch, "sample_batch": sample_batch,
           "repeats": repeats}
    for name, (model, _) in models.items():
        row[f"{name}_params"] = sum(p.numel() for p in model.parameters())
        row[f"{name}_train_img_s"] = statistics.median(rates[name]["train"])
        row[f"{name}_sample_img_s"] = statistics.median(rates[name]["sample"])
    row["train_ratio"] = row["ours_train_img_s"] / row["diffusers_train_img_s"]
    row["sample_ratio"] = row["ours_sample_img_s"] / row["diffusers_sample_img_s"]
    return row


def markdown(result: dict) -> str:
    lines = [f"Device: {result['device_name']}; torch {result['torch']}; {result['threads']} threads; "
             f"median of {result['rows'][0]['repeats']} alternating repeats.", "",
             "| preset | params ours / diffusers | train batch | train img/s ours | train img/s diffusers | ratio | "
             "sample batch | denoise img/s ours | denoise img/s diffusers | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['preset']} | {r['ours_params'] / 1e6:.2f}M / {r['diffusers_params'] / 1e6:.2f}M | {r['train_batch']} | "
                     f"{r['ours_train_img_s']:.1f} | {r['diffusers_train_img_s']:.1f} | {r['train_ratio']:.2f} | "
                     f"{r['sample_batch']} | {r['ours_sample_img_s']:.1f} | {r['diffusers_sample_img_s']:.1f} | {r['sample_ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["digits", "cifar10"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="JSON output path")
    args = parser.parse_args()
    device = torch.device(args.device)
    result = {
        "benchmark": "unet_throughput", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device_name": device_name(device),
        "rows": [measure(preset, device, args.repeats) for preset in args.presets],
    }
    write_result(args.out, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
