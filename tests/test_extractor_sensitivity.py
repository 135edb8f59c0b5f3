"""The default small-image extractor (the data set's own classifier, ddpm_core.features) is sensitive where it must
be: on real digits with growing corruption its FID rises monotonically, every level clearly beyond the previous one's
interval; and a model trained for a tenth of the quickstart's images scores clearly worse than the quickstart's."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpm_core.data import load_dataset
from ddpm_core.features import ClassifierExtractor, train_classifier
from ddpm_core.metrics import FeatureStatistics, FidEstimate, fid_jackknife

Z = 1.96  # the promotion rule's default: "clearly" means apart by more than 1.96 combined standard errors


def gaussian_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``[N, H, W, C]`` uint8 plus N(0, (sigma * 255)^2) per pixel."""
    return np.clip(images + rng.normal(0.0, sigma * 255, images.shape), 0, 255).round().astype(np.uint8)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """A 5x5 Gaussian blur of standard deviation ``sigma`` pixels (edges replicated)."""
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel[:, None] * kernel[None, :] / kernel.sum() ** 2)[None, None]  # [1, 1, 5, 5]
    x = torch.from_numpy(images).float().permute(0, 3, 1, 2)  # [N, C, H, W]
    channels = x.shape[1]
    blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel.repeat(channels, 1, 1, 1), groups=channels)
    return blurred.permute(0, 2, 3, 1).round().clamp(0, 255).numpy().astype(np.uint8)


def local_shuffle(images: np.ndarray, probability: float, rng: np.random.Generator) -> np.ndarray:
    """Swap each horizontally adjacent pixel pair with ``probability`` (in raster order)."""
    shuffled = images.copy()
    swaps = rng.random((*images.shape[:2], images.shape[2] - 1)) < probability  # [N, H, W - 1]
    for n, i, j in zip(*np.nonzero(swaps), strict=True):
        shuffled[n, i, [j, j + 1]] = shuffled[n, i, [j + 1, j]]
    return shuffled


@pytest.fixture(scope="module")
def digits_scorer():
    """The pipeline's classifier extractor trained on 1,297 digits (its reference set), and 500 unseen digits."""
    dataset = load_dataset("builtin:digits")
    order = np.random.default_rng(0).permutation(len(dataset.images))
    train, unseen = order[:1297], order[1297:]
    extractor = ClassifierExtractor(train_classifier(dataset.images[train], dataset.labels[train], epochs=15))
    reference = FeatureStatistics.from_features(extractor(dataset.images[train])[0])

    def score(images: np.ndarray) -> FidEstimate:
        features = extractor(images)[0]  # [N, d]
        bounds = [k * len(features) // 10 for k in range(11)]
        groups = [FeatureStatistics.from_features(features[bounds[k] : bounds[k + 1]]) for k in range(10)]
        return fid_jackknife(groups, (reference.mean, reference.covariance))

    return score, dataset.images[unseen]


def clearly_above(higher: FidEstimate, lower: FidEstimate) -> bool:
    return higher.value - lower.value > Z * (higher.stderr**2 + lower.stderr**2) ** 0.5


@pytest.mark.parametrize(
    "corruption, levels",
    [
        ("gaussian noise sigma", (0.15, 0.2, 0.3)),
        ("gaussian blur sigma (pixels)", (0.5, 0.7, 1.0)),
        ("neighbour swap probability", (0.05, 0.1, 0.2)),
    ],
)
def test_fid_rises_clearly_with_each_level_of_corruption(digits_scorer, corruption, levels):
    score, images = digits_scorer
    rng = np.random.default_rng(1)

    def corrupt(level: float) -> np.ndarray:
        if corruption.startswith("gaussian noise"):
            return gaussian_noise(images, level, rng)
        if corruption.startswith("gaussian blur"):
            return gaussian_blur(images, level)
        return local_shuffle(images, level, rng)

    estimates = [score(images)] + [score(corrupt(level)) for level in levels]
    table = ", ".join(
        f"{level}: {e.value:.3f} +- {e.stderr:.3f}" for level, e in zip((0, *levels), estimates, strict=True)
    )
    for lower, higher in itertools.pairwise(estimates):
        assert clearly_above(higher, lower), f"{corruption}: {table}"


@pytest.mark.slow
def test_a_tenth_of_the_training_scores_clearly_worse(digits_scorer, tmp_path):
    """The quickstart's model length (100,000 images) against a tenth of it, trained and sampled the same way
    (single process, DDIM-50, 500 samples, seed 0): the shorter run's FID is clearly higher."""
    from ddpm_core.checkpoint import load_snapshot
    from ddpm_core.data import to_uint8
    from ddpm_core.demo import train_and_sample
    from ddpm_core.diffusion import GaussianDiffusion
    from ddpm_core.samplers import Method, PerIndexNoise, SamplerConfig, sample

    score, _ = digits_scorer
    sampler = SamplerConfig(method=Method.DDIM, num_steps=50)
    estimates = {}
    for images in (10_000, 100_000):
        out = tmp_path / str(images)
        out.mkdir()
        train_and_sample(out, images, 128, 1, 0, sampler, log_every=10**9)
        snapshot = load_snapshot(str(out / "snapshot"))
        model, diffusion = snapshot.build_model(), GaussianDiffusion.from_config(snapshot.diffusion)
        pixels = to_uint8(sample(model, diffusion, (1, 8, 8), PerIndexNoise(0, range(500)), sampler).samples)
        estimates[images] = score(pixels)
    assert clearly_above(estimates[10_000], estimates[100_000]), estimates
