"""prepare: validate the data set, split off a hold-out set (and read the test split when the NLL is scored on it),
write the splits as files for the workers (:mod:`pipelines.data.shards`), and make (or reuse, keyed by data
fingerprint) the classifier feature network when evaluation or the tune stage's proxy FID uses it.

One rule decides the split, the files and the fingerprint from each image's content (:mod:`pipelines.data.splits`),
wherever the data set is read: whole on the job's driver before Ray starts (bad data fails before any worker exists),
or, for a data set too large for the driver (``data.prepare_on``), a few files per Ray Data task
(:mod:`pipelines.data.ingest`). The same images give the same result on both paths."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from ddpm_core.data import (
    DataError,
    ImageDataset,
    SourceListing,
    content_fingerprint,
    list_source,
    load_dataset,
)
from ddpm_core.features import accuracy, extractor_id, load_classifier, save_classifier, train_classifier
from ddpm_core.storage import IncompleteError, filesystem
from pipelines.config import (
    DataSection,
    Extractor,
    Loader,
    ModelSection,
    NllSplit,
    PipelineConfig,
    PrepareOn,
)
from pipelines.context import StageContext
from pipelines.contracts import PrepareOutputs
from pipelines.data.ingest import IngestPlan, UnitResult, decode_units, remove_staging, write_splits
from pipelines.data.recorded import log_training_data
from pipelines.data.shards import read_first, shard_images_for, split_identity
from pipelines.data.splits import SPLITS, commit_split, split_by_content, write_in_memory
from pipelines.data.streaming import choose_loader
from pipelines.execution import connect
from pipelines.external import External


@dataclass(frozen=True)
class PrepareSettings:
    """What prepare reads: the data section, the model the images must fit, and what the later stages need made."""

    data: DataSection
    model: ModelSection  # the images must fit its U-Net; a conditional model needs labels its classes cover
    classifier_epochs: int | None  # the domain classifier, when evaluation, tune's proxy FID or class accuracy uses it
    nll_test_split: bool  # the NLL is scored on the data set's own test split: write it too
    stream_workers: int | None  # the most workers that may stream the training split (None: data.loader=resident)
    source_listing: str  # what data.uri holds now, from a listing of its files (names, sizes, versions)
    latent: bool  # a latent model's images need not fit the U-Net (its latents do: the autoencoder stage checks)


def settings(config: PipelineConfig, external: External) -> PrepareSettings:
    evaluate = config.evaluate
    classifier = evaluate.extractor is Extractor.CLASSIFIER or config.tune.proxy_fid or config.model.conditional
    return PrepareSettings(
        data=config.data,
        model=config.model,
        classifier_epochs=evaluate.classifier_epochs if classifier else None,
        nll_test_split=evaluate.nll and evaluate.nll_split is NllSplit.TEST,
        stream_workers=stream_workers(config),
        source_listing=external.data_listing(config.data.uri),
        latent=config.autoencoder.latent,
    )


def stream_workers(config: PipelineConfig) -> int | None:
    """The most workers that may stream the training split: the training run's, or a tune trial's."""
    if config.data.loader is Loader.RESIDENT:
        return None
    tune = config.tune
    return max(config.train.max_workers, tune.workers_per_trial if tune.enabled else 0)


@dataclass(frozen=True)
class Prepared:
    """What reading the data set found, on either path."""

    fingerprint: str
    shape: tuple[int, ...]  # [H, W, C]
    num_train: int
    num_holdout: int
    class_names: tuple[str, ...] | None
    class_counts: tuple[int, ...] | None  # training images per class
    skipped: tuple[str, ...]  # unreadable files left out


def run(context: StageContext, settings: PrepareSettings) -> PrepareOutputs:
    data, options = settings.data, context.store.options
    listing = list_source(data.uri, options)
    for split in (*SPLITS, "test", "staging"):  # an interrupted attempt's files
        remove_folder(f"{context.result_uri}/{split}", options)
    on_ray_data, why = choose_prepare_on(data, listing)
    if on_ray_data and listing is not None:
        prepared = prepare_on_ray_data(context, settings, listing, why)
    else:
        prepared = prepare_on_driver(context, settings)
    context.log(
        f"prepare: {prepared.num_train + prepared.num_holdout} images {prepared.shape} from {data.uri} (fingerprint "
        f"{prepared.fingerprint[:12]}), {prepared.num_train} train / {prepared.num_holdout} hold-out"
    )
    outputs = PrepareOutputs(
        fingerprint=prepared.fingerprint,
        num_train=prepared.num_train,
        num_holdout=prepared.num_holdout,
        shards_uri=f"{context.result_uri}/shards",
        holdout_uri=f"{context.result_uri}/holdout",
        num_classes=len(prepared.class_names) if prepared.class_names else None,
        test_uri=f"{context.result_uri}/test" if settings.nll_test_split else None,
        class_names=prepared.class_names,
        class_counts=prepared.class_counts,
        source_uri=data.uri,
        source_listing=settings.source_listing,
        source_split=data.split.value,
        holdout_fraction=data.holdout_fraction,
    )
    log_data(context, outputs, prepared.skipped)
    if settings.classifier_epochs is None:
        return outputs
    return with_extractor(context, outputs, feature_extractor(context, settings.classifier_epochs, outputs))


def prepare_on_driver(context: StageContext, settings: PrepareSettings) -> Prepared:
    """The whole data set read in this process, split by content (:mod:`pipelines.data.splits`) and written."""
    data, options = settings.data, context.store.options
    dataset = load_dataset(data.uri, data.split.value, options, data.read_options())
    check_conditioning(settings, dataset.num_classes)
    shape = tuple(int(n) for n in dataset.images.shape[1:])
    check_fits_model(shape, dataset.num_classes, settings)
    content = split_by_content(dataset.images, dataset.labels, data.holdout_fraction)
    train_idx, holdout_idx = np.flatnonzero(~content.holdout), np.flatnonzero(content.holdout)
    check_split_sizes(data, len(train_idx), len(holdout_idx))
    shard_images = split_file_images(settings, shape, len(train_idx))
    for split, chosen in zip(SPLITS, (train_idx, holdout_idx), strict=True):
        labels = dataset.labels[chosen] if dataset.labels is not None else None
        uri = f"{context.result_uri}/{split}"
        write_in_memory(uri, dataset.images[chosen], labels, content.keys[chosen], shard_images, options)
    if settings.nll_test_split:
        test = test_split(settings, dataset, options)
        test_keys = split_by_content(test.images, test.labels, 0.0).keys
        write_in_memory(f"{context.result_uri}/test", test.images, test.labels, test_keys, shard_images, options)
        context.log(f"prepare: {len(test.images)} test images for the NLL")
    names, counts = dataset.class_names_or_labels(), dataset.class_counts(train_idx)
    prepared = Prepared(
        dataset.fingerprint,
        shape,
        len(train_idx),
        len(holdout_idx),
        tuple(names) if names else None,
        tuple(counts) if counts else None,
        dataset.skipped,
    )
    return prepared


def with_extractor(
    context: StageContext, outputs: PrepareOutputs, extractor: tuple[str, dict[str, Any]]
) -> PrepareOutputs:
    uri, metadata = extractor
    accuracy_on_holdout = metadata.get("holdout_accuracy")
    if accuracy_on_holdout is not None:
        context.client.log_metric(context.mlflow_run_id, "extractor_holdout_accuracy", accuracy_on_holdout)
    return dataclasses.replace(
        outputs,
        extractor_uri=uri,
        extractor_id=metadata["extractor_id"],
        extractor_holdout_accuracy=accuracy_on_holdout,
    )


def choose_prepare_on(data: DataSection, listing: SourceListing | None) -> tuple[bool, str]:
    """Whether prepare runs on Ray Data (``data.prepare_on``; ``auto``: when the source's files exceed
    ``data.memory_budget_mb``), and why, in words; formats read whole (.npz, CIFAR-10, built-in) stay on the driver."""
    if data.prepare_on is PrepareOn.DRIVER or listing is None:
        return False, "read whole on the driver"
    size = f"{listing.total_bytes / 2**20:,.1f} MiB in {len(listing.paths)} files ({listing.kind.value})"
    if data.prepare_on is PrepareOn.RAY_DATA:
        return True, f"data.prepare_on=ray_data; {size}"
    on_ray = listing.total_bytes > data.memory_budget_mb * 2**20
    chosen = "ray_data" if on_ray else "driver"
    return on_ray, f"data.prepare_on=auto chose {chosen}: {size}, data.memory_budget_mb {data.memory_budget_mb:g}"


def prepare_on_ray_data(context: StageContext, settings: PrepareSettings, listing: SourceListing, why: str) -> Prepared:
    """The splits written by Ray Data tasks (:mod:`pipelines.data.ingest`) that each hold a few source files: the
    same rule, checks and result as on the driver."""
    data, options = settings.data, context.store.options
    if settings.nll_test_split:
        raise DataError(
            f"evaluate.nll_split=test: data.uri {data.uri!r} has no separate test split (only CIFAR-10 archives do); "
            "use evaluate.nll_split=holdout with data.holdout_fraction > 0"
        )
    plan = IngestPlan(
        listing,
        IngestPlan.units_of(listing),
        data.read_options(),
        data.holdout_fraction,
        context.result_uri,
        options,  # the storage options of every URL: data.uri's and the run root's
        options,
    )
    connect()
    context.log(f"prepare: on Ray Data ({why}), {len(plan.units)} decode tasks")
    results = decode_units(plan)
    shape, labelled = unit_shape(results, data.uri), all(r.labelled for r in results if r.shape)
    num_train, num_holdout = sum(r.train for r in results), sum(r.holdout for r in results)
    names = listing.class_names or (
        tuple(str(k) for k in range(max(r.max_label for r in results) + 1)) if labelled else None
    )
    check_conditioning(settings, len(names) if names else None)
    check_fits_model(shape, len(names) if names else None, settings)
    check_split_sizes(data, num_train, num_holdout)
    entries = write_splits(plan, results, split_file_images(settings, shape, num_train), labelled)
    for split in SPLITS:
        commit_split(plan.split_uri(split), sorted(entries[split], key=lambda e: e["name"]), options, shape)
    remove_staging(plan)
    total = sum(result.hash_sum for result in results)
    return Prepared(
        content_fingerprint(total, num_train + num_holdout, shape, labelled),
        shape,
        num_train,
        num_holdout,
        names,
        train_class_counts(results, len(names)) if names else None,
        tuple(name for r in results for name in r.skipped),
    )


def train_class_counts(results: list[UnitResult], num_classes: int) -> tuple[int, ...]:
    """Training images per class over every unit."""
    counts = np.zeros(num_classes, np.int64)
    for result in results:
        counts[: len(result.train_class_counts)] += result.train_class_counts
    return tuple(int(count) for count in counts)


def remove_folder(uri: str, options: dict[str, Any]) -> None:
    fs, path = filesystem(uri, options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def log_data(context: StageContext, outputs: PrepareOutputs, skipped: tuple[str, ...]) -> None:
    """The data set's fingerprint and split sizes on the stage's MLflow run, the data as its dataset input
    (``pipelines.data.recorded``), and the unreadable files left out."""
    if skipped:
        report_skipped(context, skipped)
    client, run_id = context.client, context.mlflow_run_id
    client.log_param(run_id, "data.fingerprint", outputs.fingerprint)
    log_training_data(client, run_id, outputs)
    client.log_metric(run_id, "num_train_images", outputs.num_train)
    client.log_metric(run_id, "num_holdout_images", outputs.num_holdout)


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


def report_skipped(context: StageContext, skipped: tuple[str, ...]) -> None:
    """Unreadable image files left out (data.unreadable_images=skip): counted, listed, and named in the log."""
    client, run_id = context.client, context.mlflow_run_id
    client.log_metric(run_id, "skipped_images", len(skipped))
    client.log_text(run_id, "\n".join(skipped) + "\n", "skipped_images.txt")
    shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
    context.log(f"prepare: skipped {len(skipped)} unreadable image file(s): {shown} (skipped_images.txt)")


def split_file_images(settings: PrepareSettings, image_shape: tuple[int, ...], num_train: int) -> int:
    """Images per file of the splits: at most ``data.shard_mb``; when training may stream (``data.loader``), also
    small enough that every worker that streams it (training's, a tune trial's) gets files of its own."""
    per_file, workers = shard_images_for(image_shape, settings.data.shard_mb), settings.stream_workers
    if workers is None:
        return per_file
    loader, _ = choose_loader(settings.data, num_train, int(np.prod(image_shape)), workers)
    return min(per_file, -(-num_train // workers)) if loader is Loader.STREAM else per_file


def check_fits_model(image_shape: tuple[int, ...], num_classes: int | None, settings: PrepareSettings) -> None:
    """The data's images ``[H, W, C]`` are the size and channel count a pixel model takes; else a ``DataError`` with
    the fixes that fit the mismatch (:func:`pipelines.advice.model_fit_advice`)."""
    from pipelines.advice import model_fit_advice

    if settings.latent:
        return  # the autoencoder stage checks that the U-Net takes the latents (pipelines.stages.autoencoder)
    unet, model = settings.model.unet(num_classes), settings.model
    height, width, channels = image_shape
    if (height, width, channels) != (unet.image_size, unet.image_size, unet.in_channels):
        overridden = f" with model.overrides {model.overrides}" if model.overrides else ""
        raise DataError(
            f"data.uri {settings.data.uri!r} has {height}x{width} images with {channels} channel(s), "
            f"but model.preset {model.preset!r}{overridden} expects {unet.image_size}x{unet.image_size} "
            f"with {unet.in_channels}: {model_fit_advice((height, width, channels), model.preset, unet)}"
        )


def check_conditioning(settings: PrepareSettings, num_classes: int | None) -> None:
    """A conditional model's data has labels (``num_classes`` is None without) its classes cover (what the sample and
    train stages ask of the classes is checked by them, against this stage's outputs)."""
    uri, wanted = settings.data.uri, settings.model.num_classes
    if not settings.model.conditional:
        return
    if num_classes is None:
        raise DataError(
            f"model.conditional needs class labels, and data.uri {uri!r} has none: use one sub-folder of images per "
            "class, an .npz with a 'labels' (or 'y') array, a CIFAR-10 archive, or builtin:digits"
        )
    if wanted is not None and num_classes > wanted:
        raise DataError(
            f"data.uri {uri!r} has {num_classes} classes (labels 0..{num_classes - 1}), more than "
            f"model.num_classes {wanted}: raise it, or leave it null to take the data's"
        )


