"""One training step, as a worker takes it: what it runs (the network, the model a step calls, its EMA and optimizer,
built by :func:`step_parts` as the ``train`` section configures them) and :func:`step` itself. Free of Ray and MLflow,
so that ``benchmarks/train_step.py`` times this same step on machines that have neither."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.ema import EMA
from ddpm_core.training import StepResult, make_optimizer, train_step
from pipelines.config import TrainSection


@dataclass
class StepState:
    """What a training step reads and updates on one worker; ``images_seen`` counts the images of all workers."""

    model: nn.Module  # the bare network, whose weights DDP keeps in sync
    step_model: nn.Module  # what a training step calls: the DDP wrapper, compiled when asked
    ema: EMA
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # this worker's batches, timesteps and noise, on its device
    images_seen: int = 0
    step: int = 0

    def advance(self, images: int) -> None:
        self.images_seen, self.step = self.images_seen + images, self.step + 1


Wrap = Callable[[nn.Module, dict[str, Any]], nn.Module]  # (network, DDP options) -> the data-parallel wrapper


def step_parts(
    model: nn.Module, train: TrainSection, device: torch.device, wrap: Wrap
) -> tuple[nn.Module, nn.Module, EMA, torch.optim.Optimizer]:
    """What a training step runs, as the train section configures it: the network (in its memory format), the model a
    step calls (wrapped for data parallelism by ``wrap`` with the pipeline's DDP options, compiled when asked on this
    device), its EMA and its AdamW. The workers build theirs here (``wrap``: Ray Train's ``prepare_model``), and so
    does ``benchmarks/train_step.py`` (``wrap``: ``DistributedDataParallel``), so that it times this step."""
    model = model.to(memory_format=torch.channels_last if train.channels_last else torch.contiguous_format)
    wrapped = wrap(model, {"gradient_as_bucket_view": train.gradient_as_bucket_view})
    network = cast(nn.Module, wrapped.module) if isinstance(wrapped, DistributedDataParallel) else wrapped
    step_model = cast(nn.Module, torch.compile(wrapped)) if train.compiled(device.type == "cuda") else wrapped
    ema = EMA(network, train.optim.ema_decay, train.optim.ema_warmup)
    return network, step_model, ema, make_optimizer(network, train.optim)


def step(
    state: StepState,
    diffusion: GaussianDiffusion,
    batch: tuple[torch.Tensor, dict[str, torch.Tensor] | None],
    train: TrainSection,
    autocast: torch.dtype | None,
    region: Callable[[str], AbstractContextManager[Any]] = record_function,
) -> StepResult:
    """One training step of ``state`` on ``batch`` (images ``[B, C, H, W]`` in [-1, 1], and a conditional model's
    labels): Algorithm 1 with the EMA update (``ddpm_core.training.train_step``); ``region`` labels its parts."""
    images, conditioning = batch
    return train_step(
        state.step_model,
        diffusion,
        state.optimizer,
        images,
        train.optim,
        state.images_seen,
        state.ema,
        conditioning,
        generator=state.generator,
        autocast_dtype=autocast,
        region=region,
    )
