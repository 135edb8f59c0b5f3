"""Training and sampling throughput of our U-Net against diffusers' UNet2DModel at matched architecture.

Both networks are built with the same widths, depth, attention resolutions (single-head), GroupNorm groups and
dropout, and timed alternately in one process so that machine noise hits both alike. Training = forward, backward
and an AdamW step on the eps-MSE loss; sampling = one no-grad forward (one denoising step). Each ``--variants`` entry
is applied to both networks alike, or to ours only with ``--peer-variant`` (``eager``: diffusers as shipped):
``eager``; ``channels_last`` (NHWC weights and inputs); ``compile`` (``torch.compile``; for sampling with inductor's
weight freezing, the sample actors' compiled path); ``bf16`` (autocast to bfloat16, as on GPUs; on a CPU
fast only with native bf16 instructions, e.g. AVX512_BF16 or AMX); or several joined by ``+``, e.g.
``channels_last+compile``.
Reports the median of the repeats, the ratio ours / diffusers (> 1: ours is faster), and, to say how much any
implementation could still gain, the FLOP/s our denoising step reaches against a large matmul of its precision
(float32, or bfloat16 for ``bf16``) on the same device (the attainable peak of the convolutions' GEMM kernels).

    python benchmarks/unet_throughput.py --variants eager channels_last compile \\
        --out benchmarks/results/unet_throughput_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import device_name, synchronize, variant_switches, write_result
from diffusers import UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

from ddpm_core.samplers import fast_sampling_network
from ddpm_core.unet import UNet, UNetConfig, unet_preset

SWITCHES = ("channels_last", "compile", "bf16")  # a variant: "eager" (none) or switches joined by "+"

# batch sizes per preset and device type: big enough to be representative, small enough for a 2-core CPU
BATCH = {
    ("digits", "cpu"): (128, 256),
    ("cifar10", "cpu"): (8, 16),
    ("digits", "cuda"): (512, 1024),
    ("cifar10", "cuda"): (128, 256),
}


def diffusers_twin(config: UNetConfig) -> UNet2DModel:
    """A UNet2DModel with the same architecture as our U-Net config (the diffusers 'google/ddpm-*' layout)."""
    resolutions = [config.image_size // 2**level for level in range(len(config.channel_mult))]
    attention = [resolution in config.attention_resolutions for resolution in resolutions]
    widths = [config.base_channels * m for m in config.channel_mult]
    assert len({widths[i] for i, a in enumerate(attention) if a}) <= 1, "single-head twin needs one attention width"
    head_dim = next((w for w, a in zip(widths, attention, strict=True) if a), widths[-1])
    return UNet2DModel(
        sample_size=config.image_size,
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        layers_per_block=config.num_res_blocks,
        block_out_channels=tuple(widths),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        norm_num_groups=config.norm_groups,
        dropout=config.dropout,
        attention_head_dim=head_dim,
        add_attention=True,
        norm_eps=1e-6,
    )


def time_training(
    model, forward, batch: int, config: UNetConfig, device, repeats: int, channels_last: bool
) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    t = torch.randint(0, 1000, (batch,), device=device)
    model.train()
    rates = []
    for repeat in range(repeats + 1):  # the first is a warm-up (and the compilation)
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
def time_sampling(
    model, forward, batch: int, config: UNetConfig, device, repeats: int, channels_last: bool
) -> list[float]:
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
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


class EpsOutput(torch.nn.Module):
    """diffusers' network returning the eps tensor itself (not a ``UNet2DOutput``), as our samplers expect."""

    def __init__(self, model: UNet2DModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W], [B] -> [B, C, H, W]
        return self.model(x, t).sample


