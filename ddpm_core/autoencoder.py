"""The first stage of latent diffusion: a KL-regularised convolutional autoencoder (Rombach et al. 2022, Sec. 3.1
and App. G), laid out parameter for parameter like diffusers' ``AutoencoderKL``.

The encoder maps an image ``x [B, C, H, W]`` in [-1, 1] to a diagonal Gaussian ``q(z | x)`` over latents
``[B, c, H/f, W/f]`` (f = 2^(levels - 1)); the decoder maps a latent back to an image. Training minimises the L1
reconstruction plus a small KL to N(0, I) (LDM's "KL-reg", weight ~1e-6), which keeps the latent space from drifting
to arbitrary scales without forcing it to be Gaussian. The diffusion model then works on ``scaling_factor * (z -
shift_factor)``, the latents brought to about unit variance (LDM Sec. 4.3.2: 1/std of the first batch's latents).

The same state-dict keys and config fields as diffusers mean that a published VAE (``config.json`` +
``diffusion_pytorch_model.safetensors``, e.g. Stable Diffusion's) loads directly (:mod:`ddpm_core.autoencoder_weights`),
and that an autoencoder trained here opens in diffusers.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_core.discriminator import Adversary, adversarial_terms, discriminator_step
from ddpm_core.ema import EMA
from ddpm_core.fields import FieldError, check_ranges
from ddpm_core.training import OptimConfig, apply_update
from ddpm_core.unet import Upsample  # nearest-neighbour doubling, then a 3x3 convolution

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
_EPS = 1e-6  # GroupNorm epsilon of every norm in the autoencoder (diffusers' resnet_eps)
# config.json fields of diffusers' AutoencoderKL that do not change the network's function
_INERT_FIELDS = ("_class_name", "_diffusers_version", "_name_or_path", "sample_size", "force_upcast")


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture and latent scaling of the autoencoder (the fields of diffusers' ``AutoencoderKL`` config)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64, 128, 128)  # one level per entry; f = 2^(levels - 1)
    layers_per_block: int = 1  # ResNet blocks per encoder level (the decoder has one more)
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 1.0  # diffusion latents are scaling_factor * (z - shift_factor)
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        check_ranges(
            "autoencoder",
            {
                "in_channels": (self.in_channels >= 1, self.in_channels),
                "out_channels": (self.out_channels >= 1, self.out_channels),
                "block_out_channels": (len(self.block_out_channels) >= 1, self.block_out_channels),
                "layers_per_block": (self.layers_per_block >= 1, self.layers_per_block),
                "latent_channels": (self.latent_channels >= 1, self.latent_channels),
                "norm_num_groups": (self.norm_num_groups >= 1, self.norm_num_groups),
                "scaling_factor": (self.scaling_factor > 0, self.scaling_factor),
            },
        )
        uneven = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if uneven:
            raise FieldError(
                "autoencoder",
                "block_out_channels",
                f": {uneven} are not multiples of norm_num_groups={self.norm_num_groups}",
            )

    @property
    def downsampling_factor(self) -> int:
        """f: each side of a latent is the image's side divided by f."""
        return int(2 ** (len(self.block_out_channels) - 1))

    def latent_shape(self, channels: int, image_size: int) -> tuple[int, int, int]:
        """``(c, H/f, W/f)`` of the latents of square ``image_size`` images with ``channels`` channels."""
        if channels != self.in_channels:
            raise FieldError("autoencoder", "in_channels", f" is {self.in_channels}; the images have {channels}")
        if image_size % self.downsampling_factor:
            raise FieldError(
                "autoencoder",
                "block_out_channels",
                f": image size {image_size} is not divisible by the downsampling factor {self.downsampling_factor}",
            )
        side = image_size // self.downsampling_factor
        return (self.latent_channels, side, side)

    def to_diffusers(self) -> dict[str, Any]:
        """The ``config.json`` of diffusers' ``AutoencoderKL`` with this architecture."""
        levels = len(self.block_out_channels)
        data: dict[str, Any] = {"_class_name": "AutoencoderKL", **asdict(self)}
        data["block_out_channels"] = list(self.block_out_channels)
        data["down_block_types"] = [DOWN_BLOCK] * levels
        data["up_block_types"] = [UP_BLOCK] * levels
        data["act_fn"] = "silu"
        return data

    @classmethod
    def from_diffusers(cls, data: dict[str, Any], source: str = "config.json") -> AutoencoderConfig:
        """Read diffusers' ``AutoencoderKL`` config; anything this implementation would not reproduce is refused
        with its field named (other block types, another activation, per-channel latent statistics)."""
        fields = dict(data)
        if fields.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise FieldError(source, "_class_name", f": expected AutoencoderKL, got {fields['_class_name']!r}")
        for name, kind in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
            other = sorted({block for block in fields.pop(name, [kind]) if block != kind})
            if other:
                raise FieldError(source, name, f": only {kind} is supported, got {other}")
        if fields.pop("act_fn", "silu") != "silu":
            raise FieldError(source, "act_fn", f": only silu is supported, got {data['act_fn']!r}")
        for name in ("latents_mean", "latents_std"):
            if fields.pop(name, None) is not None:
                raise FieldError(source, name, ": per-channel latent statistics are not supported; use scaling_factor")
        for name in _INERT_FIELDS:
            fields.pop(name, None)
        if fields.get("shift_factor") is None:
            fields["shift_factor"] = 0.0
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            known = sorted(cls.__dataclass_fields__)
            raise FieldError(source, unknown[0], f": unknown AutoencoderKL field (known: {known})")
        return cls(**fields)