def check_split_sizes(data: DataSection, num_train: int, num_holdout: int) -> None:
    """Enough training images for any model (what the scores need is checked by the stages that compute them)."""
    if num_train < 2:
        raise DataError(
            f"data.uri {data.uri!r} leaves {num_train} training and {num_holdout} hold-out images "
            f"(data.holdout_fraction {data.holdout_fraction:g}), too few to train on (at least 2): use more images"
        )


def test_split(settings: PrepareSettings, train_dataset: ImageDataset, options: dict[str, Any]) -> ImageDataset:
    """The data set's test split, for the NLL on it: must exist and differ from the training data."""
    data = settings.data
    dataset = load_dataset(data.uri, "test", options, data.read_options())
    if dataset.fingerprint == train_dataset.fingerprint:
        raise DataError(
            f"evaluate.nll_split=test: data.uri {data.uri!r} has no separate test split (only "
            "CIFAR-10 archives do); use evaluate.nll_split=holdout with data.holdout_fraction > 0"
        )
    check_fits_model(dataset.images.shape[1:], dataset.num_classes, settings)
    return dataset


CLASSIFIER_BYTES = 2**30  # the domain classifier trains on at most this many bytes of images ...
CLASSIFIER_IMAGES = 100_000  # ... and at most this many: the training split's first ones, a uniform random subset


