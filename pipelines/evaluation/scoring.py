"""Feature summaries of image shards, computed by a pool of Ray actors that each load the feature network once (one
GPU each on a GPU cluster) and merged exactly:
FID statistics as float64 sums, Inception Score statistics as per-split sums keyed by global sample index, and the
features of the first images for precision/recall. Every result is independent of the number of workers.

The run's one reference-statistics cache lives here too: the training split's summary, computed once per (data
fingerprint, extractor id) and committed under ``{root}/_cache/reference/``, read by the evaluate stage and by the
tune stage's proxy FID.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from ray.util import ActorPool

from ddpm_core.features import FeatureExtractor
from ddpm_core.metrics import (
    ClassProbabilityStatistics,
    FeatureStatistics,
    FidEstimate,
    fid_jackknife,
    split_boundaries,
)
from ddpm_core.storage import IncompleteError, commit, filesystem, read_committed, read_manifest
from pipelines.config import Extractor
from pipelines.data.shards import ImageSource, SplitLayout, read_images, split_identity, split_layout, split_sources
from pipelines.evaluation.memorization import FEATURES_FILE, SetNeighbours, TrainingSet, set_neighbours
from pipelines.execution import Execution

REFERENCE_FILE = "reference.pt"


@dataclass(frozen=True)
class ExtractorSpec:
    """How a worker builds the feature network: the cached classifier, or Inception weights at a URI."""

    kind: Extractor
    uri: str  # the committed classifier, or the Inception weights file
    sha256: str = ""  # Inception: expected SHA-256 (or prefix) of the weights file


@dataclass(frozen=True)
class Summary:
    fid: FeatureStatistics
    inception: ClassProbabilityStatistics | None  # None when the Inception Score is off
    first_features: torch.Tensor  # [min(N, limit), d] features of the images with the lowest indices, in index order
    groups: dict[int, FeatureStatistics] = field(default_factory=dict)  # jackknife group -> its images' statistics
    neighbours: SetNeighbours | None = None  # each image's two nearest training images, in index order (if asked)

    def group_list(self) -> list[FeatureStatistics]:
        """The jackknife groups' statistics in group order (every group must hold images)."""
        return [self.groups[group] for group in sorted(self.groups)]


@dataclass(frozen=True)
class PublishedStatistics:
    """Reference statistics from a published ``.npz`` (``evaluate.reference_stats_uri``)."""

    mean: torch.Tensor  # [d] float64
    covariance: torch.Tensor  # [d, d] float64
    sha256: str  # of the file


@dataclass(frozen=True)
class SummaryRequest:
    """What every task of one :func:`summarize` computes."""

    spec: ExtractorSpec
    num_samples: int  # images in the whole set (sizes the Inception Score splits)
    inception_splits: int = 0  # 0: no Inception Score statistics
    keep_first: int = 0  # keep the features of the images with indices below this (precision/recall)
    groups: int = 0  # index-contiguous jackknife groups of [0, num_samples) (0: none)
    neighbours: TrainingSet | None = None  # search each image's two nearest training images (the copy rate)


def build_extractor(spec: ExtractorSpec, storage_options: dict[str, object]) -> FeatureExtractor:
    """The feature network a spec names, on this worker's GPU when it has one."""
    if spec.kind is Extractor.CLASSIFIER:
        from ddpm_core.features import ClassifierExtractor, load_classifier

        return ClassifierExtractor(load_classifier(spec.uri, storage_options)[0])
    from ddpm_core.inception import load_inception

    return load_inception(spec.uri, spec.sha256, storage_options, "cuda" if torch.cuda.is_available() else "cpu")


