"""Uncertainty and comparability of scores: the jackknife FID (standard error, bias correction, extrapolation to
another N, the paired difference) on a Gaussian oracle, jackknife groups independent of sharding, and KID against
torchmetrics."""

import numpy as np
import pytest
import torch

from ddpm_core.metrics import (
    FeatureStatistics,
    fid_jackknife,
    frechet_distance,
    kernel_inception_distance,
    polynomial_mmd2,
)
from pipelines.evaluation.scoring import group_statistics, merge_groups

DIM = 4
MEAN = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64)
SCALE = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.3, 0.8, 0.0, 0.0], [0.0, 0.2, 1.1, 0.0], [0.1, 0.0, 0.0, 0.7]])
REFERENCE = (torch.zeros(DIM, dtype=torch.float64), torch.eye(DIM, dtype=torch.float64))  # exact moments


def draw(count: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, 4]`` draws of N(MEAN, SCALE SCALE^T)."""
    return MEAN + torch.randn(count, DIM, generator=generator, dtype=torch.float64) @ SCALE.to(torch.float64).T


def groups_of(features: torch.Tensor, groups: int) -> list[FeatureStatistics]:
    bounds = [k * len(features) // groups for k in range(groups + 1)]
    return [FeatureStatistics.from_features(features[bounds[k] : bounds[k + 1]]) for k in range(groups)]


def population_fid() -> float:
    covariance = SCALE.to(torch.float64) @ SCALE.to(torch.float64).T
    return frechet_distance(MEAN, covariance, *REFERENCE)


def test_jackknife_removes_the_small_sample_bias_and_its_stderr_matches_the_spread():
    """Over 400 draws of N = 60 Gaussian features against exact reference moments: the plain FID is biased upward
    by ~tr(Sigma)/N; the jackknife's bias-corrected FID is not (within Monte Carlo error); the jackknife stderr
    averages to the actual spread of the FID over draws."""
    generator, truth = torch.Generator().manual_seed(0), population_fid()
    estimates = [fid_jackknife(groups_of(draw(60, generator), 10), REFERENCE) for _ in range(400)]
    plain = np.array([e.value for e in estimates])
    corrected = np.array([e.unbiased for e in estimates])
    monte_carlo_error = corrected.std() / np.sqrt(len(corrected))
    assert plain.mean() - truth > 10 * plain.std() / np.sqrt(len(plain))  # the bias is real and large here
    assert abs(corrected.mean() - truth) < 3 * monte_carlo_error
    assert np.mean([e.stderr for e in estimates]) == pytest.approx(plain.std(), rel=0.2)
    low, high = estimates[0].interval()
    assert low < estimates[0].value < high and high - low == pytest.approx(2 * 1.96 * estimates[0].stderr)


def real(count: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, 4]`` draws of the reference's own distribution, N(0, I) (real images against the training split)."""
    return torch.randn(count, DIM, generator=generator, dtype=torch.float64)


def test_the_real_data_floor_scales_a_small_hold_out_to_the_fid_of_n_real_images():
    """A hold-out of 195 real images, scored against a reference of 1,602 drawn from the same distribution (the
    quickstart's sizes), predicts the mean FID of 1,000 fresh real images against that reference (a Monte Carlo
    measurement, each draw with its own reference): unbiased within Monte Carlo error, and several times less
    spread than the jackknife's extrapolation ``FID_inf + k / N`` (the floor before), whose slope a small set cannot
    resolve; its standard error
    (the hold-out's jackknife one, scaled) covers its actual spread, by less than a factor of 2."""
    generator = torch.Generator().manual_seed(1)
    floors, extrapolated, stderrs, measured = [], [], [], []
    for _ in range(300):
        reference = FeatureStatistics.from_features(real(1602, generator))
        moments = (reference.mean, reference.covariance)
        holdout = fid_jackknife(groups_of(real(195, generator), 10), moments)
        floor, stderr = holdout.real_floor_at(1000, 1602)
        floors.append(floor)
        stderrs.append(stderr)
        extrapolated.append(holdout.unbiased + (holdout.value - holdout.unbiased) * 195 / 1000)  # FID_inf + k/N
        fresh = FeatureStatistics.from_features(real(1000, generator))
        measured.append(frechet_distance(fresh.mean, fresh.covariance, *moments))
    floors_, measured_ = np.array(floors), np.array(measured)
    error = np.sqrt(floors_.var() / len(floors_) + measured_.var() / len(measured_))
    assert abs(floors_.mean() - measured_.mean()) < 3 * error
    assert floors_.mean() == pytest.approx(measured_.mean(), rel=0.1)
    assert np.array(extrapolated).std() > 3 * floors_.std()
    assert floors_.std() < np.mean(stderrs) < 2 * floors_.std()  # the jackknife's is conservative (Efron-Stein)
    assert holdout.real_floor_at(195, 1602) == pytest.approx((holdout.value, holdout.stderr), rel=1e-12)
    assert holdout.real_floor_at(1000, None)[0] == pytest.approx(holdout.value * 195 / 1000, rel=1e-12)


