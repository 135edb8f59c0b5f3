"""prepare: validate the data set, split off a hold-out set (and read the test split when the NLL is scored on it),
write the splits as shards for the workers (:mod:`pipelines.data.shards`), and make (or reuse, keyed by data
fingerprint) the classifier feature network when evaluation or the tune stage's proxy FID uses it.

Runs on the job's driver before Ray starts, so bad data fails before any worker exists; a data set too large for the
driver (``data.prepare_on``) is converted by Ray Data tasks instead (:mod:`pipelines.data.ingest`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ddpm_core.checkpoint import read_snapshot_config
from ddpm_core.data import DataError, ImageDataset, SourceListing, list_source, load_dataset
from ddpm_core.features import accuracy, extractor_id, load_classifier, save_classifier, train_classifier
from ddpm_core.storage import IncompleteError, filesystem
from pipelines.config import Extractor, Loader, NllSplit, PipelineConfig, PrepareOn
from pipelines.context import StageContext
from pipelines.contracts import PrepareOutputs
from pipelines.data.ingest import (
    IngestPlan,
    UnitResult,
    commit_split,
    decode_units,
    fingerprint_of,
    remove_staging,
    shuffle_to_shards,
    train_class_counts,
)
from pipelines.data.shards import shard_images_for, write_split
from pipelines.data.streaming import choose_loader
from pipelines.execution import connect
from pipelines.generation.classes import sample_labels


def run(context: StageContext) -> PrepareOutputs:
    config, options = context.config, context.store.options
    listing = list_source(config.data.uri, data_storage_options(config))
    on_ray_data, why = choose_prepare_on(config, listing)
    if on_ray_data and listing is not None:
        return prepare_on_ray_data(context, listing, why)
    dataset = load_dataset(
        config.data.uri, config.data.split.value, data_storage_options(config), config.data.read_options()
    )
    if config.model.conditional:
        check_conditioning(dataset, config)
    check_fits_model(dataset.images.shape[1:], dataset.num_classes, config)
    train_idx, holdout_idx = split(dataset, config.data.holdout_fraction)
    check_split_sizes(config, len(train_idx), len(holdout_idx))
    context.log(
        f"prepare: {len(dataset.images)} images {dataset.images.shape[1:]} from {config.data.uri} "
        f"(fingerprint {dataset.fingerprint[:12]}), {len(train_idx)} train / {len(holdout_idx)} hold-out"
    )
    test = test_split(config, dataset) if config.evaluate.nll and config.evaluate.nll_split is NllSplit.TEST else None

    stage_uri = context.store.stage_uri("prepare")
    outputs = PrepareOutputs(
        fingerprint=dataset.fingerprint,
        num_train=len(train_idx),
        num_holdout=len(holdout_idx),
        shards_uri=f"{stage_uri}/shards",
        holdout_uri=f"{stage_uri}/holdout",
        num_classes=dataset.num_classes,
        test_uri=f"{stage_uri}/test" if test else None,
        class_names=tuple(names) if (names := dataset.class_names_or_labels()) else None,
        class_counts=tuple(counts) if (counts := dataset.class_counts(train_idx)) else None,
    )
    shard_images = split_file_images(config, dataset.images.shape[1:], len(train_idx))
    write_split(outputs.shards_uri, dataset, shard_order(train_idx, dataset, shard_images), options, shard_images)
    write_split(outputs.holdout_uri, dataset, holdout_idx, options, shard_images)
    if test is not None and outputs.test_uri is not None:
        write_split(outputs.test_uri, test, np.arange(len(test.images)), options)
        context.log(f"prepare: {len(test.images)} test images for the NLL")
    client = context.client
    log_data(context, outputs, dataset.skipped)
    if needs_classifier(config):
        uri, metadata = feature_extractor(context, dataset, train_idx, holdout_idx)
        accuracy_on_holdout = metadata.get("holdout_accuracy")
        if accuracy_on_holdout is not None:
            client.log_metric(context.mlflow_run_id, "extractor_holdout_accuracy", accuracy_on_holdout)
        outputs = dataclasses.replace(
            outputs,
            extractor_uri=uri,
            extractor_id=metadata["extractor_id"],
            extractor_holdout_accuracy=accuracy_on_holdout,
        )
    return outputs


def choose_prepare_on(config: PipelineConfig, listing: SourceListing | None) -> tuple[bool, str]:
    """Whether prepare runs on Ray Data (``data.prepare_on``; ``auto``: when the source's files exceed
    ``data.memory_budget_mb``), and why, in words; formats read whole (.npz, CIFAR-10, built-in) stay on the driver."""
    data = config.data
    if data.prepare_on is PrepareOn.DRIVER or listing is None:
        return False, "read whole on the driver"
    size = f"{listing.total_bytes / 2**20:,.1f} MiB in {len(listing.paths)} files ({listing.kind.value})"
    if data.prepare_on is PrepareOn.RAY_DATA:
        return True, f"data.prepare_on=ray_data; {size}"
    on_ray = listing.total_bytes > data.memory_budget_mb * 2**20
    chosen = "ray_data" if on_ray else "driver"
    return on_ray, f"data.prepare_on=auto chose {chosen}: {size}, data.memory_budget_mb {data.memory_budget_mb:g}"


def prepare_on_ray_data(context: StageContext, listing: SourceListing, why: str) -> PrepareOutputs:
    """The splits written by Ray Data tasks (:mod:`pipelines.data.ingest`): decoded a few files per task, split by image
    hash, the training split shuffled over all of it, fingerprinted from the tasks' hashes."""
    config, options = context.config, context.store.options
    check_needs_no_memory(config, why)
    plan = ingest_plan(context, listing)
    connect()
    context.log(f"prepare: on Ray Data ({why}), {len(plan.units)} decode tasks")
    results = decode_units(plan)
    shape, labelled = unit_shape(results, config.data.uri), all(r.labelled for r in results if r.shape)
    num_train, num_holdout = sum(r.train for r in results), sum(r.holdout for r in results)
    names = listing.class_names or (
        tuple(str(k) for k in range(max(r.max_label for r in results) + 1)) if labelled else None
    )
    check_fits_model(shape, len(names) if names else None, config)
    check_split_sizes(config, num_train, num_holdout)
    fingerprint = fingerprint_of(results, shape, labelled)
    shard_images = split_file_images(config, shape, num_train)
    trained = [r.unit for r in results if r.train]
    entries = shuffle_to_shards(plan, trained, labelled, shard_images, int(fingerprint[:8], 16))
    commit_split(plan.shards_uri, entries, options, shape)
    commit_split(plan.holdout_uri, [r.holdout_file for r in results if r.holdout_file], options, shape)
    remove_staging(plan)
    context.log(
        f"prepare: {num_train + num_holdout} images {shape} from {config.data.uri} (fingerprint {fingerprint[:12]}), "
        f"{num_train} train in {len(entries)} shuffled files / {num_holdout} hold-out"
    )
    outputs = PrepareOutputs(
        fingerprint=fingerprint,
        num_train=num_train,
        num_holdout=num_holdout,
        shards_uri=plan.shards_uri,
        holdout_uri=plan.holdout_uri,
        num_classes=len(names) if names else None,
        class_names=names,
        class_counts=train_class_counts(results, len(names)) if names else None,
    )
    log_data(context, outputs, tuple(name for r in results for name in r.skipped))
    return outputs


