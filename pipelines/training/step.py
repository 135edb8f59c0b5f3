"""One training step, as a worker takes it: what it runs (the network, the model a step calls, its EMA and optimizer,
built by :func:`step_parts` as the ``train`` section configures them) and :func:`step` itself. Free of Ray and MLflow,
so that ``benchmarks/train_step.py`` times this same step on machines that have neither."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.ema import EMA
from ddpm_core.phema import PowerEMA
from ddpm_core.stable_targets import Reference, ReferenceBank
from ddpm_core.training import StepResult, apply_update, make_optimizer
from pipelines.config import TrainSection
from pipelines.training.objective import Denoising, Objective

Batch = tuple[torch.Tensor, dict[str, torch.Tensor] | None]  # images [b, C, H, W] in [-1, 1], conditioning


def device_generator(device: torch.device) -> torch.Generator:
    """The device's default generator: what dropout draws from."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


@dataclass
class Share:
    """One of the global batch's ``train.max_workers`` equal shares: its own data slice and random streams, whichever
    worker takes it. A group of fewer workers (elastic training) takes several shares per worker, one micro-batch
    each, so that a step is the same computation at any group size."""

    index: int  # 0 .. max_workers - 1: which slice of the data and which random streams
    generator: torch.Generator  # its batches, timesteps and noise, on the worker's device
    dropout_state: torch.Tensor  # the device default generator's state (what dropout draws) after its last turn
    bank: ReferenceBank | None = None  # the images it drew last, with train.stf_reference (stable targets)

    def reference(self, batch: Batch) -> Reference | None:
        """The reference batch of the stable targets that ``batch`` is trained against (None: they are off)."""
        if self.bank is None:
            return None
        images, conditioning = batch
        return self.bank.push(images, None if conditioning is None else conditioning.get("class_labels"))

    @contextmanager
    def turn(self, device: torch.device) -> Iterator[None]:
        """Dropout draws from this share's stream while the block runs (the device's default generator)."""
        default = device_generator(device)
        default.set_state(self.dropout_state)
        try:
            yield
        finally:
            self.dropout_state = default.get_state()


@dataclass
class StepState:
    """What a training step reads and updates on one worker; ``images_seen`` counts the images of all workers."""

    model: nn.Module  # the bare network, whose weights DDP keeps in sync
    step_model: nn.Module  # what a training step calls: the DDP wrapper, compiled when asked
    ema: EMA
    optimizer: torch.optim.Optimizer
    shares: list[Share]  # the shares of the global batch this worker takes, in order
    gradient_scale: float = 1.0  # group size / shares: the all-reduce's mean over workers becomes one over shares
    images_seen: int = 0
    step: int = 0
    profiles: PowerEMA | None = None  # the post-hoc EMA profiles (train.ema_profiles), kept by rank 0 only

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
    ema = EMA(network, train.optim.ema_decay, train.optim.ema_warmup, train.tracked_sigma_rel)
    return network, step_model, ema, make_optimizer(network, train.optim)


def step(
    state: StepState,
    diffusion: GaussianDiffusion,
    batches: Sequence[Batch],
    train: TrainSection,
    autocast: torch.dtype | None,
    region: Callable[[str], AbstractContextManager[Any]] = record_function,
    objective: Objective | None = None,
) -> StepResult:
    """One training step of ``state``: ``objective``'s loss (None: Algorithm 1 of Ho et al. 2020 on ``diffusion``) on
    one micro-batch per share (``batches[i]`` is ``state.shares[i]``'s, each with its own random streams and reference
    batch), their gradients accumulated with the all-reduce only after the last, then one update at the objective's
    learning rate with the EMA (``ddpm_core.training``) and of the post-hoc EMA profiles, if kept (Karras et al. 2024,
    Eq. 127: the images seen after this step); ``region`` labels its parts."""
    chosen: Objective = objective if objective is not None else Denoising(diffusion, train)
    device = batches[0][0].device
    state.step_model.train()
    state.optimizer.zero_grad(set_to_none=True)
    results = []
    for index, (share, batch) in enumerate(zip(state.shares, batches, strict=True)):
        last = index == len(batches) - 1
        with share.turn(device), nullcontext() if last else no_sync(state.step_model):
            results.append(
                chosen.accumulate(
                    state.step_model,
                    *batch,
                    share.generator,
                    autocast,
                    state.gradient_scale,
                    region,
                    state.ema.model,
                    share.reference(batch),
                )
            )
    lr = chosen.learning_rate(state.images_seen)
    grad_norm = apply_update(state.model, state.optimizer, train.optim, state.images_seen, state.ema, region, lr)
    if state.profiles is not None:
        with region("ema"):
            state.profiles.update(state.model, state.images_seen + train.batch_size, train.batch_size)
    return summed(results, grad_norm)


def no_sync(step_model: nn.Module) -> AbstractContextManager[Any]:
    """DDP's gradient all-reduce skipped while the block runs (a micro-batch before the last); nothing to skip for a
    worker alone."""
    ddp = getattr(step_model, "_orig_mod", step_model)  # torch.compile's wrapper holds the DDP module
    return ddp.no_sync() if isinstance(ddp, DistributedDataParallel) else nullcontext()


def summed(results: list[StepResult], grad_norm: torch.Tensor) -> StepResult:
    """The statistics of a step's micro-batches, summed (:class:`ddpm_core.training.StepResult`)."""
    if len(results) == 1:
        first = results[0]
        return StepResult(first.loss, grad_norm, first.quartile_loss_sum, first.quartile_count)
    return StepResult(
        torch.stack([result.loss.double() for result in results]).sum(),  # as the window sums them
        grad_norm * len(results),
        torch.stack([result.quartile_loss_sum for result in results]).sum(0),
        torch.stack([result.quartile_count for result in results]).sum(0),
        len(results),
    )
