"""Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", Eq. 1): the paper
combines denoisers, ``D_w = D_guide + w (D_model - D_guide)``; ddpm_core combines the network's predictions. The
weights sum to one, so for eps and v predictions the two are the same denoiser, checked here against x_0 computed
from each network alone."""

import pytest
import torch

from ddpm_core.checkpoint import Guide, load_snapshot, save_snapshot
from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion
from ddpm_core.samplers import (
    Method,
    PerIndexNoise,
    SamplerConfig,
    autoguidance,
    evaluations_per_image,
    guidance_interval,
    sample,
)
from tests.test_sampling import TINY, tiny_model


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("weight", [0.5, 1.5, 2.5])
def test_guided_predictions_are_the_papers_combination_of_denoisers(prediction, weight):
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=100, prediction=prediction))
    model, guide = tiny_model(seed=0), tiny_model(seed=1)
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([3, 40, 97])  # x_t, t
    to_x0 = diffusion.x0_from_eps if prediction == "eps" else diffusion.x0_from_v
    with torch.no_grad():
        good, bad = to_x0(x, t, model(x, t)), to_x0(x, t, guide(x, t))  # D_model, D_guide: [3, 1, 8, 8]
        guided = to_x0(x, t, autoguidance(model, guide, weight, channels=1)(x, t))
    torch.testing.assert_close(guided, bad + weight * (good - bad), rtol=1e-5, atol=1e-5)
    assert (good - bad).abs().max() > 1e-3  # the two networks differ: the test can tell the weights apart


def test_weight_one_is_the_model_alone_and_labels_reach_both_networks():
    model, guide = tiny_model(seed=0, num_classes=3), tiny_model(seed=1, num_classes=3)
    assert autoguidance(model, guide, 1.0, channels=1) is model  # one network call per step
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([5, 50]), torch.tensor([0, 2])
    with torch.no_grad():
        guided = autoguidance(model, guide, 2.0, channels=1)(x, t, class_labels=labels)
        expected = 2.0 * model(x, t, class_labels=labels) - guide(x, t, class_labels=labels)
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "alone"), [(Method.ANCESTRAL, 250), (Method.DPM_SOLVER_PP_2M, 250), (Method.HEUN, 499)]
)
def test_a_guided_sample_counts_both_networks_calls(method, alone):
    diffusion, config = GaussianDiffusion.from_config(DiffusionConfig()), SamplerConfig(method=method, num_steps=250)
    assert method.network_evaluations(250) == evaluations_per_image(diffusion, config) == alone
    assert evaluations_per_image(diffusion, config, guided=True) == 2 * alone


