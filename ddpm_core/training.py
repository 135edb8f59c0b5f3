"""One optimisation step of DDPM training (Ho et al. 2020, Algorithm 1), shared by the demo and the Ray trainer."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.ema import EMA
from ddpm_core.fields import check_ranges
from ddpm_core.loss_weighting import LossWeighting
from ddpm_core.stable_targets import Reference


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation hyperparameters (defaults: the paper's CIFAR-10 run, Appendix B)."""

    lr: float = 2e-4  # Adam learning rate after warm-up
    warmup_images: int = 640_000  # linear lr warm-up length in images (5,000 steps x batch 128)
    # inverse square-root decay after this many images (Karras et al. 2024): lr * sqrt(t_ref / t) once t > t_ref;
    # 0: constant after the warm-up (the paper's). It needs no run length, so a resumed or extended run keeps it.
    lr_decay_images: int = 0
    grad_clip: float = 1.0  # max global gradient norm (<= 0 disables clipping)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    ema_decay: float = 0.9999
    ema_warmup: bool = False

    def __post_init__(self) -> None:
        check_ranges(
            "optim",
            {
                "lr": (self.lr > 0, self.lr),
                "warmup_images": (self.warmup_images >= 0, self.warmup_images),
                "lr_decay_images": (self.lr_decay_images >= 0, self.lr_decay_images),
                "weight_decay": (self.weight_decay >= 0, self.weight_decay),
                "ema_decay": (0 <= self.ema_decay < 1, self.ema_decay),
            },
        )


def learning_rate(images_seen: int, config: OptimConfig) -> float:
    """Linear warm-up from 0 to ``config.lr`` over ``warmup_images`` images, then constant, or with
    ``lr_decay_images`` = t_ref > 0 falling as ``lr / sqrt(max(t / t_ref, 1))`` (Karras et al. 2024's decay)."""
    warmup = 1.0 if config.warmup_images <= 0 else min(1.0, images_seen / config.warmup_images)
    decay = 1.0 if config.lr_decay_images <= 0 else math.sqrt(min(1.0, config.lr_decay_images / max(images_seen, 1)))
    return config.lr * warmup * decay


def make_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    fused = all(p.device.type == "cuda" for p in model.parameters())
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)


def drop_labels(
    labels: torch.Tensor, null_class: int, probability: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label ``[B]`` by the null class with ``probability`` (Ho & Salimans 2022, Algorithm 1), drawn on
    the generator's device (a CUDA generator: no host work)."""
    device = generator.device if generator is not None else labels.device
    drop = torch.rand(labels.shape[0], generator=generator, device=device) < probability  # [B]
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)