def test_the_paired_difference_counts_the_correlation_of_shared_indices():
    """Two sets that share their noise (b = a + a small shift) differ in FID far more precisely than their separate
    intervals say; identical sets differ by exactly 0 with stderr 0."""
    generator = torch.Generator().manual_seed(1)
    a = draw(400, generator)
    b = a + torch.tensor([0.05, 0.0, 0.0, 0.0], dtype=torch.float64)
    difference = fid_jackknife(groups_of(b, 10), REFERENCE).minus(fid_jackknife(groups_of(a, 10), REFERENCE))
    separate = (
        fid_jackknife(groups_of(a, 10), REFERENCE).stderr ** 2 + fid_jackknife(groups_of(b, 10), REFERENCE).stderr ** 2
    ) ** 0.5
    assert difference.stderr < separate / 5
    assert difference.value > 3 * difference.stderr  # the shift is detected
    same = fid_jackknife(groups_of(a, 10), REFERENCE).minus(fid_jackknife(groups_of(a, 10), REFERENCE))
    assert same.value == 0.0 and same.stderr == 0.0


def test_jackknife_groups_do_not_depend_on_the_sharding():
    """Group g holds the global indices [g N / G, (g + 1) N / G) whichever worker summarised which shard."""
    features = draw(103, torch.Generator().manual_seed(2))
    indices = torch.arange(103)
    whole = group_statistics(features, indices, 103, 10)
    merged: dict[int, FeatureStatistics] = {}
    for start, stop in [(0, 7), (7, 50), (50, 51), (51, 103)]:
        merged = merge_groups(merged, group_statistics(features[start:stop], indices[start:stop], 103, 10))
    assert sorted(merged) == list(range(10))
    for g in range(10):
        assert merged[g].count == whole[g].count
        torch.testing.assert_close(merged[g].sum_outer, whole[g].sum_outer, rtol=1e-12, atol=1e-12)
    sharded = fid_jackknife([merged[g] for g in range(10)], REFERENCE)
    one_pass = fid_jackknife([whole[g] for g in range(10)], REFERENCE)
    assert (sharded.value, sharded.stderr, sharded.unbiased) == pytest.approx(
        (one_pass.value, one_pass.stderr, one_pass.unbiased), rel=1e-10
    )


def test_polynomial_mmd_matches_torchmetrics():
    from torchmetrics.image.kid import poly_mmd

    generator = torch.Generator().manual_seed(3)
    real, fake = draw(50, generator), draw(50, generator) + 0.3
    assert polynomial_mmd2(real, fake) == pytest.approx(float(poly_mmd(real, fake)), rel=1e-12)


def test_kid_is_unbiased_at_small_n_and_grows_with_the_shift():
    """Same distribution: KID averages to 0 even with 20 images per set (FID would not); a shifted set scores
    higher the larger the shift."""
    generator = torch.Generator().manual_seed(4)
    same = [kernel_inception_distance(draw(20, generator), draw(20, generator), 20, 1)[0] for _ in range(300)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))
    real = draw(300, generator)
    kids = [kernel_inception_distance(real, draw(300, generator) + shift, 100, 20)[0] for shift in (0.2, 0.4, 0.8)]
    assert kids[0] < kids[1] < kids[2]
    fake = draw(300, generator) + 0.4
    mean, std = kernel_inception_distance(real, fake, 100, 20, seed=7)
    assert std > 0 and (mean, std) == kernel_inception_distance(real, fake, 100, 20, seed=7)  # seeded subsets
