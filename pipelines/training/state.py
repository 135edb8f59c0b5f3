"""What a training worker holds: its place in the worker group, and the training state (network, EMA, optimizer,
progress) with the one function that decides where the starting weights come from."""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from ddpm_core.checkpoint import CheckpointError, load_snapshot, load_training_state, save_snapshot
from ddpm_core.compile_cache import cache_file_uri, load_compiled, save_compiled
from ddpm_core.diffusion import Variance
from ddpm_core.phema import PowerEMA
from ddpm_core.stable_targets import ReferenceBank
from ddpm_core.storage import committed_folders
from ddpm_core.unet import UNet, UNetConfig
from pipelines.advice import slow_precision_advice
from pipelines.training.job import TrainJob
from pipelines.training.step import Share, StepState, step_parts


@dataclass(frozen=True)
class Worker:
    """This process's place in the data-parallel group."""

    rank: int
    world_size: int
    device: torch.device
    all_reduce: Callable[[torch.Tensor], Any] | None  # sums a tensor over the group in place (None: one worker)
    share_count: int  # the global batch's shares (train.max_workers): one per worker in a group of the most workers
    shares: tuple[int, ...]  # the shares this worker takes: rank, rank + world size, ...

    @classmethod
    def current(cls, share_count: int) -> Worker:
        """This process in its group, taking every world-size-th of ``share_count`` shares from its rank."""
        context = ray.train.get_context()
        world, rank = context.get_world_size(), context.get_world_rank()
        reduce = dist.all_reduce if world > 1 and dist.is_initialized() else None
        device = ray.train.torch.get_device()
        return cls(rank, world, device, reduce, share_count, tuple(range(rank, share_count, world)))

    def say(self, message: str) -> None:
        """A line in the job's output, from rank 0 only."""
        if self.rank == 0:
            print(f"train: {message}", flush=True)


class WeightSource(enum.Enum):
    """Where a worker group's starting weights come from, in order of precedence."""

    RESUMED = "resumed"  # this run's latest Ray Train checkpoint (a restart): network, EMA, optimizer and progress
    WARM_START = "warm start"  # another run's training state (the best tune trial): network and EMA
    INIT_SNAPSHOT = "init snapshot"  # a snapshot's weights (train.init_from, e.g. the champion's): the network
    FRESH = "fresh"  # the initialisation seeded by train.seed


@dataclass
class TrainState(StepState):
    """The training state of one worker (what a step touches, and what a checkpoint adds)."""

    unsaved_compile_cache: str | None = None  # where to store the compiled artifacts after the first step (rank 0)

    def to_checkpoint(self, job: TrainJob, random_states: list[list[torch.Tensor]]) -> dict[str, Any]:
        """The training state as ``ddpm_core.checkpoint.save_training_state`` stores it, with every worker's
        random state (:func:`random_state`, by rank), so that a resumed run draws what an uninterrupted one would, and
        the post-hoc EMA profiles when kept (rank 0's, the one that checkpoints), so that they continue exactly."""
        profiles = {} if self.profiles is None else {"posthoc": self.profiles.state_dict()}
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "images_seen": self.images_seen,
            "random_states": random_states,
            "config": {"unet": job.unet.to_dict(), "diffusion": job.diffusion.to_dict()},
            **profiles,
        }


