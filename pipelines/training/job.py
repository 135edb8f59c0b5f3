"""The one value every Ray Train worker receives: what to train, on which data, where its outputs go."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ddpm_core.diffusion import DiffusionConfig
from ddpm_core.precision import Precision
from ddpm_core.unet import UNetConfig
from pipelines.config import TrainSection
from pipelines.contracts import LatentOutputs
from pipelines.data.streaming import StreamSpec
from pipelines.execution import Device
from pipelines.training.objective import DistillTarget


class CheckpointMetrics(Protocol):
    """More metrics for every checkpoint report, computed on rank 0 from the EMA network (the tune stage ranks
    trials by them; the training loop does not know what they are)."""

    def __call__(self, ema_model: nn.Module, images_seen: int, done: bool) -> dict[str, float]: ...


@dataclass(frozen=True)
class TrainJob:
    """Everything a training worker needs; workers read no config file and no environment."""

    unet: UNetConfig
    diffusion: DiffusionConfig
    train: TrainSection  # batch, length and intervals in images, optimiser, seed, precision and fast-path switches
    device: Device
    shards_uri: str  # the training split (pipelines.data.shards)
    stream: StreamSpec | None  # how the split is streamed (data.loader resolved to stream), None: held resident
    work_uri: str  # this execution's outputs (the properties below) and Ray Train's checkpoints
    storage_options: dict[str, Any]
    tracking_uri: str
    mlflow_run_id: str  # rank 0 logs metrics and sample grids to this run
    warm_start_uri: str | None = (
        None  # a training state whose model and EMA weights start a fresh run (best tune trial)
    )
    checkpoint_metrics: CheckpointMetrics | None = None
    compile_cache_uri: str | None = None  # a folder for torch.compile's artifacts, shared by runs (None: not kept)
    grids_run_id: str | None = None  # the MLflow run of the sample grids (None: mlflow_run_id's)
    distill: DistillTarget | None = None  # a distill round's teacher and steps (None: training, Algorithm 1)
    latent: LatentOutputs | None = None  # a latent model's training data (None: the images of shards_uri)

    @property
    def precision(self) -> Precision:
        return self.train.precision(self.device is Device.GPU)

    @property
    def latent_metadata(self) -> dict[str, Any]:
        """What every snapshot of a latent model records: its latent space, so that whatever samples it decodes its
        samples (``Snapshot.image_decoder``); empty for a model of pixels."""
        return {} if self.latent is None else {"latent": self.latent.space.to_dict()}

    @property
    def snapshot_metadata(self) -> dict[str, Any]:
        """What the final snapshot records beside its images seen: :attr:`latent_metadata`, and a distilled student's
        method, steps and teacher (its sampler: DDIM at those steps on their trailing grid,
        ``ddpm_core.distillation.student_sampler``; a consistency student's network is read through its skip
        scalings, ``Snapshot.build_model``)."""
        if self.distill is None:
            return self.latent_metadata
        target = self.distill
        distilled = {"method": target.method, "steps": target.student_steps, "teacher": target.teacher_snapshot_uri}
        return {**self.latent_metadata, "distilled": distilled}

    def image_decoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """From the network's samples to images in [-1, 1]: the identity, or a latent model's decoder."""
        if self.latent is None:
            return lambda samples: samples
        return self.latent.space.decoder(self.storage_options, log=lambda _: None)

    @property
    def snapshot_uri(self) -> str:
        """The EMA weights at the end (the inference snapshot)."""
        return f"{self.work_uri}/snapshot"

    @property
    def chosen_snapshot_uri(self) -> str:
        """The EMA chosen among ``train.ema_sigma_rel``'s candidates after training (pipelines.training.ema_choice)."""
        return f"{self.work_uri}/chosen_snapshot"

    @property
    def posthoc_uri(self) -> str:
        """The post-hoc EMA profiles' snapshots, one committed folder per time (pipelines.training.posthoc)."""
        return f"{self.work_uri}/posthoc"

    @property
    def initial_snapshot_uri(self) -> str:
        """The untrained network at ``train.seed``: the evaluate stage's baseline."""
        return f"{self.work_uri}/initial_snapshot"

    @property
    def pending_metrics_uri(self) -> str:
        """Metrics that could not reach MLflow during an outage, for the driver to send."""
        return f"{self.work_uri}/pending_metrics"

    @property
    def grid_strips_uri(self) -> str:
        """One strip of each sample grid, for the picture of samples over training (pipelines.training.grids)."""
        return f"{self.work_uri}/grid_strips"

    @property
    def diverged_uri(self) -> str:
        """Written by rank 0 when the loss became non-finite: the message saying what to change."""
        return f"{self.work_uri}/diverged"

    @property
    def stop_uri(self) -> str:
        """Written by the driver when a signal asks the run to stop: the workers checkpoint at the next step and
        leave (pipelines.training.stopping)."""
        return f"{self.work_uri}/stop"

    @property
    def trainer_uri(self) -> str:
        """Ray Train's storage for this job (checkpoints under ``trainer/checkpoint_*``)."""
        return f"{self.work_uri}/ray"
