"""Sampling behaviour: per-index RNG, progressive decoding, progress reporting (guidance: tests/test_conditional.py)."""

import pytest
import torch

from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion, Variance
from ddpm_core.samplers import PerIndexNoise, SamplerConfig, fast_sampling_network, sample
from ddpm_core.unet import UNet, UNetConfig

TINY = UNetConfig(
    image_size=8,
    in_channels=1,
    base_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    dropout=0.0,
    norm_groups=8,
)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = UNetConfig(**{**TINY.to_dict(), **overrides})
    model = UNet(config, learn_variance=False).eval()
    for module in model.modules():  # leave the zero-initialised layers non-zero so the output depends on the input
        if getattr(module, "zero_init", False):
            torch.nn.init.normal_(module.weight, std=0.05)
    return model


@pytest.mark.parametrize(
    "config",
    [
        SamplerConfig(method="ancestral"),
        SamplerConfig(method="ddim", num_steps=50, eta=1.0),
        SamplerConfig(method="ddim", num_steps=20, eta=0.0),
    ],
)
def test_image_i_is_the_same_whatever_the_batching(config):
    """16 images as one batch and as batches of 5 + 11 are equal after all steps (per-index RNG)."""
    model = tiny_model()
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=200, variance=Variance.FIXED_SMALL))
    whole = sample(model, diffusion, (1, 8, 8), PerIndexNoise(7, range(16)), config).samples
    first = sample(model, diffusion, (1, 8, 8), PerIndexNoise(7, range(5)), config).samples
    rest = sample(model, diffusion, (1, 8, 8), PerIndexNoise(7, range(5, 16)), config).samples
    assert (whole - torch.cat([first, rest])).abs().max().item() < 1e-4
    # Different seeds or indices give different images.
    other = sample(model, diffusion, (1, 8, 8), PerIndexNoise(8, range(5)), config).samples
    assert (other - first).abs().max().item() > 0.1


def test_the_fast_sampling_network_changes_rounding_only():
    """bf16 autocast and torch.compile (inductor, frozen weights) give the eager float32 images up to rounding: the
    sampler's arithmetic stays float32, and the plain path is the model itself."""
    model = tiny_model()
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=200, variance=Variance.FIXED_SMALL))
    config = SamplerConfig(method="ddim", num_steps=10)
    assert fast_sampling_network(model) is model
    eager = sample(model, diffusion, (1, 8, 8), PerIndexNoise(3, range(6)), config).samples  # [6, 1, 8, 8]
    bf16_network = fast_sampling_network(model, autocast_dtype=torch.bfloat16)
    x, t = torch.randn(6, 1, 8, 8), torch.full((6,), 50)
    assert bf16_network(x, t).dtype == torch.float32
    bf16 = sample(bf16_network, diffusion, (1, 8, 8), PerIndexNoise(3, range(6)), config).samples
    assert 0 < (bf16 - eager).abs().mean().item() < 0.01  # bf16 keeps 8 bits of mantissa: close, not equal
    # compiled (inductor, frozen weights; one compilation, for the batch of 6, keeps the test short)
    compiled_network = fast_sampling_network(model, compile=True)
    compiled = sample(compiled_network, diffusion, (1, 8, 8), PerIndexNoise(3, range(6)), config).samples
    assert (compiled - eager).abs().max().item() < 1e-3
    other = sample(model, diffusion, (1, 8, 8), PerIndexNoise(4, range(6)), config).samples
    assert (
        other - eager
    ).abs().mean().item() > 0.5  # another seed: the tolerances above are far below a change of image


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; inductor skips them on CPUs")
def test_compiled_sampling_on_cuda_graphs_hands_back_outputs_a_replay_does_not_overwrite():
    """With ``cuda_graphs``, inductor captures the compiled network in CUDA graphs and each call replays into the same
    output buffer; what the network hands back is a copy, so an output kept across later calls keeps its values. The
    graphs change rounding only: the samples are the eager float32 ones up to rounding."""
    from torch._dynamo.utils import counters

    model = tiny_model().cuda()
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=200, variance=Variance.FIXED_SMALL))
    config = SamplerConfig(method="ddim", num_steps=10)
    network = fast_sampling_network(model, compile=True, cuda_graphs=True)
    t = torch.full((6,), 50, device="cuda")
    x1, x2 = torch.randn(2, 6, 1, 8, 8, device="cuda")
    counters.clear()
    with torch.no_grad():
        expected1, expected2 = model(x1, t), model(x2, t)
        for _ in range(3):  # inductor records the graph on an early call and replays it from then on
            first = network(x1, t)
        second = network(x2, t)  # a replay writing x2's output where x1's was computed
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])  # the graphs were used
    # The two inputs' outputs differ by far more than rounding (TF32 convolutions on both paths), so an output
    # overwritten by the later replay would hold x2's values.
    assert (expected1 - expected2).abs().max().item() > 0.1
    torch.testing.assert_close(first, expected1, rtol=0, atol=1e-2)
    torch.testing.assert_close(second, expected2, rtol=0, atol=1e-2)
    eager = sample(model, diffusion, (1, 8, 8), PerIndexNoise(3, range(6), "cuda"), config).samples
    graphed = sample(network, diffusion, (1, 8, 8), PerIndexNoise(3, range(6), "cuda"), config).samples
    assert (graphed - eager).abs().max().item() < 1e-2


