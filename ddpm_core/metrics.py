"""Mergeable feature statistics and the Frechet distance (Heusel et al. 2017, Eq. 6), all in float64."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
    def empty(cls, dim: int) -> FeatureStatistics:
        return cls(0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64))

    @classmethod
    def from_features(cls, features: torch.Tensor) -> FeatureStatistics:
        """Statistics of ``[N, d]`` features."""
        stats = cls.empty(features.shape[1])
        stats.update(features)
        return stats

    def update(self, features: torch.Tensor) -> None:
        features = features.detach().to("cpu", torch.float64)  # [N, d]
        if features.ndim != 2 or features.shape[1] != self.sum.shape[0]:
            raise ValueError(f"features must be [N, {self.sum.shape[0]}], got {tuple(features.shape)}")
        self.count += features.shape[0]
        with one_thread():  # the same bits on any number of threads, as frechet_distance's
            self.sum += features.sum(dim=0)
            self.sum_outer += features.T @ features

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
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
    def from_dict(cls, data: dict[str, torch.Tensor]) -> FeatureStatistics:
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
    with one_thread():
        root1 = _sqrt_psd(sigma1)
        inner = root1 @ sigma2 @ root1
        trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * trace_sqrt)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch's CPU linear algebra on one thread: how BLAS splits a product or an eigendecomposition over threads
    changes its last bits, so the same statistics give the same FID, to the bit, on any machine (a driver with 2
    cores or 64). Costs ~3 s per FID at d = 2048 on one core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def frechet_distance_from_stats(a: FeatureStatistics, b: FeatureStatistics) -> float:
    return frechet_distance(a.mean, a.covariance, b.mean, b.covariance)


def split_boundaries(num_samples: int, splits: int) -> torch.Tensor:
    """Start index of each of ``splits`` index-contiguous parts of ``num_samples`` (as in Salimans et al.'s code):
    part k holds indices ``[k N // S, (k + 1) N // S)``. ``[S + 1]`` int64."""
    return torch.tensor([k * num_samples // splits for k in range(splits + 1)], dtype=torch.int64)


@dataclass
class ClassProbabilityStatistics:
    """Sufficient statistics of the Inception Score (Salimans et al. 2016), per split, in float64.

    ``IS_k = exp(E_x KL(p(y|x) || p_k(y)))`` with ``p_k(y)`` the mean of ``p(y|x)`` over part k, and
    ``E_x KL = mean_x sum_y p log p - sum_y p_k log p_k``: so a part needs only its count, ``sum_x p(y|x)`` ``[K]``
    and ``sum_x sum_y p log p``. Samples are assigned to parts by their global index, hence any sharding of the
    samples over workers merges to the same numbers.
    """

    num_samples: int  # N, fixed in advance: the parts are index ranges of [0, N)
    count: torch.Tensor  # [S] int64
    sum_probs: torch.Tensor  # [S, K] float64
    sum_plogp: torch.Tensor  # [S] float64

    @classmethod
    def empty(cls, num_samples: int, splits: int, num_classes: int) -> ClassProbabilityStatistics:
        if not 1 <= splits <= num_samples:
            raise ValueError(f"splits must be in [1, {num_samples}], got {splits}")
        return cls(
            num_samples,
            torch.zeros(splits, dtype=torch.int64),
            torch.zeros(splits, num_classes, dtype=torch.float64),
            torch.zeros(splits, dtype=torch.float64),
        )

    def update(self, logits: torch.Tensor, indices: torch.Tensor) -> None:
        """Add samples with ``logits`` ``[n, K]`` and global sample indices ``indices`` ``[n]``."""
        log_probs = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=1)  # [n, K]
        probs = log_probs.exp()
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise ValueError(
                f"sample indices must lie in [0, {self.num_samples}), got [{int(indices.min())}, {int(indices.max())}]"
            )
        part = torch.searchsorted(split_boundaries(self.num_samples, len(self.count)), indices, right=True) - 1  # [n]
        self.count += torch.bincount(part, minlength=len(self.count))
        self.sum_probs.index_add_(0, part, probs)
        self.sum_plogp.index_add_(0, part, (probs * log_probs).sum(dim=1))

    def merge(self, other: ClassProbabilityStatistics) -> ClassProbabilityStatistics:
        if (other.num_samples, other.sum_probs.shape) != (self.num_samples, self.sum_probs.shape):
            raise ValueError("cannot merge Inception Score statistics of different sample counts, splits or classes")
        return ClassProbabilityStatistics(
            self.num_samples,
            self.count + other.count,
            self.sum_probs + other.sum_probs,
            self.sum_plogp + other.sum_plogp,
        )

    def inception_score(self) -> tuple[float, float]:
        """(mean, standard deviation) of ``IS_k`` over the parts."""
        if int(self.count.sum()) != self.num_samples:
            raise ValueError(
                f"Inception Score statistics hold {int(self.count.sum())} of the {self.num_samples} samples"
            )
        count = self.count.to(torch.float64)
        marginal = self.sum_probs / count[:, None]  # [S, K]
        marginal_plogp = torch.where(marginal > 0, marginal * marginal.log(), torch.zeros_like(marginal)).sum(dim=1)
        scores = torch.exp(self.sum_plogp / count - marginal_plogp)  # [S]
        return float(scores.mean()), float(scores.std(unbiased=False)) if len(scores) > 1 else 0.0

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {
            "num_samples": torch.tensor(self.num_samples),
            "count": self.count,
            "sum_probs": self.sum_probs,
            "sum_plogp": self.sum_plogp,
        }

    @classmethod
    def from_dict(cls, data: dict[str, torch.Tensor]) -> ClassProbabilityStatistics:
        return cls(int(data["num_samples"]), data["count"], data["sum_probs"], data["sum_plogp"])


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[n, d], [m, d] -> [n, m]`` squared Euclidean distances in float64."""
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T).clamp(min=0)


def knn_radii(features: torch.Tensor, k: int, block: int = 1024) -> torch.Tensor:
    """Squared distance from each point of ``[n, d]`` to its k-th nearest other point ``[n]``."""
    if features.shape[0] <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {features.shape[0]}")
    # Column 0 of each sorted row is the point itself (distance 0), so column k is the k-th nearest other point.
    return torch.cat(
        [
            _squared_distances(features[i : i + block], features).kthvalue(k + 1, dim=1).values
            for i in range(0, features.shape[0], block)
        ]
    )


def fraction_in_manifold(
    queries: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, block: int = 1024
) -> float:
    """Fraction of ``queries`` ``[n, d]`` inside at least one ball ``||x - m_j||^2 <= radii_j`` of the manifold."""
    inside = [
        (_squared_distances(queries[i : i + block], manifold) <= radii[None, :]).any(dim=1)
        for i in range(0, queries.shape[0], block)
    ]
    return float(torch.cat(inside).to(torch.float64).mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eqs. 1-3) of ``fake`` ``[m, d]`` against ``real``
    ``[n, d]``: each set's manifold is the union of balls reaching each point's k-th nearest neighbour; precision is
    the fraction of fakes inside the real manifold, recall the fraction of reals inside the fake manifold."""
    real, fake = real.to(torch.float64), fake.to(torch.float64)
    precision = fraction_in_manifold(fake, real, knn_radii(real, k))
    recall = fraction_in_manifold(real, fake, knn_radii(fake, k))
    return precision, recall


@dataclass(frozen=True)
class FidEstimate:
    """A FID with its delete-a-group jackknife (Quenouille 1956; Tukey 1958) standard error and bias correction.

    The N images are cut into G index-contiguous groups; ``theta_(g)`` is the FID without group g. The jackknife
    standard error is ``sqrt((G - 1) / G * sum_g (theta_(g) - theta_bar)^2)`` and the bias-corrected estimate
    ``G theta - (G - 1) theta_bar`` removes the 1/N term of the bias exactly. FID's small-sample bias is, to first
    order, that term (``E ||mu_hat - mu_r||^2 = ||mu - mu_r||^2 + tr(Sigma) / N``; Chong & Forsyth 2020 fit
    ``FID_N = FID_inf + k / N``), so ``unbiased`` estimates their FID_inf from one set. Scores of sets of different
    sizes are comparable only through it, or for real images through :meth:`real_floor_at`.
    """

    value: float  # FID of all N images
    stderr: float  # jackknife standard error of value
    unbiased: float  # jackknife bias-corrected FID (an estimate of FID_inf; may fall below 0 by chance)
    count: int  # N
    leave_one_out: tuple[float, ...]  # [G] the statistic without each group

    @property
    def groups(self) -> int:
        return len(self.leave_one_out)

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """The normal-approximation interval ``value -/+ z stderr`` (95% for z = 1.96)."""
        return self.value - z * self.stderr, self.value + z * self.stderr

    def real_floor_at(self, count: int, reference_count: int | None) -> tuple[float, float]:
        """The FID ``count`` real images would score against the reference, with its standard error, for a set of
        real images of the reference's own distribution (a hold-out against the training split).

        Two samples of one distribution have FID_inf = 0, and the first-order bias of both sets' means and
        covariances gives ``E[FID] = k (1/n + 1/m)`` for n images against m in the reference (the mean term exactly:
        ``E ||mu_a - mu_b||^2 = tr(Sigma) (1/n + 1/m)``; Chong & Forsyth 2020 for the 1/N law), so
        ``floor(N) = value (1/N + 1/m) / (1/n + 1/m)``: one measured value scaled, not extrapolated along the
        jackknife's ``FID_inf + k / N`` with ``k = n (value - unbiased)``, a slope that a small set cannot resolve.
        ``reference_count`` None (published statistics): 1/m = 0.
        """
        inverse_m = 0.0 if reference_count is None else 1.0 / reference_count
        factor = (1.0 / count + inverse_m) / (1.0 / self.count + inverse_m)
        return self.value * factor, self.stderr * factor

    def minus(self, other: FidEstimate) -> FidEstimate:
        """``self - other`` with a paired jackknife: group g of both sets must hold the same sample indices (same
        noise, same classes), so that deleting it from both keeps the pairing and the standard error counts the
        correlation of the two sets' errors."""
        if (other.count, other.groups) != (self.count, self.groups):
            raise ValueError(
                f"a paired difference needs the same N and groups, got {self.count}/{self.groups} and "
                f"{other.count}/{other.groups}"
            )
        loo = [a - b for a, b in zip(self.leave_one_out, other.leave_one_out, strict=True)]
        return jackknife(self.value - other.value, loo, self.count)


def jackknife(value: float, leave_one_out: list[float], count: int) -> FidEstimate:
    """:class:`FidEstimate` from the full-set statistic and its G delete-one-group values."""
    groups = len(leave_one_out)
    if groups < 2:
        raise ValueError(f"a jackknife needs at least 2 groups, got {groups}")
    loo = torch.tensor(leave_one_out, dtype=torch.float64)  # [G]
    stderr = float(((groups - 1) / groups * ((loo - loo.mean()) ** 2).sum()).sqrt())
    unbiased = groups * value - (groups - 1) * float(loo.mean())
    return FidEstimate(value, stderr, unbiased, count, tuple(leave_one_out))


def total(groups: list[FeatureStatistics]) -> FeatureStatistics:
    merged = groups[0]
    for group in groups[1:]:
        merged = merged.merge(group)
    return merged


def without(whole: FeatureStatistics, group: FeatureStatistics) -> FeatureStatistics:
    """The statistics of ``whole`` minus one of its groups (exact: the sums subtract)."""
    return FeatureStatistics(whole.count - group.count, whole.sum - group.sum, whole.sum_outer - group.sum_outer)


def fid_jackknife(
    groups: list[FeatureStatistics],
    reference: tuple[torch.Tensor, torch.Tensor],
    whole: FeatureStatistics | None = None,
) -> FidEstimate:
    """FID of the union of ``groups`` against ``reference`` = (mean ``[d]``, covariance ``[d, d]``), with its
    jackknife standard error and bias correction (:class:`FidEstimate`). ``whole``: the union's statistics when
    already summed (the same up to float64 rounding; passing them keeps the FID identical to a plain one)."""
    whole = whole if whole is not None else total(groups)

    def fid(stats: FeatureStatistics) -> float:
        return frechet_distance(stats.mean, stats.covariance, *reference)

    return jackknife(fid(whole), [fid(without(whole, group)) for group in groups], whole.count)


def polynomial_mmd2(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, Eq. 3) with the cubic kernel ``k(x, y) = (x.y / d + 1)^3`` of the
    Kernel Inception Distance (Binkowski et al. 2018), for ``[n, d]`` and ``[m, d]`` features."""
    real, fake = real.to(torch.float64), fake.to(torch.float64)
    dim, n, m = real.shape[1], real.shape[0], fake.shape[0]
    k_rr = (real @ real.T / dim + 1) ** 3  # [n, n]
    k_ff = (fake @ fake.T / dim + 1) ** 3  # [m, m]
    k_rf = (real @ fake.T / dim + 1) ** 3  # [n, m]
    within_real = (k_rr.sum() - k_rr.diagonal().sum()) / (n * (n - 1))
    within_fake = (k_ff.sum() - k_ff.diagonal().sum()) / (m * (m - 1))
    return float(within_real + within_fake - 2 * k_rf.mean())


def kid_subset_size(requested: int, count: int) -> int:
    """KID's subset size for sets of ``count`` images: ``requested``, at most half the set, so that the subsets
    differ and their spread means something (subsets of the whole set would all be the same set)."""
    return max(2, min(requested, count // 2))


def kernel_inception_distance(
    real: torch.Tensor, fake: torch.Tensor, subset_size: int, subsets: int, seed: int = 0
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): the mean and standard deviation of :func:`polynomial_mmd2` over ``subsets`` random
    subsets of ``subset_size`` images of each set (as torchmetrics and the authors' code compute it). Unbiased at any
    set size, so small sets compare. ``[n, d], [m, d]`` features."""
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 images in each set, got {real.shape[0]} and {fake.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor(
        [
            polynomial_mmd2(
                real[torch.randperm(real.shape[0], generator=generator)[:size]],
                fake[torch.randperm(fake.shape[0], generator=generator)[:size]],
            )
            for _ in range(subsets)
        ],
        dtype=torch.float64,
    )  # [subsets]
    return float(values.mean()), float(values.std(unbiased=False)) if subsets > 1 else 0.0
