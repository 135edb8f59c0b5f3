"""The training loop every Ray Train worker runs: DDPM's Algorithm 1 (Ho et al. 2020) on data-parallel workers, or
a distill round's objective (:mod:`pipelines.training.objective`)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.profiler import record_function

from ddpm_core.data import random_batch, random_posterior_batch, to_model_range
from ddpm_core.precision import autocast_dtype
from ddpm_core.training import RunningTotals, drop_labels
from pipelines.advice import out_of_memory_advice
from pipelines.data.latent_files import read_latents
from pipelines.data.shards import read_split
from pipelines.data.streaming import ImageStream
from pipelines.training.hooks import (
    Interval,
    Progress,
    commit_profiles,
    record_divergence,
    report_checkpoint,
    save_outputs,
)
from pipelines.training.job import TrainJob
from pipelines.training.objective import objective_of
from pipelines.training.state import TrainState, Worker, memory_format, save_compile_cache, start_state
from pipelines.training.step import Batch, Share, step
from pipelines.training.stopping import LAST_CALL_S, Agreed, StopWatch


def train_loop(job: TrainJob) -> None:
    """Train until ``train.total_images`` images (all workers together) were seen: draw a batch from this worker's
    resident slice of the data or its stream, take a step (Algorithm 1, the EMA updates), and at their intervals in
    images check the loss on every rank, log metrics and sample grids and commit post-hoc EMA snapshots (rank 0),
    and report a checkpoint."""
    worker = Worker.current(job.train.max_workers)
    state = start_state(job, worker)
    micro, started = job.train.batch_size // worker.share_count, time.time()  # images per share and step
    batches = Batches(job, worker, state, micro)
    objective = objective_of(job.diffusion, job.train, job.distill, worker.device, job.storage_options)
    totals = RunningTotals(worker.device, worker.all_reduce)
    progress = Progress(job, state.images_seen) if worker.rank == 0 else None
    train, autocast, layout = job.train, autocast_dtype(job.precision), memory_format(job)
    log, grid, checkpoint = (
        Interval(every, state.images_seen)
        for every in (train.log_every_images, train.grid_every_images or 0, train.checkpoint_every_images)
    )
    grids = progress if train.grid_every_images is not None else None  # null: no sample grids at all
    if grids is not None and state.images_seen == 0 and train.grid_every_images:
        grids.log_grid(state.ema.model, objective.diffusion, 0)  # the untrained network: the slider starts at step 0
    oom_advice = step_oom_advice(job, worker, micro)
    stop = StopWatch(job, worker)
    while state.images_seen < train.total_images:
        with record_function("data"):
            micro_batches = batches.draw(state.shares, layout)  # one [b, C, H, W] per share
        with out_of_memory_advice(*oom_advice):
            result = step(state, objective.diffusion, micro_batches, train, autocast, objective=objective)
        state.advance(train.batch_size)
        save_compile_cache(job, worker, state)  # once, after the first compiled step
        totals.add(result)
        seen, done = state.images_seen, state.images_seen >= train.total_images
        if log.due(seen, done) or checkpoint.due(seen, done):
            with record_function("logging"):  # one all-reduce: every rank sees the same sums and stops at the same step
                window = totals.summed()
            # Checked before every log and checkpoint, so that no checkpoint holds diverged weights.
            if not math.isfinite(window.loss_sum):
                record_divergence(job, worker, state)
                return
        if log.due(seen, done):
            means, waited = window.means(), batches.take_wait()
            totals.restart()
            if progress is not None:
                progress.log_metrics(means, state, waited, objective.learning_rate(seen))
            log.passed(seen)
        if grid.due(seen, done):
            if grids is not None:
                grids.log_grid(state.ema.model, objective.diffusion, seen)
            grid.passed(seen)
        commit_profiles(job, state, done)  # rank 0's post-hoc EMA snapshots, when due
        reported = checkpoint.due(seen, done)
        if reported:
            report_checkpoint(job, worker, state, time.time() - started, done)
            checkpoint.passed(seen)
        agreed = stop.agreed() if not done else None
        if agreed is not None and agreed.stop:  # asked to stop: this step's checkpoint, then leave (no snapshot)
            if not reported:
                report_checkpoint(job, worker, state, time.time() - started, False)
            worker.say(f"stopped on request at {seen} images (step {state.step}); checkpoint recorded")
            if progress is not None:
                progress.close()
            return
        if agreed is not None and (preemption := preemption_checkpoint_due(stop, agreed)) and not reported:
            report_checkpoint(job, worker, state, time.time() - started, False)  # where the restarted group resumes
            worker.say(f"{preemption}: checkpoint recorded at {seen} images (step {state.step})")
    save_outputs(job, worker, state, progress)


def preemption_checkpoint_due(stop: StopWatch, agreed: Agreed) -> str:
    """Why this step is checkpointed for a preemption ("": it is not): a notice just came, or its deadline is near."""
    if agreed.last_call:
        return f"preemption in {LAST_CALL_S:.0f} s or less (last call)"
    if not agreed.look_for_preemption or (notice := stop.preemption_notice()) is None:
        return ""
    nodes = ", ".join(node[:8] for node in notice.preempted_node_ids)
    left = f", {notice.deadline_ms / 1000 - time.time():.0f} s left" if notice.deadline_ms else ""
    return f"node {nodes} is being preempted{left}"


def step_oom_advice(job: TrainJob, worker: Worker, micro: int) -> tuple[str, str]:
    """Where a training step ran out of memory, and what to change (``out_of_memory_advice``)."""
    train = job.train
    return (
        f"a training step on {worker.device} ({len(worker.shares)} micro-batch(es) of {micro} images per worker)",
        f"lower train.batch_size (now {train.batch_size}), spread it over more workers (train.num_workers, "
        f"now {worker.world_size}), or choose a smaller model (model.preset / model.overrides)",
    )


class Batches:
    """This worker's training batches, one micro-batch per share it takes (from the share's resident slice or stream,
    ``TrainJob.stream``), and the time the loop waited for them."""

    def __init__(self, job: TrainJob, worker: Worker, state: TrainState, micro: int) -> None:
        self.job, self.size, self.waited = job, micro, 0.0
        self.data: Sequence[ResidentData | StreamedData] = (
            resident_slices(job, worker)
            if job.stream is None
            else [stream_from(job, share, worker, state, micro) for share in worker.shares]
        )

    def draw(self, shares: list[Share], layout: torch.memory_format) -> list[Batch]:
        """A micro-batch per share, each drawn with the share's generator (:meth:`draw_one`)."""
        asked = time.perf_counter()
        drawn = [self.draw_one(data, share.generator, layout) for data, share in zip(self.data, shares, strict=True)]
        self.waited += time.perf_counter() - asked
        return drawn

    def draw_one(
        self, data: ResidentData | StreamedData, generator: torch.Generator, layout: torch.memory_format
    ) -> Batch:
        """A micro-batch ``[size, C, H, W]`` in [-1, 1] on the device (drawn there from the resident slice, or the
        stream's next), and for a class-conditional model its labels ``[size]``, each replaced by the null class with
        probability ``train.class_dropout`` (Ho & Salimans 2022, Algorithm 1)."""
        job = self.job
        if isinstance(data, StreamedData):
            pixels, labels = data.stream.next(data.device)  # [size, H, W, C] uint8, flipped by the decode tasks
            images = to_model_range(pixels).contiguous(memory_format=layout)
        elif data.logvar is not None and job.latent is not None:  # a latent model: a fresh draw of each posterior
            z, labels = random_posterior_batch(data.images, data.logvar, self.size, generator, data.labels)
            images = job.latent.space.latents(z).contiguous(memory_format=layout)  # [size, c, h, w]
        else:
            flip = job.train.horizontal_flip
            images, labels = random_batch(data.images, self.size, generator, flip, layout, data.labels)
        if labels is None or job.unet.num_classes is None:
            return images, None
        dropped = drop_labels(labels, job.unet.num_classes, job.train.class_dropout, generator)
        return images, {"class_labels": dropped}

    def take_wait(self) -> float:
        """Seconds spent drawing batches since the last call."""
        waited, self.waited = self.waited, 0.0
        return waited


