"""Interpolation in the diffusion's latent space (Ho et al. 2020, Sec. 4.4 and Fig. 9): encode two images with the
forward process q(x_t | x_0) using the same noise, mix the two latents linearly, and decode each mixture with the
reverse process (Algorithm 2) from t down to 0. Small t keeps the pixels of the sources (a blend); large t keeps
only coarse attributes, and at t = T the sources are forgotten.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ddpm_core.diffusion import GaussianDiffusion, Model
from ddpm_core.samplers import NoiseSource, ancestral_step


@torch.no_grad()
def reverse_process(
    model: Model,
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    timestep: int,
    noise: NoiseSource,
    clip_denoised: bool = True,
    model_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Algorithm 2 of Ho et al. from ``x_t`` ``[B, C, H, W]`` at ``timestep`` down to x_0 ``[B, C, H, W]``; the
    per-step noise comes from ``noise`` (none at t = 0)."""
    x = x_t
    for index in reversed(range(timestep + 1)):
        t = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
        output = model(x, diffusion.model_timesteps(t), **(model_kwargs or {}))
        step_noise = noise(x.shape[1:]).to(x) if index > 0 else None
        x, _ = ancestral_step(diffusion, output, x, t, step_noise, clip_denoised)
    return x


@torch.no_grad()
def interpolate(
    model: Model,
    diffusion: GaussianDiffusion,
    first: torch.Tensor,
    second: torch.Tensor,
    timestep: int,
    weights: Sequence[float],
    noise: NoiseSource,
    encoding_noise: torch.Tensor,
    clip_denoised: bool = True,
) -> torch.Tensor:
    """Decoded mixtures ``[len(weights), C, H, W]`` of two images ``first``, ``second`` ``[C, H, W]`` in [-1, 1]
    (or of two latents of a latent model, with ``clip_denoised`` off: they are not bounded by [-1, 1]):
    ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with the same ``encoding_noise`` eps ``[C, H, W]`` for both
    (Ho et al. 2020, Eq. 4), ``(1 - w) x_t + w x'_t`` for each w of ``weights``, then :func:`reverse_process` from
    ``timestep``. ``noise`` draws the reverse process's noise for a batch of ``len(weights)`` (use one seed for every
    row, so that the rows differ only by t)."""
    sources = torch.stack([first, second])  # [2, C, H, W]
    t = torch.full((2,), timestep, dtype=torch.long, device=sources.device)
    latents = diffusion.q_sample(sources, t, encoding_noise.expand_as(sources))  # [2, C, H, W]
    mix = torch.as_tensor(list(weights), dtype=latents.dtype, device=latents.device).reshape(
        -1, 1, 1, 1
    )  # [W, 1, 1, 1]
    mixtures = (1 - mix) * latents[0] + mix * latents[1]  # [W, C, H, W]
    return reverse_process(model, diffusion, mixtures, timestep, noise, clip_denoised)
