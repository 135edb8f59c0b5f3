"""The second-order ODE solvers (DPM-Solver++(2M), Heun) and the noise-level spacings, against exact references.

1. Order of accuracy, on Gaussian data with the Bayes-optimal network (tests/oracles.py): the network is affine in
   x_t, so a deterministic sampler maps x_T to an affine function of it, found exactly by sampling x_T = 0 and 1 in
   float64. The exact solution of the probability-flow ODE maps the marginal at the first visited timestep onto the
   marginal at the last one (for Gaussians: the increasing affine map between them); every sampler then ends with the
   x_0 prediction there. The error is the distance between the two affine maps, and halving the step size divides it
   by ~4 for a second-order method, by ~2 for DDIM (first order). docs/benchmarks.md has the table.
2. Whole trajectories equal diffusers' DPMSolverMultistepScheduler and HeunDiscreteScheduler (independent
   implementations) at float64 precision, for every parameterisation.
"""

import dataclasses
import math

import pytest
import ray
import torch
from diffusers import DPMSolverMultistepScheduler, HeunDiscreteScheduler

from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion, Prediction
from ddpm_core.samplers import (
    Method,
    PerIndexNoise,
    SamplerConfig,
    Spacing,
    balanced_classes,
    classifier_free_guidance,
    sample,
    spaced_timesteps,
)
from ddpm_core.schedules import make_betas
from pipelines.__main__ import main
from tests.oracles import gaussian_oracle, oracle_coefficients
from tests.test_samplers_vs_diffusers import PREDICTION_TYPE
from tests.test_sampling import tiny_model

DATA_MEAN, DATA_STD = 0.3, 0.5
ORDER = {Method.DDIM: 1, Method.DPM_SOLVER_PP_2M: 2, Method.HEUN: 2}


def sampler_error(method: Method, steps: int, spacing: Spacing, schedule: str, prediction: Prediction):
    """(error of the sampler's affine map x_T -> x_0 against the exact ODE solution, NFE)."""
    base = GaussianDiffusion(make_betas(schedule, 1000), prediction=prediction)
    model = gaussian_oracle(base, DATA_MEAN, DATA_STD, prediction)
    config = SamplerConfig(method=method, num_steps=steps, spacing=spacing, clip_denoised=False)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64).reshape(2, 1, 1, 1)  # x_T = 0 and x_T = 1
    result = sample(model, base, (1, 1, 1), lambda shape: ends, config, dtype=torch.float64)
    intercept = result.samples[0].item()
    slope = result.samples[1].item() - intercept
    exact_slope, exact_intercept = exact_map(base, result.timesteps[0], result.timesteps[-1])
    return abs(slope - exact_slope) + abs(intercept - exact_intercept), result.network_evaluations


def exact_map(base: GaussianDiffusion, first: int, last: int) -> tuple[float, float]:
    """(slope, intercept) of the exact flow from timestep ``first`` to ``last`` followed by the x_0 prediction at
    ``last``: x_t ~ N(alpha m, alpha^2 s^2 + sigma^2), and the flow is the increasing affine map between marginals."""
    abar_first, abar_last = base.alphas_cumprod[first].item(), base.alphas_cumprod[last].item()

    def std(abar: float) -> float:
        return math.sqrt(abar * DATA_STD**2 + 1 - abar)

    flow_slope = std(abar_last) / std(abar_first)
    flow_intercept = math.sqrt(abar_last) * DATA_MEAN - flow_slope * math.sqrt(abar_first) * DATA_MEAN
    a, b = (c.item() for c in oracle_coefficients(torch.tensor(abar_last), DATA_MEAN, DATA_STD, Prediction.X0))
    return a * flow_slope, a * flow_intercept + b


# EDM's Heun works on noise-level spacings: evenly in t, its first step spans most of the noise range and the error
# falls faster than second order before it settles (measured: x8-x10 per halving on the cosine schedule).
SOLVER_SPACINGS = [
    (method, spacing)
    for method in ORDER
    for spacing in (Spacing.LOG_SNR, Spacing.KARRAS, Spacing.LINSPACE)
    if not (method is Method.HEUN and spacing is Spacing.LINSPACE)
]


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("method, spacing", SOLVER_SPACINGS)
def test_each_solver_converges_with_the_order_it_claims(method, spacing, schedule, prediction):
    coarse, nfe = sampler_error(method, 80, spacing, schedule, prediction)
    fine, _ = sampler_error(method, 160, spacing, schedule, prediction)
    expected = 2 ** ORDER[method]
    assert 0.85 * expected < coarse / fine < 1.2 * expected, (coarse, fine)
    assert nfe == (159 if method is Method.HEUN else 80)
    assert fine < 0.03  # and the output distribution approaches the exact one


