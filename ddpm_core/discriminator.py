"""The adversarial term of LDM's first stage (Rombach et al. 2022, App. G, after Esser et al. 2021, "Taming
Transformers", Sec. 3.2): a patch discriminator judges real images against the autoencoder's reconstructions, and
from a warm-up point on the autoencoder also minimises its adversarial loss, weighted adaptively against the
reconstruction loss (Esser et al., Eq. 7).

- :class:`PatchDiscriminator`: pix2pix's PatchGAN (Isola et al. 2017, Sec. 3.2.2) as LDM configures it: a stride-2
  4x4 convolution, then ``layers - 1`` more that double the width (capped at 8x), one stride-1 layer and a 1-channel
  output, LeakyReLU(0.2) between, weights drawn from N(0, 0.02). It outputs one logit per overlapping patch (70x70
  pixels at 3 layers). GroupNorm replaces LDM's BatchNorm, so a worker's logits do not depend on how the global batch
  is split over workers; like BatchNorm's in training, its statistics span the whole image.
- :func:`hinge_discriminator_loss`: ``(E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]) / 2``.
- :func:`adaptive_weight`: ``|grad_L L_rec| / (|grad_L L_adv| + 1e-4)`` at the decoder's last layer L, clamped to
  [0, 1e4] and detached: the adversarial term's gradient there is scaled to the reconstruction's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_core.fields import check_ranges

DELTA = 1e-4  # Esser et al.'s delta in Eq. 7
MAX_WEIGHT = 1e4


@dataclass(frozen=True)
class DiscriminatorConfig:
    """The discriminator's shape and when and how strongly its loss enters the autoencoder's."""

    start_images: int  # the autoencoder's warm-up: no adversarial term before this many training images
    weight: float = 0.5  # the adaptive weight's factor (LDM's disc_weight)
    width: int = 64  # the first layer's channels
    layers: int = 3  # stride-2 layers: 3 is the 70x70 PatchGAN

    def __post_init__(self) -> None:
        check_ranges(
            "discriminator",
            {
                "start_images": (self.start_images >= 0, self.start_images),
                "weight": (self.weight > 0, self.weight),
                "width": (self.width > 0 and self.width % 8 == 0, self.width),
                "layers": (self.layers >= 1, self.layers),
            },
        )


class PatchDiscriminator(nn.Module):
    """Logits ``[B, 1, h, w]``, one per patch of images ``[B, C, H, W]`` in [-1, 1]."""

    def __init__(self, in_channels: int, config: DiscriminatorConfig) -> None:
        super().__init__()
        width = config.width
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for level in range(1, config.layers + 1):
            wider = width * min(2**level, 8)
            stride = 2 if level < config.layers else 1
            blocks += [
                nn.Conv2d(channels, wider, 4, stride, 1, bias=False),
                nn.GroupNorm(min(32, wider // 8), wider),
                nn.LeakyReLU(0.2),
            ]
            channels = wider
        blocks.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [B, 1, h, w]


def hinge_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss on the logits of real images and of reconstructions ``[B, 1, h, w]``: ``[]``."""
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def generator_loss(fake: torch.Tensor) -> torch.Tensor:
    """The autoencoder's adversarial loss ``-E[D(x_hat)]`` on the logits of its reconstructions: ``[]``."""
    return -fake.mean()


def adaptive_weight(
    reconstruction_loss: torch.Tensor, adversarial_loss: torch.Tensor, last_layer: torch.Tensor
) -> torch.Tensor:
    """Esser et al. 2021, Eq. 7: the ratio of the two losses' gradient norms at ``last_layer`` (the decoder's output
    weight), clamped to [0, 1e4] and detached ``[]``. The graph is kept for the backward pass that follows."""
    (rec,) = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    (adv,) = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)
    return (rec.norm() / (adv.norm() + DELTA)).clamp(0.0, MAX_WEIGHT).detach()


@dataclass
class Adversary:
    """The discriminator in training: ``network`` takes its own steps (DDP-wrapped on several workers), ``module``
    is the bare network the autoencoder's step reads (no gradient of its own), with its optimizer and config."""

    network: nn.Module
    module: PatchDiscriminator
    optimizer: torch.optim.Optimizer
    config: DiscriminatorConfig

    def active(self, images_seen: int) -> bool:
        """Whether the adversarial term is on at ``images_seen`` (after the warm-up)."""
        return images_seen >= self.config.start_images


def make_discriminator_optimizer(discriminator: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam with LDM's betas for its discriminator (0.5, 0.9)."""
    return torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.9))


def decoder_output_weight(model: nn.Module) -> torch.Tensor:
    """The weight of the autoencoder's last layer (its decoder's output convolution), through a DDP wrapper."""
    bare = getattr(model, "module", model)
    layer = bare.get_submodule("decoder.conv_out")
    assert isinstance(layer, nn.Conv2d)
    return layer.weight


def adversarial_terms(
    model: nn.Module, adversary: Adversary, reconstruction_loss: torch.Tensor, reconstruction: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The autoencoder's adversarial loss on its reconstructions ``[B, C, H, W]``, and its adaptive weight times
    ``config.weight``; the discriminator's own weights get no gradient from it."""
    adversary.module.requires_grad_(False)
    try:
        adversarial = generator_loss(adversary.module(reconstruction))
    finally:
        adversary.module.requires_grad_(True)
    weight = adaptive_weight(reconstruction_loss, adversarial, decoder_output_weight(model)) * adversary.config.weight
    return {"adversarial": adversarial, "adaptive_weight": weight}


def discriminator_step(
    adversary: Adversary, real: torch.Tensor, fake: torch.Tensor, grad_clip: float
) -> dict[str, torch.Tensor]:
    """One step of the discriminator's hinge loss on real images and reconstructions ``[B, C, H, W]`` (detached),
    both in one forward pass; returns the loss and the mean logits on each, detached."""
    adversary.network.train()
    adversary.optimizer.zero_grad(set_to_none=True)
    logits = adversary.network(torch.cat([real, fake.detach()]))  # [2B, 1, h, w]
    on_real, on_fake = logits.chunk(2)
    loss = hinge_discriminator_loss(on_real, on_fake)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(adversary.network.parameters(), grad_clip)
    adversary.optimizer.step()
    return {
        "discriminator": loss.detach(),
        "logits_real": on_real.detach().mean(),
        "logits_fake": on_fake.detach().mean(),
    }
