"""The DDPM U-Net (Ho et al. 2020, Sec. 4 and Appendix B; the official ``diffusion_tf/models/unet.py``).

A PixelCNN++-style U-Net of wide ResNet blocks with GroupNorm, a sinusoidal timestep embedding added inside every
block, self-attention at chosen resolutions, dropout, and optional class conditioning with a null class for
classifier-free guidance. Output and residual-branch convolutions start at zero, as in the official code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_core.fields import FieldError


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the U-Net (serialised with every snapshot)."""

    image_size: int = 32
    in_channels: int = 3
    out_channels: int | None = None  # None: in_channels (x2 when the diffusion learns its variance)
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_classes: int | None = None  # class conditioning; label ``num_classes`` is the null class
    norm_groups: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise FieldError(
                "unet", "channel_mult", f" must be a non-empty list of positive ints, got {list(self.channel_mult)}"
            )
        downsampling = 2 ** (len(self.channel_mult) - 1)
        if self.image_size < 1 or self.image_size % downsampling:
            raise FieldError(
                "unet",
                "image_size",
                f" {self.image_size} must be divisible by {downsampling} "
                f"(2 ** (len(channel_mult) - 1)) for {len(self.channel_mult)} levels",
            )
        resolutions = {self.image_size // 2**level for level in range(len(self.channel_mult))}
        unknown = sorted(set(self.attention_resolutions) - resolutions)
        if unknown:
            raise FieldError(
                "unet",
                "attention_resolutions",
                f" {unknown} are not among the U-Net's resolutions {sorted(resolutions)}",
            )
        for multiplier in self.channel_mult:
            if (self.base_channels * multiplier) % self.norm_groups:
                raise FieldError(
                    "unet",
                    "base_channels",
                    f" * {multiplier} = {self.base_channels * multiplier} is not divisible "
                    f"by norm_groups = {self.norm_groups}",
                )
        if not 0.0 <= self.dropout < 1.0:
            raise FieldError("unet", "dropout", f" must lie in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes < 1:
            raise FieldError("unet", "num_classes", f" must be >= 1 or null, got {self.num_classes}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["channel_mult"], data["attention_resolutions"] = list(self.channel_mult), list(self.attention_resolutions)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> UNetConfig:
        return cls(**data)


PRESETS: dict[str, UNetConfig] = {
    # The paper's CIFAR-10 model: 35.7M parameters.
    "cifar10": UNetConfig(
        image_size=32,
        in_channels=3,
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.1,
    ),
    # The paper's 256x256 model (CelebA-HQ, LSUN; Ho et al. 2020, App. B): six resolutions from 256x256 to 8x8 with
    # the official code's multipliers (1, 1, 2, 2, 4, 4), two residual blocks each, attention at 16x16: 113.7M
    # parameters (the paper: 114M). Dropout 0 as for the paper's LSUN and CelebA-HQ runs.
    "image256": UNetConfig(
        image_size=256,
        in_channels=3,
        base_channels=128,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.0,
    ),
    # 64x64 images: the paper has no such model; this is the multiplier sequence of its successors at 64x64
    # (Nichol & Dhariwal 2021; Dhariwal & Nichol 2021: (1, 2, 3, 4)) with the paper's block and attention layout.
    "image64": UNetConfig(
        image_size=64,
        in_channels=3,
        base_channels=128,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.1,
    ),
    # scikit-learn digits (8x8, 1 channel): small enough to train usefully on a 2-core CPU in minutes.
    "digits": UNetConfig(
        image_size=8,
        in_channels=1,
        base_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        dropout=0.0,
        norm_groups=8,
    ),
    # MNIST (28x28, 1 channel).
    "mnist": UNetConfig(
        image_size=28,
        in_channels=1,
        base_channels=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(7,),
        dropout=0.1,
    ),
}


def unet_preset(name: str, **overrides: object) -> UNetConfig:
    """A named preset, with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown U-Net preset {name!r}; choose one of {sorted(PRESETS)}")
    return UNetConfig(**{**PRESETS[name].to_dict(), **overrides})


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding ``[B] -> [B, dim]`` (Vaswani et al. 2017, Sec. 3.5; the official DDPM code's
    ``get_timestep_embedding``: frequencies ``exp(-log(10000) i / (dim/2 - 1))``, sin then cos)."""
    half = dim // 2
    frequencies = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / (half - 1)
    )
    angles = timesteps.float()[:, None] * frequencies[None, :]  # [B, half]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(embedding, (0, 1)) if dim % 2 else embedding


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise a layer (the official code's ``init_scale=0``) and mark it so :meth:`UNet.reset_parameters`
    keeps it at zero."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    module.zero_init = True  # type: ignore[assignment]  # a plain attribute (Module types only tensors, modules)
    return module


class ResidualBlock(nn.Module):
    """Wide ResNet block with the timestep embedding added after the first convolution."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding = nn.Linear(embedding_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # [B, C_out, H, W]
        h = h + self.embedding(F.silu(embedding))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, residual, through ``scaled_dot_product_attention``."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2)  # [B, HW, 3C]
        # The fused kernels (flash, memory-efficient, cuDNN) need unit stride along the head dimension; an NCHW
        # activation has stride HW there and sends SDPA to its math path (explicit bmm). One copy in NCHW, none in
        # channels-last, where the copy is a no-op.
        q, k, v = qkv.contiguous().unsqueeze(1).chunk(3, dim=-1)  # each [B, 1, HW, C], last-dim stride 1
        h = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        h = h.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj(h)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """``forward(x [B, C, H, W], timesteps [B], class_labels [B] | None) -> [B, C_out, H, W]``."""

    def __init__(self, config: UNetConfig, learn_variance: bool = False) -> None:
        super().__init__()
        self.config = config
        ch, groups = config.base_channels, config.norm_groups
        embedding_dim = 4 * ch
        out_channels = config.out_channels or config.in_channels * (2 if learn_variance else 1)
        self.out_channels = out_channels
        self.time_embedding = nn.Sequential(
            nn.Linear(ch, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim)
        )
        self.class_embedding = nn.Embedding(config.num_classes + 1, embedding_dim) if config.num_classes else None

        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, channels, resolution = [ch], ch, config.image_size
        for level, multiplier in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                block = nn.ModuleList([ResidualBlock(channels, ch * multiplier, embedding_dim, config.dropout, groups)])
                channels = ch * multiplier
                if resolution in config.attention_resolutions:
                    block.append(SelfAttention(channels, groups))
                self.down.append(block)
                skip_channels.append(channels)
            if level != len(config.channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(channels)]))
                skip_channels.append(channels)
                resolution //= 2

        self.middle = nn.ModuleList(
            [
                ResidualBlock(channels, channels, embedding_dim, config.dropout, groups),
                SelfAttention(channels, groups),
                ResidualBlock(channels, channels, embedding_dim, config.dropout, groups),
            ]
        )

        self.up = nn.ModuleList()
        for level, multiplier in reversed(list(enumerate(config.channel_mult))):
            for _ in range(config.num_res_blocks + 1):
                block = nn.ModuleList(
                    [
                        ResidualBlock(
                            channels + skip_channels.pop(), ch * multiplier, embedding_dim, config.dropout, groups
                        )
                    ]
                )
                channels = ch * multiplier
                if resolution in config.attention_resolutions:
                    block.append(SelfAttention(channels, groups))
                self.up.append(block)
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(channels)]))
                resolution *= 2

        self.norm_out = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv_out = _zero(nn.Conv2d(channels, out_channels, 3, padding=1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: ``variance_scaling(1, 'fan_avg', 'uniform')`` (Glorot uniform) weights,
        zero biases, and zero for layers marked by :func:`_zero`."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                if getattr(module, "zero_init", False):
                    nn.init.zeros_(module.weight)
                else:
                    nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _run(self, block: nn.ModuleList, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        for layer in block:
            h = layer(h, embedding) if isinstance(layer, ResidualBlock) else layer(h)
        return h

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        embedding = self.time_embedding(timestep_embedding(timesteps, self.config.base_channels))  # [B, 4ch]
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(
                    "this U-Net is class-conditional: pass class_labels (use num_classes for the null class)"
                )
            embedding = embedding + self.class_embedding(class_labels)
        elif class_labels is not None:
            raise ValueError("class_labels given to a U-Net built without num_classes")

        skips = [self.conv_in(x)]  # [B, ch, H, W]
        for block in self.down:
            skips.append(self._run(cast(nn.ModuleList, block), skips[-1], embedding))
        h = self._run(self.middle, skips[-1], embedding)
        for block in self.up:
            layers = cast(nn.ModuleList, block)
            if isinstance(layers[0], ResidualBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(layers, h, embedding)
        return self.conv_out(F.silu(self.norm_out(h)))
