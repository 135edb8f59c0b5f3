"""What a training step minimises, and at which learning rate: Algorithm 1 of Ho et al. (2020) when training, or in a
round of the distill stage progressive distillation's loss (Salimans & Ho 2022, Algorithm 2) or consistency
distillation's (Song et al. 2023, Algorithm 2). One loop
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
from ddpm_core.distillation import (
    ConsistencyFunction,
    Reparameterized,
    accumulate_loss,
    consistency_distillation_loss,
    consistency_grid,
    progressive_loss,
)
from ddpm_core.stable_targets import Reference
from ddpm_core.training import StepResult, accumulate_gradients, learning_rate
from pipelines.config import DistillMethod, TrainSection

Region = Callable[[str], AbstractContextManager[Any]]


@dataclass(frozen=True)
class DistillTarget:
    """What a distillation round's workers learn (part of their :class:`~pipelines.training.job.TrainJob`):
    progressive, to do in one DDIM step of a ``student_steps``-step grid what the teacher snapshot does in two;
    consistency, to map every point of the teacher's ``grid_steps``-step DDIM trajectories to its end (the student is
    then sampled at ``student_steps``)."""

    teacher_snapshot_uri: str
    student_steps: int
    method: DistillMethod = DistillMethod.PROGRESSIVE
    grid_steps: int = 0  # consistency: N, the teacher's DDIM steps along which the student learns to be consistent


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
        ema: nn.Module,
        reference: Reference | None,
    ) -> StepResult:
        """The loss of one micro-batch ``images`` ``[b, C, H, W]``, its gradient times ``scale`` added to ``model``'s
        ``.grad``; the random draws from ``generator``. ``ema``: the EMA network (a consistency round's target);
        ``reference``: the batch of training's stable targets (None: off; always, in a distill round)."""
        ...

    def learning_rate(self, images_seen: int) -> float:
        """The learning rate of the step taken after ``images_seen`` images."""
        ...


@dataclass(frozen=True)
class Denoising:
    """Algorithm 1 (Ho et al. 2020) with ``train.loss_weighting`` (and ``train.stf_reference``'s stable targets), at
    the warm-up learning rate of ``train``."""

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
        ema: nn.Module,
        reference: Reference | None,
    ) -> StepResult:
        return accumulate_gradients(
            model,
            self.diffusion,
            images,
            conditioning,
            generator,
            autocast,
            scale,
            region,
            weighting=self.train.weighting,
            reference=reference,
        )

    def learning_rate(self, images_seen: int) -> float:
        return learning_rate(images_seen, self.train.optim)


@dataclass(frozen=True)
class Distilling:
    """A distill round's objective: a loss against a frozen ``teacher`` that answers in the student's
    parameterisation, at a learning rate annealed linearly from ``peak_lr`` to 0 over the round's ``total_images``
    (Salimans & Ho 2022, App. E). Subclasses give the per-example loss."""

    diffusion: GaussianDiffusion  # the student's
    teacher: nn.Module
    peak_lr: float
    total_images: int

    def per_example(
        self,
        model: nn.Module,
        ema: nn.Module,
        images: torch.Tensor,
        conditioning: dict[str, torch.Tensor] | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The loss of each image of ``images`` ``[b, C, H, W]``, ``[b]``."""
        raise NotImplementedError

    def accumulate(
        self,
        model: nn.Module,
        images: torch.Tensor,
        conditioning: dict[str, torch.Tensor] | None,
        generator: torch.Generator,
        autocast: torch.dtype | None,
        scale: float,
        region: Region,
        ema: nn.Module,
        reference: Reference | None,
    ) -> StepResult:
        if reference is not None:
            raise ValueError("a distill round's targets are its teacher's: it takes no reference batch")

        def losses() -> torch.Tensor:
            return self.per_example(model, ema, images, conditioning, generator)

        return accumulate_loss(losses, images, autocast, scale, region)

    def learning_rate(self, images_seen: int) -> float:
        return self.peak_lr * max(0.0, 1.0 - images_seen / self.total_images)


@dataclass(frozen=True)
class Progressive(Distilling):
    """Progressive distillation's loss (Salimans & Ho 2022, Algorithm 2, truncated-SNR weighting): one student DDIM
    step of a ``student_steps``-step grid against two of the teacher's."""

    student_steps: int

    def per_example(
        self,
        model: nn.Module,
        ema: nn.Module,
        images: torch.Tensor,
        conditioning: dict[str, torch.Tensor] | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        return progressive_loss(
            self.diffusion, model, self.teacher, images, self.student_steps, generator, conditioning
        )


@dataclass(frozen=True)
class Consistency(Distilling):
    """Consistency distillation's loss (Song et al. 2023, Algorithm 2: d = L2, lambda = 1, the teacher's DDIM step as
    the ODE solver) on the ``grid`` of :func:`~ddpm_core.distillation.consistency_grid`, the student and its target
    network (the EMA of its weights at ``distill.target_ema``, theta^-) read through the skip scalings."""

    grid: torch.Tensor  # [N + 1] timesteps, increasing from the boundary

    def per_example(
        self,
        model: nn.Module,
        ema: nn.Module,
        images: torch.Tensor,
        conditioning: dict[str, torch.Tensor] | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        student, target = ConsistencyFunction(model, self.diffusion), ConsistencyFunction(ema, self.diffusion)
        return consistency_distillation_loss(
            self.diffusion, student, target, self.teacher, images, self.grid, generator, conditioning
        )


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
    if distill.method is DistillMethod.CONSISTENCY:
        grid = consistency_grid(diffusion.num_timesteps, distill.grid_steps)
        return Consistency(diffusion, teacher, train.optim.lr, train.total_images, grid)
    return Progressive(diffusion, teacher, train.optim.lr, train.total_images, distill.student_steps)
