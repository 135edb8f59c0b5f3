"""distill: the trained model distilled into a few-step sampler (docs/distillation.md; ``ddpm_core.distillation``).

- ``progressive`` (Salimans & Ho 2022, Algorithm 2): round after round, a student initialised from its teacher
  learns to do in one DDIM step what the teacher does in two; the student of a round is the teacher of the next,
  from ``distill.teacher_steps`` / 2 steps down to ``distill.steps``.
- ``consistency`` (Song et al. 2023, Algorithm 2): one round, in which a student initialised from the teacher
  learns to map every point of the teacher's ``distill.teacher_steps``-step DDIM trajectories to their end, against
  its own EMA (the target network); it is sampled at ``distill.steps``.

Each round is a Ray Train job of the training loop with the distillation objective
(:mod:`pipelines.training.objective`): DDP workers, the global batch split into the same shares whatever the group's
size, checkpoints every ``distill.checkpoint_every_images`` and resume from the newest, stopping at a signal, and
its loss and learning rate on its own MLflow run under this stage's. A round whose student is committed is not run
again, so a killed stage resumes at the round and checkpoint it reached."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ddpm_core.storage import commit, is_committed, read_committed
from ddpm_core.training import OptimConfig
from pipelines.config import DataSection, DistillMethod, DistillSection, PipelineConfig, TrainSection
from pipelines.context import StageContext
from pipelines.contracts import DistillOutputs, DistillRound, PrepareOutputs, TrainedWith, TrainOutputs
from pipelines.data.streaming import plan_stream
from pipelines.external import External
from pipelines.interruption import STOP
from pipelines.tracking import nested_run
from pipelines.training.job import TrainJob
from pipelines.training.objective import DistillTarget
from pipelines.training.trainer import run_job

ROUND_RECORD = "round.json"


@dataclass(frozen=True)
class DistillSettings:
    """What distillation reads: its own section, the training workers' layout, seed and precision switches (a round
    runs on the train stage's worker group), and how the data is loaded."""

    distill: DistillSection
    train: TrainSection
    data: DataSection


def settings(config: PipelineConfig, external: External) -> DistillSettings:
    return DistillSettings(config.distill, config.train, config.data)


def run(
    context: StageContext, settings: DistillSettings, prepare: PrepareOutputs, train: TrainOutputs
) -> DistillOutputs:
    distill = settings.distill
    diffusion = dataclasses.replace(train.config.diffusion, prediction=distill.prediction)
    student = dataclasses.replace(train.config, diffusion=diffusion, train=round_optim(settings))
    context.log(
        f"distill: {distill.method.value}, {plan_line(distill)}, "
        f"{distill.images_per_round:,} images each, a {distill.prediction.value}-predicting student from "
        f"{train.snapshot_uri}"
    )
    teacher, rounds = train.snapshot_uri, []
    for index, steps in enumerate(distill.rounds):
        target = DistillTarget(teacher, steps, distill.method, distill.teacher_steps)
        done = distill_round(context, settings, (prepare, train, student), index, target)
        rounds.append(done)
        teacher = done.snapshot_uri
    outputs = DistillOutputs(
        snapshot_uri=teacher,
        steps=distill.steps,
        method=distill.method.value,
        teacher_snapshot_uri=train.snapshot_uri,
        rounds=tuple(rounds),
        images_seen=sum(done.images_seen for done in rounds),
        loop_seconds=None if any(r.loop_seconds is None for r in rounds) else sum(r.loop_seconds or 0 for r in rounds),
        config=student,
    )
    log_cost(context, outputs, train)
    return outputs


def plan_line(distill: DistillSection) -> str:
    """The rounds in words, for the stage's log."""
    if distill.method is DistillMethod.CONSISTENCY:
        return f"one round along the teacher's {distill.teacher_steps}-step DDIM trajectories"
    return f"rounds of {', '.join(map(str, distill.rounds))} steps"


def round_optim(settings: DistillSettings) -> OptimConfig:
    """A round's AdamW: ``distill.lr`` from the first step (the objective anneals it to 0), training's gradient
    clipping and no weight decay. Progressive keeps no EMA (decay 0: the snapshot holds the student's weights, as in
    Salimans & Ho 2022); consistency keeps the target network's, ``distill.target_ema`` from the first step."""
    distill = settings.distill
    decay = distill.target_ema if distill.method is DistillMethod.CONSISTENCY else 0.0
    return OptimConfig(
        lr=distill.lr, warmup_images=0, grad_clip=settings.train.optim.grad_clip, ema_decay=decay, ema_warmup=False
    )


