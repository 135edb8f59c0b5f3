"""sample: draw ``sample.num_samples`` images from the EMA snapshot with Ray actors
(:mod:`pipelines.generation.sampling`), on the device kind training ran on; the shards are committed one by one, so
a restarted stage skips finished ones. A class-conditional model draws ``sample.classes`` in turn (all, balanced, by
default) with guidance scale ``sample.guidance_scale``."""

from __future__ import annotations

from pipelines.context import StageContext
from pipelines.contracts import Conditioning, NetworkExecution, PrepareOutputs, SampleOutputs, TrainOutputs
from pipelines.execution import Device
from pipelines.generation.classes import sample_labels
from pipelines.generation.sampling import SampleRequest, sample_to_shards


def run(context: StageContext, prepare: PrepareOutputs, train: TrainOutputs) -> SampleOutputs:
    settings = context.config.sample
    on_gpu = train.device is Device.GPU
    network = NetworkExecution(settings.precision(on_gpu), settings.compiled(on_gpu))
    conditioning = None
    if train.num_classes is not None:
        names = list(prepare.class_names or ())  # the data's classes (a model may have more: model.num_classes)
        classes = sample_labels(settings.classes, names, len(names))
        conditioning = Conditioning(classes, settings.guidance_scale, null_class=train.num_classes)
        context.log(
            f"sample: {len(classes)} classes in turn, guidance scale w = {settings.guidance_scale:g} (0: unguided)"
        )
    request = SampleRequest(
        snapshot_uri=train.snapshot_uri,
        out_uri=f"{context.work_uri('sample')}/shards",
        num_samples=settings.num_samples,
        shard_size=settings.batch_size,
        num_workers=settings.num_workers,
        sampler=settings.sampler,
        seed=settings.seed,
        network=network,
        conditioning=conditioning,
    )
    shard_uris, sampling_seconds = sample_to_shards(request, context.execution(train.device), context.log)
    context.client.log_metric(context.mlflow_run_id, "num_samples", settings.num_samples)
    return SampleOutputs(
        shard_uris=tuple(shard_uris),
        num_samples=settings.num_samples,
        shard_size=settings.batch_size,
        num_workers=settings.num_workers,
        sampler=settings.sampler,
        seed=settings.seed,
        execution=network,
        sampling_seconds=sampling_seconds,
        conditioning=conditioning,
    )
