"""The memorization score (Carlini et al. 2023; Somepalli et al. 2023): nearest neighbours against brute force, copy
rates of a copying "model" and of real held-out images, the Wilson interval, duplicates and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from sklearn.datasets import load_digits

from ddpm_core.memorization import (
    Neighbours,
    calibrate,
    closest_pairs,
    copy_rate,
    nearest_two,
    side_by_side,
    wilson_interval,
)


def brute_force(queries: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances to the two nearest ``[N, 2]`` and their indices ``[N, 2]``, by cdist (no matmul shortcut) + topk."""
    distances = torch.cdist(queries.double(), reference.double(), compute_mode="donot_use_mm_for_euclid_dist")
    return torch.topk(distances, 2, dim=1, largest=False)


@pytest.mark.parametrize(
    ("n", "m", "block", "dtype"),
    [(37, 53, 8, torch.float64), (37, 17, 8, torch.float32), (5, 2, 2, torch.float64), (64, 300, 1024, torch.float32)],
)
def test_nearest_two_equals_cdist_and_topk_in_blocks_with_offsets_and_merges(n, m, block, dtype):
    generator = torch.Generator().manual_seed(n * m)
    queries, reference = torch.randn(n, 6, generator=generator, dtype=dtype), torch.randn(m, 6, generator=generator)
    expected, index = brute_force(queries, reference.to(dtype))
    found = nearest_two(queries, reference.to(dtype), offset=100, block=block)
    assert found.d1.dtype == found.d2.dtype == torch.float64 and found.index.dtype == torch.int64
    torch.testing.assert_close(found.d1, expected[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(found.d2, expected[:, 1], rtol=1e-12, atol=1e-12)
    assert torch.equal(found.index, index[:, 0] + 100)
    if m >= 4:  # two disjoint parts of the reference (each of at least 2), with offsets, merged either way round
        first = nearest_two(queries, reference[: m // 2].to(dtype), offset=100, block=block)
        second = nearest_two(queries, reference[m // 2 :].to(dtype), offset=100 + m // 2, block=block)
        for merged in [first.merge(second), second.merge(first)]:
            assert torch.equal(merged.d1, found.d1) and torch.equal(merged.d2, found.d2)
            assert torch.equal(merged.index, found.index)
    blocks = Neighbours.cat([nearest_two(queries[i : i + 4], reference.to(dtype), 100, block) for i in range(0, n, 4)])
    assert torch.equal(blocks.d1, found.d1) and torch.equal(blocks.index, found.index)


def test_a_near_copy_keeps_its_tiny_distance_where_norms_are_large():
    generator = torch.Generator().manual_seed(1)
    reference = 10 + torch.rand(50, 784, generator=generator, dtype=torch.float64)  # ||b||^2 ~ 8e4
    noise = 1e-6 * torch.randn(784, generator=generator, dtype=torch.float64)
    found = nearest_two((reference[7] + noise)[None], reference, block=16)
    assert found.index.item() == 7
    # d1^2 ~ 8e-10, of which the product form's rounding (~ eps * ||b||^2 ~ 2e-11) would be a few percent
    torch.testing.assert_close(found.d1, noise.norm()[None], rtol=1e-9, atol=0)


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits as [-1, 1] features, shuffled and split: train 900, held-out calibration 450,
    held-out check 447 (disjoint draws from one distribution)."""
    images = torch.tensor(load_digits().images, dtype=torch.float32).reshape(-1, 64) / 8 - 1  # [1797, 64]
    images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))]
    return images[:900], images[900:1350], images[1350:]


def test_a_copying_model_is_flagged_and_real_held_out_images_are_not():
    train, calibration, check = digits()
    threshold = calibrate(nearest_two(calibration, train, block=256), false_positive_rate=0.01)
    assert 0.3 < threshold < 0.9  # real digits' nearest is not much nearer than their second nearest
    generator = torch.Generator().manual_seed(2)
    noisy = train[:300] + 1e-3 * torch.randn(300, 64, generator=generator)  # a "model" returning training images
    copies = torch.cat([noisy, train[300:350]])  # and 50 exact copies
    copying = copy_rate(nearest_two(copies, train, block=256), threshold)
    assert copying.count == copying.total == 350 and copying.low >= 0.95
    real = copy_rate(nearest_two(check, train, block=256), threshold)  # a model that samples the data distribution
    assert real.total == 447 and real.high <= 0.05
    half = copy_rate(nearest_two(torch.cat([copies[:200], check[:200]]), train), threshold)  # half copies
    assert half.low <= 0.5 <= half.high and half.count >= 200


def test_fresh_samples_of_the_data_distribution_are_not_flagged_and_copies_are():
    """Gaussian clusters, so that every set is a fresh draw: training, calibration and samples."""
    generator = torch.Generator().manual_seed(3)
    centres = 3 * torch.randn(10, 16, generator=generator)

    def draw(count: int) -> torch.Tensor:
        return centres[torch.randint(10, (count,), generator=generator)] + torch.randn(count, 16, generator=generator)

    train = draw(2000)
    heldout = draw(1000)  # its neighbours in two halves of the training set, merged
    threshold = calibrate(nearest_two(heldout, train[:1000]).merge(nearest_two(heldout, train[1000:], offset=1000)))
    fresh = copy_rate(nearest_two(draw(1000), train), threshold)
    assert fresh.high <= 0.05
    copies = copy_rate(nearest_two(train[:500] + 1e-3 * torch.randn(500, 16, generator=generator), train), threshold)
    assert copies.rate == 1.0 and copies.low >= 0.95


def test_calibration_flags_at_most_the_false_positive_rate_of_its_own_images():
    ratios = torch.linspace(0.1, 1.0, 10, dtype=torch.float64)  # ten held-out ratios, d1 = ratio, d2 = 1
    heldout = Neighbours(ratios, torch.ones(10, dtype=torch.float64), torch.arange(10))
    for rate, flagged in [(0.05, 0), (0.1, 1), (0.15, 1), (0.5, 5), (0.99, 9)]:
        assert copy_rate(heldout, calibrate(heldout, rate)).count == flagged <= rate * 10


def test_wilson_interval_against_known_values_and_scipy():
    low, high = wilson_interval(0, 100)
    assert low == 0.0 and high == pytest.approx(0.0370, abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(100, 100)[1] == 1.0 and wilson_interval(100, 100)[0] == pytest.approx(0.9630, abs=1e-4)
    for count, total, confidence in [(3, 17, 0.95), (1, 1000, 0.99), (40, 41, 0.9), (7, 7, 0.5)]:
        expected = binomtest(count, total).proportion_ci(confidence, method="wilson")
        assert wilson_interval(count, total, confidence) == pytest.approx((expected.low, expected.high), abs=1e-12)
    neighbours = Neighbours(
        torch.zeros(100, dtype=torch.float64), torch.ones(100, dtype=torch.float64), torch.zeros(100, dtype=torch.int64)
    )
    rate = copy_rate(neighbours, threshold=0.0)  # ratio 0 is not below 0: none of 100
    assert (rate.rate, rate.count, rate.total, rate.low) == (0.0, 0, 100, 0.0) and rate.high == pytest.approx(
        0.0370, 1e-3
    )


def test_duplicate_training_items_count_an_exact_copy_as_a_copy():
    generator = torch.Generator().manual_seed(4)
    reference = torch.randn(20, 8, generator=generator)
    reference[13] = reference[3]  # a duplicated training image
    queries = torch.stack([reference[3], reference[5], torch.full((8,), 50.0)])  # a copy, another, a far point
    for found in [
        nearest_two(queries, reference, block=4),
        nearest_two(queries, reference[:10]).merge(nearest_two(queries, reference[10:], offset=10)),
    ]:
        assert found.d1[0] == 0 and found.d2[0] == 0 and found.index[0].item() in (3, 13)
        assert (
            found.ratio[0] == 0
            and found.ratio[1] == 0
            and 0.9 < found.ratio[2] <= 1
            and torch.isfinite(found.ratio).all()
        )
        assert copy_rate(found, threshold=0.5).count == 2
    assert calibrate(nearest_two(reference[[3, 4]], reference), 0.1) == 0.0  # all-copies held-out set: no crash


def test_closest_pairs_and_their_picture():
    d1 = torch.tensor([0.5, 0.0, 0.2, 0.9], dtype=torch.float64)
    neighbours = Neighbours(d1, torch.ones(4, dtype=torch.float64), torch.tensor([4, 1, 2, 0]))
    pairs = closest_pairs(neighbours, k=3)
    assert pairs == [(1, 1, 0.0), (2, 2, 0.2), (0, 4, 0.5)] and len(closest_pairs(neighbours, k=10)) == 4
    samples = torch.full((4, 3, 5, 6), -1.0)  # black samples, white training images
    training = torch.ones(5, 3, 5, 6)
    training[4, 0] = -1.0  # training image 4 without its red
    picture = side_by_side(samples, training, pairs, padding=0, min_cell=1)
    assert picture.dtype == np.uint8 and picture.shape == (3 * 5, 2 * 6, 3)
    assert (picture[:, :6] == 0).all() and (picture[:10, 6:] == 255).all()
    assert (picture[10:, 6:, 0] == 0).all() and (picture[10:, 6:, 1:] == 255).all()
    grey = side_by_side(samples[:, :1], training[:, :1], pairs[:1])  # one channel, 1 px white padding
    assert grey.shape == (5 + 2, 2 * 6 + 3) and (grey[0] == 255).all() and (grey[1:6, 1:7] == 0).all()


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: nearest_two(torch.empty(0, 4), torch.randn(5, 4)), "queries"),
        (lambda: nearest_two(torch.randn(3, 4), torch.randn(5, 3)), "reference"),
        (lambda: nearest_two(torch.randn(3, 4), torch.randn(1, 4)), "reference"),
        (lambda: nearest_two(torch.randn(3, 4), torch.randn(5, 4, 1)), "reference"),
        (lambda: nearest_two(torch.tensor([[float("nan")]]), torch.randn(5, 1)), "queries"),
        (lambda: nearest_two(torch.randn(3, 4), torch.randn(5, 4), block=1), "block"),
        (lambda: nearest_two(torch.randn(3, 4), torch.randn(5, 4), offset=-1), "offset"),
        (lambda: calibrate(nearest_two(torch.randn(3, 4), torch.randn(5, 4)), 0.0), "false_positive_rate"),
        (lambda: calibrate(nearest_two(torch.randn(3, 4), torch.randn(5, 4)), 1.0), "false_positive_rate"),
        (lambda: copy_rate(nearest_two(torch.randn(3, 4), torch.randn(5, 4)), 0.5, confidence=1.0), "confidence"),
        (lambda: copy_rate(nearest_two(torch.randn(3, 4), torch.randn(5, 4)), float("nan")), "threshold"),
        (lambda: closest_pairs(nearest_two(torch.randn(3, 4), torch.randn(5, 4)), k=0), "k"),
        (lambda: side_by_side(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), [(0, 2, 0.0)]), "pairs"),
        (lambda: wilson_interval(5, 4), "count"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()