class ResidentData(NamedTuple):
    images: torch.Tensor  # [N_r, C, H, W] in [-1, 1], on the worker's device; a latent model: posterior means
    labels: torch.Tensor | None  # [N_r] int64 on the same device: a class-conditional model's
    logvar: torch.Tensor | None = None  # a latent model's posterior log-variances, [N_r, c, h, w]


class StreamedData(NamedTuple):
    stream: ImageStream  # this worker's place in the streamed order
    device: torch.device


def stream_from(job: TrainJob, share: int, worker: Worker, state: TrainState, micro: int) -> StreamedData:
    """Share ``share``'s stream from where its order stands after ``state.step`` steps, through the last step
    (pipelines.data.streaming: the position is steps x images per share, so a restarted group of any size continues
    exactly)."""
    assert job.stream is not None
    steps_left = -(-(job.train.total_images - state.images_seen) // job.train.batch_size)
    start = state.step * micro
    stream = ImageStream(job.stream, share, worker.share_count, start, steps_left * micro, micro)
    worker.say(f"streaming the training split from image {start} of each share's order ({steps_left} steps left)")
    return StreamedData(stream, worker.device)


def resident_slices(job: TrainJob, worker: Worker) -> list[ResidentData]:
    """The training split, read once, and each of this worker's shares' part of it (every share-count-th image from
    the share's index), held on the worker's device with its labels when the model is class-conditional: a step
    draws both there, with no host work. A latent model holds the posteriors of its latents instead of images."""
    if job.latent is not None:
        latents = read_latents(job.latent.uri, job.storage_options)
        data, logvar, labels = (
            torch.as_tensor(latents["mean"]),
            torch.as_tensor(latents["logvar"]),
            latents.get("labels"),
        )
    else:
        images, labels = read_split(job.shards_uri, job.storage_options)
        data, logvar = to_model_range(images), None
    if job.unet.num_classes is None:
        labels = None
    elif labels is None:
        raise ValueError(f"{job.shards_uri}: a class-conditional model needs labels, and the split has none")
    device, slices = worker.device, [slice(share, None, worker.share_count) for share in worker.shares]
    return [
        ResidentData(
            data[mine].to(device),
            None if labels is None else torch.as_tensor(labels[mine], dtype=torch.long).to(device),
            None if logvar is None else logvar[mine].to(device),
        )
        for mine in slices
    ]