def round_section(settings: DistillSettings, teacher_uri: str) -> TrainSection:
    """The training loop's settings for a round: the train stage's workers, seed and precision; the round's images,
    batch and optimiser (:func:`round_optim`); no sample grids, no post-hoc profiles, no stable targets (the round's
    targets are the teacher's); the teacher's weights as the student's start."""
    distill, train = settings.distill, settings.train
    return dataclasses.replace(
        train,
        batch_size=distill.batch_size,
        total_images=distill.images_per_round,
        checkpoint_every_images=distill.checkpoint_every_images,
        log_every_images=distill.log_every_images,
        grid_every_images=None,
        ema_profiles=(),
        ema_snapshot_every_images=0,
        ema_sigma_rel=None,
        stf_reference=0,
        optim=round_optim(settings),
        init_from=teacher_uri,
    )


def distill_round(
    context: StageContext,
    settings: DistillSettings,
    upstream: tuple[PrepareOutputs, TrainOutputs, TrainedWith],
    index: int,
    target: DistillTarget,
) -> DistillRound:
    """Round ``index``: its student trained on Ray Train unless a committed record says it was (then read back)."""
    prepare, train, student = upstream
    work_uri = f"{context.result_uri}/round_{index}_{target.student_steps}steps"
    record_uri, options = f"{work_uri}/record", context.store.options
    if is_committed(record_uri, options):
        context.log(f"distill: round {index + 1} ({target.student_steps} steps) is committed, reused")
        return DistillRound(**json.loads(read_committed(record_uri, [ROUND_RECORD], options)[0][ROUND_RECORD]))
    section = round_section(settings, target.teacher_snapshot_uri)
    split = (prepare.shards_uri, prepare.num_train)
    stream, _ = plan_stream(settings.data, section, split, student.unet, section.max_workers, options)
    run_id = nested_run(
        context.client,
        context.mlflow_run_id,
        f"round_{index + 1}",
        "distill round",
        f"Round {index + 1} of {target.method.value} distillation: a {target.student_steps}-step student of "
        f"`{target.teacher_snapshot_uri}`. Its loss and learning rate are this run's metrics.",
    )
    job = TrainJob(
        unet=student.unet,
        diffusion=student.diffusion,
        train=section,
        device=train.device,
        shards_uri=prepare.shards_uri,
        stream=stream,
        work_uri=work_uri,
        storage_options=options,
        tracking_uri=context.tracking_uri,
        mlflow_run_id=run_id,
        distill=target,
    )
    done = train_round(context, job, index, settings.data.decode_cpus if stream else 0.0)
    commit(record_uri, {ROUND_RECORD: json.dumps(dataclasses.asdict(done)).encode()}, {"kind": "round"}, options)
    return done


def train_round(context: StageContext, job: TrainJob, index: int, decode_cpus: float) -> DistillRound:
    """Round ``index``'s Ray Train job on the train stage's worker group; a signal checkpoints it and stops."""
    section, target = job.train, job.distill
    assert target is not None
    context.log(
        f"distill: round {index + 1}, a {target.student_steps}-step student, {section.total_images:,} images, "
        f"batch {section.batch_size}, lr {section.optim.lr:g} annealed to 0"
    )
    result = run_job(context, job, "distillation workers", decode_cpus)
    if STOP.requested:
        context.log(f"distill: round {index + 1} stopped; its checkpoint is recorded and a re-run resumes")
        STOP.check()
    reported: dict[str, Any] = result.metrics or {}
    return DistillRound(
        steps=target.student_steps,
        teacher_snapshot_uri=target.teacher_snapshot_uri,
        snapshot_uri=job.snapshot_uri,
        images_seen=int(reported["images_seen"]),
        loop_seconds=reported.get("loop_seconds"),
        mlflow_run_id=job.mlflow_run_id,
    )


def log_cost(context: StageContext, outputs: DistillOutputs, train: TrainOutputs) -> None:
    """Distillation's images and seconds beside the teacher's training (issue 33's cost accounting)."""
    metrics = {"distill_images": float(outputs.images_seen), "teacher_images": float(train.images_seen)}
    if outputs.loop_seconds is not None:
        metrics["distill_seconds"] = outputs.loop_seconds
    if train.loop_seconds is not None:
        metrics["teacher_loop_seconds"] = train.loop_seconds
    for key, value in metrics.items():
        context.client.log_metric(context.mlflow_run_id, key, value)
    share = outputs.images_seen / train.images_seen if train.images_seen else float("nan")
    seconds = f", {outputs.loop_seconds:.0f} s" if outputs.loop_seconds is not None else ""
    teacher = f" ({train.loop_seconds:.0f} s)" if train.loop_seconds is not None else ""
    context.log(
        f"distill: a {outputs.steps}-step student from {outputs.images_seen:,} images{seconds}, "
        f"{share:.2f}x the teacher's {train.images_seen:,}{teacher}"
    )