@ray.remote
class FeatureWorker:
    """Holds one feature network, loaded once for every file it is given (not once per file), and summarizes image
    files with it."""

    def __init__(self, spec: ExtractorSpec, storage_options: dict[str, object]) -> None:
        self.spec = spec
        self.extractor = build_extractor(spec, storage_options)
        self.storage_options = storage_options
        self.classifiers: dict[str, FeatureExtractor] = {}  # other networks than ``spec``'s, by URI

    def summarize(self, source: ImageSource, request: SummaryRequest) -> Summary:
        """The summary of one file's images."""
        images = read_images(source, self.storage_options)  # [n, H, W, C] uint8
        return summary_of(self.extractor, images, source.first_index, request, self.storage_options)

    def predicted_classes(self, source: ImageSource, classifier_uri: str) -> np.ndarray:
        """The top-1 class ``[n]`` int64 of one file's images by the data set's classifier at ``classifier_uri``: this
        worker's own network when it is that classifier, else one it loads on its first call."""
        spec = ExtractorSpec(Extractor.CLASSIFIER, classifier_uri)
        if spec == self.spec:
            classifier = self.extractor
        else:
            if classifier_uri not in self.classifiers:
                self.classifiers[classifier_uri] = build_extractor(spec, self.storage_options)
            classifier = self.classifiers[classifier_uri]
        _, logits = classifier(read_images(source, self.storage_options))  # [n, K]
        return logits.argmax(dim=1).numpy()

    def features(self, source: ImageSource) -> bytes:
        """The features ``[n, d]`` float32 of one file's images, as ``.npy`` bytes."""
        features, _ = self.extractor(read_images(source, self.storage_options))  # [n, d]
        buffer = io.BytesIO()
        np.save(buffer, features.to(torch.float32).numpy())
        return buffer.getvalue()


@dataclass(frozen=True)
class FeatureWorkers:
    """A pool of :class:`FeatureWorker` actors of one feature network. A stage that computes features of several
    image sets in a row (with no other Ray work in between) holds one for all of them: each worker's start, a new
    process importing torch and loading the network, costs seconds."""

    spec: ExtractorSpec
    pool: ActorPool


@contextlib.contextmanager
def feature_workers(spec: ExtractorSpec, files: int, execution: Execution) -> Iterator[FeatureWorkers]:
    """A pool of :class:`FeatureWorker` actors spread over the nodes, one per CPU (or GPU) free in the cluster, at
    least one and at most one per file; when the block ends they are stopped and their resources are free again."""
    count = max(1, min(files, execution.free_slots()))
    with execution.actor_pool(FeatureWorker, count, spec, execution.storage_options) as pool:
        yield FeatureWorkers(spec, pool)


def held_or_new(
    workers: FeatureWorkers | None, spec: ExtractorSpec, files: int, execution: Execution
) -> contextlib.AbstractContextManager[FeatureWorkers]:
    """``workers`` as they are (whoever holds them stops them), or a new pool of :func:`feature_workers` for
    ``files`` files, stopped when the block ends."""
    if workers is None:
        return feature_workers(spec, files, execution)
    if workers.spec != spec:
        raise ValueError(f"feature workers of {workers.spec} were handed features to compute with {spec}")
    return contextlib.nullcontext(workers)


def predicted_classes(sources: list[ImageSource], classifier_uri: str, workers: FeatureWorkers) -> np.ndarray:
    """The top-1 class ``[N]`` int64 of every image of ``sources``, in the order given, by the data set's classifier
    at ``classifier_uri``: one call per file on ``workers``."""
    calls = workers.pool.map(lambda worker, source: worker.predicted_classes.remote(source, classifier_uri), sources)
    return np.concatenate(list(calls))


def summary_of(
    extractor: FeatureExtractor,
    images: np.ndarray,
    first_index: int,
    request: SummaryRequest,
    storage_options: dict[str, object],
) -> Summary:
    """The summary of images ``[n, H, W, C]`` uint8 whose global indices start at ``first_index``, in this process
    (a :class:`FeatureWorker`'s work, and the tune stage's proxy FID on a trial's rank 0), by the extractor that
    ``request.spec`` names; its first features are those with indices below ``request.keep_first``."""
    features, logits = extractor(images)  # [n, d], [n, K]
    indices = torch.arange(first_index, first_index + len(images))  # [n]
    inception = None
    if request.inception_splits:
        inception = ClassProbabilityStatistics.empty(request.num_samples, request.inception_splits, logits.shape[1])
        inception.update(logits, indices)
    groups = group_statistics(features, indices, request.num_samples, request.groups) if request.groups else {}
    neighbours = set_neighbours(images, features, request.neighbours, storage_options) if request.neighbours else None
    first = features[indices < request.keep_first]  # [min(n, keep_first - first_index), d]
    return Summary(FeatureStatistics.from_features(features), inception, first, groups, neighbours)


