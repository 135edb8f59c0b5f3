"""train: data-parallel DDPM training with Ray Train (DDP over NCCL with bf16 autocast on GPUs, gloo and fp32 on
CPUs; ``train.bf16_on_gpu`` / ``train.bf16_on_cpu``). Progress is counted in images; checkpoints of the full training
state are reported to Ray Train every ``train.checkpoint_every_images``, and a re-run (or a worker-group restart)
resumes from the latest one. With ``train.ema_profiles``, rank 0 also keeps post-hoc EMA profiles and commits their
snapshots (:mod:`pipelines.training.posthoc`). The loop itself is :func:`pipelines.training.loop.train_loop`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ddpm_core.checkpoint import read_snapshot_config
from ddpm_core.data import DataError
from pipelines.config import PipelineConfig, TrainSection
from pipelines.context import StageContext
from pipelines.contracts import (
    AutoencoderOutputs,
    EmaCandidate,
    LatentOutputs,
    PrepareOutputs,
    TrainedWith,
    TrainOutputs,
    TuneOutputs,
)
from pipelines.data.recorded import log_training_data
from pipelines.data.streaming import plan_stream
from pipelines.execution import Device, cluster_device
from pipelines.external import External
from pipelines.interruption import STOP
from pipelines.tracking import nested_run, run_link, set_note_part
from pipelines.training.ema_choice import EmaSweep, best_of, choose_ema, log_sweep
from pipelines.training.grids import COMPOSITE, log_samples_over_training
from pipelines.training.job import TrainJob
from pipelines.training.recipe import TrainingRecipe
from pipelines.training.trainer import run_job
from pipelines.typed import INLINE


@dataclass(frozen=True)
class TrainSettings:
    """What training reads: the recipe (the tune stage's choices arrive as its outputs) and whether it starts from
    the best trial's weights."""

    recipe: TrainingRecipe = field(metadata=INLINE)  # model.*, diffusion.*, train.*, data.*
    warm_start_from_trial: bool = False  # tune.warm_start, with the tune stage on


def settings(config: PipelineConfig, external: External) -> TrainSettings:
    return TrainSettings(TrainingRecipe.of(config), config.tune.enabled and config.tune.warm_start)


def check_data(settings: TrainSettings, prepare: PrepareOutputs, storage_options: dict[str, Any]) -> None:
    """A ``train.init_from`` snapshot has as many classes as this run's conditional model (the data's, unless
    ``model.num_classes``)."""
    model, uri = settings.recipe.model, settings.recipe.train.init_from
    if not (model.conditional and uri):
        return
    classes = model.num_classes or prepare.num_classes
    found, _ = read_snapshot_config(uri, storage_options)  # per protocol: the s3 entry applies to s3:// only
    if found.num_classes != classes:
        raise DataError(
            f"train.init_from {uri!r} is a model of {found.num_classes or 'no'} classes, but this run's model has "
            f"{classes} (data.uri {prepare.source_uri!r}, model.num_classes): warm-start from a model of the same "
            "classes"
        )


def run(
    context: StageContext,
    settings: TrainSettings,
    prepare: PrepareOutputs,
    autoencoder: AutoencoderOutputs | None,
    tune: TuneOutputs | None,
) -> TrainOutputs:
    recipe = settings.recipe if tune is None else settings.recipe.with_overrides(tune.best_params)
    train = recipe.train
    device = cluster_device(train.use_gpu)
    warm_start = tune.best_checkpoint_uri if tune is not None and settings.warm_start_from_trial else None
    unet = recipe.model.unet(prepare.num_classes)
    split, latent = (prepare.shards_uri, prepare.num_train), autoencoder.latent if autoencoder is not None else None
    stream, why = plan_stream(recipe.data, train, split, unet, train.max_workers, context.store.options, latent)
    context.log(f"train: {'stream' if stream else 'resident'} data loader ({why})")
    log_training_data(context.client, context.mlflow_run_id, prepare)  # the data as this run's dataset input
    job = TrainJob(
        unet=unet,
        diffusion=recipe.diffusion,
        train=train,
        device=device,
        shards_uri=prepare.shards_uri,
        stream=stream,
        work_uri=context.result_uri,
        storage_options=context.store.options,
        tracking_uri=context.tracking_uri,
        mlflow_run_id=context.mlflow_run_id,
        warm_start_uri=warm_start,
        compile_cache_uri=context.store.cache_uri("compile", "train"),
        grids_run_id=grids_run(context, train),
        latent=latent,
    )
    conditional = (
        f", {job.unet.num_classes} classes (label dropout {train.class_dropout:g})" if job.unet.num_classes else ""
    )
    context.log(
        f"train: {workers_line(train)}, {'GPU (NCCL' if device is Device.GPU else 'CPU (gloo'}, "
        f"{job.precision.value}), {train.total_images} images, batch {train.batch_size}{conditional}"
    )
    result = run_job(context, job, "training workers", recipe.data.decode_cpus if stream else 0.0)
    if STOP.requested:
        stopped_at = (result.metrics or {}).get("images_seen", "?")
        context.log(f"train: stopped at {stopped_at} images; the checkpoint there is recorded and a re-run resumes")
        STOP.check()
    log_samples_over_training(job, context.client)
    reported = result.metrics or {}  # the final checkpoint report of the final attempt
    images_seen = int(reported["images_seen"])
    holdout_latent = autoencoder.holdout_latent if autoencoder is not None else None
    sweep = ema_sweep(context, job, (prepare, holdout_latent), images_seen, context.execution(device).runtime_env)
    return TrainOutputs(
        snapshot_uri=job.chosen_snapshot_uri if sweep else job.snapshot_uri,
        initial_snapshot_uri=job.initial_snapshot_uri,
        images_seen=images_seen,
        device=device,
        loop_seconds=reported.get("loop_seconds"),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        config=TrainedWith(diffusion=recipe.diffusion, train=train.optim, unet=unet, preset=recipe.model.preset),
        num_classes=job.unet.num_classes,
        posthoc_uri=job.posthoc_uri if train.ema_profiles else None,
        ema_sigma_rel=best_of(sweep).sigma_rel if sweep else train.tracked_sigma_rel,
        ema_sweep=sweep,
    )


def ema_sweep(
    context: StageContext,
    job: TrainJob,
    holdout: tuple[PrepareOutputs, LatentOutputs | None],
    images_seen: int,
    runtime_env: dict[str, Any],
) -> tuple[EmaCandidate, ...]:
    """With several ``train.ema_sigma_rel`` candidates, each reconstructed and scored on the hold-out split
    (``holdout``: the prepared splits, and a latent model's hold-out latents), the best one's snapshot committed and
    the sweep logged to the train run (:mod:`pipelines.training.ema_choice`)."""
    candidates, (prepare, holdout_latent) = job.train.ema_candidates, holdout
    if len(candidates) < 2:
        return ()
    images, kind = min(job.train.ema_choice_images, prepare.num_holdout), "latents" if holdout_latent else "images"
    context.log(
        f"train: post-hoc EMA, scoring sigma_rel {list(candidates)} by {job.train.ema_choice.value} on {images} "
        f"held-out {kind} ({job.train.ema_choice_timesteps} timesteps each)"
    )
    sweep = EmaSweep(
        job.snapshot_uri,
        job.posthoc_uri,
        images_seen,
        candidates,
        job.train.ema_choice,
        job.train.weighting,
        job.train.ema_choice_tolerance,
        prepare.holdout_uri,
        holdout_latent,
        job.train.ema_choice_images,
        job.train.ema_choice_timesteps,
        job.chosen_snapshot_uri,
        context.store.options,
    )
    scored = choose_ema(sweep, job.device, runtime_env)
    log_sweep(context.client, context.mlflow_run_id, scored, job.train.ema_profiles, context.log)
    return scored


def grids_run(context: StageContext, train: TrainSection) -> str | None:
    """The sample grids' own MLflow run under the train run (None without grids; see
    :func:`pipelines.tracking.nested_run`), and a paragraph in the train run's description leading there."""
    if train.grid_every_images is None:
        return None
    every = f"at 0 images and every {train.grid_every_images:,}" if train.grid_every_images else "at the end"
    description = (
        f"Sample grids of the EMA network {every}, the same noise each time. *Model metrics*, the **samples** card: "
        f"its slider is the images seen. *Artifacts*, `{COMPOSITE}`: one row of each grid, oldest at the top."
    )
    client = context.client
    run_id = nested_run(client, context.mlflow_run_id, "samples", "train samples", description)
    link = run_link(client.get_run(run_id).info.experiment_id, run_id, "sample grids run", tab="model-metrics")
    opening = "Samples during training: "
    set_note_part(client, context.mlflow_run_id, opening, f"{opening}the {link} (a step slider, and `{COMPOSITE}`).")
    return run_id


def workers_line(train: TrainSection) -> str:
    """The worker group, as the job's output says it: "2 worker(s)", or an elastic group's range and shares."""
    if train.min_workers == train.max_workers:
        return f"{train.max_workers} worker(s)"
    shares = f"the batch in {train.max_workers} shares of {train.batch_size // train.max_workers}"
    return f"{train.min_workers} to {train.max_workers} workers (elastic, {shares})"
