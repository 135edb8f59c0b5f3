"""The copy rate of a sample set (Carlini et al. 2023, "Extracting Training Data from Diffusion Models"; Somepalli et
al. 2023, "Diffusion Art or Digital Forgery?"), as the evaluate stage computes it with :mod:`ddpm_core.memorization`.

Each call of the evaluate stage's feature summaries (:func:`pipelines.evaluation.scoring.summary_of`) that is
asked for neighbours searches, for its shard's images, the two nearest training images, block by block over the
training split's files: in the extractor's feature space (the training split's features, cached once per data set
and extractor by :func:`pipelines.evaluation.scoring.training_features`) and in pixel space. The driver concatenates
the shards' neighbours in sample order, calibrates the ratio threshold on the held-out images' neighbours, and reads
off the copy rates with their Wilson intervals (:func:`memorization_score`)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ddpm_core.data import to_model_range
from ddpm_core.memorization import (
    CopyRate,
    Neighbours,
    calibrate,
    closest_pairs,
    copy_rate,
    nearest_two,
    side_by_side,
    wilson_interval,
)
from ddpm_core.storage import read_committed
from pipelines.contracts import ClosestPair, MemorizationScore
from pipelines.data.shards import ImageSource, read_images

FEATURES_FILE = "features-{:05d}.npy"  # float32 [n_i, d]: the features of the training split's file i
CLOSEST_PAIRS = 8  # pairs shown side by side
BLOCK = 1024  # queries and training items per matrix product


@dataclass(frozen=True)
class TrainingSet:
    """The training split as the neighbour search reads it, one file (block) at a time: its image files in index
    order, and the committed cache of their features (one ``features-NNNNN.npy`` per file, same order)."""

    sources: tuple[ImageSource, ...]
    features_uri: str
    count: int


@dataclass(frozen=True)
class SetNeighbours:
    """The two nearest training images of each image of a set, in the feature space and in pixels (``[N]`` each)."""

    features: Neighbours
    pixels: Neighbours

    def merge(self, other: SetNeighbours) -> SetNeighbours:
        """The neighbours of the same images in the union of two disjoint parts of the training set."""
        return SetNeighbours(self.features.merge(other.features), self.pixels.merge(other.pixels))

    @staticmethod
    def cat(parts: Sequence[SetNeighbours]) -> SetNeighbours:
        """The neighbours of consecutive parts of a set (in index order), as one."""
        return SetNeighbours(
            Neighbours.cat([part.features for part in parts]), Neighbours.cat([part.pixels for part in parts])
        )


def flat_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 images ``[n, H, W, C]`` -> the model's range [-1, 1], flattened ``[n, C*H*W]`` float32."""
    return to_model_range(images).reshape(len(images), -1)


def set_neighbours(
    images: np.ndarray, features: torch.Tensor, training: TrainingSet, storage_options: dict[str, Any]
) -> SetNeighbours:
    """The two nearest training images of each of ``images`` ``[n, H, W, C]`` uint8 with ``features`` ``[n, d]``, by
    blocks: one training file at a time (its cached features and its pixels), merged (Carlini et al. 2023's
    retrieval; exact, not approximate, search)."""
    pixels = flat_pixels(images)  # [n, C*H*W]
    found: SetNeighbours | None = None
    for number, source in enumerate(training.sources):
        name = FEATURES_FILE.format(number)
        stored = read_committed(training.features_uri, [name], storage_options)[0][name]
        block = torch.from_numpy(np.load(io.BytesIO(stored)))  # [m, d]
        train_pixels = flat_pixels(read_images(source, storage_options))  # [m, C*H*W]
        offset = source.first_index
        part = SetNeighbours(_nearest(features, block, offset), _nearest(pixels, train_pixels, offset))
        found = part if found is None else found.merge(part)
    assert found is not None
    return found