def feature_extractor(context: StageContext, epochs: int, outputs: PrepareOutputs) -> tuple[str, dict[str, Any]]:
    """(URI, metadata) of the classifier of this training split: reused from the cache, or trained on the written
    training split (its first images, whichever path wrote it) and committed there."""
    if outputs.num_classes is None:
        raise DataError(
            f"evaluate.extractor=classifier (or tune's proxy FID, or a conditional model's accuracy) needs class "
            f"labels, and data.uri {outputs.source_uri!r} has none (use class sub-folders or an .npz with 'labels')"
        )
    options = context.store.options
    trained_on = split_identity(outputs.shards_uri, options)[:16]  # the training split's, not the data set's
    uri = context.store.cache_uri("extractors", f"{trained_on}-classifier-e{epochs}")
    try:
        _, metadata = load_classifier(uri, options)
        context.log(f"prepare: reusing feature extractor {metadata['extractor_id']} from {uri}")
        return uri, metadata
    except IncompleteError:
        pass
    images, labels = read_first(outputs.shards_uri, classifier_images(outputs.shards_uri, options), options)
    assert labels is not None  # a labelled data set's splits hold its labels
    context.log(f"prepare: training the feature-extractor classifier on {len(images)} labelled images")
    model = train_classifier(images, labels, epochs)
    holdout_accuracy = None
    if outputs.num_holdout:
        held_images, held_labels = read_first(outputs.holdout_uri, len(images), options)
        holdout_accuracy = accuracy(model, held_images, held_labels) if held_labels is not None else None
    metadata = {
        "extractor_id": extractor_id(model),
        "data_fingerprint": outputs.fingerprint,
        "holdout_accuracy": holdout_accuracy,
        "trained_on_images": len(images),
    }
    save_classifier(uri, model, metadata, options)
    return uri, metadata


def classifier_images(shards_uri: str, options: dict[str, Any]) -> int:
    """How many training images the classifier reads: :data:`CLASSIFIER_IMAGES`, fewer for large images."""
    image_bytes = read_first(shards_uri, 1, options)[0][0].nbytes
    return max(1, min(CLASSIFIER_IMAGES, CLASSIFIER_BYTES // image_bytes))
