"""Mergeable feature statistics and the Frechet distance (Heusel et al. 2017, Eq. 6), all in float64."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FeatureStatistics:
    """Sufficient statistics of a feature set: count, sum ``[d]`` and sum of outer products ``[d, d]`` in float64.

    Shards merge exactly by adding, so statistics computed over any split of the data, on any number of workers,
    equal the one-pass statistics up to float64 rounding (as in EDM's distributed FID).
    """

    count: int
    sum: torch.Tensor  # [d] float64
    sum_outer: torch.Tensor  # [d, d] float64

    @classmethod
    def empty(cls, dim: int) -> "FeatureStatistics":
        return cls(0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64))

    @classmethod
    def from_features(cls, features: torch.Tensor) -> "FeatureStatistics":
        """Statistics of ``[N, d]`` features."""
        stats = cls.empty(features.shape[1])
        stats.update(features)
        return stats

    def update(self, features: torch.Tensor) -> None:
        features = features.detach().to("cpu", torch.float64)  # [N, d]
        if features.ndim != 2 or features.shape[1] != self.sum.shape[0]:
            raise ValueError(f"features must be [N, {self.sum.shape[0]}], got {tuple(features.shape)}")
        self.count += features.shape[0]
        self.sum += features.sum(dim=0)
        self.sum_outer += features.T @ features

    def merge(self, other: "FeatureStatistics") -> "FeatureStatistics":
        if other.sum.shape != self.sum.shape:
            raise ValueError(f"cannot merge statistics of dimension {other.sum.shape[0]} into {self.sum.shape[0]}")
        return FeatureStatistics(self.count + other.count, self.sum + other.sum, self.sum_outer + other.sum_outer)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def covariance(self) -> torch.Tensor:
        """Unbiased covariance ``[d, d]`` (divides by N - 1, as ``numpy.cov`` in pytorch-fid)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        mean = self.mean
        return (self.sum_outer - self.count * torch.outer(mean, mean)) / (self.count - 1)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"count": torch.tensor(self.count), "sum": self.sum, "sum_outer": self.sum_outer}

    @classmethod
    def from_dict(cls, data: dict[str, torch.Tensor]) -> "FeatureStatistics":
        return cls(int(data["count"]), data["sum"].to(torch.float64), data["sum_outer"].to(torch.float64))


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Principal square root of a symmetric positive semi-definite matrix via its eigendecomposition."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` in float64.

    ``Tr((S1 S2)^{1/2}) = Tr((S1^{1/2} S2 S1^{1/2})^{1/2})``: the inner matrix is symmetric PSD, so the trace is the
    sum of square roots of its eigenvalues, with no complex parts to discard (unlike ``scipy.linalg.sqrtm`` on the
    non-symmetric product).
    """
    mu1, mu2, sigma1, sigma2 = (x.to(torch.float64) for x in (mu1, mu2, sigma1, sigma2))
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * trace_sqrt)


def frechet_distance_from_stats(a: FeatureStatistics, b: FeatureStatistics) -> float:
    return frechet_distance(a.mean, a.covariance, b.mean, b.covariance)
