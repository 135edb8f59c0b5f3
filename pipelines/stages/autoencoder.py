"""autoencoder: the first stage of a latent model (Rombach et al. 2022; docs/latent.md). It trains LDM's KL-regularised
autoencoder on the training split with Ray Train (``autoencoder.train``: :mod:`pipelines.training.autoencoder`) or
takes the verified folder at ``autoencoder.weights_uri``; then encodes the training split into the latents training
draws from (:mod:`pipelines.data.latents`), and reconstructs the hold-out split: the reconstructions are the floor of
any latent model, shown in this stage's run as a grid and rFID, and scored again by the evaluate stage."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ddpm_core.autoencoder import AutoencoderConfig
from ddpm_core.autoencoder_weights import WEIGHTS_FILE, LatentSpace, read_config
from ddpm_core.data import DataError
from ddpm_core.fields import FieldError
from ddpm_core.images import grid, labelled_rows
from ddpm_core.storage import filesystem
from pipelines.config import AutoencoderSection, Extractor, PipelineConfig
from pipelines.context import StageContext
from pipelines.contracts import AutoencoderOutputs, LatentOutputs, PrepareOutputs
from pipelines.data.latents import Encoding, LatentSplit, encode_split
from pipelines.data.shards import ImageSource, read_first, read_images, split_sources
from pipelines.evaluation.reconstruction import reconstructed_sources
from pipelines.evaluation.scoring import ExtractorSpec, SummaryRequest, feature_workers, fid_estimate, summarize
from pipelines.execution import Demand, Device, check_fits, cluster_device
from pipelines.external import External
from pipelines.interruption import STOP
from pipelines.training.autoencoder import AutoencoderJob, ask_to_stop, bundle, fit, make_trainer

GRID_IMAGES = 16  # hold-out images (and their reconstructions) in the stage's grid
RFID_GROUPS = 10  # jackknife groups of the stage's rFID


@dataclass(frozen=True)
class AutoencoderSettings:
    """What the stage reads: the autoencoder section, what the U-Net takes, and where the autoencoder trains."""

    autoencoder: AutoencoderSection
    unet_input: tuple[int, int]  # (in_channels, image_size) of model.preset with model.overrides: the latents' shape
    use_gpu: bool | None = None  # train.use_gpu (None: GPUs when the cluster has them)


def settings(config: PipelineConfig, external: External) -> AutoencoderSettings:
    unet = config.model.unconditional_unet()  # what it takes does not depend on its classes
    return AutoencoderSettings(config.autoencoder, (unet.in_channels, unet.image_size), config.train.use_gpu)


def check_data(settings: AutoencoderSettings, prepare: PrepareOutputs, storage_options: dict[str, Any]) -> None:
    """The autoencoder takes the data's images, and the U-Net takes its latents ``[c, H/f, W/f]``; else a
    ``DataError`` saying which ``model.overrides`` fit."""
    section, (in_channels, size) = settings.autoencoder, settings.unet_input
    height, width, channels = image_shape(prepare, storage_options)
    where = f"at {section.weights_uri!r}" if section.weights_uri else "of autoencoder.train"
    try:
        if height != width:
            raise FieldError("autoencoder", "image_size", f": the images are {height}x{width}, not square")
        latent = network(section, channels, storage_options).latent_shape(channels, height)
    except FieldError as error:
        raise DataError(f"the autoencoder {where} does not take the images of data.uri: {error}") from None
    check_discriminator(section, height)
    if (latent[0], latent[1]) != (in_channels, size):
        raise DataError(
            f"the autoencoder {where} turns the {height}x{width}x{channels} images into {latent[1]}x{latent[2]} "
            f"latents with {latent[0]} channels, but the U-Net of model.preset and model.overrides expects "
            f"{size}x{size} with {in_channels}: set model.overrides.image_size={latent[1]} and "
            f"model.overrides.in_channels={latent[0]}"
        )


def check_discriminator(section: AutoencoderSection, size: int) -> None:
    """The patch discriminator's ``discriminator_layers`` stride-2 layers and its two 4x4 ones leave at least one
    patch of the ``size``-pixel images."""
    layers = section.discriminator_layers
    if section.discriminator_start_images is not None and size // 2**layers < 3:
        raise DataError(
            f"autoencoder.discriminator_layers={layers} needs images of at least {3 * 2**layers} pixels a side (one "
            f"patch after its {layers} halvings and two 4x4 convolutions); the images are {size}: lower it"
        )


def image_shape(prepare: PrepareOutputs, storage_options: dict[str, Any]) -> tuple[int, int, int]:
    """``[H, W, C]`` of the training split's images (its first file is read)."""
    height, width, channels = read_first(prepare.shards_uri, 1, storage_options)[0].shape[1:]
    return int(height), int(width), int(channels)


