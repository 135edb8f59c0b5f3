"""What the training loop does every N images besides stepping: rank 0's metrics and sample grids (MLflow, and the
job's output), its post-hoc EMA snapshots, checkpoint reports to Ray Train, stopping on a diverged loss, and the
outputs at the end."""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import time
import uuid

import ray.train
from mlflow.entities import Metric
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from torch import nn

from ddpm_core.checkpoint import save_snapshot, save_training_state
from ddpm_core.data import to_uint8
from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.images import grid, rows_by_class
from ddpm_core.samplers import Method, PerIndexNoise, SamplerConfig, balanced_classes, sample
from ddpm_core.storage import commit
from ddpm_core.training import OptimConfig
from pipelines.tracking import BufferedMetricLogger
from pipelines.training.grids import save_strip
from pipelines.training.job import TrainJob
from pipelines.training.posthoc import commit_snapshots
from pipelines.training.state import TrainState, Worker, gather_random_states

PENDING_METRICS = "metrics.json"
DIVERGED = "diverged.txt"
GRID_IMAGES = 64
GRID_CLASSES = 16  # a conditional model's grid: one row of 8 for each of its first classes


class Interval:
    """Something due at every multiple of ``every`` images (``every`` = 0: only at the end of training)."""

    def __init__(self, every: int, images_seen: int) -> None:
        self.every = every
        self.next = self._after(images_seen)

    def due(self, images_seen: int, done: bool) -> bool:
        return images_seen >= self.next or done

    def passed(self, images_seen: int) -> None:
        """It happened at ``images_seen``: the next one is due at the following multiple."""
        self.next = self._after(images_seen)

    def _after(self, images_seen: int) -> float:
        return (images_seen // self.every + 1) * self.every if self.every > 0 else math.inf


class Progress:
    """Rank 0's reports: metrics and sample grids to the stage's MLflow run, progress lines to the job's output.
    An MLflow outage never stops training: metrics are buffered, and what is still unsent at the end is kept in
    storage for the driver (``TrainJob.pending_metrics_uri``)."""

    def __init__(self, job: TrainJob, images_seen: int) -> None:
        # One quick attempt per MLflow call (no minutes of client-side retries): an outage is absorbed by the buffer.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.job = job
        self.client = MlflowClient(job.tracking_uri)
        self.metrics = BufferedMetricLogger(
            self.client, job.mlflow_run_id, lambda line: print(f"train: {line}", flush=True)
        )
        self.window_started, self.window_images_seen = time.time(), images_seen
        self.system = system_metrics(job)
        self.to_images = job.image_decoder()  # the grids' samples -> images: a latent model's decoder

    def log_metrics(self, means: dict[str, float], state: TrainState, data_wait_seconds: float, lr: float) -> None:
        """The window's mean step statistics, the learning rate ``lr`` of the next step, the EMA decay, the training
        rate, the share of the window spent waiting for data, and this worker's peak memory."""
        now = time.time()
        elapsed = max(now - self.window_started, 1e-9)
        rate = (state.images_seen - self.window_images_seen) / elapsed
        values = {
            **means,
            "lr": lr,
            "images_per_second": rate,
            "data_wait_fraction": min(1.0, data_wait_seconds / elapsed),
            "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
            "ema_decay": state.ema.current_decay(),
            "optimizer_steps": state.step,  # MLflow's step axis counts images seen (docs/pipeline.md)
        }
        self.metrics.send(
            [Metric(key, float(value), int(now * 1000), state.images_seen) for key, value in values.items()]
        )
        print(
            f"train: {state.images_seen}/{self.job.train.total_images} images, loss {means['loss']:.4f}, "
            f"{rate:.0f} img/s",
            flush=True,
        )
        self.window_started, self.window_images_seen = time.time(), state.images_seen

    def log_grid(self, ema_model: nn.Module, diffusion: GaussianDiffusion, images_seen: int) -> None:
        """An 8x8 grid of DDIM samples of the EMA network, the same noise every time (MLflow's image slider); a
        class-conditional network's has one row per class (unguided: w = 0)."""
        unet = self.job.unet
        device = next(ema_model.parameters()).device
        classes = range(min(unet.num_classes, GRID_CLASSES)) if unet.num_classes else None
        count = 8 * len(classes) if classes else GRID_IMAGES
        labels = balanced_classes(range(count), classes) if classes else None  # [count]
        noise = PerIndexNoise(self.job.train.seed, range(count), device)
        steps, clip = min(50, diffusion.num_timesteps), self.job.latent is None  # latents are not in [-1, 1]
        sampler = SamplerConfig(method=Method.DDIM, num_steps=steps, clip_denoised=clip)
        kwargs = None if labels is None else {"class_labels": labels.to(device)}
        shape = (unet.in_channels, unet.image_size, unet.image_size)
        samples = sample(ema_model, diffusion, shape, noise, sampler, kwargs).samples  # [count, C', H', W']
        pixels = to_uint8(self.to_images(samples))  # [count, H, W, C]
        if labels is not None:
            pixels = rows_by_class(pixels, labels.numpy(), columns=8)
        try:
            save_strip(self.job, pixels, 8, images_seen)
            run_id = self.job.grids_run_id or self.job.mlflow_run_id
            self.client.log_image(run_id, grid(pixels, columns=8), key="samples", step=images_seen)
        except Exception as error:  # a progress picture is not worth stopping training for
            print(f"train: sample grid at {images_seen} images not logged ({type(error).__name__})", flush=True)

    def close(self) -> None:
        """A last attempt to send buffered metrics; what still fails is committed for the driver to send."""
        if self.system is not None:
            self.system.finish()
        unsent = self.metrics.close()
        if unsent:
            payload = json.dumps([metric.to_dictionary() for metric in unsent]).encode()
            commit(
                self.job.pending_metrics_uri,
                {PENDING_METRICS: payload},
                {"count": len(unsent)},
                self.job.storage_options,
            )
            print(
                f"train: {len(unsent)} metrics could not reach MLflow; kept at {self.job.pending_metrics_uri}",
                flush=True,
            )


def system_metrics(job: TrainJob) -> SystemMetricsMonitor | None:
    """MLflow's system metrics (CPU, memory, disk, network; GPU utilisation and memory where there is one) of rank 0's
    machine on the train run, every 10 s, continuing the step count after a restart."""
    try:
        monitor = SystemMetricsMonitor(job.mlflow_run_id, resume_logging=True, tracking_uri=job.tracking_uri)
    except Exception as error:  # a missing optional dependency or an unreachable server: train without them
        print(f"train: no system metrics ({type(error).__name__}: {error})", flush=True)
        return None
    monitor.start()
    return monitor


def commit_profiles(job: TrainJob, state: TrainState, done: bool) -> None:
    """Rank 0 commits the post-hoc EMA profiles' snapshots (Karras et al. 2024, Sec. 3.2) when this step passed a
    multiple of ``train.ema_snapshot_every_images``, and at the end; nothing on other ranks or when off. Called before
    the step's checkpoint, so that a checkpoint's run has committed every snapshot time up to it."""
    if state.profiles is None:
        return
    every, seen = job.train.ema_snapshot_every_images, state.images_seen
    if done or seen // every > (seen - job.train.batch_size) // every:
        commit_snapshots(job.posthoc_uri, state.profiles.snapshot(seen), job.storage_options)


def report_checkpoint(job: TrainJob, worker: Worker, state: TrainState, loop_seconds: float, done: bool) -> None:
    """Every rank reports (Ray Train's barrier); rank 0 adds ``job.checkpoint_metrics`` and the training state, which
    Ray Train persists as the checkpoint a restarted worker group resumes from."""
    metrics = {"images_seen": state.images_seen, "step": state.step, "loop_seconds": loop_seconds}
    if worker.rank == 0 and job.checkpoint_metrics is not None:
        metrics.update(job.checkpoint_metrics(state.ema.model, state.images_seen, done))
    random_states = gather_random_states(worker, state.shares)  # as the next step will find them
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if worker.rank == 0:
            save_training_state(directory, state.to_checkpoint(job, random_states))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(state.step))