def test_a_snapshot_stores_its_guide_and_samples_guided(tmp_path):
    """A snapshot committed with a :class:`Guide` loads with it; :meth:`Snapshot.sampling_model` is the autoguided
    model at the stored weight (or another; 1: the model alone), and a snapshot saved again without the guide loses
    its weight too (no metadata promising weights that are not there)."""
    model, guide = tiny_model(seed=0), tiny_model(seed=1)
    diffusion, provenance = DiffusionConfig(num_timesteps=100), {"guide_images": 300, "guide_sigma_rel": 0.05}
    uri = str(tmp_path / "guided")
    save_snapshot(
        uri, model, TINY, diffusion, {"ema_sigma_rel": 0.05}, None, Guide(guide.state_dict(), 1.5, provenance)
    )
    loaded = load_snapshot(uri)
    assert loaded.guide is not None and loaded.guide.weight == 1.5 and loaded.guide.provenance == provenance
    assert loaded.metadata["autoguidance"] == {"weight": 1.5, **provenance}
    assert all(torch.equal(loaded.guide.state_dict[key], value) for key, value in guide.state_dict().items())
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([7, 70])
    with torch.no_grad():
        good, bad = model(x, t), guide(x, t)  # [2, 1, 8, 8] each
        torch.testing.assert_close(loaded.sampling_model()(x, t), bad + 1.5 * (good - bad), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            loaded.sampling_model(weight=3.0)(x, t), bad + 3 * (good - bad), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(loaded.sampling_model(weight=1.0)(x, t), good)
    again = str(tmp_path / "again")
    save_snapshot(again, loaded.build_network(), loaded.unet, loaded.diffusion, loaded.metadata)
    plain = load_snapshot(again)
    assert plain.guide is None and "autoguidance" not in plain.metadata and plain.metadata["ema_sigma_rel"] == 0.05


def counted(model, calls):
    """``model`` that appends the timesteps of each call to ``calls``."""

    def call(x, t, **kwargs):
        calls.append(int(t[0]))
        return model(x, t, **kwargs)

    return call


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.5, 3.0), (2.0, float("inf"))])
def test_in_a_limited_interval_only_the_steps_whose_noise_level_lies_in_it_are_guided(interval):
    """Kynkäänniemi et al. 2024: guidance where sigma_t = sqrt((1 - abar_t) / abar_t) lies in (low, high], the model
    alone elsewhere, element by element in a batch of mixed timesteps."""
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=100, schedule="cosine"))
    model, guide = tiny_model(seed=0), tiny_model(seed=1)
    guided = autoguidance(model, guide, 2.0, channels=1)
    limited = guidance_interval(guided, model, diffusion.alphas_cumprod, interval)
    t = torch.arange(0, 100, 3)  # [34]
    abar = diffusion.alphas_cumprod[t].double()
    sigma = ((1 - abar) / abar).sqrt()  # [34]
    inside = (sigma > interval[0]) & (sigma <= interval[1])
    assert 0 < int(inside.sum()) < len(t)  # the batch mixes both kinds of step
    x = torch.randn(len(t), 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = torch.where(inside[:, None, None, None], guided(x, t), model(x, t))  # [34, 1, 8, 8]
        torch.testing.assert_close(limited(x, t), expected)
        for index in (int(inside.nonzero()[0]), int((~inside).nonzero()[0])):  # one timestep: one branch only
            one = t[index : index + 1]
            reference = guided if inside[index] else model
            torch.testing.assert_close(limited(x[index : index + 1], one), reference(x[index : index + 1], one))


@pytest.mark.parametrize("method", list(Method))
@pytest.mark.parametrize("interval", [None, (0.0, 1.0), (0.3, 2.0)])
def test_the_guided_network_calls_are_counted_as_a_sampler_makes_them(method, interval):
    """:func:`evaluations_per_image` (the evaluate stage's NFE) against the calls a sampler makes to the model and to
    its guide, counted while it samples."""
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=100, schedule="cosine"))
    config = SamplerConfig(method=method, num_steps=12)
    model_calls, guide_calls = [], []
    model, guide = counted(tiny_model(seed=0), model_calls), counted(tiny_model(seed=1), guide_calls)
    guided = autoguidance(model, guide, 1.5, channels=1)
    if interval is not None:
        guided = guidance_interval(guided, model, diffusion.alphas_cumprod, interval)
    drawn = sample(guided, diffusion, (1, 8, 8), PerIndexNoise(0, range(2)), config).samples  # [2, 1, 8, 8]
    assert drawn.grad_fn is None  # sampled without autograd: no graph of the 12 steps is kept
    assert len(model_calls) == method.network_evaluations(12)
    assert 0 < len(guide_calls) <= len(model_calls) and (interval is not None or guide_calls == model_calls)
    assert evaluations_per_image(diffusion, config, True, interval) == len(model_calls) + len(guide_calls)


def test_a_snapshot_stores_its_guides_interval_and_samples_guided_only_there(tmp_path):
    model, guide = tiny_model(seed=0), tiny_model(seed=1)
    config = DiffusionConfig(num_timesteps=100, schedule="cosine")
    uri = str(tmp_path / "limited")
    save_snapshot(uri, model, TINY, config, {}, None, Guide(guide.state_dict(), 1.5, {"guide_images": 30}, (0.0, 1.0)))
    loaded = load_snapshot(uri)
    assert loaded.guide is not None and loaded.guide.interval == (0.0, 1.0)
    assert loaded.metadata["autoguidance"] == {"weight": 1.5, "interval": [0.0, 1.0], "guide_images": 30}
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([10, 90])  # [2]
    abar = GaussianDiffusion.from_config(config).alphas_cumprod[t]  # [2]
    sigma = ((1 - abar) / abar).sqrt()
    assert sigma[0] <= 1.0 < sigma[1]  # t = 10 inside, t = 90 outside
    with torch.no_grad():
        good, bad = model(x, t), guide(x, t)  # [2, 1, 8, 8] each
        expected = torch.stack([(bad + 1.5 * (good - bad))[0], good[1]])
        torch.testing.assert_close(loaded.sampling_model()(x, t), expected, rtol=1e-5, atol=1e-5)
