"""Mode coverage of an unconditional sample set of labelled data: which classes the samples fall in, by the data set's
own classifier (the prepare stage's), against the training split's labels.

The distance is the total variation distance ``TVD(q, p) = 1/2 sum_k |q_k - p_k|`` between the samples' class shares
``q`` and the training split's ``p`` (0: the same shares; 1 - p_c when every sample is of class c): the label-space
check of mode dropping that GAN papers read off a pretrained classifier's histogram (Metz et al. 2017, Unrolled GANs:
modes counted on stacked MNIST; Srivastava et al. 2017, VEEGAN: the KL of the class histogram). Its 95%
interval is a seeded percentile bootstrap over the samples (Efron & Tibshirani 1993): resampling N samples with
replacement is drawing their class counts from ``Multinomial(N, q)``. A TVD of N samples is biased upward by sampling
noise (a perfect model's N samples do not land on ``p`` exactly), so the same draw from ``p`` itself gives the floor.
Per-class recall ``min(1, q_k / p_k)`` says how much of each class's expected share is present.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipelines.contracts import ClassCoverage


def total_variation(q: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``1/2 sum_k |q_k - p_k|`` over the last axis: shares ``[..., K]`` against ``[K]``."""
    return 0.5 * np.abs(q - p).sum(-1)


def class_coverage(
    counts: np.ndarray, training_counts: Sequence[int], names: Sequence[str], resamples: int, seed: int
) -> ClassCoverage:
    """TVD of the samples' class counts ``[K]`` from the training split's, with its percentile bootstrap interval
    and floor (``resamples`` draws each, seeded by ``seed``), and per-class recall."""
    p = np.asarray(training_counts, dtype=np.float64) / sum(training_counts)  # [K]
    total = int(counts.sum())
    q = counts / total  # [K]
    generator = np.random.default_rng(seed)
    resampled = generator.multinomial(total, q, size=resamples) / total  # [B, K]: the samples, drawn again
    low, high = np.quantile(total_variation(resampled, p), [0.025, 0.975])
    perfect = generator.multinomial(total, p, size=resamples) / total  # [B, K]: a model that draws p exactly
    recall = np.minimum(1.0, np.divide(q, p, out=np.ones_like(q), where=p > 0))  # [K]
    return ClassCoverage(
        tvd=float(total_variation(q, p)),
        tvd_low=float(low),
        tvd_high=float(high),
        tvd_floor=float(total_variation(perfect, p).mean()),
        resamples=resamples,
        seed=seed,
        num_samples=total,
        class_names=tuple(names),
        training_share=tuple(float(x) for x in p),
        sample_share=tuple(float(x) for x in q),
        recall=tuple(float(x) for x in recall),
    )


def coverage_table(coverage: ClassCoverage) -> dict[str, list[object]]:
    """One row per class: its training share, its share of the samples and its recall (an MLflow table)."""
    return {
        "class": list(coverage.class_names),
        "training_share": list(coverage.training_share),
        "sample_share": list(coverage.sample_share),
        "recall": list(coverage.recall),
    }
