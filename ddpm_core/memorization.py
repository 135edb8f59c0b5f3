"""Memorization score of generated images: is a sample a copy of a training image?

The criterion is relative, not absolute. Carlini et al. 2023 ("Extracting Training Data from Diffusion Models")
call a generation a copy of its nearest training example when its distance to that example is small *compared with
its distances to the next nearest ones* (for CIFAR-10, the l2 distance divided by the mean distance to the closest
training examples): a sample that is close to everything (a blurry average) is not a copy, a sample that is close to
one image and far from the rest is. We use the two-nearest-neighbour form of that ratio, ``d1 / d2`` (as Gu et al.
2023, "On Memorization in Diffusion Models", do); a copy has a ratio near 0, a fresh sample a ratio near 1. Somepalli
et al. 2023 ("Diffusion Art or Digital Forgery?") retrieve the nearest training images in a copy-detection feature
space rather than in pixels: the functions here take any ``[N, D]`` features, pixels or embeddings.

The threshold is calibrated on held-out real images, which are not copies by construction (:func:`calibrate`), and
the copy rate comes with a Wilson score interval (:func:`copy_rate`).

Everything is mergeable, so that a pipeline can score sample shards block by block: :func:`nearest_two` of the same
queries against disjoint parts of the training set (each with its ``offset``) combine with :meth:`Neighbours.merge`,
and the neighbours of disjoint blocks of queries concatenate with :meth:`Neighbours.cat`.

Known limit: an image duplicated in the training set is both the nearest and the second nearest of a sample near
it (``d1 == d2``). An *exact* copy of it still counts as a copy (``d1 == d2 == 0``, ratio defined as 0), but a *near*
copy of it gets a ratio of 1. Deduplicate the reference set first (Carlini et al. found the most extracted images to
be among the most duplicated ones).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ddpm_core.data import to_uint8
from ddpm_core.images import grid


@dataclass(frozen=True)
class Neighbours:
    """The two nearest training items of each of ``N`` queries (Carlini et al. 2023; Gu et al. 2023).

    ``d1`` ``[N]`` float64: Euclidean distance to the nearest training item; ``d2`` ``[N]`` float64: to the second
    nearest (``d1 <= d2``); ``index`` ``[N]`` int64: the nearest item's index in the whole training set.
    """

    d1: Tensor  # [N] float64
    d2: Tensor  # [N] float64
    index: Tensor  # [N] int64

    @property
    def ratio(self) -> Tensor:
        """``d1 / d2`` ``[N]`` float64: near 0 for a copy, near 1 for a sample as close to two training items.

        An exact copy of a training image that is duplicated in the training set has ``d1 == d2 == 0``; its ratio is
        0 (a copy), not NaN.
        """
        return torch.where(self.d1 == 0, torch.zeros_like(self.d1), self.d1 / self.d2)

    def merge(self, other: Neighbours) -> Neighbours:
        """The neighbours of the same queries in the union of two disjoint parts of the training set, each found by
        :func:`nearest_two` with its own ``offset`` (so both ``index`` are global). On a tie ``self`` wins."""
        if self.d1.shape != other.d1.shape:
            raise ValueError(f"other: neighbours of {other.d1.shape[0]} queries, expected {self.d1.shape[0]}")
        other = _to(other, self.d1.device)
        d1 = torch.minimum(self.d1, other.d1)  # [N]
        # Second smallest of {a1 <= a2} and {b1 <= b2}: the larger of the two firsts, unless a second is smaller.
        d2 = torch.minimum(torch.maximum(self.d1, other.d1), torch.minimum(self.d2, other.d2))  # [N]
        index = torch.where(other.d1 < self.d1, other.index, self.index)  # [N]
        return Neighbours(d1, d2, index)

    @staticmethod
    def cat(parts: Sequence[Neighbours]) -> Neighbours:
        """The neighbours of consecutive blocks of queries, in order, as one (``[sum N_i]``)."""
        if not parts:
            raise ValueError("parts: no neighbours to concatenate")
        device = parts[0].d1.device
        parts = [_to(part, device) for part in parts]
        return Neighbours(
            torch.cat([p.d1 for p in parts]), torch.cat([p.d2 for p in parts]), torch.cat([p.index for p in parts])
        )


def _to(neighbours: Neighbours, device: torch.device) -> Neighbours:
    return Neighbours(neighbours.d1.to(device), neighbours.d2.to(device), neighbours.index.to(device))


@dataclass(frozen=True)
class CopyRate:
    """The fraction ``rate = count / total`` of samples flagged as copies, with its Wilson interval ``[low, high]``."""

    rate: float
    low: float
    high: float
    count: int
    total: int


def _check_features(name: str, x: Tensor, least: int) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name}: expected [count, features], got shape {tuple(x.shape)}")
    if x.shape[0] < least or x.shape[1] == 0:
        raise ValueError(f"{name}: needs at least {least} rows and 1 feature, got shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name}: expected real features, got {x.dtype}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or infinity")


def nearest_two(queries: Tensor, reference: Tensor, offset: int = 0, block: int = 1024) -> Neighbours:
    """Distances from each query ``[N, D]`` to its two nearest rows of ``reference`` ``[M, D]`` (``M >= 2``), and
    the nearest's index ``offset + j`` (the retrieval step of Carlini et al. 2023 and Somepalli et al. 2023).

    The two candidates come from blocked matrix products in float64: the squared distance ``||a||^2 - 2 a.b +
    ||b||^2`` less the row's constant ``||a||^2``, which ranks alike. Their distances are then recomputed as
    ``||a - b||`` in float64 (so never negative): the product form cancels the large norms and would leave a near
    copy's tiny distance as rounding noise, and an exact copy must be at distance exactly 0 (:attr:`Neighbours.ratio`).
    Working memory besides the float64 copy of ``queries`` is one ``[block, block]`` matrix and one ``[block, D]``
    one; runs on ``queries``' device.
    """
    _check_features("queries", queries, 1)
    _check_features("reference", reference, 2)
    if queries.shape[1] != reference.shape[1]:
        raise ValueError(f"queries/reference: feature sizes differ ({queries.shape[1]} != {reference.shape[1]})")
    if block < 2:
        raise ValueError(f"block: must be at least 2, got {block}")
    if offset < 0:
        raise ValueError(f"offset: must be >= 0, got {offset}")
    device, count = queries.device, queries.shape[0]
    q = queries.to(torch.float64)  # [N, D]
    best: tuple[Tensor, Tensor] | None = None  # scores [N, 2], indices in reference [N, 2]
    for start in range(0, reference.shape[0], block):
        r = reference[start : start + block].to(device=device, dtype=torch.float64)  # [m, D], m <= block
        r_norm = r.square().sum(1)  # [m]
        parts = [_block_two(q[i : i + block], r, r_norm) for i in range(0, count, block)]
        found = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]) + start  # [N, 2], [N, 2]
        best = found if best is None else _keep_two(best, found)
    assert best is not None
    return _exact(q, reference, best[1], block, offset)


def _block_two(q: Tensor, r: Tensor, r_norm: Tensor) -> tuple[Tensor, Tensor]:
    """The two nearest rows of ``r`` ``[m, D]`` to each row of ``q`` ``[n, D]``, ranked by ``||b||^2 - 2 a.b`` (the
    squared distance less the row's constant ``||a||^2``): ``(scores [n, 2], indices [n, 2])``, nearest first (the
    second at ``inf`` when ``m == 1``)."""
    scores = torch.addmm(r_norm[None, :], q, r.T, alpha=-2.0)  # [n, m]
    if r.shape[0] == 1:
        scores = torch.cat([scores, torch.full_like(scores, math.inf)], 1)  # [n, 2]
    return torch.topk(scores, 2, dim=1, largest=False, sorted=True)


def _keep_two(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The two smallest of two ``(values [N, 2], indices [N, 2])``, ``a``'s first on a tie."""
    values, indices = torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]], 1)  # [N, 4]
    order = torch.sort(values, dim=1, stable=True).indices[:, :2]  # [N, 2]
    return values.gather(1, order), indices.gather(1, order)


