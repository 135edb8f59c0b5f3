"""Beta schedules against their published definitions and against diffusers (an independent implementation)."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from ddpm_core.schedules import Schedule, make_betas


def test_linear_is_the_papers_schedule_at_t1000():
    betas = make_betas("linear", 1000)
    assert betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_linear_rescales_for_other_t_keeping_total_noise():
    # Rescaling by 1000/T keeps abar_T of the same order: ~4e-5 at T=1000, still near zero at T=250.
    for steps in (250, 4000):
        abar = torch.cumprod(1 - make_betas("linear", steps), 0)[-1].item()
        assert abar < 1e-3
        assert make_betas("linear", steps)[0].item() == pytest.approx(1e-4 * 1000 / steps)


def test_cosine_matches_nichol_dhariwal_eq17():
    steps, s = 1000, 0.008
    betas = make_betas("cosine", steps)
    f = lambda t: math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = torch.cumprod(1 - betas, 0)
    # abar_t = f(t) / f(0), except where beta was clipped at 0.999 (only the last step).
    for t in (1, 10, 500, 900):
        assert abar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-10)
    assert betas.max().item() == pytest.approx(0.999)


@pytest.mark.parametrize(
    "ours, theirs",
    [("linear", "linear"), ("cosine", "squaredcos_cap_v2"), ("quadratic", "scaled_linear"), ("sigmoid", "sigmoid")],
)
@pytest.mark.parametrize("steps", [1000, 100])
def test_schedules_equal_diffusers(ours, theirs, steps):
    scale = 1000 / steps
    reference = DDPMScheduler(
        num_train_timesteps=steps, beta_schedule=theirs, beta_start=1e-4 * scale, beta_end=0.02 * scale
    ).betas.double()
    # diffusers builds these in float32; compare at float32 precision.
    torch.testing.assert_close(make_betas(ours, steps), reference, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("schedule", list(Schedule))
def test_any_t_gives_valid_betas(schedule):
    for steps in (2, 3, 17, 1000, 4000):
        betas = make_betas(schedule, steps)
        assert betas.shape == (steps,)
        assert bool(((betas > 0) & (betas < 1)).all())


def test_bad_schedule_input_is_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="num_timesteps must be >= 2"):
        make_betas("linear", 1)
    with pytest.raises(ValueError, match="'warp'"):
        make_betas("warp", 1000)
    with pytest.raises(ValueError, match="unexpected parameters"):
        make_betas("cosine", 1000, beta_start=0.1)
    with pytest.raises(ValueError, match="outside"):
        make_betas("linear", 1000, beta_start=0.5, beta_end=1.5)


def test_a_log_snr_shift_moves_every_steps_log_snr_by_that_constant():
    """Hoogeboom et al. 2023, Sec. 3.1: log SNR(t) + shift at every t (up to the last step's 0.999 clip)."""

    def log_snr(betas: torch.Tensor) -> torch.Tensor:
        abar = torch.cumprod(1 - betas, 0)
        return torch.log(abar / (1 - abar))

    plain = log_snr(make_betas("cosine", 1000))
    for shift in (-1.5, 0.7, 2.0):
        shifted = log_snr(make_betas("cosine", 1000, logsnr_shift=shift))
        torch.testing.assert_close(shifted[:-1] - plain[:-1], torch.full((999,), shift, dtype=torch.float64))
    torch.testing.assert_close(make_betas("cosine", 1000, logsnr_shift=0.0), make_betas("cosine", 1000))
