"""The first stage of latent diffusion trained on Ray Train: LDM's KL-regularised autoencoder (Rombach et al. 2022,
Sec. 3.1 and App. G; :func:`ddpm_core.autoencoder.autoencoder_train_step`) with DDP over ``autoencoder.num_workers``
workers, checkpoints reported to Ray Train every ``autoencoder.checkpoint_every_images`` (a re-run of the same job
resumes from the latest), and a stop the driver asks for (a signal) honoured at the next step with a checkpoint.
With ``autoencoder.discriminator_start_images``, LDM's patch discriminator joins after that many images
(:mod:`ddpm_core.discriminator`); it is checkpointed with the autoencoder and left out of the saved folder.

Every step draws one global batch of ``autoencoder.batch_size`` training images with a generator seeded by
(``seed``, step), and each worker takes every ``world``-th of them: the batches, and so the trained weights up to
floating-point summation order, do not depend on the worker count (with a discriminator they do: each worker weighs
the adversarial term by its own gradients, as LDM's workers do). A worker's posterior draws are seeded by (``seed``,
step, rank)."""

from __future__ import annotations

import functools
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from ddpm_core.autoencoder import AutoencoderConfig, KLAutoencoder, autoencoder_train_step
from ddpm_core.autoencoder_weights import save_autoencoder
from ddpm_core.data import to_model_range
from ddpm_core.discriminator import Adversary, PatchDiscriminator, make_discriminator_optimizer
from ddpm_core.storage import commit, filesystem, is_committed, read_committed
from ddpm_core.training import OptimConfig, make_optimizer
from pipelines.config import AutoencoderSection
from pipelines.context import StageStopped
from pipelines.data.shards import read_split
from pipelines.execution import Device, train_storage
from pipelines.training.state import prepare_for_ray_train
from pipelines.training.trainer import off_the_main_thread, without_print_patch

STATE_FILE = "autoencoder_state.pt"
STOP_FILE = "requested.txt"
DIVERGED_FILE = "diverged.txt"
LOG_EVERY_STEPS = 50
# step terms -> MLflow metrics, once the discriminator has joined
ADVERSARIAL_METRICS = {
    "discriminator": "discriminator_hinge_loss",
    "logits_real": "discriminator_logits_real",  # mean logit on real images
    "logits_fake": "discriminator_logits_fake",  # and on reconstructions
    "adversarial": "autoencoder_adversarial",  # -E[D(x_hat)]
    "adaptive_weight": "autoencoder_adaptive_weight",  # Esser et al. 2021, Eq. 7, times discriminator_weight
}
POLL_S = 0.5  # how often rank 0 looks for the driver's stop marker


