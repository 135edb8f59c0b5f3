"""train: data-parallel DDPM training with Ray Train (DDP over NCCL with bf16 autocast on GPUs, gloo and fp32 on
CPUs; ``train.bf16_on_gpu`` / ``train.bf16_on_cpu``). Progress is counted in images; checkpoints of the full training
state are reported to Ray Train every ``train.checkpoint_every_images``, and a re-run (or a worker-group restart)
resumes from the latest one. The loop itself is :func:`pipelines.training.loop.train_loop`."""

from __future__ import annotations

from pipelines.config import PipelineConfig, with_overrides
from pipelines.context import StageContext
from pipelines.contracts import PrepareOutputs, TrainedWith, TrainOutputs, TuneOutputs
from pipelines.data.streaming import plan_stream
from pipelines.execution import Device, check_fits, cluster_device
from pipelines.training.job import TrainJob
from pipelines.training.trainer import WorkerGroup, fit, make_trainer, send_pending_metrics


def run(context: StageContext, prepare: PrepareOutputs, tune: TuneOutputs | None) -> TrainOutputs:
    config = tuned_config(context.config, tune)
    device = cluster_device(config.train.use_gpu)
    warm_start = tune.best_checkpoint_uri if tune is not None and config.tune.warm_start else None
    unet = config.model.unet(prepare.num_classes)
    split, values = (prepare.shards_uri, prepare.num_train), unet.in_channels * unet.image_size**2
    stream, why = plan_stream(config.data, config.train, split, values, config.train.num_workers, context.store.options)
    context.log(f"train: {'stream' if stream else 'resident'} data loader ({why})")
    job = TrainJob(
        unet=unet,
        diffusion=config.diffusion,
        train=config.train,
        device=device,
        shards_uri=prepare.shards_uri,
        stream=stream,
        work_uri=context.work_uri("train"),
        storage_options=context.store.options,
        tracking_uri=context.tracking_uri,
        mlflow_run_id=context.mlflow_run_id,
        warm_start_uri=warm_start,
        compile_cache_uri=context.store.cache_uri("compile", "train"),
    )
    train = config.train
    group = WorkerGroup(train.num_workers, train.cpus_per_worker, train.max_failures, train.startup_retries)
    execution = context.execution(device)
    demand = group.demand(
        device,
        f"{train.num_workers} training workers",
        "train.num_workers / train.cpus_per_worker",
        decode_cpus=config.data.decode_cpus if stream else 0.0,
    )
    check_fits(demand, execution, context.log)
    conditional = (
        f", {job.unet.num_classes} classes (label dropout {train.class_dropout:g})" if job.unet.num_classes else ""
    )
    context.log(
        f"train: {train.num_workers} worker(s), {'GPU (NCCL' if device is Device.GPU else 'CPU (gloo'}, "
        f"{job.precision.value}), {train.total_images} images, batch {train.batch_size}{conditional}"
    )
    result = fit(make_trainer(job, group, execution.runtime_env), job)
    send_pending_metrics(job, context.client, context.log)
    reported = result.metrics or {}  # the final checkpoint report of the final attempt
    return TrainOutputs(
        snapshot_uri=job.snapshot_uri,
        initial_snapshot_uri=job.initial_snapshot_uri,
        images_seen=int(reported["images_seen"]),
        device=device,
        loop_seconds=reported.get("loop_seconds"),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        config=TrainedWith(diffusion=config.diffusion, train=train.optim),
        num_classes=job.unet.num_classes,
    )


def tuned_config(config: PipelineConfig, tune: TuneOutputs | None) -> PipelineConfig:
    """The config to train with: the tune stage's best parameters applied, when a tune stage ran."""
    return config if tune is None else with_overrides(config, tune.best_params)
