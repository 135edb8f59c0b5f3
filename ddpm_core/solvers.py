"""Second-order solvers of the probability-flow ODE for the discrete-time models: DPM-Solver++(2M) (Lu et al. 2022b,
"DPM-Solver++", Algorithm 2) and Heun's method (Karras et al. 2022, "EDM", Algorithm 1).

Both integrate from the noisiest visited timestep down to the cleanest, and end with a first-order step to
sigma = 0, which is the network's x_0 prediction there (as DDIM's last step is). They read the model only through its
x_0 prediction, so every parameterisation (eps, x_0, v) and variance works, and a guided or conditional model is just
another ``model``. With ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` and ``lambda_t = log(alpha_t /
sigma_t)`` (half the log-SNR):

- DPM-Solver++(2M), Eq. (5) and Algorithm 2 of Lu et al.: ``x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D``,
  ``h = lambda_s - lambda_t``, with ``D = x0_hat(x_t)`` at the first and last step and otherwise the multistep
  ``D = (1 + 1/(2r)) x0_hat(x_t) - 1/(2r) x0_hat(x_prev)``, ``r = h_prev / h``. One network evaluation per step.
- Heun in EDM's variables ``y = x / alpha``, ``s = sigma / alpha``: ``dy/ds = (y - x0_hat) / s``; an Euler step, then
  the trapezoidal correction with the slope at its end point. Two network evaluations per step, one at the last.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ddpm_core.diffusion import GaussianDiffusion, Model

StepCallback = Callable[[int, int, torch.Tensor], None]  # (original timestep, steps done, x0_hat [B, C, H, W])


@dataclass
class Denoiser:
    """The network's x_0 prediction at an original-schedule timestep, counting network evaluations (NFE)."""

    model: Model
    diffusion: GaussianDiffusion  # the full schedule (not respaced): timesteps are original indices
    model_kwargs: dict[str, object] = field(default_factory=dict)
    clip_denoised: bool = True
    dtype: torch.dtype = torch.float32
    evaluations: int = 0

    def __call__(self, x: torch.Tensor, timestep: int) -> torch.Tensor:
        """x0_hat ``[B, C, H, W]`` of ``x`` ``[B, C, H, W]`` at ``timestep``."""
        t = torch.full((x.shape[0],), timestep, dtype=torch.long, device=x.device)
        output = self.model(x, self.diffusion.model_timesteps(t), **self.model_kwargs).to(self.dtype)
        self.evaluations += 1
        return self.diffusion.p_mean_variance(output, x, t, self.clip_denoised).pred_x0

    def alpha_sigma(self, timestep: int) -> tuple[float, float]:
        """(alpha_t, sigma_t) of the variance-preserving process at ``timestep``, in float64."""
        abar = float(self.diffusion.alphas_cumprod[timestep])
        return abar**0.5, (1.0 - abar) ** 0.5


def dpm_solver_pp_2m(
    denoise: Denoiser, x: torch.Tensor, timesteps: list[int], on_step: StepCallback | None = None
) -> torch.Tensor:
    """DPM-Solver++(2M) from ``x`` ``[B, C, H, W]`` at ``timesteps[0]`` (descending) to sigma = 0."""
    previous: tuple[torch.Tensor, float] | None = None  # (x0_hat, h) of the step before
    for done, t in enumerate(timesteps):
        x0 = denoise(x, t)  # [B, C, H, W]
        if on_step is not None:
            on_step(t, done + 1, x0)
        if done == len(timesteps) - 1:
            return x0  # first order to sigma = 0: x_0 = x0_hat
        s = timesteps[done + 1]
        (alpha_t, sigma_t), (alpha_s, sigma_s) = denoise.alpha_sigma(t), denoise.alpha_sigma(s)
        h = math.log(alpha_s / sigma_s) - math.log(alpha_t / sigma_t)  # lambda_s - lambda_t > 0
        if previous is None:
            direction = x0
        else:
            r = previous[1] / h
            direction = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous[0]
        x = (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * direction
        previous = (x0, h)
    return x


def heun(denoise: Denoiser, x: torch.Tensor, timesteps: list[int], on_step: StepCallback | None = None) -> torch.Tensor:
    """Heun's second-order method (EDM, Algorithm 1, deterministic) from ``x`` ``[B, C, H, W]`` at ``timesteps[0]``
    (descending) to sigma = 0; Euler at the last step."""
    y = x / denoise.alpha_sigma(timesteps[0])[0]  # EDM's variable: y = x / alpha, noise level s = sigma / alpha
    for done, t in enumerate(timesteps):
        alpha_t, sigma_t = denoise.alpha_sigma(t)
        x0 = denoise(alpha_t * y, t)  # [B, C, H, W]
        if on_step is not None:
            on_step(t, done + 1, x0)
        if done == len(timesteps) - 1:
            return x0  # Euler to s = 0: y + (0 - s_t) (y - x0) / s_t = x0
        next_t = timesteps[done + 1]
        alpha_s, sigma_s = denoise.alpha_sigma(next_t)
        s_t, s_s = sigma_t / alpha_t, sigma_s / alpha_s
        slope = (y - x0) / s_t
        euler = y + (s_s - s_t) * slope
        corrected = (euler - denoise(alpha_s * euler, next_t)) / s_s
        y = y + (s_s - s_t) * 0.5 * (slope + corrected)
    return y
