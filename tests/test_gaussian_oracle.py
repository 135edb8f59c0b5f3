"""Gaussian oracle: every sampler, fed the exact optimal predictor for Gaussian data, must produce outputs whose
mean and variance equal the moments propagated step by step through the paper's update equations in float64.

The propagation below is written from the papers (Ho et al. 2020, Algorithm 2; Song et al. 2021, Eq. 12) in
epsilon form only; the library computes its steps through x_0 and the posterior (Eq. 7) for all three
parameterisations, so agreement checks both the algebra and the parameterisation conversions.
"""

import math

import pytest
import torch

from ddpm_core.diffusion import GaussianDiffusion, Prediction, Variance
from ddpm_core.samplers import GeneratorNoise, SamplerConfig, sample, spaced_timesteps
from ddpm_core.schedules import make_betas
from tests.oracles import gaussian_oracle, oracle_coefficients

DATA_MEAN, DATA_STD = 0.3, 0.5
NUM_SAMPLES, SHAPE = 20_000, (1, 2, 2)  # 80,000 independent scalar draws


def exact_output_moments(base: GaussianDiffusion, visited: list[int], method: str, variance: Variance, eta: float):
    """Mean and variance of the sampler output, propagated exactly in float64 through the eps-form updates."""
    mean, var = 0.0, 1.0  # x_T ~ N(0, 1)
    abar_all = base.alphas_cumprod
    for i in reversed(range(len(visited))):
        abar = abar_all[visited[i]].item()
        abar_prev = abar_all[visited[i - 1]].item() if i > 0 else 1.0
        eps_a, eps_b = (
            c.item()
            for c in oracle_coefficients(torch.tensor(abar, dtype=torch.float64), DATA_MEAN, DATA_STD, Prediction.EPS)
        )
        alpha = abar / abar_prev  # the respaced alpha_t
        beta = 1 - alpha
        if method == "ancestral":
            # x' = (x - beta / sqrt(1 - abar) eps_hat) / sqrt(alpha) + sigma z   (Algorithm 2, line 4)
            c1 = (1 - beta / math.sqrt(1 - abar) * eps_a) / math.sqrt(alpha)
            c0 = -beta / math.sqrt(1 - abar) * eps_b / math.sqrt(alpha)
            sigma2 = beta if variance is Variance.FIXED_LARGE else beta * (1 - abar_prev) / (1 - abar)
        else:
            # x' = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z   (DDIM Eq. 12)
            sigma2 = eta**2 * (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)
            direction = math.sqrt(max(1 - abar_prev - sigma2, 0.0))
            # x0_hat = (x - sqrt(1 - abar) eps_hat) / sqrt(abar)
            x0_a = (1 - math.sqrt(1 - abar) * eps_a) / math.sqrt(abar)
            x0_b = -math.sqrt(1 - abar) * eps_b / math.sqrt(abar)
            c1 = math.sqrt(abar_prev) * x0_a + direction * eps_a
            c0 = math.sqrt(abar_prev) * x0_b + direction * eps_b
        if i == 0:
            sigma2 = 0.0  # no noise at the last step
        mean, var = c1 * mean + c0, c1**2 * var + sigma2
    return mean, var


def run_sampler(schedule, prediction, variance, method, steps, eta, seed):
    base = GaussianDiffusion(make_betas(schedule, 1000), prediction=prediction, variance=variance)
    model = gaussian_oracle(base, DATA_MEAN, DATA_STD, prediction)
    config = SamplerConfig(method=method, num_steps=steps, eta=eta, clip_denoised=False)
    noise = GeneratorNoise(NUM_SAMPLES, torch.Generator().manual_seed(seed), dtype=torch.float64)
    result = sample(model, base, SHAPE, noise, config, dtype=torch.float64)
    visited = spaced_timesteps(1000, steps or 1000, config.timestep_spacing)
    assert result.timesteps == list(reversed(visited))
    return result.samples, exact_output_moments(base, visited, method, variance, eta)


def assert_moments(samples, mean, var):
    n = samples.numel()
    std = math.sqrt(var)
    assert abs(samples.mean().item() - mean) < 5 * std / math.sqrt(n), (samples.mean().item(), mean)
    assert abs(samples.std().item() - std) < 5 * std / math.sqrt(2 * n), (samples.std().item(), std)


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("variance", [Variance.FIXED_SMALL, Variance.FIXED_LARGE])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ancestral_1000_steps_matches_exact_moments_and_the_data(schedule, variance, prediction):
    samples, (mean, var) = run_sampler(schedule, prediction, variance, "ancestral", None, 0.0, seed=1)
    assert_moments(samples, mean, var)
    # With all 1000 steps and the exact denoiser, ancestral sampling recovers the data distribution itself.
    assert samples.mean().item() == pytest.approx(DATA_MEAN, rel=0.02)
    assert samples.std().item() == pytest.approx(DATA_STD, rel=0.02)


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("steps", [50, 1000])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_matches_exact_moments(schedule, eta, steps, prediction):
    samples, (mean, var) = run_sampler(schedule, prediction, Variance.FIXED_SMALL, "ddim", steps, eta, seed=2)
    assert_moments(samples, mean, var)


def test_ancestral_50_respaced_steps_matches_exact_moments():
    samples, (mean, var) = run_sampler("linear", Prediction.EPS, Variance.FIXED_SMALL, "ancestral", 50, 0.0, seed=3)
    assert_moments(samples, mean, var)


def test_the_oracle_test_detects_a_swapped_sqrt_alpha():
    """Control: the propagated moments of a subtly wrong update (sqrt(abar) in place of sqrt(alpha) in Algorithm 2)
    differ from the correct ones by far more than the Monte Carlo tolerance used above."""
    base = GaussianDiffusion(make_betas("linear", 1000))
    visited = list(range(1000))
    right_mean, right_var = exact_output_moments(base, visited, "ancestral", Variance.FIXED_SMALL, 0.0)
    wrong = GaussianDiffusion(make_betas("linear", 1000))
    wrong.alphas_cumprod = base.alphas.clone()  # the classic mix-up: treat alpha_t as abar_t
    wrong_mean, wrong_var = exact_output_moments(wrong, visited, "ancestral", Variance.FIXED_SMALL, 0.0)
    tolerance = 5 * math.sqrt(right_var) / math.sqrt(NUM_SAMPLES * 4)
    assert (
        abs(wrong_mean - right_mean) > 10 * tolerance
        or abs(math.sqrt(wrong_var) - math.sqrt(right_var)) > 10 * tolerance
    )
