"""The variational bound: each term against an independent KL / likelihood computation, the losses'
gradient routing, and the unbiased bits/dim estimate against the full T-term bound."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch.distributions import Normal, kl_divergence

from ddpm_core.data import load_dataset, to_model_range
from ddpm_core.diffusion import (
    GaussianDiffusion,
    Loss,
    Prediction,
    Variance,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from ddpm_core.schedules import make_betas
from ddpm_core.unet import UNet, UNetConfig
from tests.oracles import gaussian_oracle
from tests.test_sampling import TINY

LOG2 = math.log(2.0)


def random_output(variance: Variance, shape, generator):
    channels = shape[1] * (2 if variance is Variance.LEARNED_RANGE else 1)
    output = torch.randn(shape[0], channels, *shape[2:], generator=generator, dtype=torch.float64)
    if variance is Variance.LEARNED_RANGE:
        output[:, shape[1] :] = output[:, shape[1] :].tanh()  # interpolation values in [-1, 1]
    return output


def test_normal_kl_equals_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(2, 100, generator=generator, dtype=torch.float64)
    lv1, lv2 = torch.randn(2, 100, generator=generator, dtype=torch.float64)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("variance", list(Variance))
def test_vlb_terms_equal_independent_kl(prediction, variance):
    """For t > 0, L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)); the model side is rebuilt here from the
    paper's formulas (Eq. 11 mean in eps form, Nichol & Dhariwal Eq. 15 variance), not from the library."""
    generator = torch.Generator().manual_seed(1)
    diffusion = GaussianDiffusion(make_betas("cosine", 1000), prediction, variance)
    shape = (4, 2, 3, 3)
    x0 = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 10, 500, 999])
    x_t = diffusion.q_sample(x0, t, torch.randn(shape, generator=generator, dtype=torch.float64))
    output = random_output(variance, shape, generator)
    terms = diffusion.vlb_terms_bits(output, x0, x_t, t)

    betas = diffusion.betas
    abar = torch.cumprod(1 - betas, 0)
    a_t, ab_t, b_t = ((1 - betas)[t], abar[t], betas[t])
    a_t, ab_t, b_t, ab_prev = (v.reshape(-1, 1, 1, 1) for v in (a_t, ab_t, b_t, abar[t - 1]))
    post_var = b_t * (1 - ab_prev) / (1 - ab_t)
    post_mean = (ab_prev.sqrt() * b_t / (1 - ab_t)) * x0 + ((1 - ab_prev) * a_t.sqrt() / (1 - ab_t)) * x_t
    head = output[:, : shape[1]]
    if prediction is Prediction.EPS:
        eps = head
    elif prediction is Prediction.X0:
        eps = (x_t - ab_t.sqrt() * head) / (1 - ab_t).sqrt()
    else:  # v: eps = sqrt(1 - abar) x_t + sqrt(abar) v
        eps = (1 - ab_t).sqrt() * x_t + ab_t.sqrt() * head
    model_mean = (x_t - b_t / (1 - ab_t).sqrt() * eps) / a_t.sqrt()  # Ho et al. 2020, Eq. 11
    if variance is Variance.FIXED_SMALL:
        model_var = post_var.expand(shape)
    elif variance is Variance.FIXED_LARGE:
        model_var = b_t.expand(shape)
    else:
        fraction = (output[:, shape[1] :] + 1) / 2
        model_var = torch.exp(fraction * torch.log(b_t) + (1 - fraction) * torch.log(post_var))
    kl = kl_divergence(Normal(post_mean, post_var.sqrt().expand(shape)), Normal(model_mean, model_var.sqrt()))
    torch.testing.assert_close(terms, kl.mean(dim=(1, 2, 3)) / LOG2, rtol=1e-7, atol=1e-9)


def test_decoder_term_is_the_discretized_gaussian_nll():
    """At t = 0 the term is -log p(x_0 | x_1) with Eq. 13's bins, computed here with scipy's normal CDF."""
    generator = torch.Generator().manual_seed(2)
    diffusion = GaussianDiffusion(make_betas("linear", 1000), variance=Variance.FIXED_SMALL)
    pixels = torch.randint(0, 256, (3, 1, 4, 4), generator=generator)
    pixels[0, 0, 0, :2] = torch.tensor([0, 255])  # make sure both edge bins occur
    x0 = pixels.double() / 127.5 - 1
    t = torch.zeros(3, dtype=torch.long)
    x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=generator, dtype=torch.float64))
    output = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    terms = diffusion.vlb_terms_bits(output, x0, x_t, t)

    moments = diffusion.p_mean_variance(output, x_t, t)
    mean, std = moments.mean.numpy(), np.exp(0.5 * moments.log_variance.numpy())
    x = x0.numpy()
    upper = np.where(x > 0.999, np.inf, x + 1 / 255)
    lower = np.where(x < -0.999, -np.inf, x - 1 / 255)
    probability = norm.cdf(upper, mean, std) - norm.cdf(lower, mean, std)
    expected = -np.log(probability).mean(axis=(1, 2, 3)) / LOG2
    np.testing.assert_allclose(terms.numpy(), expected, rtol=1e-9)