def test_dpm_solver_reaches_ddim_s_error_with_a_fraction_of_the_evaluations():
    ddim_50, _ = sampler_error(Method.DDIM, 50, Spacing.LINSPACE, "linear", Prediction.EPS)
    dpm_10, nfe = sampler_error(Method.DPM_SOLVER_PP_2M, 10, Spacing.LOG_SNR, "linear", Prediction.EPS)
    assert nfe == 10 and dpm_10 < ddim_50


def test_noise_level_spacings_are_uniform_where_the_schedule_allows():
    base = GaussianDiffusion(make_betas("linear", 1000))
    abar = base.alphas_cumprod.double()
    lambdas = (0.5 * torch.log(abar / (1 - abar))).numpy()
    steps = spaced_timesteps(1000, 10, Spacing.LOG_SNR, abar)
    assert steps[0] == 0 and steps[-1] == 999
    gaps = -torch.tensor(lambdas[steps]).diff()  # [9], lambda decreases with t
    assert float(gaps.std() / gaps.mean()) < 0.05  # within rounding to the nearest timestep
    karras = spaced_timesteps(1000, 10, Spacing.KARRAS, abar)
    assert karras[0] == 0 and karras[-1] == 999 and len(set(karras)) == 10
    crowded = spaced_timesteps(1000, 100, Spacing.LOG_SNR, abar)  # near t = 0 targets share timesteps: moved up
    assert crowded[:3] == [0, 1, 2] and len(set(crowded)) == 100
    with pytest.raises(ValueError, match="needs the noise schedule"):
        spaced_timesteps(1000, 10, Spacing.KARRAS)


def nonlinear_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # a smooth stand-in for a network
    scale = 1.0 + t.to(x.dtype).reshape(-1, 1, 1, 1) / 1000.0
    return 0.5 * torch.sin(scale * x) + 0.1 * x


def diffusers_trajectory(scheduler, latent: torch.Tensor) -> torch.Tensor:
    """diffusers' sampling loop over the scheduler's timesteps, from its initial latent."""
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latent, t)  # Heun: y / sqrt(s^2 + 1), the VP x; DPM: itself
        latent = scheduler.step(nonlinear_model(model_input, t.reshape(1).expand(len(latent))), t, latent).prev_sample
    return latent


def dpm_solver_scheduler(base: GaussianDiffusion, visited: list[int], prediction: Prediction):
    scheduler = DPMSolverMultistepScheduler(
        beta_schedule="linear",
        prediction_type=PREDICTION_TYPE[prediction],
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(timesteps=list(reversed(visited)))
    abar = base.alphas_cumprod[visited[::-1]]
    scheduler.sigmas = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])  # float64
    return scheduler


def diffusers_dpm_solver_in_float64(scheduler, latent: torch.Tensor) -> torch.Tensor:
    """diffusers' own DPM-Solver++ updates, in the order its ``step`` applies them (first order at the first and the
    final step, the 2M update between), called directly: ``step`` itself computes in float32."""
    previous = None
    for index, t in enumerate(scheduler.timesteps):
        scheduler._step_index = index
        output = scheduler.convert_model_output(
            nonlinear_model(latent, t.reshape(1).expand(len(latent))), sample=latent
        )
        if previous is None or index == len(scheduler.timesteps) - 1:
            latent = scheduler.dpm_solver_first_order_update(output, sample=latent)
        else:
            latent = scheduler.multistep_dpm_solver_second_order_update([previous, output], sample=latent)
        previous = output
    return latent


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("spacing", [Spacing.LOG_SNR, Spacing.LINSPACE, Spacing.KARRAS])
def test_dpm_solver_pp_2m_equals_diffusers(prediction, spacing):
    base = GaussianDiffusion(make_betas("linear", 1000), prediction=prediction)
    visited = spaced_timesteps(1000, 12, spacing, base.alphas_cumprod)
    x_t = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    config = SamplerConfig(method=Method.DPM_SOLVER_PP_2M, num_steps=12, spacing=spacing, clip_denoised=False)
    ours = sample(nonlinear_model, base, (1, 4, 4), lambda shape: x_t.clone(), config, dtype=torch.float64)
    theirs = diffusers_dpm_solver_in_float64(dpm_solver_scheduler(base, visited, prediction), x_t.clone())
    torch.testing.assert_close(ours.samples, theirs, rtol=1e-10, atol=1e-10)
    assert ours.network_evaluations == 12
    # diffusers' public step() (float32 inside) agrees to float32 precision
    stepped = diffusers_trajectory(dpm_solver_scheduler(base, visited, prediction), x_t.clone())
    torch.testing.assert_close(ours.samples, stepped, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("prediction", list(Prediction))
def test_heun_equals_diffusers(prediction):
    base = GaussianDiffusion(make_betas("linear", 1000), prediction=prediction)
    visited = spaced_timesteps(1000, 8, Spacing.LOG_SNR, base.alphas_cumprod)
    scheduler = HeunDiscreteScheduler(
        beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type=PREDICTION_TYPE[prediction]
    )
    scheduler.set_timesteps(timesteps=list(reversed(visited)))
    abar = base.alphas_cumprod[visited[::-1]]
    sigmas = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])  # float64
    scheduler.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    z = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theirs = diffusers_trajectory(scheduler, z / abar[0].sqrt())  # EDM's y_T = x_T / alpha_T (x_T = z)
    config = SamplerConfig(method=Method.HEUN, num_steps=8, spacing=Spacing.LOG_SNR, clip_denoised=False)
    ours = sample(nonlinear_model, base, (1, 4, 4), lambda shape: z.clone(), config, dtype=torch.float64)
    torch.testing.assert_close(ours.samples, theirs, rtol=1e-10, atol=1e-10)
    assert ours.network_evaluations == 15 == len(scheduler.timesteps)


