"""FID, Inception Score and precision/recall against independent implementations (pytorch-fid, torch-fidelity) on
fixed features, and the exactness of their mergeable statistics under any sharding."""

import math

import numpy as np
import pytest
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_full

from ddpm_core.metrics import (
    ClassProbabilityStatistics,
    FeatureStatistics,
    frechet_distance_from_stats,
    knn_radii,
    precision_recall,
)


def correlated_features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=generator, dtype=torch.float64) / math.sqrt(d)
    return torch.randn(n, d, generator=generator, dtype=torch.float64) @ mixing + shift


@pytest.mark.parametrize("d", [16, 256])
def test_frechet_distance_matches_pytorch_fid(d):
    a, b = (
        FeatureStatistics.from_features(correlated_features(3000, d, 0)),
        FeatureStatistics.from_features(correlated_features(2000, d, 1, 0.3)),
    )
    ours = frechet_distance_from_stats(a, b)
    reference = calculate_frechet_distance(a.mean.numpy(), a.covariance.numpy(), b.mean.numpy(), b.covariance.numpy())
    assert ours == pytest.approx(reference, rel=1e-6)
    # and against numpy's covariance of the raw features, as pytorch-fid computes it
    features = correlated_features(3000, d, 0).numpy()
    np.testing.assert_allclose(a.covariance.numpy(), np.cov(features, rowvar=False), rtol=1e-9, atol=1e-12)


def logits_fixture(n: int = 1000, k: int = 20, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(n, k, generator=generator) + torch.linspace(0, 2, k)


@pytest.mark.parametrize("splits", [1, 10, 7])
def test_inception_score_matches_torch_fidelity(splits):
    logits = logits_fixture()
    stats = ClassProbabilityStatistics.empty(len(logits), splits, logits.shape[1])
    stats.update(logits, torch.arange(len(logits)))
    mean, std = stats.inception_score()
    reference = isc_features_to_metric(logits, splits=splits, shuffle=False)
    assert mean == pytest.approx(reference["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(reference["inception_score_std"], rel=1e-8, abs=1e-12)


def test_inception_score_closed_forms():
    n, k = 320, 8  # 4 splits of 80: each holds every class equally often
    uniform = ClassProbabilityStatistics.empty(n, 4, k)
    uniform.update(torch.zeros(n, k), torch.arange(n))  # p(y|x) uniform: IS = 1
    assert uniform.inception_score()[0] == pytest.approx(1.0, abs=1e-12)
    confident = ClassProbabilityStatistics.empty(n, 4, k)
    # One-hot, balanced: IS = K.
    confident.update(100.0 * torch.nn.functional.one_hot(torch.arange(n) % k, k).float(), torch.arange(n))
    assert confident.inception_score()[0] == pytest.approx(k, rel=1e-9)


def test_inception_score_statistics_merge_exactly_in_any_order():
    logits = logits_fixture(1003)
    whole = ClassProbabilityStatistics.empty(1003, 10, logits.shape[1])
    whole.update(logits, torch.arange(1003))
    permutation = torch.randperm(1003, generator=torch.Generator().manual_seed(3))
    parts = []
    for chunk in permutation.split(217):  # shards that cut across the splits, in scrambled index order
        part = ClassProbabilityStatistics.empty(1003, 10, logits.shape[1])
        part.update(logits[chunk], chunk)
        parts.append(part)
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    torch.testing.assert_close(merged.sum_probs, whole.sum_probs, rtol=1e-13, atol=1e-12)
    assert merged.inception_score() == pytest.approx(whole.inception_score(), rel=1e-12)
    with pytest.raises(ValueError, match="hold 217 of the 1003"):
        parts[0].inception_score()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_torch_fidelity(k):
    real, fake = correlated_features(600, 32, 0), correlated_features(500, 32, 1, shift=0.25)
    ours = precision_recall(real, fake, k)
    # torch-fidelity's (generated, real) argument order.
    reference = calculate_precision_recall_full(fake, real, neighborhood=k, batch_size=10000)
    assert ours == pytest.approx(reference, abs=1e-7)  # torch-fidelity averages in float32; 1/600 separates counts
    assert 0.0 < ours[0] < 1.0 and 0.0 < ours[1] < 1.0


def test_precision_recall_hand_computed_case():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # k=1 radii: 1, 1, 1, 1
    fake = torch.tensor([[0.5], [3.9], [10.0]])  # k=1 radii: 3.4, 3.4, 6.1
    assert knn_radii(real.double(), 1).tolist() == [1.0, 1.0, 1.0, 1.0]  # squared distances
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(2 / 3)  # 0.5 and 3.9 lie within 1 of a real point; 10 does not
    assert recall == pytest.approx(1.0)  # every real point is within 3.4 of 0.5 or 3.9
    identical = precision_recall(real, real, k=1)
    assert identical == (1.0, 1.0)


def test_published_reference_statistics_npz(tmp_path):
    """The common published format (pytorch-fid / guided-diffusion): an .npz with mu [d] and sigma [d, d]."""
    import hashlib

    from ddpm_core.data import DataError
    from pipelines.evaluation.scoring import published_reference

    stats = FeatureStatistics.from_features(correlated_features(500, 8, 0))
    np.savez(tmp_path / "ref.npz", mu=stats.mean.numpy(), sigma=stats.covariance.numpy())
    published = published_reference(str(tmp_path / "ref.npz"), {})
    torch.testing.assert_close(published.mean, stats.mean)
    torch.testing.assert_close(published.covariance, stats.covariance)
    assert published.sha256 == hashlib.sha256((tmp_path / "ref.npz").read_bytes()).hexdigest()
    np.savez(tmp_path / "bad.npz", mu=np.zeros(8), sigma=np.zeros((8, 7)))
    with pytest.raises(DataError, match="'sigma' \\[d, d\\]"):
        published_reference(str(tmp_path / "bad.npz"), {})
    np.savez(tmp_path / "other.npz", mean=np.zeros(8))
    with pytest.raises(DataError, match="expected an .npz with arrays 'mu'"):
        published_reference(str(tmp_path / "other.npz"), {})
    with pytest.raises(DataError, match="does not exist"):
        published_reference(str(tmp_path / "missing.npz"), {})
