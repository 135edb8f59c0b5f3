"""What a training step minimises, and at which learning rate: Algorithm 1 of Ho et al. (2020) when training, or
progressive distillation's loss (Salimans & Ho 2022, Algorithm 2) in a round of the distill stage. One loop
(:func:`pipelines.training.loop.train_loop`) runs both, so that a distillation round has training's checkpoints,
resume, worker-count-independent random streams, stopping and metrics."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ddpm_core.checkpoint import load_snapshot
from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion
from ddpm_core.distillation import Reparameterized, accumulate_progressive
from ddpm_core.training import StepResult, accumulate_gradients, learning_rate
from pipelines.config import TrainSection

Region = Callable[[str], AbstractContextManager[Any]]


@dataclass(frozen=True)
class DistillTarget:
    """What a distillation round's workers learn (part of their :class:`~pipelines.training.job.TrainJob`): to do in
    one DDIM step of a ``student_steps``-step grid what the teacher snapshot does in two."""

    teacher_snapshot_uri: str
    student_steps: int
    method: str = "progressive"


class Objective(Protocol):
    @property
    def diffusion(self) -> GaussianDiffusion:
        """The network's: what its outputs mean (its sample grids are drawn with it)."""
        ...

    def accumulate(
        self,
        model: nn.Module,
        images: torch.Tensor,
        conditioning: dict[str, torch.Tensor] | None,
        generator: torch.Generator,
        autocast: torch.dtype | None,
        scale: float,
        region: Region,
    ) -> StepResult:
        """The loss of one micro-batch ``images`` ``[b, C, H, W]``, its gradient times ``scale`` added to ``model``'s
        ``.grad``; the random draws from ``generator``."""
        ...

    def learning_rate(self, images_seen: int) -> float:
        """The learning rate of the step taken after ``images_seen`` images."""
        ...


@dataclass(frozen=True)
class Denoising:
    """Algorithm 1 (Ho et al. 2020) with ``train.loss_weighting``, at the warm-up learning rate of ``train``."""

    diffusion: GaussianDiffusion
    train: TrainSection

    def accumulate(
        self,
        model: nn.Module,
        images: torch.Tensor,
        conditioning: dict[str, torch.Tensor] | None,
        generator: torch.Generator,
        autocast: torch.dtype | None,
        scale: float,
        region: Region,
    ) -> StepResult:
        weighting = self.train.weighting
        return accumulate_gradients(
            model, self.diffusion, images, conditioning, generator, autocast, scale, region, weighting=weighting
        )

    def learning_rate(self, images_seen: int) -> float:
        return learning_rate(images_seen, self.train.optim)


@dataclass(frozen=True)
class Progressive:
    """Progressive distillation's loss (Salimans & Ho 2022, Algorithm 2, truncated-SNR weighting) against a frozen
    teacher that answers in the student's parameterisation, at a learning rate annealed linearly from ``peak_lr`` to
    0 over the round's ``total_images`` (their App. E)."""

    diffusion: GaussianDiffusion  # the student's
    teacher: nn.Module
    student_steps: int
    peak_lr: float
    total_images: int

    def accumulate(
        self,
        model: nn.Module,
        images: torch.Tensor,
        conditioning: dict[str, torch.Tensor] | None,
        generator: torch.Generator,
        autocast: torch.dtype | None,
        scale: float,
        region: Region,
    ) -> StepResult:
        return accumulate_progressive(
            self.diffusion,
            model,
            self.teacher,
            images,
            self.student_steps,
            conditioning,
            generator,
            autocast,
            scale,
            region,
        )

    def learning_rate(self, images_seen: int) -> float:
        return self.peak_lr * max(0.0, 1.0 - images_seen / self.total_images)


def objective_of(
    config: DiffusionConfig,
    train: TrainSection,
    distill: DistillTarget | None,
    device: torch.device,
    storage_options: dict[str, Any],
) -> Objective:
    """Training's objective for the network's diffusion ``config``, or with ``distill`` the round's: its teacher loaded
    on ``device``, frozen, and answering in ``config``'s (the student's) parameterisation."""
    diffusion = GaussianDiffusion.from_config(config)
    if distill is None:
        return Denoising(diffusion, train)
    snapshot = load_snapshot(distill.teacher_snapshot_uri, storage_options)
    network = snapshot.build_model().to(device).eval().requires_grad_(False)
    teacher = Reparameterized(network, GaussianDiffusion.from_config(snapshot.diffusion), diffusion.prediction)
    return Progressive(diffusion, teacher, distill.student_steps, train.optim.lr, train.total_images)
