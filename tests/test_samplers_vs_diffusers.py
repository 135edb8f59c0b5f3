"""One sampler step against diffusers' DDPMScheduler / DDIMScheduler (an independent implementation), with the same
network output and the same noise; and the visited timesteps against diffusers' spacings."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ddpm_core.diffusion import GaussianDiffusion, Prediction, Variance
from ddpm_core.samplers import Spacing, ancestral_step, ddim_step, spaced_timesteps
from ddpm_core.schedules import make_betas

PREDICTION_TYPE = {Prediction.EPS: "epsilon", Prediction.X0: "sample", Prediction.V: "v_prediction"}
SHAPE = (3, 2, 4, 4)


@pytest.mark.parametrize("spacing", [Spacing.LINSPACE, Spacing.LEADING, Spacing.TRAILING])
@pytest.mark.parametrize("steps", [10, 50, 1000])
def test_visited_timesteps_equal_diffusers(spacing, steps):
    scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing.value)
    scheduler.set_timesteps(steps)
    assert list(reversed(spaced_timesteps(1000, steps, spacing))) == scheduler.timesteps.tolist()


def inputs(seed, channels_out):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    # Scaled so that the predicted x_0 is sometimes clipped.
    output = torch.randn(SHAPE[0], channels_out, *SHAPE[2:], generator=generator, dtype=torch.float64) * 1.5
    return x_t, output


def in_float64(scheduler, base: GaussianDiffusion):
    """diffusers keeps its schedule in float32, which loses ~3e-4 relative precision in 1 - abar_1. The schedules
    are compared in test_schedules; here both sides get the same float64 schedule, so the step math is compared
    at float64 precision."""
    scheduler.betas = base.betas.clone()
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    return scheduler


def spaced_diffusion(prediction, variance, steps, spacing=Spacing.LEADING, schedule="linear"):
    base = GaussianDiffusion(make_betas(schedule, 1000), prediction, variance)
    if steps is None:
        return base, base, list(range(1000))
    visited = spaced_timesteps(1000, steps, spacing)
    return base, base.respaced(visited), visited


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("steps", [None, 50])
@pytest.mark.parametrize("variance", list(Variance))
@pytest.mark.parametrize("prediction", list(Prediction))
def test_ancestral_step_equals_ddpm_scheduler(prediction, variance, steps, clip):
    base, ours, visited = spaced_diffusion(prediction, variance, steps)
    theirs = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type=PREDICTION_TYPE[prediction],
        variance_type=variance.value,
        clip_sample=clip,
        clip_sample_range=1.0,
    )
    in_float64(theirs, base)
    if steps is not None:
        theirs.set_timesteps(steps)
    learned = variance is Variance.LEARNED_RANGE
    for index in [len(visited) - 1, len(visited) // 2, 1, 0]:
        x_t, output = inputs(index, SHAPE[1] * (2 if learned else 1))
        if learned:
            output[:, SHAPE[1] :] = output[:, SHAPE[1] :].tanh()
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + index), dtype=torch.float64)
        expected = theirs.step(output, visited[index], x_t, generator=torch.Generator().manual_seed(100 + index))
        t = torch.full((SHAPE[0],), index, dtype=torch.long)
        step = ancestral_step(ours, output, x_t, t, noise, clip_denoised=clip)
        torch.testing.assert_close(step.x_prev, expected.prev_sample, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(step.pred_x0, expected.pred_original_sample, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("steps, spacing", [(50, Spacing.LEADING), (50, Spacing.TRAILING), (1000, Spacing.LEADING)])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("schedule, diffusers_schedule", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_ddim_step_equals_ddim_scheduler(schedule, diffusers_schedule, prediction, eta, steps, spacing, clip):
    base, ours, visited = spaced_diffusion(prediction, Variance.FIXED_SMALL, steps, spacing, schedule)
    theirs = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule=diffusers_schedule,
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type=PREDICTION_TYPE[prediction],
        clip_sample=clip,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        timestep_spacing=spacing.value,
    )
    in_float64(theirs, base)
    theirs.set_timesteps(steps)
    for index in [len(visited) - 1, len(visited) // 2, 1, 0]:
        x_t, output = inputs(index, SHAPE[1])
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(200 + index), dtype=torch.float64)
        # use_clipped_model_output: after clipping x_0, eps is recomputed from it (DDIM's own code does this).
        expected = theirs.step(
            output, visited[index], x_t, eta=eta, use_clipped_model_output=True, variance_noise=noise
        )
        t = torch.full((SHAPE[0],), index, dtype=torch.long)
        step = ddim_step(ours, output, x_t, t, noise if index > 0 else None, eta, clip_denoised=clip)
        torch.testing.assert_close(step.x_prev, expected.prev_sample, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(step.pred_x0, expected.pred_original_sample, rtol=1e-9, atol=1e-10)
