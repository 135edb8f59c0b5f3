"""prepare: validate the data set, split off a hold-out set (and read the test split when the NLL is scored on
it), write canonical uint8 shards for the workers, and make (or reuse, keyed by data fingerprint) the domain
classifier, plus its reference statistics when the tune stage's proxy FID needs them (evaluate computes its own,
distributed)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from ddpm_core.data import DataError, load_dataset
from ddpm_core.features import accuracy, extract_features, extractor_id, load_classifier, save_classifier, train_classifier
from ddpm_core.metrics import FeatureStatistics
from ddpm_core.storage import IncompleteError, commit, read_committed
from pipelines.stages.context import StageContext

SHARD_IMAGES = 10_000


def data_storage_options(config) -> dict[str, Any]:
    return config.storage.options() if config.data.uri.startswith("s3://") else {}


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


def write_split(uri: str, dataset, indices: np.ndarray, storage_options: dict[str, Any]) -> None:
    """``shard-NNNNN.npz`` files of ``SHARD_IMAGES`` images (and labels) each, committed with one manifest."""
    files = {}
    for number, start in enumerate(range(0, max(len(indices), 1), SHARD_IMAGES)):
        chunk = indices[start:start + SHARD_IMAGES]
        arrays = {"images": dataset.images[chunk]}
        if dataset.labels is not None:
            arrays["labels"] = dataset.labels[chunk]
        files[f"shard-{number:05d}.npz"] = npz_bytes(**arrays)
    commit(uri, files, {"count": int(len(indices))}, storage_options)


def test_split(context: StageContext, train_dataset):
    """The data set's test split, for the NLL on it: must exist and differ from the training data."""
    dataset = load_dataset(context.config.data.uri, "test", data_storage_options(context.config))
    if dataset.fingerprint == train_dataset.fingerprint:
        raise DataError(f"evaluate.nll_split=test: data.uri {context.config.data.uri!r} has no separate test split (only "
                        "CIFAR-10 archives do); use evaluate.nll_split=holdout with data.holdout_fraction > 0")
    check_fits_model(dataset, context)
    return dataset


def needs_proxy_fid_reference(config) -> bool:
    """The tune stage's proxy FID scores trials against the classifier's statistics of the training split."""
    return config.tune.enabled and config.tune.proxy_fid_samples > 0


def needs_classifier(config) -> bool:
    return config.evaluate.extractor == "classifier" or needs_proxy_fid_reference(config)


def run(context: StageContext) -> dict[str, Any]:
    config = context.config
    dataset = load_dataset(config.data.uri, config.data.split, data_storage_options(config))
    check_fits_model(dataset, context)
    train_idx, holdout_idx = split(dataset, config.data.holdout_fraction)
    context.log(f"prepare: {len(dataset.images)} images {dataset.images.shape[1:]} from {config.data.uri} "
                f"(fingerprint {dataset.fingerprint[:12]}), {len(train_idx)} train / {len(holdout_idx)} hold-out")
    test = test_split(context, dataset) if config.evaluate.nll and config.evaluate.nll_split == "test" else None

    stage_uri = context.store.stage_uri("prepare")
    shards_uri, holdout_uri = f"{stage_uri}/shards", f"{stage_uri}/holdout"
    write_split(shards_uri, dataset, train_idx, context.store.options)
    write_split(holdout_uri, dataset, holdout_idx, context.store.options)
    outputs = {"fingerprint": dataset.fingerprint, "num_train": int(len(train_idx)), "num_holdout": int(len(holdout_idx)),
               "shards_uri": shards_uri, "holdout_uri": holdout_uri, "num_classes": dataset.num_classes,
               "extractor_uri": None, "extractor_id": None, "reference_stats_uri": None}
    if test is not None:
        outputs["test_uri"] = f"{stage_uri}/test"
        write_split(outputs["test_uri"], test, np.arange(len(test.images)), context.store.options)
        context.log(f"prepare: {len(test.images)} test images for the NLL")
    client = context.client
    client.log_param(context.mlflow_run_id, "data.fingerprint", dataset.fingerprint)
    client.log_metric(context.mlflow_run_id, "num_train_images", len(train_idx))
    client.log_metric(context.mlflow_run_id, "num_holdout_images", len(holdout_idx))
    if needs_classifier(config):
        model, extractor_meta, extractor_uri = feature_extractor(context, dataset, train_idx, holdout_idx)
        if needs_proxy_fid_reference(config):  # evaluate computes (and caches) its own reference, distributed
            outputs["reference_stats_uri"] = reference_statistics(context, dataset, train_idx, model, extractor_meta["extractor_id"])[1]
        if extractor_meta.get("holdout_accuracy") is not None:
            client.log_metric(context.mlflow_run_id, "extractor_holdout_accuracy", extractor_meta["holdout_accuracy"])
        outputs.update(extractor_uri=extractor_uri, extractor_id=extractor_meta["extractor_id"],
                       extractor_holdout_accuracy=extractor_meta.get("holdout_accuracy"))
    return outputs
