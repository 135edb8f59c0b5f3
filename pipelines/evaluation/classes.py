"""Class-conditional sample sets: how often the data set's own classifier sees the class each image was asked for
(conditional accuracy), from its top-1 classes (``pipelines.evaluation.scoring.predicted_classes``), and the guidance
sweep's plot.

The classifier is the one the prepare stage trains on the data set's labels (the classifier feature network), so its
label order is the data's. Its hold-out accuracy (``extractor_holdout_accuracy``) bounds what the measurement can
resolve: a conditional accuracy near it means the classes are as recognisable as real images'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.contracts import GuidancePoint
from pipelines.figures import png_bytes, subplots


@dataclass(frozen=True)
class ClassHits:
    """Per requested class: how many images were asked for, and how many the classifier assigned to it."""

    requested: np.ndarray  # [K] int64
    recognised: np.ndarray  # [K] int64

    @classmethod
    def of(cls, requested: np.ndarray, predicted: np.ndarray, num_classes: int) -> ClassHits:
        """The hits of images asked for the classes ``requested`` ``[N]`` that the classifier saw as ``predicted``
        ``[N]``."""
        return cls(
            np.bincount(requested, minlength=num_classes),
            np.bincount(requested[predicted == requested], minlength=num_classes),
        )

    @property
    def accuracy(self) -> float:
        """Top-1 conditional accuracy over all images."""
        return float(self.recognised.sum() / self.requested.sum())

    def per_class(self, names: list[str]) -> dict[str, float]:
        """Accuracy by class name, for the classes that were asked for."""
        return {
            names[label]: float(self.recognised[label] / self.requested[label])
            for label in range(len(names))
            if self.requested[label] > 0
        }


def sweep_plot(points: Sequence[GuidancePoint]) -> bytes:
    """PNG of the guidance sweep: FID and conditional accuracy against the guidance scale w (left), and the
    trade-off, FID against accuracy with one point per w (right)."""
    figure, (by_scale, trade_off) = subplots(1, 2, figsize=(10, 4), dpi=120)
    scales = [point.guidance_scale for point in points]
    accuracy = [point.conditional_accuracy for point in points]
    fid = [point.fid for point in points]
    fid_label = f"FID ({points[0].num_samples} samples)"
    by_scale.plot(scales, fid, "o-", color="tab:blue")
    by_scale.set_xlabel("guidance scale w")
    by_scale.set_ylabel(fid_label, color="tab:blue")
    twin = by_scale.twinx()
    twin.plot(scales, accuracy, "s--", color="tab:orange")
    twin.set_ylabel("conditional accuracy", color="tab:orange")
    by_scale.set_title("FID and class accuracy against w")
    by_scale.grid(alpha=0.3)
    trade_off.plot(accuracy, fid, "o-", color="tab:blue")
    for point in points:
        trade_off.annotate(
            f"w={point.guidance_scale:g}",
            (point.conditional_accuracy, point.fid),
            xytext=(4, 4),
            textcoords="offset points",
        )
    trade_off.set_xlabel("conditional accuracy (data set's classifier)")
    trade_off.set_ylabel(fid_label)
    trade_off.set_title("Quality against class fidelity")
    trade_off.grid(alpha=0.3)
    return png_bytes(figure)
