"""Latent interpolation (Ho et al. 2020, Sec. 4.4): the reverse process from an intermediate timestep is Algorithm 2,
the endpoints of an interpolation decode the sources' own latents, and mixing is linear in the latent."""

import torch

from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion
from ddpm_core.interpolation import interpolate, reverse_process
from ddpm_core.samplers import PerIndexNoise, SamplerConfig, sample
from tests.test_sampling import tiny_model


def test_the_reverse_process_from_t_minus_1_is_ancestral_sampling():
    model, diffusion = tiny_model(), GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=50))
    drawn = sample(model, diffusion, (1, 8, 8), PerIndexNoise(7, range(3)), SamplerConfig(method="ancestral"))
    noise = PerIndexNoise(7, range(3))
    x_t = noise((1, 8, 8))  # the same x_T as sample() drew, then the same per-step noise
    torch.testing.assert_close(reverse_process(model, diffusion, x_t, 49, noise), drawn.samples)


def test_interpolation_endpoints_decode_each_source_and_mixing_is_linear():
    model, diffusion = tiny_model(), GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=50))
    first, second = torch.rand(1, 8, 8) * 2 - 1, torch.rand(1, 8, 8) * 2 - 1
    eps = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0))
    decoded = interpolate(model, diffusion, first, second, 20, [0.0, 0.5, 1.0], PerIndexNoise(3, range(3)), eps)
    t = torch.full((1,), 20)
    latents = [diffusion.q_sample(source[None], t, eps[None]) for source in (first, second)]  # Eq. 4, shared eps
    for weight, index in ((0.0, 0), (0.5, 1), (1.0, 2)):
        mixture = (1 - weight) * latents[0] + weight * latents[1]  # [1, C, H, W]
        alone = reverse_process(model, diffusion, mixture, 20, PerIndexNoise(3, range(index, index + 1)))
        torch.testing.assert_close(decoded[index : index + 1], alone)
    assert not torch.allclose(decoded[0], decoded[2])