def group_statistics(
    features: torch.Tensor, indices: torch.Tensor, num_samples: int, groups: int
) -> dict[int, FeatureStatistics]:
    """Statistics of ``[n, d]`` features per jackknife group: group g holds the global indices
    ``[g N // G, (g + 1) N // G)``, so any sharding of the set merges to the same groups."""
    group = torch.searchsorted(split_boundaries(num_samples, groups), indices, right=True) - 1  # [n]
    return {int(g): FeatureStatistics.from_features(features[group == g]) for g in torch.unique(group).tolist()}


def merge_groups(a: dict[int, FeatureStatistics], b: dict[int, FeatureStatistics]) -> dict[int, FeatureStatistics]:
    merged = dict(a)
    for group, stats in b.items():
        merged[group] = merged[group].merge(stats) if group in merged else stats
    return merged


def summarize(
    sources: list[ImageSource], request: SummaryRequest, execution: Execution, workers: FeatureWorkers | None = None
) -> Summary:
    """Summaries of every source in parallel, merged in the order given (so the float64 sums are reproducible), on
    ``workers`` when given, else on a pool of their own."""
    with held_or_new(workers, request.spec, len(sources), execution) as held:
        parts: list[Summary] = list(
            held.pool.map(lambda worker, source: worker.summarize.remote(source, request), sources)
        )
    fid = parts[0].fid
    for part in parts[1:]:
        fid = fid.merge(part.fid)
    inception = parts[0].inception
    for part in parts[1:]:
        if inception is not None and part.inception is not None:
            inception = inception.merge(part.inception)
    groups: dict[int, FeatureStatistics] = {}
    for part in parts:
        groups = merge_groups(groups, part.groups)
    in_index_order = [part for _, part in sorted(zip(sources, parts, strict=True), key=lambda p: p[0].first_index)]
    found = [part.neighbours for part in in_index_order if part.neighbours is not None]
    neighbours = SetNeighbours.cat(found) if found else None
    return Summary(fid, inception, torch.cat([part.first_features for part in in_index_order]), groups, neighbours)


def reference_key(train_uri: str, extractor_id: str, storage_options: dict[str, Any]) -> str:
    """The cache key of the training split's reference statistics: the split's own identity
    (:func:`pipelines.data.shards.split_identity`) and the feature network's."""
    return f"{split_identity(train_uri, storage_options)[:16]}-{extractor_id}"


def save_reference(
    uri: str, summary: Summary, metadata: Mapping[str, object], storage_options: dict[str, object]
) -> None:
    buffer = io.BytesIO()
    torch.save({**summary.fid.to_dict(), "first_features": summary.first_features}, buffer)
    commit(uri, {REFERENCE_FILE: buffer.getvalue()}, dict(metadata), storage_options)


def load_reference(uri: str, storage_options: dict[str, object]) -> Summary:
    files, _ = read_committed(uri, [REFERENCE_FILE], storage_options)
    data = torch.load(io.BytesIO(files[REFERENCE_FILE]), weights_only=True)
    return Summary(FeatureStatistics.from_dict(data), None, data["first_features"])


