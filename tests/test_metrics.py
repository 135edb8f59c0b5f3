"""Frechet distance against closed forms and scipy; mergeable feature statistics."""

import numpy as np
import pytest
import scipy.linalg
import torch

from ddpm_core.metrics import FeatureStatistics, frechet_distance, frechet_distance_from_stats


def random_covariance(dim, generator):
    a = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


def test_closed_form_for_diagonal_gaussians():
    """FD(N(m1, diag(s1^2)), N(m2, diag(s2^2))) = |m1 - m2|^2 + sum (s1 - s2)^2."""
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 2.0, 1.5])
    expected = ((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum()
    assert frechet_distance(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2)) == pytest.approx(expected.item(), rel=1e-12)


def test_closed_form_for_commuting_covariances():
    """S2 = c^2 S1 gives Tr(S1 + S2 - 2 sqrt(S1 S2)) = (1 - c)^2 Tr(S1)."""
    sigma = random_covariance(6, torch.Generator().manual_seed(0))
    mu = torch.zeros(6, dtype=torch.float64)
    assert frechet_distance(mu, sigma, mu, 9 * sigma) == pytest.approx(4 * torch.trace(sigma).item(), rel=1e-10)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("dim", [2, 16, 64])
def test_matches_scipy_sqrtm_reference(dim):
    generator = torch.Generator().manual_seed(dim)
    mu1, mu2 = torch.randn(2, dim, generator=generator, dtype=torch.float64)
    sigma1, sigma2 = random_covariance(dim, generator), random_covariance(dim, generator)
    covmean = scipy.linalg.sqrtm(sigma1.numpy() @ sigma2.numpy())
    reference = ((mu1 - mu2) ** 2).sum().item() + np.trace(sigma1.numpy() + sigma2.numpy() - 2 * covmean.real)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-9)


def test_merged_shard_statistics_equal_one_pass_statistics():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(1000, 32, generator=generator) * 3 + 1
    whole = FeatureStatistics.from_features(features)
    merged = FeatureStatistics.empty(32)
    for shard in features.split([100, 450, 1, 449]):
        merged = merged.merge(FeatureStatistics.from_features(shard))
    assert merged.count == whole.count == 1000
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.covariance, whole.covariance, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        whole.covariance.numpy(), np.cov(features.double().numpy(), rowvar=False), rtol=1e-9, atol=1e-9
    )
    other = FeatureStatistics.from_features(torch.randn(500, 32, generator=generator))
    assert frechet_distance_from_stats(merged, other) == pytest.approx(
        frechet_distance_from_stats(whole, other), rel=1e-10
    )
    round_trip = FeatureStatistics.from_dict(merged.to_dict())
    torch.testing.assert_close(round_trip.sum_outer, merged.sum_outer)


def test_statistics_reject_mismatched_features():
    stats = FeatureStatistics.empty(4)
    with pytest.raises(ValueError, match="features must be"):
        stats.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="at least 2 samples"):
        _ = FeatureStatistics.from_features(torch.zeros(1, 4)).covariance


def test_the_frechet_distance_is_the_same_bits_whatever_the_thread_count():
    """BLAS splits products and eigendecompositions by thread count, which changes the last bits (on some CPUs even
    of a covariance): a driver or worker with more cores must not report another FID for the same features
    (tests/test_multinode.py compares runs to the bit), from the feature sums to the distance."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 256, generator=generator, dtype=torch.float64)  # [n, d]
    b = torch.randn(2000, 256, generator=generator, dtype=torch.float64) + 0.1  # [n, d]
    threads = torch.get_num_threads()
    try:
        values, sums = set(), set()
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            first, second = FeatureStatistics.from_features(a), FeatureStatistics.from_features(b)
            sums.add(first.sum_outer.numpy().tobytes())
            values.add(frechet_distance_from_stats(first, second))
            values.add(frechet_distance(first.mean, first.covariance, second.mean, second.covariance))
        assert len(sums) == 1 and len(values) == 1, values
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