def log_data(context: StageContext, outputs: PrepareOutputs, skipped: tuple[str, ...]) -> None:
    """The data set's fingerprint and split sizes on the stage's MLflow run, and the unreadable files left out."""
    if skipped:
        report_skipped(context, skipped)
    client, run_id = context.client, context.mlflow_run_id
    client.log_param(run_id, "data.fingerprint", outputs.fingerprint)
    client.log_metric(run_id, "num_train_images", outputs.num_train)
    client.log_metric(run_id, "num_holdout_images", outputs.num_holdout)


def ingest_plan(context: StageContext, listing: SourceListing) -> IngestPlan:
    """The Ray Data prepare's plan, with the splits' folders emptied of any earlier attempt."""
    config, options = context.config, context.store.options
    stage_uri = context.store.stage_uri("prepare")
    plan = IngestPlan(
        listing,
        IngestPlan.units_of(listing),
        config.data.read_options(),
        config.data.holdout_fraction,
        f"{stage_uri}/staging",
        f"{stage_uri}/holdout",
        f"{stage_uri}/shards",
        data_storage_options(config),
        options,
    )
    for uri in (plan.shards_uri, plan.holdout_uri, plan.staging_uri):
        fs, path = filesystem(uri, options)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    return plan


def needs_classifier(config: PipelineConfig) -> bool:
    """Whether the run uses the domain classifier: as FID's extractor, for tune's proxy FID, or for a conditional
    model's accuracy."""
    return config.evaluate.extractor is Extractor.CLASSIFIER or config.tune.proxy_fid or config.model.conditional