def reference_summary(
    cache_uri: str,
    train_uri: str,
    request: SummaryRequest,
    metadata: Mapping[str, object],
    execution: Execution,
    log: Callable[[str], None],
    workers: FeatureWorkers | None = None,
) -> Summary:
    """The training split's summary from the cache (when it kept enough first features), or computed over its
    shards (on ``workers`` when given) and committed there."""
    try:
        summary = load_reference(cache_uri, execution.storage_options)
        if summary.first_features.shape[0] >= min(request.keep_first, summary.fid.count):
            log(f"reusing reference statistics {cache_uri}")
            return summary
    except IncompleteError:
        pass
    sources = split_sources(train_uri, execution.storage_options)
    log(f"computing reference statistics of the training split ({len(sources)} shards) into {cache_uri}")
    summary = summarize(sources, request, execution, workers)
    save_reference(cache_uri, summary, {**metadata, "count": summary.fid.count}, execution.storage_options)
    return summary


def reference_moments(reference: Summary, published: PublishedStatistics | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean ``[d]``, covariance ``[d, d]``) FIDs are measured against: the published statistics when there are any,
    else the training split's."""
    if published is not None:
        return published.mean, published.covariance
    return reference.fid.mean, reference.fid.covariance


def fid_estimate(summary: Summary, reference: Summary, published: PublishedStatistics | None) -> FidEstimate:
    """FID of a summary made with jackknife groups, with its standard error and bias correction."""
    return fid_jackknife(summary.group_list(), reference_moments(reference, published), summary.fid)


def published_reference(uri: str, storage_options: dict[str, object]) -> PublishedStatistics:
    """Statistics from the common ``.npz`` format of published statistics (arrays ``mu`` and ``sigma``)."""
    from ddpm_core.data import DataError

    try:
        fs, path = filesystem(uri, storage_options)
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise DataError(f"evaluate.reference_stats_uri {uri!r} does not exist") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            mu, sigma = archive["mu"], archive["sigma"]
    except (KeyError, ValueError, OSError) as error:
        raise DataError(
            f"evaluate.reference_stats_uri {uri!r}: expected an .npz with arrays 'mu' [d] and 'sigma' [d, d] ({error})"
        ) from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DataError(
            f"evaluate.reference_stats_uri {uri!r}: 'mu' must be [d] and 'sigma' [d, d], got {mu.shape} "
            f"and {sigma.shape}"
        )
    return PublishedStatistics(
        torch.from_numpy(mu).to(torch.float64),
        torch.from_numpy(sigma).to(torch.float64),
        hashlib.sha256(data).hexdigest(),
    )


def training_features(
    cache_uri: str,
    train_uri: str,
    spec: ExtractorSpec,
    execution: Execution,
    log: Callable[[str], None],
    workers: FeatureWorkers | None = None,
) -> TrainingSet:
    """The training split's files and the committed cache of their features, one ``features-NNNNN.npy`` per file
    (computed by the feature workers the first time, then reused for the data fingerprint and extractor of
    ``cache_uri`` and the split's files): what the copy rate's neighbour search reads, block by block. The same
    images can be split into files of other sizes (a streamed run's prepare writes smaller ones), so the cache is
    kept per layout. Computed on ``workers`` when given."""
    layout = split_layout(train_uri, execution.storage_options)
    cache_uri = f"{cache_uri}-{layout_key(layout)}"
    try:
        read_manifest(cache_uri, execution.storage_options)
        log(f"reusing training features {cache_uri}")
    except IncompleteError:
        log(f"computing the features of the training split ({len(layout.sources)} files) into {cache_uri}")
        with held_or_new(workers, spec, len(layout.sources), execution) as held:
            parts: list[bytes] = list(
                held.pool.map(lambda worker, source: worker.features.remote(source), list(layout.sources))
            )
        files = {FEATURES_FILE.format(number): data for number, data in enumerate(parts)}
        commit(cache_uri, files, {"count": layout.count}, execution.storage_options)
    return TrainingSet(layout.sources, cache_uri, layout.count)


def layout_key(layout: SplitLayout) -> str:
    """A short hash of how many images each file of a split holds, in order."""
    return hashlib.sha256(",".join(map(str, layout.counts)).encode()).hexdigest()[:8]