@dataclass(frozen=True)
class DiagonalGaussian:
    """``q(z | x) = N(mean, diag(exp(logvar)))``, each ``[B, c, h, w]``; logvar clamped to [-30, 20] as in LDM."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = moments.chunk(2, dim=1)  # moments [B, 2c, h, w] -> two [B, c, h, w]
        return cls(mean, logvar.clamp(-30.0, 20.0))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``z = mean + exp(logvar / 2) * noise`` (the reparameterisation trick, Kingma & Welling 2014, Sec. 2.4)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def kl(self) -> torch.Tensor:
        """``KL(q || N(0, I))`` per example, in nats: ``0.5 * sum(mean^2 + var - 1 - logvar)`` (Kingma & Welling 2014,
        App. B); ``[B]``."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(dim=1)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a (1x1 where the width changes) shortcut; no timestep input."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # [B, C_out, H, W]
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Attention(nn.Module):
    """Single-head self-attention over the h*w positions with a residual (the autoencoder's middle block)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, hw, C]
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))  # [B, hw, C]
        h = self.to_out[0](h).transpose(1, 2).reshape(batch, channels, height, width)
        return x + h


class MidBlock(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Downsampler(nn.Module):
    """Halve each side: pad one pixel right and bottom, then a stride-2 3x3 convolution (LDM's asymmetric pad)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution of the encoder or decoder: ``layers`` ResNet blocks, then the resampler of its subclass."""

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * layers
        self.resnets = nn.ModuleList([ResnetBlock(a, b, groups) for a, b in itertools.pairwise(widths)])

    def resamplers(self) -> nn.ModuleList:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        for sampler in self.resamplers():
            x = sampler(x)
        return x


class DownLevel(Level):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool) -> None:
        super().__init__(in_channels, out_channels, layers, groups)
        self.downsamplers = nn.ModuleList([Downsampler(out_channels)] if downsample else [])

    def resamplers(self) -> nn.ModuleList:
        return self.downsamplers


class UpLevel(Level):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool) -> None:
        super().__init__(in_channels, out_channels, layers, groups)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def resamplers(self) -> nn.ModuleList:
        return self.upsamplers


