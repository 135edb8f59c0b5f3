"""The forward process q(x_t | x_0) and the posterior q(x_{t-1} | x_t, x_0) against independent closed forms."""

import math

import pytest
import torch

from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.schedules import make_betas


@pytest.fixture(params=["linear", "cosine"])
def diffusion(request):
    return GaussianDiffusion(make_betas(request.param, 1000))


@pytest.mark.parametrize("step", [0, 1, 9, 99, 499, 999])
def test_q_sample_marginal_equals_composition_of_single_steps(diffusion, step):
    """x_t drawn in closed form (Eq. 4) and by t+1 single steps of Eq. 2 have the same mean and std.

    Writing sqrt(alpha_t) where sqrt(abar_t) belongs (or the reverse) changes the mean by orders of magnitude
    more than the tolerance here."""
    generator = torch.Generator().manual_seed(step)
    n = 200_000
    x0 = torch.full((n, 1), 0.8, dtype=torch.float64)
    chain = x0.clone()
    for i in range(step + 1):
        beta = diffusion.betas[i]
        chain = (1 - beta).sqrt() * chain + beta.sqrt() * torch.randn(n, 1, generator=generator, dtype=torch.float64)
    t = torch.full((n,), step, dtype=torch.long)
    direct = diffusion.q_sample(x0, t, torch.randn(n, 1, generator=generator, dtype=torch.float64))

    expected_mean = 0.8 * math.sqrt(diffusion.alphas_cumprod[step].item())
    expected_std = math.sqrt(1 - diffusion.alphas_cumprod[step].item())
    mean_tolerance = 5 * expected_std / math.sqrt(n)
    for x in (chain, direct):
        assert abs(x.mean().item() - expected_mean) < mean_tolerance
        assert abs(x.std().item() - expected_std) < 5 * expected_std / math.sqrt(2 * n)


def test_q_mean_variance_is_eq4(diffusion):
    x0 = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    mean, variance, log_variance = diffusion.q_mean_variance(x0, t)
    abar = torch.cumprod(1 - diffusion.betas, 0)[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(mean, abar.sqrt() * x0)
    torch.testing.assert_close(variance, (1 - abar).expand_as(x0))
    torch.testing.assert_close(log_variance, torch.log(1 - abar).expand_as(x0))


def test_posterior_equals_bayes_rule_on_gaussians(diffusion):
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): product of two Gaussians in x_{t-1},
    computed here from precisions, independently of Eq. 6-7's coefficient form."""
    x0 = torch.randn(6, 1, 3, 3, dtype=torch.float64)
    x_t = torch.randn(6, 1, 3, 3, dtype=torch.float64)
    t = torch.tensor([1, 2, 50, 400, 998, 999])
    mean, variance, log_variance = diffusion.q_posterior(x0, x_t, t)

    betas = diffusion.betas
    abar = torch.cumprod(1 - betas, 0)
    b = betas[t].reshape(-1, 1, 1, 1)
    abar_prev = abar[t - 1].reshape(-1, 1, 1, 1)
    precision = 1 / (1 - abar_prev) + (1 - b) / b
    expected_variance = 1 / precision
    expected_mean = expected_variance * (abar_prev.sqrt() * x0 / (1 - abar_prev) + (1 - b).sqrt() * x_t / b)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(variance, expected_variance.expand_as(x0), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(log_variance, torch.log(expected_variance).expand_as(x0), rtol=1e-10, atol=1e-12)


def test_posterior_at_t0_is_x0_with_log_variance_clipped(diffusion):
    x0 = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    x_t = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    t = torch.zeros(2, dtype=torch.long)
    mean, variance, log_variance = diffusion.q_posterior(x0, x_t, t)
    torch.testing.assert_close(mean, x0)  # abar_{-1} = 1: the posterior collapses onto x_0
    assert bool((variance == 0).all())
    assert torch.allclose(log_variance, torch.log(diffusion.posterior_variance[1]).expand_as(x0))


def test_posterior_matches_monte_carlo_conditioning(diffusion):
    """Sample (x_{t-1}, x_t) jointly from the forward chain for a fixed x_0; the regression of x_{t-1} on x_t
    must be the posterior mean's affine map and its residual variance beta~_t."""
    generator = torch.Generator().manual_seed(0)
    step, n, x0_value = 300, 400_000, 0.5
    abar_prev = diffusion.alphas_cumprod[step - 1]
    x_prev = abar_prev.sqrt() * x0_value + (1 - abar_prev).sqrt() * torch.randn(
        n, generator=generator, dtype=torch.float64
    )
    beta = diffusion.betas[step]
    x_t = (1 - beta).sqrt() * x_prev + beta.sqrt() * torch.randn(n, generator=generator, dtype=torch.float64)
    design = torch.stack([torch.ones(n, dtype=torch.float64), x_t], 1)
    coefficients = torch.linalg.lstsq(design, x_prev[:, None]).solution.squeeze()
    residual_variance = (x_prev - design @ coefficients).var()
    assert coefficients[1].item() == pytest.approx(diffusion.posterior_mean_coef2[step].item(), rel=5e-3)
    assert coefficients[0].item() == pytest.approx(
        diffusion.posterior_mean_coef1[step].item() * x0_value, rel=5e-2, abs=2e-4
    )
    assert residual_variance.item() == pytest.approx(diffusion.posterior_variance[step].item(), rel=1e-2)


def test_parameterisations_invert_each_other(diffusion):
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, 4, 4, generator=generator, dtype=torch.float64)
    eps = torch.randn(5, 2, 4, 4, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 1, 300, 700, 999])
    x_t = diffusion.q_sample(x0, t, eps)
    torch.testing.assert_close(diffusion.x0_from_eps(x_t, t, eps), x0, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(diffusion.eps_from_x0(x_t, t, x0), eps, rtol=1e-7, atol=1e-7)
    v = diffusion.v_target(x0, t, eps)
    torch.testing.assert_close(diffusion.x0_from_v(x_t, t, v), x0, rtol=1e-9, atol=1e-9)