def quartile_sums(t: torch.Tensor, values: torch.Tensor, num_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and counts ``[4]`` of per-example ``values`` by timestep quartile (improved-diffusion's ``loss_q0..q3``)."""
    quartile = (4 * t // num_timesteps).clamp(max=3)
    sums = torch.zeros(4, dtype=torch.float64, device=values.device).index_add_(0, quartile, values.detach().double())
    counts = torch.zeros(4, dtype=torch.float64, device=values.device).index_add_(
        0, quartile, torch.ones_like(values, dtype=torch.float64)
    )
    return sums, counts


@dataclass
class StepResult:
    """Device tensors (no host synchronisation): read them only at logging intervals. A worker that takes several
    micro-batches in a step sums their statistics, so that means over a window weight every micro-batch alike."""

    loss: torch.Tensor  # [] the mean loss of each micro-batch, summed
    grad_norm: torch.Tensor  # [] global gradient norm before clipping, times micro_batches
    quartile_loss_sum: torch.Tensor  # [4]
    quartile_count: torch.Tensor  # [4]
    micro_batches: int = 1  # how many equal micro-batches ``loss`` sums the means of (``grad_norm`` is times this)


@dataclass(frozen=True)
class WindowTotals:
    """The summed statistics of one logging window, on the host: what :meth:`RunningTotals.summed` returns."""

    loss_sum: float  # non-finite once any step on any worker diverged
    steps: float  # micro-batches summed over workers and steps (one per worker and step in a fixed group)
    grad_norm_sum: float
    quartile_loss_sums: tuple[float, ...]  # [4]
    quartile_counts: tuple[float, ...]  # [4]

    def means(self) -> dict[str, float]:
        """Means over the window's steps: ``loss``, ``grad_norm`` and ``loss_q0..3`` (the quartiles that saw a step)."""
        means = {"loss": self.loss_sum / self.steps, "grad_norm": self.grad_norm_sum / self.steps}
        means.update(
            {
                f"loss_q{q}": total / count
                for q, (total, count) in enumerate(zip(self.quartile_loss_sums, self.quartile_counts, strict=True))
                if count > 0
            }
        )
        return means


class RunningTotals:
    """The :class:`StepResult` s of the steps since the last :meth:`restart`, summed on the device, so that a training
    step never waits for the host: read at log and checkpoint steps only (one collective and one device-to-host copy).

    ``reduce`` sums a tensor in place over the data-parallel workers (``torch.distributed.all_reduce``); every worker
    must then call :meth:`summed` at the same steps."""

    def __init__(self, device: torch.device, reduce: Callable[[torch.Tensor], Any] | None = None) -> None:
        # loss sum, micro-batches (one per worker and step in a fixed group), grad-norm sum,
        # per-quartile loss sums [4], per-quartile counts [4]
        self.sums = torch.zeros(11, dtype=torch.float64, device=device)  # [11]
        self.one = torch.ones(1, dtype=torch.float64, device=device)  # [1]
        self.reduce = reduce

    def add(self, result: StepResult) -> None:
        self.sums += torch.cat(
            [
                result.loss.double().reshape(1),
                self.one * result.micro_batches,
                result.grad_norm.double().reshape(1),
                result.quartile_loss_sum,
                result.quartile_count,
            ]
        )

    def summed(self) -> WindowTotals:
        """The sums since the last :meth:`restart` over the steps of all workers; the window goes on."""
        sums = self.sums.clone()  # [11]
        if self.reduce is not None:
            self.reduce(sums)
        values = sums.tolist()
        return WindowTotals(values[0], values[1], values[2], tuple(values[3:7]), tuple(values[7:11]))

    def restart(self) -> None:
        """Starts a new window (after its means were logged)."""
        self.sums.zero_()


def train_step(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    optimizer: torch.optim.Optimizer,
    x0: torch.Tensor,
    config: OptimConfig,
    images_seen: int,
    ema: EMA | None = None,
    model_kwargs: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    region: Callable[[str], AbstractContextManager[Any]] = record_function,
    *,
    weighting: LossWeighting | None = None,
) -> StepResult:
    """Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), a gradient step on the configured loss, then the EMA update.

    ``x0`` is ``[B, C, H, W]`` in [-1, 1]. ``images_seen`` (before this step) sets the warm-up learning rate.
    ``t`` and ``eps`` are drawn on ``generator``'s device; nothing here waits for the device (the result holds
    device tensors). ``region`` labels the forward, backward, optimizer and EMA parts: the profiler's
    ``record_function`` by default (free when no profiler runs), or a benchmark's clock.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    part = accumulate_gradients(
        model, diffusion, x0, model_kwargs, generator, autocast_dtype, 1.0, region, weighting=weighting
    )
    grad_norm = apply_update(model, optimizer, config, images_seen, ema, region)
    return dataclasses.replace(part, grad_norm=grad_norm)


def accumulate_gradients(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    model_kwargs: dict[str, Any] | None,
    generator: torch.Generator | None,
    autocast_dtype: torch.dtype | None,
    scale: float,
    region: Callable[[str], AbstractContextManager[Any]] = record_function,
    *,
    weighting: LossWeighting | None = None,
    reference: Reference | None = None,
) -> StepResult:
    """The loss of Algorithm 1 on one micro-batch ``x0`` ``[b, C, H, W]``, its gradient times ``scale`` added to the
    parameters' ``.grad``: a global batch split into micro-batches of equal size ``b`` is the same gradient when each
    is scaled by its share of the batch (1 / micro-batches). The result's ``grad_norm`` is zero (no update yet).
    ``weighting`` reweights the loss per timestep (:meth:`GaussianDiffusion.training_losses`); the result's loss and
    quartile sums are of the weighted loss. ``reference``: the batch of the stable targets (Xu et al. 2023), None for
    Algorithm 1's own."""
    batch = x0.shape[0]
    draw_on = generator.device if generator is not None else x0.device  # a CUDA generator: no host round trip
    t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=generator, device=draw_on).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=draw_on).to(x0.device, x0.dtype)
    with (
        region("forward"),
        torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None),
    ):
        terms = diffusion.training_losses(model, x0, t, noise, model_kwargs, weighting, reference)
        loss = terms["loss"].mean()
    with region("backward"):
        (loss if scale == 1.0 else loss * scale).backward()
    sums, counts = quartile_sums(t, terms["loss"], diffusion.num_timesteps)
    return StepResult(loss.detach(), torch.zeros((), device=loss.device), sums, counts)


def apply_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: OptimConfig,
    images_seen: int,
    ema: EMA | None,
    region: Callable[[str], AbstractContextManager[Any]] = record_function,
    lr: float | None = None,
) -> torch.Tensor:
    """The update of Algorithm 1 from the accumulated gradients: clip their global norm, an AdamW step at ``lr``
    (None: the warm-up learning rate of ``images_seen``), then the EMA; returns the norm before clipping ``[]``."""
    with region("optimizer"):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(images_seen, config) if lr is None else lr
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
    with region("ema"):
        if ema is not None:
            ema.update(model)
    return grad_norm.detach()