def network(section: AutoencoderSection, channels: int, storage_options: dict[str, Any]) -> AutoencoderConfig:
    """The autoencoder's architecture: the one ``autoencoder.train`` trains, or the folder's config (read with a
    deadline)."""
    if section.train:
        return section.architecture(channels)
    assert section.weights_uri is not None
    return read_config(section.weights_uri, storage_options, log=lambda _: None)


def run(context: StageContext, settings: AutoencoderSettings, prepare: PrepareOutputs) -> AutoencoderOutputs:
    section = settings.autoencoder
    images_seen = None
    device, shape = cluster_device(settings.use_gpu), image_shape(prepare, context.store.options)
    if section.train:
        folder, sha256, images_seen = train(context, section, (prepare, shape[2]), device)
    else:
        assert section.weights_uri is not None and section.weights_sha256 is not None
        folder, sha256 = section.weights_uri, section.weights_sha256
    latent = encode_latents(context, section, (folder, sha256), (prepare, shape))
    holdout_latent = encode_holdout(context, section, latent, prepare)
    reconstructions = holdout_reconstructions(context, latent.space, prepare, device)
    rfid = stage_rfid(context, prepare, reconstructions, device)
    return AutoencoderOutputs(
        latent=latent,
        trained=section.train,
        images_seen=images_seen,
        reconstruction_uris=tuple(source.uri for source in reconstructions),
        rfid=rfid[0] if rfid else None,
        rfid_stderr=rfid[1] if rfid else None,
        holdout_latent=holdout_latent,
    )


def train(
    context: StageContext, section: AutoencoderSection, data: tuple[PrepareOutputs, int], device: Device
) -> tuple[str, str, int]:
    """The autoencoder trained on Ray Train (:mod:`pipelines.training.autoencoder`) on the prepared training split of
    images of ``channels`` channels (``data``): its folder, the weights file's SHA-256 and the images it saw. A
    signal stops it at the next step with a checkpoint a re-run resumes from."""
    (prepare, channels), options = data, context.store.options
    job = AutoencoderJob(
        section.architecture(channels),
        section,
        prepare.shards_uri,
        context.result_uri,
        options,
        context.tracking_uri,
        context.mlflow_run_id,
        device,
    )
    execution = context.execution(device)
    workers = section.num_workers
    resources = {name: amount * workers for name, amount in bundle(device is Device.GPU).items()}
    demand = Demand(f"{workers} autoencoder workers", resources, "autoencoder.num_workers")
    check_fits(demand, execution, context.log)
    context.log(
        f"autoencoder: training f={job.network.downsampling_factor}, {job.network.latent_channels} latent channels, "
        f"{section.images} images, batch {section.batch_size} on {workers} {device.value} worker(s)"
    )
    with STOP.safe_point(lambda: ask_to_stop(job)):
        result = fit(make_trainer(job, execution.runtime_env), job)
    reported = result.metrics or {}
    seen, world = int(reported.get("images_seen", 0)), int(reported.get("world_size", 0))
    if STOP.requested:
        context.log(f"autoencoder: stopped at {seen} images; the checkpoint there is recorded and a re-run resumes")
        STOP.check()
    fs, path = filesystem(f"{job.folder_uri}/{WEIGHTS_FILE}", options)
    sha256 = hashlib.sha256(fs.cat_file(path)).hexdigest()
    context.log(
        f"autoencoder: trained on {seen} images by {world} worker(s), saved to {job.folder_uri} "
        f"(weights SHA-256 {sha256[:16]})"
    )
    context.client.log_metric(context.mlflow_run_id, "autoencoder_workers", world)
    return job.folder_uri, sha256, seen


def encode_latents(
    context: StageContext,
    section: AutoencoderSection,
    weights: tuple[str, str],
    data: tuple[PrepareOutputs, tuple[int, int, int]],
) -> LatentOutputs:
    """The training split (``data``: the prepared splits and their images' ``[H, W, C]``) encoded by the autoencoder
    (:mod:`pipelines.data.latents`: Ray Data actors, files committed one by one and reused by a re-run), the scaling
    factor chosen, and both logged to the stage's run."""
    prepare, shape = data
    split = encode_split(encoding_of(context, section, prepare.shards_uri, weights), context.log)
    space = latent_space(section, weights, split, context.store.options)
    client, run_id = context.client, context.mlflow_run_id
    client.log_param(run_id, "autoencoder.identity", split.autoencoder_identity)
    client.log_param(run_id, "latent.shape", "x".join(str(n) for n in split.shape))
    client.log_metric(run_id, "latent_scaling_factor", space.scaling_factor)
    client.log_metric(run_id, "latent_scaling_factor_estimated", split.scaling_factor)
    context.log(
        f"autoencoder: {split.count} latents {split.shape} in {split.uri} ({split.encoded_now} files encoded now), "
        f"scaling factor {space.scaling_factor:.4g}"
    )
    return LatentOutputs(split.uri, split.shape, split.count, space, shape)


