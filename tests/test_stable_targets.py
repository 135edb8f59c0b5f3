"""Stable targets (Xu, Tong & Jaakkola 2023): the reference batch's posterior mean against closed forms (a Gaussian,
whose posterior mean is linear in x_t; two points, whose posterior is a logistic), the targets at the ends of the
noise range, the class-conditional restriction, the bank a share keeps, and the loss that regresses on them."""

import math

import pytest
import torch

from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion, Prediction
from ddpm_core.stable_targets import Reference, ReferenceBank, posterior_mean, stable_targets


def forward(x0: torch.Tensor, alpha_bar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) noise (Ho et al. 2020, Eq. 4), abar ``[B]``."""
    shape = (-1, *([1] * (x0.dim() - 1)))
    return alpha_bar.sqrt().view(shape) * x0 + (1 - alpha_bar).sqrt().view(shape) * noise


@pytest.mark.parametrize("alpha_bar", [0.05, 0.5, 0.95])
def test_the_posterior_mean_of_a_large_gaussian_reference_is_the_closed_form(alpha_bar):
    """x0 ~ N(mu, s^2 I): E[x0 | x_t] = mu + sqrt(abar) s^2 / (abar s^2 + 1 - abar) (x_t - sqrt(abar) mu)."""
    generator = torch.Generator().manual_seed(0)
    mu, s = torch.tensor([0.3, -0.5, 0.1]), 0.7
    reference = mu + s * torch.randn(400_000, 3, generator=generator, dtype=torch.float64)  # [R, 3]
    x_t = torch.tensor([[0.2, 0.4, -0.9], [1.5, -1.0, 0.0]], dtype=torch.float64)  # [2, 3]
    abar = torch.full((2,), alpha_bar, dtype=torch.float64)
    gain = math.sqrt(alpha_bar) * s**2 / (alpha_bar * s**2 + 1 - alpha_bar)
    exact = mu + gain * (x_t - math.sqrt(alpha_bar) * mu)
    torch.testing.assert_close(posterior_mean(x_t, abar, reference), exact.double(), atol=6e-3, rtol=0)


def two_points(dim: int = 16) -> torch.Tensor:
    """Two images, +1 and -1 everywhere ``[2, dim]``."""
    return torch.stack([torch.ones(dim), -torch.ones(dim)]).double()


def exact_two_point_mean(x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """E[x0 | x_t] for x0 = +-1 (each with probability 1/2): tanh(sqrt(abar) sum(x_t) / (1 - abar)) times ones."""
    slope = math.sqrt(alpha_bar) / (1 - alpha_bar)
    return torch.tanh(slope * x_t.sum(1, keepdim=True)) * torch.ones_like(x_t)


def test_the_stable_target_is_far_nearer_the_posterior_mean_than_the_one_image_target():
    """Two modes at the noise level where x_t could come from either: Algorithm 1's target x0 scatters around the
    posterior mean; the stable target of 512 reference images (x0 among them) is close to it, at every draw."""
    generator = torch.Generator().manual_seed(1)
    data, alpha_bar, batch = two_points(), 0.004, 256
    x0 = data[torch.randint(0, 2, (batch,), generator=generator)]  # [256, 16]
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    abar = torch.full((batch,), alpha_bar, dtype=torch.float64)
    x_t = forward(x0, abar, noise)
    others = data[torch.randint(0, 2, (256,), generator=generator)]
    exact = exact_two_point_mean(x_t, alpha_bar)
    stable = posterior_mean(x_t, abar, torch.cat([x0, others]))  # each row's x0 among the 512
    one_image_error = ((x0 - exact) ** 2).mean()
    stable_error = ((stable - exact) ** 2).mean()
    assert one_image_error > 0.3, "the noise level must leave the mode open"
    assert stable_error < 0.02 * one_image_error


def test_at_low_noise_the_targets_are_algorithm_1s_and_at_high_noise_the_reference_mean():
    generator = torch.Generator().manual_seed(2)
    reference = torch.rand(64, 1, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1  # [64, 1, 4, 4]
    x0, noise = reference[:8], torch.randn(8, 1, 4, 4, generator=generator, dtype=torch.float64)
    low = torch.full((8,), 1 - 1e-6, dtype=torch.float64)
    x0_hat, eps_hat = stable_targets(x0, noise, forward(x0, low, noise), low, reference)
    assert torch.equal(x0_hat, x0) and torch.equal(eps_hat, noise), "exactly Algorithm 1's targets"
    high = torch.full((8,), 1e-14, dtype=torch.float64)
    x0_hat, eps_hat = stable_targets(x0, noise, forward(x0, high, noise), high, reference)
    torch.testing.assert_close(x0_hat, reference.mean(0, keepdim=True).expand_as(x0_hat), atol=1e-5, rtol=0)
    mid = torch.full((8,), 0.3, dtype=torch.float64)
    x_t = forward(x0, mid, noise)
    x0_hat, eps_hat = stable_targets(x0, noise, x_t, mid, reference)
    torch.testing.assert_close(forward(x0_hat, mid, eps_hat), x_t), "eps_hat makes x_t from x0_hat"


def test_a_class_conditional_target_averages_its_own_class_and_the_null_class_all():
    """Each class a single image: its conditional posterior is that image at any noise; the dropped label's is the
    two-point logistic."""
    data, alpha_bar = two_points(), 0.004
    reference = Reference(data.repeat(4, 1), torch.tensor([0, 1] * 4), null_class=2)  # [8, 16]
    x_t = torch.randn(3, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    abar = torch.full((3,), alpha_bar, dtype=torch.float64)
    mean = posterior_mean(x_t, abar, reference.images, reference.allowed(labels))
    torch.testing.assert_close(mean[0], data[0])
    torch.testing.assert_close(mean[1], data[1])
    torch.testing.assert_close(mean[2], exact_two_point_mean(x_t[2:], alpha_bar)[0])
    assert reference.allowed(None) is None and Reference(data).allowed(labels) is None


def test_the_bank_holds_the_last_images_the_micro_batch_last_and_resumes_from_its_state():
    bank = ReferenceBank(10, null_class=5)
    batches = [torch.full((4, 1, 2, 2), float(i)) for i in range(4)]
    for i, images in enumerate(batches):
        reference = bank.push(images, torch.full((4,), i))
    assert reference.images.shape[0] == 10 and torch.equal(reference.images[-4:], batches[3])
    assert reference.images[:, 0, 0, 0].tolist() == [1.0, 1.0] + [2.0] * 4 + [3.0] * 4
    assert reference.labels is not None and reference.labels.tolist() == [1, 1] + [2] * 4 + [3] * 4
    resumed = ReferenceBank(10, null_class=5)
    resumed.restore(bank.state(), torch.device("cpu"))
    following = torch.full((4, 1, 2, 2), 9.0)
    expected, got = bank.push(following, torch.full((4,), 9)), resumed.push(following, torch.full((4,), 9))
    assert torch.equal(expected.images, got.images) and torch.equal(expected.labels, got.labels)
    assert ReferenceBank(3).state() == []
    with pytest.raises(ValueError, match="does not fit"):
        ReferenceBank(3).push(batches[0])


@pytest.mark.parametrize("prediction", list(Prediction))
def test_the_loss_regresses_on_the_stable_targets_in_every_parameterisation(prediction):
    """A network that outputs zeros: the per-example mse is the mean square of the target, which with a reference
    batch is the target of (x0_hat, eps_hat) and without one Algorithm 1's."""
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=100, prediction=prediction))
    generator = torch.Generator().manual_seed(4)
    x0 = torch.rand(6, 1, 4, 4, generator=generator) * 2 - 1  # [6, 1, 4, 4]
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor([0, 10, 40, 60, 80, 99])
    reference = Reference(torch.cat([torch.rand(20, 1, 4, 4, generator=generator) * 2 - 1, x0]))

    def zero(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x_t)

    stable = diffusion.training_losses(zero, x0, t, noise, reference=reference)["mse"]
    abar = diffusion.alphas_cumprod[t].float()
    x0_hat, eps_hat = stable_targets(x0, noise, diffusion.q_sample(x0, t, noise), abar, reference.images)
    expected = (diffusion.training_target(x0_hat, t, eps_hat) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(stable, expected)
    plain = diffusion.training_losses(zero, x0, t, noise)["mse"]
    assert not torch.allclose(stable, plain), "the high-noise rows regress on other targets"
    torch.testing.assert_close(stable[0], plain[0]), "at t = 0 the target is Algorithm 1's"
