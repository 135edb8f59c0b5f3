"""The training loop every Ray Train worker runs: DDPM's Algorithm 1 (Ho et al. 2020) on data-parallel workers."""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import torch
from torch.profiler import record_function

from ddpm_core.data import random_batch, to_model_range
from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.precision import autocast_dtype
from ddpm_core.training import RunningTotals, drop_labels, train_step
from pipelines.advice import out_of_memory_advice
from pipelines.shards import read_split
from pipelines.training.hooks import Interval, Progress, record_divergence, report_checkpoint, save_outputs
from pipelines.training.job import TrainJob
from pipelines.training.state import Worker, memory_format, start_state


def train_loop(job: TrainJob) -> None:
    """Train until ``train.total_images`` images (all workers together) were seen: draw a batch from this worker's
    resident slice of the data, take a step (Algorithm 1, the EMA update), and at their intervals in images check the
    loss on every rank, log metrics and sample grids (rank 0), and report a checkpoint."""
    worker = Worker.current()
    state = start_state(job, worker)
    data = resident_slice(job, worker)
    diffusion = GaussianDiffusion.from_config(job.diffusion)
    totals = RunningTotals(worker.device, worker.all_reduce)
    progress = Progress(job, state.images_seen) if worker.rank == 0 else None
    train, autocast, layout = job.train, autocast_dtype(job.precision), memory_format(job)
    log, grid, checkpoint = (
        Interval(every, state.images_seen)
        for every in (train.log_every_images, train.grid_every_images or 0, train.checkpoint_every_images)
    )
    grids = progress if train.grid_every_images is not None else None  # null: no sample grids at all
    if grids is not None and state.images_seen == 0 and train.grid_every_images:
        grids.log_grid(state.ema.model, diffusion, 0)  # the untrained network: the slider starts at step 0
    per_worker, started = train.batch_size // worker.world_size, time.time()
    oom_where = f"a training step on {worker.device} ({per_worker} images per worker)"
    oom_advice = (
        f"lower train.batch_size (now {train.batch_size}), spread it over more workers (train.num_workers, "
        f"now {worker.world_size}), or choose a smaller model (model.preset / model.overrides)"
    )
    while state.images_seen < train.total_images:
        with record_function("data"):
            batch, conditioning = draw_batch(job, data, per_worker, state.generator, layout)  # [B_r, C, H, W]
        with out_of_memory_advice(oom_where, oom_advice):
            result = train_step(
                state.step_model,
                diffusion,
                state.optimizer,
                batch,
                train.optim,
                state.images_seen,
                state.ema,
                conditioning,
                generator=state.generator,
                autocast_dtype=autocast,
            )
        state.advance(train.batch_size)
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
            means = window.means()
            totals.restart()
            if progress is not None:
                progress.log_metrics(means, state)
            log.passed(seen)
        if grid.due(seen, done):
            if grids is not None:
                grids.log_grid(state.ema.model, diffusion, seen)
            grid.passed(seen)
        if checkpoint.due(seen, done):
            report_checkpoint(job, worker, state, time.time() - started, done)
            checkpoint.passed(seen)
    save_outputs(job, worker, state, progress)


def draw_batch(
    job: TrainJob, data: ResidentData, size: int, generator: torch.Generator, layout: torch.memory_format
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """A batch ``[size, C, H, W]`` drawn on the device, and for a class-conditional model its labels ``[size]``, each
    replaced by the null class with probability ``train.class_dropout`` (Ho & Salimans 2022, Algorithm 1)."""
    flip = job.train.horizontal_flip
    images, labels = random_batch(data.images, size, generator, flip, layout, data.labels)
    if labels is None or job.unet.num_classes is None:
        return images, None
    return images, {"class_labels": drop_labels(labels, job.unet.num_classes, job.train.class_dropout, generator)}


class ResidentData(NamedTuple):
    images: torch.Tensor  # [N_r, C, H, W] in [-1, 1], on the worker's device
    labels: torch.Tensor | None  # [N_r] int64 on the same device: a class-conditional model's


def resident_slice(job: TrainJob, worker: Worker) -> ResidentData:
    """This worker's share of the training split (every world-size-th image from its rank), held on its device with
    its labels when the model is class-conditional: a step draws both there, with no host work."""
    images, labels = read_split(job.shards_uri, job.storage_options)
    mine = slice(worker.rank, None, worker.world_size)
    resident = to_model_range(images[mine]).to(worker.device)
    if job.unet.num_classes is None:
        return ResidentData(resident, None)
    if labels is None:
        raise ValueError(f"{job.shards_uri}: a class-conditional model needs labels, and the split has none")
    return ResidentData(resident, torch.as_tensor(labels[mine], dtype=torch.long).to(worker.device))