def checkpoint_name(step: int) -> str:
    """A checkpoint's folder name: names sort by step, not by a node's clock (the nodes' clocks of a cluster differ,
    and rank 0 moves between nodes). Two checkpoints of one step (the steps after an unreadable checkpoint, trained
    again) hold the same state, since training is deterministic; the suffix keeps their folders apart."""
    return f"checkpoint_{step:010d}_{uuid.uuid4().hex[:8]}"


def divergence_message(images_seen: int, step: int, optim: OptimConfig) -> str:
    return (
        f"training diverged: the loss became non-finite by {images_seen} images (step {step}). The last checkpoint "
        f"before it is kept, but resuming with the same settings would diverge again: lower train.lr (now {optim.lr}), "
        f"keep train.grad_clip > 0 (now {optim.grad_clip}), or lengthen train.warmup_images "
        f"(now {optim.warmup_images})."
    )


def record_divergence(job: TrainJob, worker: Worker, state: TrainState) -> None:
    """Rank 0 commits what to change, for the driver to read after ``fit()`` (Ray Train keeps only checkpointed
    reports); every rank then leaves the loop at the same step, so the group ends without a retry."""
    if worker.rank == 0:
        message = divergence_message(state.images_seen, state.step, job.train.optim)
        commit(job.diverged_uri, {DIVERGED: message.encode()}, {"images_seen": state.images_seen}, job.storage_options)


def save_outputs(job: TrainJob, worker: Worker, state: TrainState, progress: Progress | None) -> None:
    """At the end, on rank 0: the EMA snapshot, and the metrics MLflow did not take."""
    if worker.rank != 0:
        return
    save_snapshot(
        job.snapshot_uri,
        state.ema.model,
        job.unet,
        job.diffusion,
        {"images_seen": state.images_seen, "step": state.step, **job.snapshot_metadata},
        job.storage_options,
    )
    if progress is not None:
        progress.close()