def check_needs_no_memory(config: PipelineConfig, why: str) -> None:
    """What needs the data set in one process (the classifier extractor, trained on it) is refused on Ray Data."""
    if needs_classifier(config):
        raise DataError(
            f"prepare runs on Ray Data ({why}), and evaluate.extractor=classifier (or tune.proxy_fid, or "
            "model.conditional's accuracy) trains a classifier on the whole data set in memory: use "
            "evaluate.extractor=inception, or data.prepare_on=driver for a data set that fits the driver"
        )


def unit_shape(results: list[UnitResult], uri: str) -> tuple[int, ...]:
    """The one image shape of every unit, else a :class:`DataError` naming two that differ."""
    shapes = {r.shape: r.unit for r in results if r.shape is not None}
    if not shapes:
        raise DataError(f"{uri}: none of its images could be read")
    if len(shapes) > 1:
        (first, a), (second, b) = list(shapes.items())[:2]
        raise DataError(
            f"mixed image sizes in {uri!r}: decode task {a} read {first}, task {b} read {second} (H, W, C); set "
            "data.image_size to center-crop and resize every image to one size"
        )
    return tuple(next(iter(shapes)))


def data_storage_options(config: PipelineConfig) -> dict[str, Any]:
    """The storage options for ``data.uri``: the run root's when the data is on S3 too."""
    return config.storage.options() if config.data.uri.startswith("s3://") else {}


def report_skipped(context: StageContext, skipped: tuple[str, ...]) -> None:
    """Unreadable image files left out (data.unreadable_images=skip): counted, listed, and named in the log."""
    client, run_id = context.client, context.mlflow_run_id
    client.log_metric(run_id, "skipped_images", len(skipped))
    client.log_text(run_id, "\n".join(skipped) + "\n", "skipped_images.txt")
    shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    context.log(f"prepare: skipped {len(skipped)} unreadable image file(s): {shown} (skipped_images.txt)")