def test_solvers_keep_per_index_noise_and_guidance_working():
    model = classifier_free_guidance(tiny_model(num_classes=3), 1.0, null_class=3, channels=1)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=100))

    def draw(indices, method):
        config = SamplerConfig(method=method, num_steps=6, spacing=Spacing.LOG_SNR)
        kwargs = {"class_labels": balanced_classes(indices, (0, 1, 2))}
        return sample(model, diffusion, (1, 8, 8), PerIndexNoise(5, indices), config, kwargs).samples

    for method in (Method.DPM_SOLVER_PP_2M, Method.HEUN):
        split = torch.cat([draw(range(2), method), draw(range(2, 5), method)])
        torch.testing.assert_close(draw(range(5), method), split, rtol=1e-5, atol=1e-5)


def test_naming_a_method_alone_gives_the_spacing_measured_best_for_it():
    """The ODE solvers take trailing spacing unless another is named (DPM-Solver++ with linspace or log-SNR spacing
    loses to DDIM-50 on digits: docs/benchmarks.md); DDIM and the ancestral sampler keep linspace. The spacing in a
    sampler's record (its protocol and fingerprint) is the one used, named or not."""
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=100))
    expected = {Method.DPM_SOLVER_PP_2M: Spacing.TRAILING, Method.HEUN: Spacing.TRAILING}
    for method in Method:
        default, named = SamplerConfig(method=method, num_steps=10), SamplerConfig(method, 10, spacing="leading")
        assert default.timestep_spacing is expected.get(method, Spacing.LINSPACE)
        assert default.to_dict()["spacing"] == default.timestep_spacing.value
        assert named.timestep_spacing is Spacing.LEADING
        noise = PerIndexNoise(0, range(1))
        visited = sample(tiny_model(), diffusion, (1, 8, 8), noise, default).timesteps
        assert visited == list(reversed(spaced_timesteps(100, 10, default.timestep_spacing)))
    dpm = SamplerConfig(method=Method.DPM_SOLVER_PP_2M, num_steps=20)
    assert dataclasses.replace(dpm, method=Method.DDIM).timestep_spacing is Spacing.LINSPACE  # follows the method


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sample.method=euler"], "sample.method: 'euler' is not one of ancestral, ddim, dpm_solver++_2m, heun"),
        (["sample.num_steps=0"], "sample.num_steps must be >= 1, got 0"),
        (["sample.num_steps=1001"], "sample.num_steps 1001 exceeds diffusion.num_timesteps 1000"),
        (["sample.spacing=log-snr"], "sample.spacing: 'log-snr' is not one of linspace, leading, trailing, log_snr"),
        (["sample.method=heun", "sample.eta=0.5"], "sample.eta 0.5 applies to sample.method=ddim only (heun is a det"),
    ],
)
def test_bad_sampler_settings_fail_before_ray_starts(tmp_path, capsys, overrides, message):
    local = [f"storage.root={tmp_path / 'runs'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(["run", *local, *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not ray.is_initialized()