class Encoder(nn.Module):
    """``x [B, C, H, W] -> moments [B, 2c, H/f, W/f]`` (mean and log-variance stacked on channels)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        inputs = (widths[0], *widths[:-1])
        self.down_blocks = nn.ModuleList(
            [
                DownLevel(a, b, config.layers_per_block, groups, downsample=i < len(widths) - 1)
                for i, (a, b) in enumerate(zip(inputs, widths, strict=True))
            ]
        )
        self.mid_block = MidBlock(widths[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """``z [B, c, h, w] -> x [B, C, h*f, w*f]``."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        widths, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, config.mid_block_add_attention)
        inputs = (widths[0], *widths[:-1])
        self.up_blocks = nn.ModuleList(
            [
                UpLevel(a, b, config.layers_per_block + 1, groups, upsample=i < len(widths) - 1)
                for i, (a, b) in enumerate(zip(inputs, widths, strict=True))
            ]
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class KLAutoencoder(nn.Module):
    """The autoencoder: :meth:`encode` gives ``q(z | x)``; :meth:`decode` an image; :meth:`to_latent` and
    :meth:`from_latent` convert between z and the scaled latents the diffusion model sees."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """``x [B, C, H, W]`` in [-1, 1] -> ``q(z | x)`` over ``[B, c, H/f, W/f]``."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent ``z [B, c, h, w]`` -> image ``[B, C, h*f, w*f]`` (not clipped)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction of ``x`` through a sampled latent, and the posterior it was sampled from."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior

    def to_latent(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latent: ``scaling_factor * (z - shift_factor)``."""
        return self.config.scaling_factor * (z - self.config.shift_factor)

    def from_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_latent`."""
        return latent / self.config.scaling_factor + self.config.shift_factor


def autoencoder_loss(
    x: torch.Tensor, reconstruction: torch.Tensor, posterior: DiagonalGaussian, kl_weight: float
) -> dict[str, torch.Tensor]:
    """LDM's first-stage objective without the perceptual and adversarial terms (Rombach et al. 2022, App. G):
    ``|x - D(z)|_1 + kl_weight * KL(q(z|x) || N(0, I))``, both summed over an image's dimensions and averaged over
    the batch, then divided by the pixel count so that the value reads as a mean absolute error. Returns the
    scalar ``loss`` and its per-example terms ``l1`` and ``kl`` (``[B]``, nats for ``kl``)."""
    pixels = x[0].numel()
    l1 = (x - reconstruction).abs().flatten(1).sum(dim=1)  # [B]
    kl = posterior.kl()  # [B]
    loss = (l1 + kl_weight * kl).mean() / pixels
    return {"loss": loss, "l1": l1 / pixels, "kl": kl}


def autoencoder_train_step(
    model: KLAutoencoder,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    optim: OptimConfig,
    images_seen: int,
    kl_weight: float,
    generator: torch.Generator | None = None,
    ema: EMA | None = None,
    adversary: Adversary | None = None,
) -> dict[str, torch.Tensor]:
    """One step on :func:`autoencoder_loss` for images ``x [B, C, H, W]`` in [-1, 1]: a latent sampled from
    ``q(z | x)`` with ``generator``, decoded, the gradient applied as the diffusion model's is (warm-up learning rate,
    clipping, AdamW, EMA: :func:`ddpm_core.training.apply_update`). With an ``adversary`` past its warm-up, the loss
    adds the adaptively weighted adversarial term (Esser et al. 2021, Eq. 7) and the discriminator then takes a step
    on the same reconstructions (:mod:`ddpm_core.discriminator`). Returns the loss terms, detached; ``loss`` is the
    whole objective."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    reconstruction, posterior = model(x, generator)
    terms = autoencoder_loss(x, reconstruction, posterior, kl_weight)
    active = adversary if adversary is not None and adversary.active(images_seen) else None
    if active is not None:
        terms |= adversarial_terms(model, active, terms["loss"], reconstruction)
        terms["loss"] = terms["loss"] + terms["adaptive_weight"] * terms["adversarial"]
    terms["loss"].backward()
    grad_norm = apply_update(model, optimizer, optim, images_seen, ema)
    detached = {name: value.detach() for name, value in terms.items()}
    if active is not None:
        detached |= discriminator_step(active, x, reconstruction, optim.grad_clip)
    return {**detached, "grad_norm": grad_norm}


def latent_scaling_factor(latents: torch.Tensor) -> float:
    """LDM's rescaling (Sec. 4.3.2 and App. G): ``1 / std`` of a batch of unscaled latents ``[N, c, h, w]``, so
    that the diffusion model's data have about unit variance as its schedule assumes."""
    return float(1.0 / latents.double().std())