def _exact(q: Tensor, reference: Tensor, indices: Tensor, block: int, offset: int) -> Neighbours:
    """:class:`Neighbours` from the two candidates ``indices`` ``[N, 2]`` (in ``reference``) of each query of ``q``
    ``[N, D]`` float64, with distances recomputed as ``||q - r||``, ``block`` queries at a time."""
    d1, d2, index = [], [], []
    for i in range(0, q.shape[0], block):
        pair = indices[i : i + block]  # [n, 2]
        distance = torch.stack(
            [
                (q[i : i + block] - reference[pair[:, k].to(reference.device)].to(q)).square().sum(1).sqrt()
                for k in range(2)
            ],
            1,
        )  # [n, 2]
        swap = distance[:, 1] < distance[:, 0]  # [n]
        d1.append(distance.min(1).values)
        d2.append(distance.max(1).values)
        index.append(torch.where(swap, pair[:, 1], pair[:, 0]) + offset)
    return Neighbours(torch.cat(d1), torch.cat(d2), torch.cat(index))


def calibrate(heldout: Neighbours, false_positive_rate: float = 0.01) -> float:
    """The ratio threshold below which a sample counts as a copy: the ``false_positive_rate`` quantile of the ratios
    of held-out real images (real images not in the training set, so not copies by construction: whatever fraction
    of them the threshold flags is a false-positive rate).

    The quantile is the order statistic ``sorted(ratio)[floor(rate * n)]`` of the ``n`` held-out ratios, so at most
    ``floor(rate * n)`` of them lie strictly under it (:func:`copy_rate` counts ``ratio < threshold``).
    """
    if not 0.0 < false_positive_rate < 1.0:
        raise ValueError(f"false_positive_rate: must be in (0, 1), got {false_positive_rate}")
    ratio = heldout.ratio  # [n]
    if ratio.numel() == 0:
        raise ValueError("heldout: no held-out images")
    ordered = torch.sort(ratio).values  # [n]
    return float(ordered[math.floor(false_positive_rate * ratio.numel())])