def test_discretized_likelihood_is_normalised_over_the_256_bins():
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in [(0.0, -3.0), (0.97, -5.0), (-1.2, -1.0), (0.5, -9.0)]:
        log_probs = discretized_gaussian_log_likelihood(
            levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale)
        )
        assert log_probs.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
        assert bool(torch.isfinite(log_probs).all())


def test_prior_term_is_kl_to_standard_normal():
    diffusion = GaussianDiffusion(make_betas("linear", 1000))
    x0 = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(2, 1, 2, 2)
    abar_T = torch.cumprod(1 - diffusion.betas, 0)[-1]
    expected = (
        kl_divergence(Normal(abar_T.sqrt() * x0, (1 - abar_T).sqrt()), Normal(0.0, 1.0)).mean(dim=(1, 2, 3)) / LOG2
    )
    torch.testing.assert_close(diffusion.prior_bits(x0), expected)
    assert bool((diffusion.prior_bits(x0) < 1e-4).all())  # the linear schedule ends almost at N(0, I)


class AffineHead(torch.nn.Module):
    """A stand-in network with separately addressable mean and variance outputs."""

    def __init__(self, channels: int):
        super().__init__()
        self.mean_scale = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.var_value = torch.nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
        self.channels = channels

    def forward(self, x, t):
        return torch.cat([self.mean_scale * x, self.var_value * torch.ones_like(x)], dim=1)


@pytest.mark.parametrize("loss, mean_gets_vb_gradient", [(Loss.HYBRID, False), (Loss.VLB, True)])
def test_hybrid_loss_stops_the_vlb_gradient_into_the_mean(loss, mean_gets_vb_gradient):
    diffusion = GaussianDiffusion(make_betas("linear", 100), Prediction.EPS, Variance.LEARNED_RANGE, loss)
    model = AffineHead(1)
    x0 = torch.rand(8, 1, 2, 2, dtype=torch.float64) * 2 - 1
    t = torch.arange(1, 9) * 10
    terms = diffusion.training_losses(model, x0, t, torch.randn_like(x0))
    mean_grad, var_grad = torch.autograd.grad(terms["vb"].sum(), [model.mean_scale, model.var_value], allow_unused=True)
    assert var_grad is not None and abs(var_grad.item()) > 0
    assert (mean_grad is not None and abs(mean_grad.item()) > 0) == mean_gets_vb_gradient
    expected = terms["mse"] + 0.001 * 100 * terms["vb"] if loss is Loss.HYBRID else 100 * terms["vb"]
    torch.testing.assert_close(terms["loss"], expected)