def split_file_images(config: PipelineConfig, image_shape: tuple[int, ...], num_train: int) -> int:
    """Images per file of the splits: at most ``data.shard_mb``; when training will stream (``data.loader``), also
    small enough that every training worker gets files of its own."""
    per_file = shard_images_for(image_shape, config.data.shard_mb)
    workers = config.train.num_workers
    loader, _ = choose_loader(config.data, num_train, int(np.prod(image_shape)), workers)
    return min(per_file, -(-num_train // workers)) if loader is Loader.STREAM else per_file


def shard_order(indices: np.ndarray, dataset: ImageDataset, shard_images: int) -> np.ndarray:
    """The order the training split is written in: a split of several files in a random order (seeded by the data
    fingerprint), so that each file is a uniform random subset (what streaming relies on); one file as it is."""
    if len(indices) <= shard_images:
        return indices
    return np.random.default_rng(int(dataset.fingerprint[15:30], 16)).permutation(indices)


def check_fits_model(image_shape: tuple[int, ...], num_classes: int | None, config: PipelineConfig) -> None:
    unet = config.model.unet(num_classes)
    height, width, channels = image_shape
    if (height, width, channels) != (unet.image_size, unet.image_size, unet.in_channels):
        raise DataError(
            f"data.uri {config.data.uri!r} has {height}x{width} images with {channels} channel(s), "
            f"but model.preset {config.model.preset!r} expects {unet.image_size}x{unet.image_size} "
            f"with {unet.in_channels}; choose a matching preset, set model.overrides, or resize the images with "
            f"data.image_size: {unet.image_size}"
        )


def check_conditioning(dataset: ImageDataset, config: PipelineConfig) -> None:
    """A conditional model's data has labels its classes cover; ``sample.classes`` names classes of the data; a
    ``train.init_from`` snapshot has as many classes."""
    uri, wanted = config.data.uri, config.model.num_classes
    if dataset.labels is None or dataset.num_classes is None:
        raise DataError(
            f"model.conditional needs class labels, and data.uri {uri!r} has none: use one sub-folder of images per "
            "class, an .npz with a 'labels' (or 'y') array, a CIFAR-10 archive, or builtin:digits"
        )
    if wanted is not None and dataset.num_classes > wanted:
        raise DataError(
            f"data.uri {uri!r} has {dataset.num_classes} classes (labels 0..{dataset.num_classes - 1}), more than "
            f"model.num_classes {wanted}: raise it, or leave it null to take the data's"
        )
    sample_labels(config.sample.classes, dataset.class_names_or_labels() or [], dataset.num_classes)
    if config.train.init_from:
        check_init_from_classes(config, wanted or dataset.num_classes)


def check_init_from_classes(config: PipelineConfig, num_classes: int) -> None:
    uri = config.train.init_from or ""
    found, _ = read_snapshot_config(uri, config.storage.options() if uri.startswith("s3://") else {})
    if found.num_classes != num_classes:
        raise DataError(
            f"train.init_from {uri!r} is a model of {found.num_classes or 'no'} classes, but this run's model has "
            f"{num_classes} (data.uri {config.data.uri!r}, model.num_classes): warm-start from a model of the same "
            "classes"
        )


def check_split_sizes(config: PipelineConfig, num_train: int, num_holdout: int) -> None:
    """The splits are large enough for the scores the config asks for, before anything trains."""
    evaluate, uri = config.evaluate, config.data.uri
    needs = {"the FID's covariance (2 images)": num_train >= 2}
    if evaluate.precision_recall:
        k = evaluate.precision_recall_k
        needs[f"precision/recall's k-nearest neighbours (more than evaluate.precision_recall_k={k})"] = num_train > k
    if evaluate.nll and evaluate.nll_split is NllSplit.HOLDOUT:
        needs["the NLL bound (evaluate.nll, at least 1 hold-out image)"] = num_holdout >= 1
    if config.tune.enabled:
        needs["the tune stage's held-out bits/dim (at least 1 hold-out image)"] = num_holdout >= 1
    missing = [what for what, ok in needs.items() if not ok]
    if missing:
        raise DataError(
            f"data.uri {uri!r} leaves {num_train} training and {num_holdout} hold-out images "
            f"(data.holdout_fraction {config.data.holdout_fraction:g}), too few for {'; '.join(missing)}: use more "
            "images, or change those settings"
        )


def split(dataset: ImageDataset, holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train / hold-out index split, seeded by the data fingerprint."""
    order = np.random.default_rng(int(dataset.fingerprint[:15], 16)).permutation(len(dataset.images))
    holdout = round(holdout_fraction * len(order))
    return np.sort(order[holdout:]), np.sort(order[:holdout])


def test_split(config: PipelineConfig, train_dataset: ImageDataset) -> ImageDataset:
    """The data set's test split, for the NLL on it: must exist and differ from the training data."""
    dataset = load_dataset(config.data.uri, "test", data_storage_options(config), config.data.read_options())
    if dataset.fingerprint == train_dataset.fingerprint:
        raise DataError(
            f"evaluate.nll_split=test: data.uri {config.data.uri!r} has no separate test split (only "
            "CIFAR-10 archives do); use evaluate.nll_split=holdout with data.holdout_fraction > 0"
        )
    check_fits_model(dataset.images.shape[1:], dataset.num_classes, config)
    return dataset


def feature_extractor(
    context: StageContext, dataset: ImageDataset, train_idx: np.ndarray, holdout_idx: np.ndarray
) -> tuple[str, dict[str, Any]]:
    """(URI, metadata) of the classifier for this data fingerprint: reused from the cache, or trained and committed
    there."""
    if dataset.labels is None:
        raise DataError(
            f"evaluate.extractor=classifier (or tune's proxy FID) needs class labels, and data.uri "
            f"{context.config.data.uri!r} has none (use class sub-folders or an .npz with 'labels')"
        )
    epochs = context.config.evaluate.classifier_epochs
    uri = context.store.cache_uri("extractors", f"{dataset.fingerprint[:16]}-classifier-e{epochs}")
    try:
        _, metadata = load_classifier(uri, context.store.options)
        context.log(f"prepare: reusing feature extractor {metadata['extractor_id']} from {uri}")
        return uri, metadata
    except IncompleteError:
        pass
    context.log(f"prepare: training the feature-extractor classifier on {len(train_idx)} labelled images")
    model = train_classifier(dataset.images[train_idx], dataset.labels[train_idx], epochs)
    holdout_accuracy = (
        accuracy(model, dataset.images[holdout_idx], dataset.labels[holdout_idx]) if len(holdout_idx) else None
    )
    metadata = {
        "extractor_id": extractor_id(model),
        "data_fingerprint": dataset.fingerprint,
        "holdout_accuracy": holdout_accuracy,
    }
    save_classifier(uri, model, metadata, context.store.options)
    return uri, metadata