def _nearest(queries: torch.Tensor, block: torch.Tensor, offset: int) -> Neighbours:
    """:func:`nearest_two` of ``queries`` ``[n, D]`` in one training block ``[m, D]``; a block of one image (the
    last file of a split may hold one) gives an infinite second distance, as :func:`nearest_two` needs two."""
    if block.shape[0] >= 2:
        return nearest_two(queries, block, offset, BLOCK)
    d1 = (queries.double() - block.double()).square().sum(1).sqrt()  # [n]
    index = torch.full_like(d1, offset, dtype=torch.int64)  # [n]
    return Neighbours(d1, torch.full_like(d1, float("inf")), index)


def memorization_score(
    samples: SetNeighbours, heldout: SetNeighbours, false_positive_rate: float, feature_space: str, training: int
) -> MemorizationScore:
    """Copy rates of the samples in both spaces under thresholds calibrated on the held-out images at
    ``false_positive_rate`` (:func:`ddpm_core.memorization.calibrate`), with Wilson intervals, the held-out images'
    own rate (:func:`cross_fitted_rate`) and the closest pairs in the feature space."""
    threshold = calibrate(heldout.features, false_positive_rate)
    threshold_pixels = calibrate(heldout.pixels, false_positive_rate)
    pairs = tuple(ClosestPair(*pair) for pair in closest_pairs(samples.features, CLOSEST_PAIRS))
    return MemorizationScore(
        feature_space=feature_space,
        false_positive_rate=false_positive_rate,
        heldout_images=int(heldout.features.d1.numel()),
        training_images=training,
        threshold=threshold,
        threshold_pixels=threshold_pixels,
        copy_rate=copy_rate(samples.features, threshold),
        copy_rate_pixels=copy_rate(samples.pixels, threshold_pixels),
        heldout_rate=cross_fitted_rate(heldout.features, false_positive_rate),
        heldout_rate_pixels=cross_fitted_rate(heldout.pixels, false_positive_rate),
        closest_pairs=pairs,
    )


def cross_fitted_rate(heldout: Neighbours, false_positive_rate: float) -> CopyRate:
    """The false-positive check: the share of held-out images flagged by a threshold calibrated *without* them (the
    even-indexed half under the odd half's threshold and vice versa), with its Wilson interval. Under its own
    threshold a calibration set's rate is at most the requested rate by construction; out of sample it estimates
    the rate a copy-free model would score (a single held-out image is checked against itself)."""
    count = heldout.d1.numel()
    halves = [torch.arange(start, count, 2) for start in (0, 1)] if count >= 2 else [torch.arange(count)] * 2
    parts = [_subset(heldout, half) for half in halves]
    flagged = sum(
        int((part.ratio < calibrate(other, false_positive_rate)).sum())
        for part, other in zip(parts, reversed(parts), strict=True)
    )
    total = sum(part.d1.numel() for part in parts)
    low, high = wilson_interval(flagged, total)
    return CopyRate(flagged / total, low, high, flagged, total)


def _subset(neighbours: Neighbours, rows: torch.Tensor) -> Neighbours:
    return Neighbours(neighbours.d1[rows], neighbours.d2[rows], neighbours.index[rows])


def pair_strips(samples: np.ndarray, training: np.ndarray, pairs: Sequence[ClosestPair]) -> list[np.ndarray]:
    """One picture strip per pair, the sample left and its nearest training image right: uint8 ``[h, w(, C)]``;
    ``samples`` and ``training`` ``[k, H, W, C]`` uint8 are the pairs' images, in pair order."""
    left, right = to_model_range(samples), to_model_range(training)  # [k, C, H, W] each
    return [
        side_by_side(left[i : i + 1], right[i : i + 1], [(0, 0, pair.ratio)], padding=2, min_cell=64)
        for i, pair in enumerate(pairs)
    ]


def pair_caption(pair: ClosestPair, rank: int) -> str:
    """A strip's label: its rank, its ratio and which images it shows."""
    return f"{rank}. ratio {pair.ratio:.3f}  sample {pair.sample_index} | training {pair.training_index}"