@pytest.mark.parametrize("prediction", list(Prediction))
def test_simple_loss_is_the_mse_to_the_parameterisation_target(prediction):
    diffusion = GaussianDiffusion(make_betas("linear", 1000), prediction)
    generator = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 1, 3, 3, generator=generator, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 5, 600, 999])
    zero = lambda x, t: torch.zeros_like(x)
    terms = diffusion.training_losses(zero, x0, t, noise)
    abar = diffusion.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    target = {Prediction.EPS: noise, Prediction.X0: x0, Prediction.V: abar.sqrt() * noise - (1 - abar).sqrt() * x0}[
        prediction
    ]
    torch.testing.assert_close(terms["loss"], (target**2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_bits_per_dim_estimate_is_unbiased_for_the_full_bound(schedule):
    """On real 8-bit digits with the Gaussian oracle as the model, the Monte Carlo estimate (8 timesteps per
    image) agrees with the full 1000-term bound within its standard error (paired over 128 images)."""
    digits = load_dataset("builtin:digits")
    x0 = to_model_range(digits.images[:128]).double()  # [128, 1, 8, 8]
    diffusion = GaussianDiffusion(make_betas(schedule, 1000), variance=Variance.FIXED_SMALL)
    model = gaussian_oracle(diffusion, x0.mean().item(), x0.std().item(), Prediction.EPS)
    full = diffusion.bits_per_dim(model, x0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(full["total"], full["terms"].sum(1) + full["prior"])
    estimate = diffusion.bits_per_dim_estimate(model, x0, num_samples=8, generator=torch.Generator().manual_seed(5))
    difference = estimate["total"] - full["total"]
    standard_error = difference.std().item() / math.sqrt(len(difference))
    assert abs(difference.mean().item()) < 4 * standard_error
    # The per-example stderr the estimator reports is of the right size.
    assert estimate["stderr"].pow(2).mean().sqrt().item() == pytest.approx(difference.std().item(), rel=0.5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("variance, max_gap", [(Variance.FIXED_LARGE, 0.25), (Variance.FIXED_SMALL, 1.0)])
def test_bound_on_gaussian_data_lies_just_above_its_entropy(schedule, variance, max_gap):
    """8-bit data drawn from N(m, s^2): the exact oracle's bound must be >= the data's discretised cross-entropy
    under N(m, s^2) (a bound on the NLL; the model is this Gaussian up to sampler error) and close to it. The
    fixed-large variance is the tighter one here, since the true reverse variance exceeds beta~_t."""
    mean, std = 0.1, 0.3
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(128, 1, 4, 4, generator=generator, dtype=torch.float64) * std + mean
    x0 = ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # quantised to the 8-bit grid
    values = x0.numpy()
    upper = np.where(values > 0.999, np.inf, values + 1 / 255)
    lower = np.where(values < -0.999, -np.inf, values - 1 / 255)
    cross_entropy = -np.log2(norm.cdf(upper, mean, std) - norm.cdf(lower, mean, std)).mean(axis=(1, 2, 3))

    diffusion = GaussianDiffusion(make_betas(schedule, 1000), variance=variance)
    bound = diffusion.bits_per_dim(gaussian_oracle(diffusion, mean, std, Prediction.EPS), x0, generator=generator)[
        "total"
    ]
    gap = bound.numpy() - cross_entropy
    standard_error = gap.std() / math.sqrt(len(gap))
    assert gap.mean() > -4 * standard_error
    assert gap.mean() < max_gap


def test_continuous_decoder_term_is_the_gaussian_density():
    """For continuous data (latents) the t = 0 term is -log of the decoder Gaussian's density, torch.distributions'."""
    generator = torch.Generator().manual_seed(7)
    diffusion = GaussianDiffusion(make_betas("linear", 1000), variance=Variance.FIXED_LARGE)
    x0 = torch.randn(3, 4, 2, 2, generator=generator, dtype=torch.float64) * 1.5  # [3, 4, 2, 2], beyond [-1, 1]
    t = torch.zeros(3, dtype=torch.long)
    x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=generator, dtype=torch.float64))
    output = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    moments = diffusion.p_mean_variance(output, x_t, t)
    expected = -Normal(moments.mean, (0.5 * moments.log_variance).exp()).log_prob(x0).mean(dim=(1, 2, 3)) / LOG2
    torch.testing.assert_close(diffusion.vlb_terms_bits(output, x0, x_t, t, continuous=True), expected)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("variance, max_gap", [(Variance.FIXED_LARGE, 0.3), (Variance.FIXED_SMALL, 1.0)])
def test_continuous_bound_on_gaussian_data_lies_just_above_its_differential_entropy(schedule, variance, max_gap):
    """Continuous data drawn from N(m, s^2) with s = 1, as scaled latents are: the exact oracle's bound in bits/dim
    must be >= the data's differential cross-entropy under N(m, s^2) (2.05 bits) and close to it, with no 8-bit bin
    in it (the discretised decoder would censor every value outside [-1, 1], a third of them)."""
    mean, std = 0.1, 1.0
    generator = torch.Generator().manual_seed(6)
    x0 = torch.randn(128, 1, 4, 4, generator=generator, dtype=torch.float64) * std + mean  # [128, 1, 4, 4]
    cross_entropy = -norm.logpdf(x0.numpy(), mean, std).mean(axis=(1, 2, 3)) / LOG2
    diffusion = GaussianDiffusion(make_betas(schedule, 1000), variance=variance)
    oracle = gaussian_oracle(diffusion, mean, std, Prediction.EPS)
    bound = diffusion.bits_per_dim(oracle, x0, generator=generator, continuous=True)["total"]
    gap = bound.numpy() - cross_entropy
    standard_error = gap.std() / math.sqrt(len(gap))
    assert gap.mean() > -4 * standard_error
    assert gap.mean() < max_gap


def test_the_bound_of_several_timesteps_per_call_is_the_bound_of_one_per_call():
    """The full bound evaluates several timesteps of a small batch in one network call; the noise is drawn in the
    same order, so a class-conditional U-Net's per-image bound (labels tiled with the images) equals the one of one
    timestep per call up to float rounding, in fewer calls."""
    config = UNetConfig(**{**TINY.to_dict(), "num_classes": 3})  # tests/test_sampling.py's, class-conditional
    network = UNet(config).eval()
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():  # every weight random, the output layer's too (zero at initialisation)
        for parameter in network.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    sizes: list[int] = []
    network.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    diffusion = GaussianDiffusion(make_betas("linear", 100), variance=Variance.FIXED_LARGE)
    x0 = to_model_range(load_dataset("builtin:digits").images[:3])  # [3, 1, 8, 8] float32, as the pipeline's
    labels = {"class_labels": torch.tensor([0, 2, 1])}  # [3]

    def bound(max_batch: int) -> dict[str, torch.Tensor]:
        return diffusion.bits_per_dim(network, x0, labels, torch.Generator().manual_seed(8), max_batch=max_batch)

    one = bound(max_batch=1)
    assert sizes == [3] * 100  # below the batch: one timestep per call
    sizes.clear()
    several = bound(max_batch=64)
    assert sizes == [63] * 4 + [48]  # 21 timesteps per call, then the last 16
    torch.testing.assert_close(several["terms"], one["terms"])  # float32's tolerance: the convolutions' rounding
    torch.testing.assert_close(several["total"], one["total"])
    other = diffusion.bits_per_dim(
        network, x0, {"class_labels": torch.tensor([1, 0, 2])}, torch.Generator().manual_seed(8)
    )
    assert not torch.allclose(other["terms"], one["terms"])  # the labels reach the network
