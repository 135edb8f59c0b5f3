"""Elastic training's promise: a step whose global batch is split into equal shares, each with its own data slice
and random streams (batches, timesteps, noise, dropout), is the same computation on any number of workers. A group
shrunk from two workers to one takes both shares on the one worker (gradients accumulated, the all-reduce's mean
replaced by the shares' weights): the weights, the EMA and the logged loss equal the two-worker group's. The same
holds for training on stable targets (each share keeps its own reference bank) and for a distill round's objectives
(progressive distillation against a frozen teacher; consistency distillation against the teacher and the student's
EMA, its target network)."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
from torch.nn.parallel import DistributedDataParallel

from ddpm_core.data import random_batch
from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion, Prediction
from ddpm_core.distillation import Reparameterized, consistency_grid
from ddpm_core.training import OptimConfig, RunningTotals
from ddpm_core.unet import UNet
from pipelines.config import TrainSection
from pipelines.training.objective import Consistency, Objective, Progressive
from pipelines.training.state import Worker, fresh_shares
from pipelines.training.step import StepState, step, step_parts
from tests.conftest import free_port
from tests.test_sampling import TINY as SAMPLING_TINY

TINY = dataclasses.replace(SAMPLING_TINY, dropout=0.3)  # dropout draws from each share's own stream
SHARES, MICRO, STEPS = 2, 4, 4


def distill_objective(method: str, diffusion: GaussianDiffusion, train: TrainSection) -> Objective:
    """A distill round's objective for a v student of a frozen eps teacher (its own seeded weights): progressive to
    2 steps, or consistency along the teacher's 10-step DDIM trajectories."""
    torch.manual_seed(7)
    teacher = Reparameterized(UNet(TINY).eval().requires_grad_(False), diffusion, Prediction.V)
    student = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=100, prediction=Prediction.V))
    if method == "consistency":
        return Consistency(student, teacher, train.optim.lr, STEPS * train.batch_size, consistency_grid(100, 10))
    return Progressive(student, teacher, train.optim.lr, STEPS * train.batch_size, 2)


def train_on(rank: int, world: int, port: int, out: str, distill: str | None) -> None:
    """``STEPS`` steps of a group of ``world`` workers over ``SHARES`` shares (with ``distill``, of that distill
    method's objective; ``"stable"``: training on stable targets, a reference bank per share); rank 0 saves the
    result."""
    torch.set_num_threads(1)  # the same kernels' summation order in every process
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    device = torch.device("cpu")
    train = TrainSection(
        num_workers=(1, SHARES), batch_size=SHARES * MICRO, optim=OptimConfig(lr=1e-3, warmup_images=0, ema_decay=0.9)
    )
    torch.manual_seed(0)

    def wrap(model: torch.nn.Module, options: dict) -> torch.nn.Module:
        return DistributedDataParallel(model, **options) if world > 1 else model

    parts = step_parts(UNet(TINY), train, device, wrap)
    reduce = dist.all_reduce if world > 1 else None
    worker = Worker(rank, world, device, reduce, SHARES, tuple(range(rank, SHARES, world)))  # as Worker.current
    reference = 3 * MICRO if distill == "stable" else 0  # each share's bank: its last three micro-batches
    state = StepState(*parts, fresh_shares(0, worker, 0, reference), gradient_scale=world / SHARES)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=100))
    objective = distill_objective(distill, diffusion, train) if distill in ("progressive", "consistency") else None
    data = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1  # [64, 1, 8, 8]
    totals = RunningTotals(device, reduce)
    for _ in range(STEPS):
        layout = torch.contiguous_format
        batches = [
            (random_batch(data[share.index :: SHARES], MICRO, share.generator, True, layout)[0], None)
            for share in state.shares
        ]
        totals.add(step(state, diffusion, batches, train, None, objective=objective))
        state.advance(train.batch_size)
    window = totals.summed()
    if rank == 0:
        saved = {"model": state.model.state_dict(), "ema": state.ema.model.state_dict(), "means": window.means()}
        torch.save(saved, out)
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "distill", [None, "stable", "progressive", "consistency"], ids=["training", "stable-targets", "progressive", "cd"]
)
def test_one_worker_taking_both_shares_equals_two_workers(tmp_path, distill):
    alone, pair = tmp_path / "alone.pt", tmp_path / "pair.pt"
    # both groups at once (one thread per process: the same sums as one at a time), the lone worker's joined last
    lone = torch.multiprocessing.spawn(train_on, args=(1, 0, str(alone), distill), nprocs=1, join=False)
    torch.multiprocessing.spawn(train_on, args=(2, free_port(), str(pair), distill), nprocs=2)
    while not lone.join():  # raises the worker's error
        pass
    one, two = torch.load(alone), torch.load(pair)
    for part in ("model", "ema"):
        assert one[part].keys() == two[part].keys()
        unequal = [name for name in one[part] if not torch.equal(one[part][name], two[part][name])]
        assert not unequal, f"{part}: {len(unequal)} tensors differ, e.g. {unequal[:3]}"
    assert one["means"] == two["means"], "the logged loss, gradient norm and quartile losses are the same numbers"
    assert one["means"]["loss"] > 0 and one["means"]["grad_norm"] > 0