def encode_holdout(
    context: StageContext, section: AutoencoderSection, latent: LatentOutputs, prepare: PrepareOutputs
) -> LatentOutputs | None:
    """The hold-out split encoded like the training split, in the training split's latent space (its scaling
    factor): what a latent model's held-out bound is scored on. None without hold-out images."""
    if prepare.num_holdout == 0:
        return None
    space = latent.space
    weights = (space.autoencoder_uri, space.autoencoder_sha256)
    split = encode_split(encoding_of(context, section, prepare.holdout_uri, weights), context.log)
    context.log(f"autoencoder: {split.count} held-out latents in {split.uri} ({split.encoded_now} files encoded now)")
    return LatentOutputs(split.uri, split.shape, split.count, space, latent.image_shape)


def encoding_of(
    context: StageContext, section: AutoencoderSection, split_uri: str, weights: tuple[str, str]
) -> Encoding:
    """How one split is encoded by the autoencoder folder and SHA-256 of ``weights``: into the run store's latent
    cache, with ``autoencoder.encode_batch`` and ``autoencoder.encode_actors``."""
    folder, sha256 = weights
    latents_root = context.store.cache_uri("latents", "").rstrip("/")
    return Encoding(
        split_uri, folder, sha256, latents_root, context.store.options, section.encode_batch, section.encode_actors
    )


def latent_space(
    section: AutoencoderSection, weights: tuple[str, str], split: LatentSplit, options: dict[str, Any]
) -> LatentSpace:
    """The latent space of the encoded split: ``autoencoder.scaling_factor``, else the split's 1/std."""
    folder, sha256 = weights
    config = read_config(folder, options, log=lambda _: None)
    return LatentSpace(
        folder, sha256, split.autoencoder_identity, section.scaling_factor or split.scaling_factor, config.shift_factor
    )


def holdout_reconstructions(
    context: StageContext, space: LatentSpace, prepare: PrepareOutputs, device: Device
) -> list[ImageSource]:
    """The hold-out split reconstructed through the autoencoder, one committed shard per file, and the grid of the
    first ones logged; none without hold-out images (``data.holdout_fraction`` 0)."""
    if prepare.num_holdout == 0:
        context.log("autoencoder: no held-out images (data.holdout_fraction is 0): no reconstructions, no rFID")
        return []
    folder, execution = f"{context.result_uri}/reconstructions", context.execution(device)
    reconstructions = reconstructed_sources(space, prepare.holdout_uri, folder, execution, context.log)
    log_reconstruction_grid(context, prepare, reconstructions)
    return reconstructions


def log_reconstruction_grid(context: StageContext, prepare: PrepareOutputs, reconstructions: list[ImageSource]) -> None:
    """The first hold-out images above their reconstructions, as ``reconstructions.png`` in the stage's run."""
    options = context.store.options
    originals = read_images(split_sources(prepare.holdout_uri, options)[0], options)[:GRID_IMAGES]
    rebuilt = read_images(reconstructions[0], options)[:GRID_IMAGES]
    rows = [grid(originals, GRID_IMAGES), grid(rebuilt, GRID_IMAGES)]
    picture: Image.Image = labelled_rows(rows, ["held-out", "reconstructed"])
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "reconstructions.png")
        picture.save(path)
        context.client.log_artifact(context.mlflow_run_id, path)


def stage_rfid(
    context: StageContext, prepare: PrepareOutputs, reconstructions: list[ImageSource], device: Device
) -> tuple[float, float] | None:
    """rFID (Rombach et al. 2022, Table 8: the reconstructions against the originals) in the domain classifier's
    features, with its jackknife standard error, logged to the stage's run; None when prepare made no classifier
    (the evaluate stage scores it in its own extractor's features either way)."""
    if prepare.extractor_uri is None or prepare.num_holdout < 2:
        context.log("autoencoder: rFID is left to the evaluate stage (no domain classifier was made)")
        return None
    execution, count = context.execution(device), prepare.num_holdout
    request = SummaryRequest(ExtractorSpec(Extractor.CLASSIFIER, prepare.extractor_uri), count, groups=RFID_GROUPS)
    originals = split_sources(prepare.holdout_uri, execution.storage_options)
    with feature_workers(request.spec, max(len(originals), len(reconstructions)), execution) as workers:
        held = summarize(originals, request, execution, workers)
        estimate = fid_estimate(summarize(reconstructions, request, execution, workers), held, None)
    context.client.log_metric(context.mlflow_run_id, "rfid", estimate.value)
    context.client.log_metric(context.mlflow_run_id, "rfid_stderr", estimate.stderr)
    context.log(f"autoencoder: rFID {estimate.value:.4g} ± {estimate.stderr:.2g} on {count} held-out images")
    return estimate.value, estimate.stderr
