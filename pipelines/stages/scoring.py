"""Feature summaries of image shards, computed by Ray tasks (one GPU each on a GPU cluster) and merged exactly:
FID statistics as float64 sums, Inception Score statistics as per-split sums keyed by global sample index, and the
features of the first images for precision/recall. Every result is independent of the number of workers.

The reference summary of the training split is computed once per (data fingerprint, extractor) and cached in
storage, like the classifier extractor itself."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from ddpm_core.metrics import ClassProbabilityStatistics, FeatureStatistics
from ddpm_core.storage import IncompleteError, commit, read_committed, read_manifest


@dataclass(frozen=True)
class ExtractorSpec:
    """How a worker builds the feature network: the cached classifier, or Inception weights at a URI."""

    kind: str  # classifier | inception
    uri: str  # the committed classifier, or the Inception weights file
    sha256: str = ""  # Inception: expected SHA-256 (or prefix) of the weights file


@dataclass(frozen=True)
class ImageSource:
    """One committed file of uint8 images ``[n, H, W, C]``; its first image has global index ``first_index``."""

    uri: str
    file: str  # images.npy (sample shards) or shard-NNNNN.npz (prepare shards)
    first_index: int


@dataclass
class Summary:
    fid: FeatureStatistics
    inception: ClassProbabilityStatistics | None  # None when the Inception Score is off
    first_features: torch.Tensor  # [min(N, limit), d] features of the images with the lowest indices, in index order


def build_extractor(spec: ExtractorSpec, storage_options: dict[str, Any]):
    """The :class:`ddpm_core.features.FeatureExtractor` a spec names, on this worker's GPU when it has one."""
    if spec.kind == "classifier":
        from ddpm_core.features import ClassifierExtractor, load_classifier

        return ClassifierExtractor(load_classifier(spec.uri, storage_options)[0])
    from ddpm_core.inception import load_inception

    return load_inception(spec.uri, spec.sha256, storage_options, "cuda" if torch.cuda.is_available() else "cpu")


def read_images(source: ImageSource, storage_options: dict[str, Any]) -> np.ndarray:
    from pipelines.stages.prepare import load_npz

    data = read_committed(source.uri, [source.file], storage_options)[0][source.file]
    if source.file.endswith(".npz"):
        return load_npz(data)["images"]
    return np.load(io.BytesIO(data), allow_pickle=False)


def sample_sources(shard_uris: list[str], storage_options: dict[str, Any]) -> list[ImageSource]:
    """Sample shards carry their first sample index in the manifest."""
    return [ImageSource(uri, "images.npy", int(read_manifest(uri, storage_options)["metadata"]["start"])) for uri in shard_uris]


def split_sources(uri: str, storage_options: dict[str, Any]) -> list[ImageSource]:
    """The shards of a split written by prepare (``shard-NNNNN.npz``, in index order)."""
    from pipelines.stages.prepare import SHARD_IMAGES

    names = sorted(read_manifest(uri, storage_options)["files"])
    return [ImageSource(uri, name, number * SHARD_IMAGES) for number, name in enumerate(names)]


@ray.remote
def summarize_source(source: ImageSource, spec: ExtractorSpec, storage_options: dict[str, Any], num_samples: int,
                     inception_splits: int, keep_first: int) -> dict[str, Any]:
    images = read_images(source, storage_options)
    features, logits = build_extractor(spec, storage_options)(images)  # [n, d], [n, K]
    indices = torch.arange(source.first_index, source.first_index + len(images))
    result: dict[str, Any] = {"fid": FeatureStatistics.from_features(features).to_dict(),
                              "first": (indices[indices < keep_first], features[indices < keep_first])}
    if inception_splits:
        inception = ClassProbabilityStatistics.empty(num_samples, inception_splits, logits.shape[1])
        inception.update(logits, indices)
        result["inception"] = inception.to_dict()
    return result


def summarize(sources: list[ImageSource], spec: ExtractorSpec, storage_options: dict[str, Any], runtime_env: dict[str, Any],
              use_gpu: bool, num_samples: int, inception_splits: int = 0, keep_first: int = 0) -> Summary:
    """Summaries of every source in parallel, merged in a fixed order (so the float64 sums are reproducible)."""
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    parts = ray.get([summarize_source.options(**resources, runtime_env=runtime_env).remote(
        source, spec, storage_options, num_samples, inception_splits, keep_first) for source in sources])
    fid = FeatureStatistics.from_dict(parts[0]["fid"])
    for part in parts[1:]:
        fid = fid.merge(FeatureStatistics.from_dict(part["fid"]))
    inception = None
    if inception_splits:
        inception = ClassProbabilityStatistics.from_dict(parts[0]["inception"])
        for part in parts[1:]:
            inception = inception.merge(ClassProbabilityStatistics.from_dict(part["inception"]))
    indices = torch.cat([part["first"][0] for part in parts])
    features = torch.cat([part["first"][1] for part in parts])
    return Summary(fid, inception, features[indices.argsort()])


def save_reference(uri: str, summary: Summary, metadata: dict[str, Any], storage_options: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save({**summary.fid.to_dict(), "first_features": summary.first_features}, buffer)
    commit(uri, {"reference.pt": buffer.getvalue()}, metadata, storage_options)


def load_reference(uri: str, storage_options: dict[str, Any]) -> tuple[Summary, dict[str, Any]]:
    files, metadata = read_committed(uri, ["reference.pt"], storage_options)
    data = torch.load(io.BytesIO(files["reference.pt"]), weights_only=True)
    return Summary(FeatureStatistics.from_dict(data), None, data["first_features"]), metadata


def reference_summary(cache_uri: str, train_uri: str, spec: ExtractorSpec, metadata: dict[str, Any], storage_options: dict[str, Any],
                      runtime_env: dict[str, Any], use_gpu: bool, keep_first: int, log) -> tuple[Summary, str]:
    """The training split's summary from the cache, or computed over its shards and committed there."""
    try:
        summary, _ = load_reference(cache_uri, storage_options)
        if summary.first_features.shape[0] >= min(keep_first, summary.fid.count):
            log(f"evaluate: reusing reference statistics {cache_uri}")
            return summary, cache_uri
    except IncompleteError:
        pass
    sources = split_sources(train_uri, storage_options)
    log(f"evaluate: computing reference statistics of the training split ({len(sources)} shards) into {cache_uri}")
    summary = summarize(sources, spec, storage_options, runtime_env, use_gpu, 0, 0, keep_first)
    save_reference(cache_uri, summary, {**metadata, "count": summary.fid.count}, storage_options)
    return summary, cache_uri


def published_reference(uri: str, storage_options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(mu ``[d]``, sigma ``[d, d]``, SHA-256 of the file) from the common ``.npz`` format of published statistics."""
    from ddpm_core.data import DataError
    from ddpm_core.storage import filesystem

    try:
        fs, path = filesystem(uri, storage_options)
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise DataError(f"evaluate.reference_stats_uri {uri!r} does not exist") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            mu, sigma = archive["mu"], archive["sigma"]
    except (KeyError, ValueError, OSError) as error:
        raise DataError(f"evaluate.reference_stats_uri {uri!r}: expected an .npz with arrays 'mu' [d] and 'sigma' [d, d] ({error})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DataError(f"evaluate.reference_stats_uri {uri!r}: 'mu' must be [d] and 'sigma' [d, d], got {mu.shape} and {sigma.shape}")
    return torch.from_numpy(mu).to(torch.float64), torch.from_numpy(sigma).to(torch.float64), hashlib.sha256(data).hexdigest()
