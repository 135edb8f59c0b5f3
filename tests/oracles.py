"""Analytic denoisers for Gaussian data, used as the "network" in exact sampler tests.

For x_0 ~ N(m, s^2 I), x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps is jointly Gaussian with x_0 and eps, so the
MSE-optimal predictions E[eps | x_t], E[x_0 | x_t] and E[v | x_t] are affine in x_t.
"""

import torch

from ddpm_core.diffusion import GaussianDiffusion, Prediction


def oracle_coefficients(abar: torch.Tensor, mean: float, std: float, prediction: Prediction):
    """(a, b) with E[target | x_t] = a x_t + b, for the target of ``prediction``; ``abar`` broadcastable."""
    variance = abar * std**2 + 1 - abar  # Var(x_t)
    centred = -abar.sqrt() * mean  # E[target | x_t] is a (x_t - sqrt(abar) m) + E[target]
    eps_a = (1 - abar).sqrt() / variance
    x0_a = abar.sqrt() * std**2 / variance
    if prediction is Prediction.EPS:
        return eps_a, eps_a * centred
    if prediction is Prediction.X0:
        return x0_a, x0_a * centred + mean
    v_a = abar.sqrt() * eps_a - (1 - abar).sqrt() * x0_a
    return v_a, v_a * centred - (1 - abar).sqrt() * mean


def gaussian_oracle(base: GaussianDiffusion, mean: float, std: float, prediction: Prediction):
    """A model(x_t, t) for the original-schedule timestep t of ``base``."""

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = base.alphas_cumprod[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        a, b = oracle_coefficients(abar, mean, std, Prediction(prediction))
        return a * x + b

    return model