def start_state(job: TrainJob, worker: Worker) -> TrainState:
    """The state this worker group starts from: a network seeded identically on every rank, its weights from
    :func:`starting_weights`, wrapped by DDP, with an EMA and an AdamW optimizer (restored when resuming)."""
    torch.manual_seed(job.train.seed)  # identical initial weights on every rank
    model = UNet(job.unet, learn_variance=job.diffusion.variance is Variance.LEARNED_RANGE)
    checkpoint = ray.train.get_checkpoint()
    if worker.rank == 0 and checkpoint is None:
        metadata = {"images_seen": 0, **job.latent_metadata}
        save_snapshot(job.initial_snapshot_uri, model, job.unet, job.diffusion, metadata, job.storage_options)
    source, restored = starting_weights(job, worker, model, checkpoint)
    parts = step_parts(model, job.train, worker.device, prepare_for_ray_train)
    compiled = job.train.compiled(worker.device.type == "cuda")
    state = TrainState(
        *parts,
        shares=job_shares(job, worker, 0),
        gradient_scale=worker.world_size / worker.share_count,
        unsaved_compile_cache=load_compile_cache(job, worker) if compiled else None,
        profiles=start_profiles(job, worker, parts[0], restored if source is WeightSource.RESUMED else None),
    )
    ddp = worker.world_size > 1  # prepare_model wraps the network in DDP
    if restored is not None:
        state.ema.load_state_dict(restored["ema"])
    if source is WeightSource.RESUMED and restored is not None:
        state.optimizer.load_state_dict(restored["optimizer"])
        state.images_seen, state.step = int(restored["images_seen"]), int(restored["step"])
        restore_random_state(job, worker, state, restored.get("random_states"))
    wrapping = f", DDP with gradient_as_bucket_view={job.train.gradient_as_bucket_view}" if ddp else ""
    shares = f", {len(worker.shares)} shares of the batch per worker" if len(worker.shares) > 1 else ""
    worker.say(
        f"worker group of {worker.world_size} started at {state.images_seen} images, "
        f"{job.precision.value}{wrapping}{shares}"
    )
    advice = slow_precision_advice(job.precision, worker.device.type, "train.bf16_on_cpu")
    if advice:
        worker.say(advice)
    return state


def start_profiles(
    job: TrainJob, worker: Worker, network: nn.Module, resumed: dict[str, Any] | None
) -> PowerEMA | None:
    """Rank 0's post-hoc EMA profiles of ``network`` (``train.ema_profiles``; Karras et al. 2024, Sec. 3.1), continued
    from the ``resumed`` training state's, else started afresh (the first update weighs the trained weights 1,
    Eq. 127: a warm start's count of images restarts at 0); None on other ranks (their weights are rank 0's) or when
    off."""
    if worker.rank != 0 or not job.train.ema_profiles:
        return None
    profiles = PowerEMA(network, job.train.ema_profiles)
    if resumed is not None:
        if "posthoc" not in resumed:
            raise CheckpointError(
                f"the checkpoint at {int(resumed['images_seen'])} images holds no post-hoc EMA profiles, which "
                f"train.ema_profiles {list(job.train.ema_profiles)} needs: run again with --from train"
            )
        profiles.load_state_dict(resumed["posthoc"])
    return profiles


def prepare_for_ray_train(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """Ray Train's placement of the network on this worker's device, wrapped in DDP in a group of several.

    A 1x1 convolution's weight gradient ``[o, i, 1, 1]`` comes with strides that differ from its bucket view's only
    along the two size-1 dimensions, which address no memory; DDP compares strides literally and would warn, in
    every job's output, of a slowdown that cannot happen."""
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=options)


def starting_weights(
    job: TrainJob, worker: Worker, model: nn.Module, checkpoint: ray.train.Checkpoint | None
) -> tuple[WeightSource, dict[str, Any] | None]:
    """Load the starting weights into ``model`` from the first source that applies (:class:`WeightSource`); returns
    the source and the training state it came with (resume and warm start), which holds the EMA and optimizer."""
    say = worker.say
    resumed = newest_checkpoint_state(job, worker, checkpoint)
    if resumed is not None:
        state, how = resumed
        model.load_state_dict(state["model"])
        say(f"resumed from checkpoint at {int(state['images_seen'])} images (step {int(state['step'])}){how}")
        return WeightSource.RESUMED, state
    if job.warm_start_uri:
        state = load_training_state(job.warm_start_uri, job.storage_options)
        model.load_state_dict(state["model"])
        say(f"warm start from {job.warm_start_uri} ({state['images_seen']} images)")
        return WeightSource.WARM_START, state
    if job.train.init_from:
        load_snapshot_weights(model, job.train.init_from, job.unet, job.storage_options)
        say(f"initial weights from {job.train.init_from}")
        return WeightSource.INIT_SNAPSHOT, None
    return WeightSource.FRESH, None