def forwards(network: str, model: torch.nn.Module, switches: set[str]) -> tuple:
    """(training forward, sampling forward) of ``model``, each ``f(model, x, t) -> eps``; both networks denoise
    through ``fast_sampling_network``, as our sample actors do, and train under autocast as our trainer does."""
    compile, autocast = "compile" in switches, torch.bfloat16 if "bf16" in switches else None
    eps_model = model if network == "ours" else EpsOutput(model)
    train_model = torch.compile(eps_model, dynamic=False) if compile else eps_model
    sample_model = fast_sampling_network(eps_model, autocast, compile)

    def train_forward(_, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            return train_model(x, t).float()

    return train_forward, (lambda _, x, t: sample_model(x, t))


def forward_flops_per_image(model: torch.nn.Module, config: UNetConfig, device) -> float:
    x = torch.randn(2, config.in_channels, config.image_size, config.image_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.full((2,), 500, device=device))
    return counter.get_total_flops() / 2


def matmul_gflops(device, dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a large square matmul in ``dtype``: the attainable peak of the GEMM kernels convolutions lower to."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    rates = []
    for repeat in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        if repeat:
            rates.append(2 * size**3 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def measure(
    preset: str,
    variant: str,
    peer_variant: str,
    device: torch.device,
    repeats: int,
    matmul_gflops_by_dtype: dict[str, float],
) -> dict:
    """Ours under ``variant`` against diffusers under ``peer_variant``, alternating ``repeats`` times."""
    config = unet_preset(preset)
    torch.manual_seed(0)
    switches = {"ours": variant_switches(variant, SWITCHES), "diffusers": variant_switches(peer_variant, SWITCHES)}
    models = {"ours": UNet(config), "diffusers": diffusers_twin(config)}
    for name, model in models.items():
        memory_format = torch.channels_last if "channels_last" in switches[name] else torch.contiguous_format
        model.to(device, memory_format=memory_format)
    paths = {name: forwards(name, model, switches[name]) for name, model in models.items()}
    train_batch, sample_batch = BATCH[(preset, device.type)]
    rates = {name: {"train": [], "sample": []} for name in models}
    for _ in range(repeats):  # alternate the two networks
        for name, model in models.items():
            train_forward, sample_forward = paths[name]
            channels_last = "channels_last" in switches[name]
            rates[name]["train"] += time_training(model, train_forward, train_batch, config, device, 1, channels_last)
            rates[name]["sample"] += time_sampling(
                model, sample_forward, sample_batch, config, device, 1, channels_last
            )
    row = {
        "preset": preset,
        "variant": variant,
        "peer_variant": peer_variant,
        "device": device.type,
        "train_batch": train_batch,
        "sample_batch": sample_batch,
        "repeats": repeats,
    }
    for name, model in models.items():
        row[f"{name}_params"] = sum(p.numel() for p in model.parameters())
        row[f"{name}_train_img_s"] = statistics.median(rates[name]["train"])
        row[f"{name}_sample_img_s"] = statistics.median(rates[name]["sample"])
        row[f"{name}_train_window_img_s"], row[f"{name}_sample_window_img_s"] = (
            rates[name]["train"],
            rates[name]["sample"],
        )
    row["train_ratio"] = row["ours_train_img_s"] / row["diffusers_train_img_s"]
    row["sample_ratio"] = row["ours_sample_img_s"] / row["diffusers_sample_img_s"]
    row["gflop_per_image_fwd"] = forward_flops_per_image(models["ours"], config, device) / 1e9
    row["ours_sample_gflops"] = row["gflop_per_image_fwd"] * row["ours_sample_img_s"]
    row["ours_sample_matmul_fraction"] = (
        row["ours_sample_gflops"] / matmul_gflops_by_dtype["bf16" if "bf16" in switches["ours"] else "fp32"]
    )
    return row


def markdown(result: dict) -> str:
    lines = [
        f"Device: {result['device_name']}; torch {result['torch']}; {result['threads']} threads; "
        f"median of {result['rows'][0]['repeats']} alternating repeats; matmul {result['matmul_gflops']:.0f} GFLOP/s "
        f"float32, {result['matmul_gflops_bf16']:.0f} bfloat16.",
        "",
        "| preset | variant ours / diffusers | params ours / diffusers | train batch | train img/s ours "
        "| train img/s diffusers | ratio | "
        "sample batch | denoise img/s ours | denoise img/s diffusers | ratio | ours denoise GFLOP/s (of matmul's) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['preset']} | {r['variant']} / {r['peer_variant']} "
            f"| {r['ours_params'] / 1e6:.2f}M / {r['diffusers_params'] / 1e6:.2f}M | "
            f"{r['train_batch']} | {r['ours_train_img_s']:.1f} | {r['diffusers_train_img_s']:.1f} "
            f"| {r['train_ratio']:.2f} | "
            f"{r['sample_batch']} | {r['ours_sample_img_s']:.1f} | {r['diffusers_sample_img_s']:.1f} "
            f"| {r['sample_ratio']:.2f} | "
            f"{r['ours_sample_gflops']:.0f} ({r['ours_sample_matmul_fraction']:.0%}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["digits", "cifar10"])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["eager"],
        help=f"ours: 'eager' or switches joined by '+' from {', '.join(SWITCHES)}",
    )
    parser.add_argument(
        "--peer-variant",
        default=None,
        help="diffusers' variant (default: the same as ours), e.g. 'eager' for diffusers as shipped",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True, help="JSON output path")
    args = parser.parse_args()
    device = torch.device(args.device)
    for variant in [*args.variants, *([args.peer_variant] if args.peer_variant else [])]:
        try:
            variant_switches(variant, SWITCHES)
        except ValueError as error:
            parser.error(str(error))
    matmul = {"fp32": matmul_gflops(device), "bf16": matmul_gflops(device, torch.bfloat16)}
    result = {
        "benchmark": "unet_throughput",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device_name": device_name(device),
        "matmul_gflops": matmul["fp32"],
        "matmul_gflops_bf16": matmul["bf16"],
        "rows": [
            measure(preset, variant, args.peer_variant or variant, device, args.repeats, matmul)
            for preset in args.presets
            for variant in args.variants
        ],
    }
    write_result(args.out, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
