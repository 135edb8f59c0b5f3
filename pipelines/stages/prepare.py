"""prepare: validate the data set, split off a hold-out set, write canonical uint8 shards for the training
workers, and make (or reuse, keyed by data fingerprint) the feature extractor and the reference statistics."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from ddpm_core.data import DataError, load_dataset
from ddpm_core.features import accuracy, extract_features, extractor_id, load_classifier, save_classifier, train_classifier
from ddpm_core.metrics import FeatureStatistics, frechet_distance_from_stats
from ddpm_core.storage import IncompleteError, commit, read_committed
from pipelines.stages.context import StageContext

SHARD_IMAGES = 10_000


def data_storage_options(context: StageContext) -> dict[str, Any]:
    return context.config.storage.options() if context.config.data.uri.startswith("s3://") else {}


def check_fits_model(dataset, context: StageContext) -> None:
    unet = context.config.model.unet()
    _, height, width, channels = dataset.images.shape
    if (height, width, channels) != (unet.image_size, unet.image_size, unet.in_channels):
        raise DataError(f"data.uri {context.config.data.uri!r} has {height}x{width} images with {channels} channel(s), "
                        f"but model.preset {context.config.model.preset!r} expects {unet.image_size}x{unet.image_size} "
                        f"with {unet.in_channels}; choose a matching preset or set model.overrides")


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def split(dataset, holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train / hold-out index split, seeded by the data fingerprint."""
    order = np.random.default_rng(int(dataset.fingerprint[:15], 16)).permutation(len(dataset.images))
    holdout = int(round(holdout_fraction * len(order)))
    return np.sort(order[holdout:]), np.sort(order[:holdout])


def read_shards(uri: str, storage_options: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    files, _ = read_committed(uri, None, storage_options)
    parts = [load_npz(files[name]) for name in sorted(files)]
    labels = np.concatenate([p["labels"] for p in parts]) if "labels" in parts[0] else None
    return np.concatenate([p["images"] for p in parts]), labels


def feature_extractor(context: StageContext, dataset, train_idx, holdout_idx):
    """The classifier for this data fingerprint: loaded from the cache, or trained and committed there."""
    if dataset.labels is None:
        raise DataError(f"evaluate.extractor=classifier needs class labels, and data.uri {context.config.data.uri!r} has none "
                        "(use class sub-folders or an .npz with 'labels')")
    uri = context.store.cache_uri("extractors", f"{dataset.fingerprint[:16]}-classifier-e{context.config.evaluate.classifier_epochs}")
    try:
        model, metadata = load_classifier(uri, context.store.options)
        context.log(f"prepare: reusing feature extractor {metadata['extractor_id']} from {uri}")
        return model, metadata, uri
    except IncompleteError:
        pass
    context.log(f"prepare: training the feature-extractor classifier on {len(train_idx)} labelled images")
    model = train_classifier(dataset.images[train_idx], dataset.labels[train_idx], context.config.evaluate.classifier_epochs)
    metadata = {"extractor_id": extractor_id(model), "data_fingerprint": dataset.fingerprint,
                "holdout_accuracy": accuracy(model, dataset.images[holdout_idx], dataset.labels[holdout_idx]) if len(holdout_idx) else None}
    save_classifier(uri, model, metadata, context.store.options)
    return model, metadata, uri


def reference_statistics(context: StageContext, dataset, train_idx, model, extractor: str) -> tuple[FeatureStatistics, str]:
    """Feature statistics of the whole training split, cached by (data fingerprint, extractor id)."""
    uri = context.store.cache_uri("reference_stats", f"{dataset.fingerprint[:16]}-{extractor}")
    try:
        files, _ = read_committed(uri, ["stats.pt"], context.store.options)
        return FeatureStatistics.from_dict(torch.load(io.BytesIO(files["stats.pt"]), weights_only=True)), uri
    except IncompleteError:
        pass
    stats = FeatureStatistics.from_features(extract_features(model, dataset.images[train_idx]))
    buffer = io.BytesIO()
    torch.save(stats.to_dict(), buffer)
    commit(uri, {"stats.pt": buffer.getvalue()}, {"extractor_id": extractor, "data_fingerprint": dataset.fingerprint,
                                                    "count": stats.count}, context.store.options)
    return stats, uri


def run(context: StageContext) -> dict[str, Any]:
    config = context.config
    dataset = load_dataset(config.data.uri, config.data.split, data_storage_options(context))
    check_fits_model(dataset, context)
    train_idx, holdout_idx = split(dataset, config.data.holdout_fraction)
    context.log(f"prepare: {len(dataset.images)} images {dataset.images.shape[1:]} from {config.data.uri} "
                f"(fingerprint {dataset.fingerprint[:12]}), {len(train_idx)} train / {len(holdout_idx)} hold-out")

    shards_uri, holdout_uri = f"{context.store.stage_uri('prepare')}/shards", f"{context.store.stage_uri('prepare')}/holdout"
    for uri, indices in ((shards_uri, train_idx), (holdout_uri, holdout_idx)):
        files = {}
        for number, start in enumerate(range(0, max(len(indices), 1), SHARD_IMAGES)):
            chunk = indices[start:start + SHARD_IMAGES]
            arrays = {"images": dataset.images[chunk]}
            if dataset.labels is not None:
                arrays["labels"] = dataset.labels[chunk]
            files[f"shard-{number:05d}.npz"] = npz_bytes(**arrays)
        commit(uri, files, {"count": int(len(indices))}, context.store.options)

    model, extractor_meta, extractor_uri = feature_extractor(context, dataset, train_idx, holdout_idx)
    reference, reference_uri = reference_statistics(context, dataset, train_idx, model, extractor_meta["extractor_id"])
    fid_floor = None
    if len(holdout_idx) >= 2:
        holdout_stats = FeatureStatistics.from_features(extract_features(model, dataset.images[holdout_idx]))
        fid_floor = frechet_distance_from_stats(holdout_stats, reference)
    client = context.client
    client.log_param(context.mlflow_run_id, "data.fingerprint", dataset.fingerprint)
    client.log_metric(context.mlflow_run_id, "num_train_images", len(train_idx))
    client.log_metric(context.mlflow_run_id, "num_holdout_images", len(holdout_idx))
    if extractor_meta.get("holdout_accuracy") is not None:
        client.log_metric(context.mlflow_run_id, "extractor_holdout_accuracy", extractor_meta["holdout_accuracy"])
    if fid_floor is not None:
        client.log_metric(context.mlflow_run_id, "fid_holdout_vs_train", fid_floor)
    return {
        "fingerprint": dataset.fingerprint, "num_train": int(len(train_idx)), "num_holdout": int(len(holdout_idx)),
        "shards_uri": shards_uri, "holdout_uri": holdout_uri, "num_classes": dataset.num_classes,
        "extractor_uri": extractor_uri, "extractor_id": extractor_meta["extractor_id"],
        "extractor_holdout_accuracy": extractor_meta.get("holdout_accuracy"),
        "reference_stats_uri": reference_uri, "reference_count": reference.count, "fid_holdout_vs_train": fid_floor,
    }