@dataclass(frozen=True)
class AutoencoderJob:
    """Everything an autoencoder worker needs; workers read no config file and no environment."""

    network: AutoencoderConfig
    section: AutoencoderSection  # images, batch, learning rate, KL weight, seed, checkpoint interval
    shards_uri: str  # the training split (pipelines.data.shards)
    work_uri: str  # the stage's result folder: checkpoints, the stop marker, the trained folder
    storage_options: dict[str, Any]
    tracking_uri: str
    mlflow_run_id: str  # rank 0 logs the loss terms here
    device: Device = Device.CPU

    @property
    def optim(self) -> OptimConfig:
        """AdamW at ``learning_rate`` after a linear warm-up over the first 5% of the images, gradients clipped at 1
        (the settings ``benchmarks/autoencoder_rfid.py`` measured)."""
        section = self.section
        return OptimConfig(lr=section.learning_rate, warmup_images=section.images // 20, grad_clip=1.0, ema_decay=0.0)

    @property
    def folder_uri(self) -> str:
        """The trained autoencoder, a diffusers ``AutoencoderKL`` folder."""
        return f"{self.work_uri}/autoencoder"

    @property
    def stop_uri(self) -> str:
        """Committed by the driver when a signal asks the workers to checkpoint and leave."""
        return f"{self.work_uri}/stop"

    @property
    def diverged_uri(self) -> str:
        """Committed by rank 0 when the loss became non-finite: what to change."""
        return f"{self.work_uri}/diverged"

    @property
    def trainer_uri(self) -> str:
        return f"{self.work_uri}/ray"


class StopFlag:
    """Rank 0 looks for the driver's stop marker in a background thread; every rank learns of it, and of a
    non-finite loss on any rank, at the same step through one all-reduce, so that all of them act at that step."""

    def __init__(self, job: AutoencoderJob, rank: int, world: int) -> None:
        self.job, self.world, self.seen = job, world, threading.Event()
        if rank == 0:
            threading.Thread(target=self.poll, daemon=True).start()

    def poll(self) -> None:
        while not self.seen.is_set():
            if is_committed(self.job.stop_uri, self.job.storage_options):
                self.seen.set()
            time.sleep(POLL_S)

    def agreed(self, loss: torch.Tensor) -> tuple[bool, bool]:
        """(stop asked, some rank's ``loss`` non-finite), the same on every rank."""
        flags = torch.tensor([float(self.seen.is_set()), float(not torch.isfinite(loss).item())])
        if self.world > 1:
            dist.all_reduce(flags)
        return bool(flags[0] > 0), bool(flags[1] > 0)


def autoencoder_loop(job: AutoencoderJob) -> None:
    """Train until ``autoencoder.images`` images were seen (all workers together), then rank 0 saves the folder."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    section = job.section
    device = ray.train.torch.get_device() if job.device is Device.GPU else torch.device("cpu")
    images, _ = read_split(job.shards_uri, job.storage_options)
    data = torch.from_numpy(images).to(device)  # [N, H, W, C] uint8: a quarter of float32's memory
    torch.manual_seed(section.seed)  # identical initial weights on every rank
    network = KLAutoencoder(job.network).to(device)
    optimizer = make_optimizer(network, job.optim)
    adversary = make_adversary(job, world, device)
    state = training_state(network, optimizer, adversary)
    seen, step = resume(state, device)
    model = ddp(network, world)
    client = MlflowClient(job.tracking_uri) if rank == 0 else None
    if client is not None and seen > 0:  # where a re-run (or a restarted group) picked up
        client.log_metric(job.mlflow_run_id, "autoencoder_resumed_at_images", seen, step=step)
    stop, every = StopFlag(job, rank, world), section.checkpoint_every_images
    while seen < section.images:
        batch_generator = torch.Generator().manual_seed(hash_seed(section.seed, step, -1))
        picked = torch.randint(0, len(data), (section.batch_size,), generator=batch_generator)  # [B]
        mine = to_model_range(data[picked[rank::world].to(device)])  # [B / world, C, H, W] in [-1, 1]
        noise = torch.Generator(device).manual_seed(hash_seed(section.seed, step, rank))
        terms = autoencoder_train_step(
            model,  # type: ignore[arg-type]
            optimizer,
            mine,
            job.optim,
            seen,
            section.kl_weight,
            noise,
            adversary=adversary,
        )
        seen, step = seen + section.batch_size, step + 1
        if client is not None and (step == 1 or step % LOG_EVERY_STEPS == 0 or seen >= section.images):
            log_terms(client, job.mlflow_run_id, terms, seen, step)
        stopping, diverged = stop.agreed(terms["loss"])
        if diverged:  # no checkpoint of diverged weights: the last one stays the newest
            if rank == 0:
                record_divergence(job, seen)
            return
        if seen // every > (seen - section.batch_size) // every or seen >= section.images or stopping:
            report(state, (seen, step), rank, world)
            if rank == 0:
                say_progress(seen, section.images, terms)
        if stopping:
            return
    if rank == 0:
        save_autoencoder(network.eval(), job.folder_uri, job.storage_options)


def say_progress(seen: int, total: int, terms: dict[str, torch.Tensor]) -> None:
    """A line in the job's output at each checkpoint (rank 0's step L1, per pixel)."""
    l1 = float(terms["l1"].mean())
    print(f"autoencoder: {seen:,} of {total:,} images, L1 {l1:.4f}, checkpoint recorded", flush=True)


def record_divergence(job: AutoencoderJob, seen: int) -> None:
    """What to change when the loss became non-finite by ``seen`` images, committed for the driver to raise."""
    section = job.section
    adversarial = section.discriminator_start_images is not None and seen > section.discriminator_start_images
    discriminator = (
        f", or autoencoder.discriminator_weight (now {section.discriminator_weight}: the discriminator joined at "
        f"{section.discriminator_start_images} images)"
        if adversarial
        else ""
    )
    message = (
        f"autoencoder training diverged: the loss became non-finite by {seen} images. Lower autoencoder.learning_rate "
        f"(now {section.learning_rate}) or autoencoder.kl_weight (now {section.kl_weight}){discriminator}; the last "
        "checkpoint is kept, but resuming with the same settings would diverge again"
    )
    commit(job.diverged_uri, {DIVERGED_FILE: message.encode()}, {}, job.storage_options)


def hash_seed(seed: int, step: int, rank: int) -> int:
    """A generator seed for (``seed``, step, rank); rank -1: the global batch's."""
    return (seed * 1_000_003 + step) * 1_009 + rank + 1


def make_adversary(job: AutoencoderJob, world: int, device: torch.device) -> Adversary | None:
    """LDM's patch discriminator and its optimizer, when ``autoencoder.discriminator_start_images`` is set (seeded
    by ``autoencoder.seed`` after the autoencoder: the same on every rank)."""
    config = job.section.discriminator
    if config is None:
        return None
    module = PatchDiscriminator(job.network.in_channels, config).to(device)
    optimizer = make_discriminator_optimizer(module, job.section.learning_rate)
    return Adversary(ddp(module, world), module, optimizer, config)