def newest_checkpoint_state(
    job: TrainJob, worker: Worker, registered: ray.train.Checkpoint | None
) -> tuple[dict[str, Any], str] | None:
    """The training state of the job's newest readable checkpoint and how it was found (None: the job has none).

    That is Ray Train's latest (``registered``) unless a newer one was committed that Ray Train never registered: a
    worker uploads its checkpoint before its report waits in a queue for the controller, so a group that goes in
    between (a preempted node's workers, trained on past their last call) leaves one; and when Ray Train's record was
    unreadable and set aside (``trainer.set_aside_unreadable_record``), none is registered. Training is
    deterministic, so every committed checkpoint of the job is a state its run went through."""
    committed = committed_checkpoints(job.trainer_uri, job.storage_options)
    latest = registered.path.rstrip("/").rsplit("/", 1)[-1] if registered is not None else ""
    newer = [uri for uri in committed if uri.rsplit("/", 1)[-1] > latest]  # names sort by step (checkpoint_name)
    if registered is not None and not newer:
        return resumable_state(job, worker, registered), ""
    if not committed:
        return None
    how = "record was set aside" if registered is None else f"latest is {latest}"
    return readable_state(job, worker, committed, None), f", the newest committed one (Ray Train's {how})"


def resumable_state(job: TrainJob, worker: Worker, checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """The training state of Ray Train's latest checkpoint; when that cannot be read (corrupt, or truncated by a full
    disk), the newest earlier one that can (Ray Train keeps two), and the job's output says so."""
    try:
        with checkpoint.as_directory() as directory:
            return load_training_state(directory)
    except CheckpointError as error:
        latest = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
        committed = committed_checkpoints(job.trainer_uri, job.storage_options)
        earlier = [uri for uri in committed if uri.rsplit("/", 1)[-1] < latest]  # names sort by step (checkpoint_name)
        return readable_state(job, worker, earlier, error)


def readable_state(
    job: TrainJob, worker: Worker, committed: list[str], error: CheckpointError | None
) -> dict[str, Any]:
    """The training state of the newest of the ``committed`` checkpoints that can be read (``error``: why the one
    Ray Train chose could not); the job's output names it."""
    for uri in reversed(committed):
        try:
            state = load_training_state(uri, job.storage_options)
        except CheckpointError as unreadable:
            error = error or unreadable
            continue
        if error is not None:
            worker.say(f"the latest checkpoint cannot be read ({error}); resuming from the one before it, {uri}")
        return state
    raise CheckpointError(
        f"{error}; no earlier checkpoint can be read either: run again with --from train to train from the start"
    )


def committed_checkpoints(trainer_uri: str, storage_options: dict[str, Any]) -> list[str]:
    """The committed Ray Train checkpoints under a job's ``trainer_uri``, by step (``hooks.checkpoint_name``), as
    URIs."""
    return committed_folders(f"{trainer_uri}/trainer", "checkpoint_*", storage_options)


def load_snapshot_weights(model: nn.Module, uri: str, unet: UNetConfig, storage_options: dict[str, Any]) -> None:
    """Copy a snapshot's weights into ``model``; a snapshot of another architecture is refused by name."""
    snapshot = load_snapshot(uri, storage_options)
    if snapshot.unet != unet:
        raise CheckpointError(init_from_mismatch(uri, snapshot.unet, unet))
    try:
        model.load_state_dict(snapshot.state_dict)
    except RuntimeError as error:
        raise CheckpointError(f"train.init_from {uri!r}: weights do not fit this model ({error})") from error


def init_from_mismatch(uri: str, found: UNetConfig, expected: UNetConfig) -> str:
    return (
        f"train.init_from {uri!r} holds a U-Net with config {found.to_dict()}, but this run's model is "
        f"{expected.to_dict()}; warm-start only from the same model.preset/overrides"
    )


def share_random_state(share: Share) -> list[torch.Tensor]:
    """A share's random state: its batch generator's, its dropout stream's, and its reference bank's images (and
    labels) when it keeps one: what the next step's draws and targets depend on."""
    bank = [] if share.bank is None else share.bank.state()
    return [share.generator.get_state(), share.dropout_state, *bank]


def gather_random_states(worker: Worker, shares: list[Share]) -> list[list[torch.Tensor]]:
    """Every share's :func:`share_random_state`, by share (a collective: every rank calls it at the same step)."""
    mine = [(share.index, share_random_state(share)) for share in shares]
    everyone: list[Any] = [mine]
    if worker.all_reduce is not None:
        everyone = [None] * worker.world_size
        dist.all_gather_object(everyone, mine)
    return [state for _, state in sorted((item for part in everyone for item in part), key=lambda item: item[0])]


def restore_random_state(
    job: TrainJob, worker: Worker, state: TrainState, saved: list[list[torch.Tensor]] | None
) -> None:
    """Continue every share's random streams where the checkpoint left them, whatever the group's size then and now;
    a checkpoint without them (or from another number of shares) restarts the streams from (seed, share, images
    seen), so the data order after it differs."""
    if saved is not None and len(saved) == worker.share_count:
        for share in state.shares:
            generator_state, dropout_state, *bank = saved[share.index]
            share.generator.set_state(generator_state)
            share.dropout_state = dropout_state
            if share.bank is not None:
                share.bank.restore(bank, worker.device)
        return
    state.shares = job_shares(job, worker, state.images_seen)
    found = "no random state" if saved is None else f"the random state of {len(saved)} shares"
    worker.say(f"the checkpoint holds {found}: the random streams restart from (seed, share, images seen)")


def compile_cache_uri(job: TrainJob, worker: Worker) -> str | None:
    """This job's file of compiled artifacts: keyed by what the compiled step depends on (the network, precision,
    layout and per-worker batch); None when the job keeps none."""
    if job.compile_cache_uri is None:
        return None
    key = {
        "unet": job.unet.to_dict(),
        "learn_variance": job.diffusion.variance is Variance.LEARNED_RANGE,
        "precision": job.precision.value,
        "channels_last": job.train.channels_last,
        "batch_per_worker": job.train.batch_size // worker.share_count,  # a micro-batch
        "world_size": worker.world_size,
    }
    return cache_file_uri(job.compile_cache_uri, worker.device, key)


def load_compile_cache(job: TrainJob, worker: Worker) -> str | None:
    """Loads the compiled artifacts of an earlier worker start, or run, of this job; returns where rank 0 stores them
    after the first step when there were none (None: loaded, or not this rank's job)."""
    uri = compile_cache_uri(job, worker)
    if uri is None:
        return None
    loaded = load_compiled(uri, job.storage_options)
    if loaded:
        worker.say(f"compile cache: loaded {loaded / 2**20:.1f} MiB of compiled artifacts from {uri}")
        return None
    return uri if worker.rank == 0 else None


def save_compile_cache(job: TrainJob, worker: Worker, state: TrainState) -> None:
    """After the first compiled step: stores what it compiled, for restarted workers and later runs."""
    if state.unsaved_compile_cache is not None:
        saved = save_compiled(state.unsaved_compile_cache, job.storage_options)
        worker.say(
            f"compile cache: saved {saved / 2**20:.1f} MiB of compiled artifacts to {state.unsaved_compile_cache}"
        )
        state.unsaved_compile_cache = None


def memory_format(job: TrainJob) -> torch.memory_format:
    return torch.channels_last if job.train.channels_last else torch.contiguous_format


def fresh_shares(
    seed: int, worker: Worker, images_seen: int, reference_size: int = 0, null_class: int | None = None
) -> list[Share]:
    """This worker's shares with their random streams started from (seed, share, images seen), and with a
    ``reference_size`` (``train.stf_reference``) an empty bank of reference images each (``null_class``: a
    class-conditional model's dropped label)."""
    return [
        Share(
            index,
            seeded_generator((seed, index, images_seen), worker.device),
            seeded_generator((seed, index, images_seen, DROPOUT_STREAM), worker.device).get_state(),
            ReferenceBank(reference_size, null_class) if reference_size else None,
        )
        for index in worker.shares
    ]


def job_shares(job: TrainJob, worker: Worker, images_seen: int) -> list[Share]:
    """:func:`fresh_shares` as ``job`` trains: its seed, and its stable targets' reference batch."""
    return fresh_shares(job.train.seed, worker, images_seen, job.train.stf_reference, job.unet.num_classes)


DROPOUT_STREAM = 1  # the extra seed word of a share's dropout stream (its batch stream has none)


def seeded_generator(words: tuple[int, ...], device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``words`` (e.g. seed, share, images seen) through NumPy's SeedSequence:
    streams of nearby words are independent. Batches, timesteps and noise are drawn where they are used; a resumed
    run continues the checkpoint's streams instead (:func:`restore_random_state`)."""
    state = np.random.SeedSequence(list(words)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
