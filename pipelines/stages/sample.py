"""sample: draw ``sample.num_samples`` images from the EMA snapshot with Ray actors
(:mod:`pipelines.generation.sampling`), on the device kind training ran on; the shards are committed one by one, so
a restarted stage skips finished ones. A class-conditional model draws ``sample.classes`` in turn (all, balanced, by
default) with guidance scale ``sample.guidance_scale``. With ``sample.autoguidance_weight`` (not 1), the model is
guided by its own EMA at an earlier point of the run (:mod:`pipelines.generation.guides`): the stage commits the
model's snapshot with that guide in its result folder, and samples, and hands on, that snapshot.

With the distill stage on, the images are the student's, drawn with its own sampler (DDIM at ``distill.steps`` on
their trailing grid); ``sample.method`` and ``num_steps`` are then the teacher's, which evaluate draws beside it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.config import PipelineConfig, SampleSection
from pipelines.context import StageContext
from pipelines.contracts import (
    Conditioning,
    DistillOutputs,
    NetworkExecution,
    PrepareOutputs,
    SampleOutputs,
    TrainOutputs,
)
from pipelines.execution import Device
from pipelines.external import External
from pipelines.generation.classes import sample_labels
from pipelines.generation.guides import autoguidance_of, guided_snapshot
from pipelines.generation.sampling import SampleRequest, sample_to_shards


@dataclass(frozen=True)
class SampleSettings:
    sample: SampleSection


def settings(config: PipelineConfig, external: External) -> SampleSettings:
    return SampleSettings(config.sample)


def check_data(settings: SampleSettings, prepare: PrepareOutputs, storage_options: dict[str, Any]) -> None:
    """``sample.classes`` names classes the data has."""
    if settings.sample.classes is not None and prepare.num_classes is not None:
        sample_labels(settings.sample.classes, list(prepare.class_names or ()), prepare.num_classes)


def run(
    context: StageContext,
    settings: SampleSettings,
    prepare: PrepareOutputs,
    train: TrainOutputs,
    distill: DistillOutputs | None,
) -> SampleOutputs:
    sample = settings.sample
    snapshot_uri, sampler = (
        (train.snapshot_uri, sample.sampler) if distill is None else (distill.snapshot_uri, distill.sampler)
    )
    if distill is not None:
        context.log(f"sample: the {distill.steps}-step student of the distill stage, DDIM on its trailing grid")
    autoguidance = autoguidance_of(sample, train)  # None with distillation (the config refuses both)
    if autoguidance is not None:
        execution = context.execution(train.device)
        uri = f"{context.result_uri}/guided_snapshot"
        snapshot_uri = guided_snapshot(train, autoguidance, uri, execution.storage_options, execution.runtime_env)
        context.log(f"sample: the model {autoguidance.described()}")
    on_gpu = train.device is Device.GPU
    network = NetworkExecution(sample.precision(on_gpu), sample.compiled(on_gpu))
    conditioning = None
    if train.num_classes is not None:
        names = list(prepare.class_names or ())  # the data's classes (a model may have more: model.num_classes)
        classes = sample_labels(sample.classes, names, len(names))
        # the interval is kept at w = 0 too: evaluate's guidance sweep samples its w > 0 sets in it
        conditioning = Conditioning(classes, sample.guidance_scale, train.num_classes, sample.guidance_interval)
        context.log(f"sample: {len(classes)} classes in turn, {conditioning.described()}")
    request = SampleRequest(
        snapshot_uri=snapshot_uri,
        out_uri=f"{context.result_uri}/shards",
        num_samples=sample.num_samples,
        shard_size=sample.batch_size,
        num_workers=sample.num_workers,
        sampler=sampler,
        seed=sample.seed,
        network=network,
        conditioning=conditioning,
    )
    shard_uris, sampling_seconds = sample_to_shards(request, context.execution(train.device), context.log)
    context.client.log_metric(context.mlflow_run_id, "num_samples", sample.num_samples)
    return SampleOutputs(
        shard_uris=tuple(shard_uris),
        num_samples=sample.num_samples,
        shard_size=sample.batch_size,
        num_workers=sample.num_workers,
        sampler=sampler,
        seed=sample.seed,
        execution=network,
        sampling_seconds=sampling_seconds,
        conditioning=conditioning,
        snapshot_uri=snapshot_uri,
        autoguidance=autoguidance,
    )