def ddp(network: nn.Module, world: int) -> nn.Module:
    """``network`` wrapped by DDP on several workers (its gradients as views into the all-reduce buckets)."""
    return prepare_for_ray_train(network, {"gradient_as_bucket_view": True}) if world > 1 else network


def training_state(
    network: nn.Module, optimizer: torch.optim.Optimizer, adversary: Adversary | None
) -> dict[str, nn.Module | torch.optim.Optimizer]:
    """What a checkpoint holds, by name: the autoencoder and its optimizer, and the discriminator and its optimizer
    when there is one."""
    state: dict[str, nn.Module | torch.optim.Optimizer] = {"model": network, "optimizer": optimizer}
    if adversary is not None:
        state |= {"discriminator": adversary.module, "discriminator_optimizer": adversary.optimizer}
    return state


def resume(state: dict[str, nn.Module | torch.optim.Optimizer], device: torch.device) -> tuple[int, int]:
    """The images seen and steps taken at the latest checkpoint Ray Train hands this group (0, 0 when none), with
    every part of the training ``state`` restored from it."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0
    with checkpoint.as_directory() as directory:
        saved = torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=True)
    for name, part in state.items():
        part.load_state_dict(saved[name])
    return int(saved["images_seen"]), int(saved["step"])


def report(
    state: dict[str, nn.Module | torch.optim.Optimizer], progress: tuple[int, int], rank: int, world: int
) -> None:
    """Every rank reports (Ray Train's barrier) the images seen and steps taken (``progress``) and the group's size;
    rank 0 adds the training ``state`` a restarted group resumes from."""
    seen, step = progress
    metrics = {"images_seen": seen, "step": step, "world_size": world}
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            saved = {name: part.state_dict() for name, part in state.items()}
            torch.save({**saved, "images_seen": seen, "step": step}, Path(directory) / STATE_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:010d}")


def log_terms(client: MlflowClient, run_id: str, terms: dict[str, torch.Tensor], seen: int, step: int) -> None:
    """The step's mean L1 (per pixel), KL (nats per image) and gradient norm, and the adversarial terms once the
    discriminator has joined, at ``step``."""
    values = {
        "autoencoder_l1": float(terms["l1"].mean()),
        "autoencoder_kl": float(terms["kl"].mean()),
        "autoencoder_grad_norm": float(terms["grad_norm"]),
        "autoencoder_images_seen": float(seen),
    }
    values |= {metric: float(terms[term]) for term, metric in ADVERSARIAL_METRICS.items() if term in terms}
    for name, value in values.items():
        client.log_metric(run_id, name, value, step=step)


def make_trainer(job: AutoencoderJob, runtime_env: dict[str, Any]) -> TorchTrainer:
    """A trainer of :func:`autoencoder_loop` on ``autoencoder.num_workers`` workers (a CPU each, and a GPU each on
    a GPU device), its checkpoints under ``job.trainer_uri`` (a re-run of the same job resumes from the latest)."""
    storage_path, storage_filesystem = train_storage(job.trainer_uri, job.storage_options)
    gpu = job.device is Device.GPU
    return TorchTrainer(
        functools.partial(autoencoder_loop, job),
        scaling_config=ScalingConfig(
            num_workers=job.section.num_workers, use_gpu=gpu, resources_per_worker=bundle(gpu)
        ),
        # ray.train re-exports Train V2's RunConfig and FailureConfig at run time; mypy sees the V1 classes.
        run_config=RunConfig(
            name="autoencoder",
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,  # type: ignore[call-arg]
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=1),
            worker_runtime_env=without_print_patch(runtime_env),
        ),
    )


def bundle(gpu: bool) -> dict[str, float]:
    """One worker's resources."""
    return {"CPU": 1.0, **({"GPU": 1.0} if gpu else {})}


def fit(trainer: TorchTrainer, job: AutoencoderJob) -> Result:
    """``trainer.fit()`` off the main thread (Ray Train V2 takes over its SIGINT handler), after removing the markers
    an earlier attempt left; :class:`StageStopped` with what to change when the loss diverged."""
    for uri in (job.stop_uri, job.diverged_uri):
        fs, path = filesystem(uri, job.storage_options)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    result = off_the_main_thread(trainer.fit)
    if is_committed(job.diverged_uri, job.storage_options):
        message = read_committed(job.diverged_uri, [DIVERGED_FILE], job.storage_options)[0][DIVERGED_FILE]
        raise StageStopped(message.decode())
    return result


def ask_to_stop(job: AutoencoderJob) -> None:
    """A signal's safe point: the workers checkpoint at their next step and leave (from a thread of its own, as this
    runs in a signal handler)."""

    def request() -> None:
        commit(job.stop_uri, {STOP_FILE: b"a signal to the driver"}, {}, job.storage_options)

    threading.Thread(target=request, daemon=True).start()