def test_progressive_decoding_and_progress_callback():
    model = tiny_model()
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=100))
    seen = []
    result = sample(
        model,
        diffusion,
        (1, 8, 8),
        PerIndexNoise(0, range(3)),
        SamplerConfig(num_steps=100),
        progress=lambda done, total: seen.append((done, total)),
        record_x0_every=25,
    )
    assert seen == [(i, 100) for i in range(1, 101)]
    assert result.recorded_steps == [99, 74, 49, 24, 0]
    assert result.pred_x0.shape == (5, 3, 1, 8, 8)
    assert result.pred_x0.abs().max() <= 1.0  # clipped x_0 predictions
    assert result.timesteps == list(range(99, -1, -1))


def test_sampler_config_rejects_bad_values():
    with pytest.raises(ValueError, match="sampler.method"):
        SamplerConfig(method="euler")
    with pytest.raises(ValueError, match="sampler.eta"):
        SamplerConfig(method="ddim", eta=1.5)
    with pytest.raises(ValueError, match="sampler.num_steps"):
        SamplerConfig(num_steps=0)


class HalfInput(torch.nn.Module):
    """A fixed eps-prediction network: eps_hat(x, t) = x / 2."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x / 2


@pytest.mark.parametrize("variance", list(Variance)[:2])
@pytest.mark.parametrize("method", ["ddim", "ancestral", "dpm_solver++_2m", "heun"])
def test_one_step_sampling_returns_the_clipped_x0_estimate_from_pure_noise(method, variance):
    """A sampler respaced to one step (a one-step distilled student's) takes one network evaluation at the noisiest
    trailing timestep and returns its x_0 estimate, clipped: a one-step schedule has no beta~_1 to clip to."""
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=1000, variance=variance))
    config = SamplerConfig(method=method, num_steps=1, spacing="trailing")
    result = sample(HalfInput(), diffusion, (1, 4, 4), PerIndexNoise(3, range(5)), config)
    x_T = PerIndexNoise(3, range(5))((1, 4, 4))  # [5, 1, 4, 4]
    abar = diffusion.alphas_cumprod[-1].item()
    expected = ((x_T - (1 - abar) ** 0.5 * x_T / 2) / abar**0.5).clamp(-1, 1)  # Eq. 4 inverted at t = T - 1
    assert result.timesteps == [999]
    torch.testing.assert_close(result.samples, expected, rtol=1e-5, atol=1e-5)