def wilson_interval(count: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) of a binomial proportion ``count / total``, in closed form.

    Wilson rather than the normal (Wald) interval ``p +- z sqrt(p (1 - p) / n)``: at 0 of n copies Wald's interval
    collapses to ``[0, 0]``, and near 0 or 1 it undercovers and leaves [0, 1]; Wilson's inverts the score test, stays
    inside [0, 1] and keeps close to nominal coverage near 0 and 1, where copy rates live.
    """
    if total < 1:
        raise ValueError(f"total: must be at least 1, got {total}")
    if not 0 <= count <= total:
        raise ValueError(f"count: must be in [0, {total}], got {count}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence}")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p, z2 = count / total, z * z
    denominator = 1.0 + z2 / total
    centre = (p + z2 / (2 * total)) / denominator
    half = z / denominator * math.sqrt(p * (1.0 - p) / total + z2 / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


def copy_rate(neighbours: Neighbours, threshold: float, confidence: float = 0.95) -> CopyRate:
    """The fraction of samples whose ratio ``d1 / d2`` is below ``threshold`` (from :func:`calibrate`), i.e. the
    fraction judged copies of a training image (Carlini et al. 2023's extraction rate), with a Wilson interval."""
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold: must be a finite ratio >= 0, got {threshold}")
    total = neighbours.d1.numel()
    if total == 0:
        raise ValueError("neighbours: no samples")
    count = int((neighbours.ratio < threshold).sum())
    low, high = wilson_interval(count, total, confidence)
    return CopyRate(count / total, low, high, count, total)


def closest_pairs(neighbours: Neighbours, k: int = 8) -> list[tuple[int, int, float]]:
    """The ``k`` samples most like copies (smallest ratio), ascending: ``(sample index, training index, ratio)``;
    the samples to look at side by side with their training images, as in the figures of Carlini et al. 2023 and
    Somepalli et al. 2023. Ties keep the sample order."""
    if k < 1:
        raise ValueError(f"k: must be at least 1, got {k}")
    ratio = neighbours.ratio.cpu()  # [N]
    order = torch.sort(ratio, stable=True).indices[:k]  # [min(k, N)]
    index = neighbours.index.cpu()
    return [(int(i), int(index[i]), float(ratio[i])) for i in order]


def side_by_side(
    samples: Tensor, training: Tensor, pairs: Sequence[tuple[int, int, float]], padding: int = 1, min_cell: int = 1
) -> np.ndarray:
    """One row per pair of :func:`closest_pairs`: the sample on the left, its nearest training image on the right.

    ``samples`` ``[N, C, H, W]`` and ``training`` ``[M, C, H, W]`` in [-1, 1] (``training`` indexed as in ``pairs``).
    Laid out by :func:`ddpm_core.images.grid` (white ``padding``, images enlarged to ``min_cell`` px): uint8
    ``[rows * (s*H + padding) + padding, 2 * (s*W + padding) + padding]`` (``, C]`` when ``C > 1``), with
    ``s = max(1, ceil(min_cell / max(H, W)))``; with ``padding=0`` and ``min_cell=1``, ``[rows * H, 2 * W(, C)]``.
    """
    if not pairs:
        raise ValueError("pairs: nothing to show")
    if samples.ndim != 4 or training.ndim != 4 or samples.shape[1:] != training.shape[1:]:
        raise ValueError(
            f"samples/training: expected [N, C, H, W] alike, got {tuple(samples.shape)}, {tuple(training.shape)}"
        )
    sample_index = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    training_index = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    for name, index, size in (
        ("samples", sample_index, samples.shape[0]),
        ("training", training_index, training.shape[0]),
    ):
        if bool((index < 0).any() or (index >= size).any()):
            raise ValueError(f"pairs: an index is outside {name} (size {size})")
    left = to_uint8(samples[sample_index.to(samples.device)])  # [rows, H, W, C]
    right = to_uint8(training[training_index.to(training.device)])  # [rows, H, W, C]
    interleaved = np.stack([left, right], axis=1).reshape(-1, *left.shape[1:])  # [2 * rows, H, W, C]
    return np.asarray(grid(interleaved, columns=2, padding=padding, min_cell=min_cell))
