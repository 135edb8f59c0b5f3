"""The streaming loader (``data.loader: stream``): training images read, decoded and flipped by Ray Data CPU tasks and
consumed by each training worker in a seeded epoch order, so no process holds the training split.

**The order.** Epochs are per worker. In worker ``r``'s epoch ``e`` (of ``W`` workers), the split's files are put in
the permutation seeded by ``(seed, e)`` and the worker takes every ``W``-th of them from position ``r``: within one
epoch number the workers read disjoint files, and together all of them. Each file's images come in the permutation
seeded by ``(seed, e, file)``, each flipped left-right with probability 1/2 by the same generator. Prepare writes a
split of more than one file in a random order of the data, so every file is a uniform random subset of the split:
a batch is a uniform random draw from at most a few files, and over an epoch every image of the worker's files is
seen exactly once (sampling without replacement; the resident loader samples with replacement). This is a windowed
shuffle with a window of one file, not a full shuffle of the split: consecutive batches share files, which matters
only if the files are not random subsets (they are, by construction). Its cost is one read of each file per epoch
and no shuffle across the network.

**Resumption.** The order is a function of (seed, rank, number of workers, the split's file counts) and nothing else,
so the position in it is the number of images the worker has drawn: ``step x batch per worker``. A worker group that
restarts from a checkpoint (a killed worker, a killed driver) continues the order exactly where the checkpoint's
step left it, skipping the images already drawn within the current file; ``images_seen`` is exact because it is
counted in steps. Resuming with another number of workers starts the new group's order at the same step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray.data
import torch

from ddpm_core.unet import UNetConfig
from pipelines.config import DataSection, Loader, TrainSection
from pipelines.data.shards import ImageSource, SplitLayout, read_split_file, split_layout

if TYPE_CHECKING:
    from pipelines.contracts import LatentOutputs

FILES_PER_TASK = 4  # files one Ray Data task decodes in turn (a task costs ~35 ms of scheduling on its own)


@dataclass(frozen=True)
class Piece:
    """One file of one epoch of a worker's order: positions ``skip .. stop-1`` of that file's permutation."""

    epoch: int
    file: int  # index into SplitLayout.sources
    skip: int
    stop: int


def epoch_files(num_files: int, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """The files of worker ``rank``'s epoch ``epoch``, in order: every ``world_size``-th file of the permutation
    seeded by ``(seed, epoch)``, from position ``rank``."""
    order = np.random.default_rng([seed, epoch]).permutation(num_files)
    return [int(file) for file in order[rank::world_size]]


def check_enough_files(layout: SplitLayout, world_size: int) -> None:
    """Every worker streams its own files: there must be at least one per worker (prepare writes enough)."""
    if len(layout.counts) < world_size:
        raise ValueError(
            f"the training split has {len(layout.counts)} file(s), fewer than the {world_size} training workers "
            "that stream it: run prepare again for this train.num_workers (--from prepare), or use "
            "data.loader=resident"
        )


def pieces(layout: SplitLayout, seed: int, rank: int, world_size: int, start: int, count: int) -> list[Piece]:
    """The pieces holding images ``start .. start+count-1`` of worker ``rank``'s order (every epoch of it)."""
    check_enough_files(layout, world_size)
    found: list[Piece] = []
    position, epoch, stop = 0, 0, start + count
    while position < stop:
        for file in epoch_files(len(layout.counts), seed, epoch, rank, world_size):
            size = layout.counts[file]
            if position + size > start and position < stop:
                found.append(Piece(epoch, file, max(0, start - position), min(size, stop - position)))
            position += size
            if position >= stop:
                break
        epoch += 1
    return found


def file_order(size: int, seed: int, piece: Piece) -> tuple[np.ndarray, np.ndarray]:
    """(the permutation ``[size]`` of a file's images in ``piece``'s epoch, which of them are flipped ``[size]``)."""
    generator = np.random.default_rng([seed, piece.epoch, piece.file])
    return generator.permutation(size), generator.random(size) < 0.5


def decode_piece(
    piece: Piece, source: ImageSource, seed: int, flip: bool, storage_options: dict[str, Any]
) -> dict[str, np.ndarray]:
    """A piece's images ``[n, H, W, C]`` uint8 in its order (flipped left-right where drawn) and, when the split has
    them, their labels ``[n]`` int64."""
    arrays = read_split_file(source, storage_options)
    images = arrays["images"]  # [N_file, H, W, C]
    order, flips = file_order(len(images), seed, piece)
    chosen = order[piece.skip : piece.stop]
    batch = images[chosen]  # [n, H, W, C]
    if flip:
        mirrored = flips[piece.skip : piece.stop]
        batch[mirrored] = batch[mirrored, :, ::-1]
    decoded = {"images": batch}
    if "labels" in arrays:
        decoded["labels"] = arrays["labels"][chosen].astype(np.int64)
    return decoded


@dataclass(frozen=True)
class StreamSpec:
    """What a worker streams and how: the split, the order's seed, and the Ray Data settings."""

    layout: SplitLayout
    seed: int
    flip: bool
    decode_cpus: float  # Ray CPUs of each decode task
    prefetch_batches: int
    memory_budget_mb: float  # the object-store memory one worker's stream may hold in flight
    storage_options: dict[str, Any]


def decode_pieces(rows: dict[str, np.ndarray], spec: StreamSpec) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data ``map_batches`` function (a task, not an actor): rows ``epoch, file, skip, stop`` -> the pieces'
    images (and labels), one piece at a time."""
    for values in zip(rows["epoch"], rows["file"], rows["skip"], rows["stop"], strict=True):
        piece = Piece(*(int(value) for value in values))
        yield decode_piece(piece, spec.layout.sources[piece.file], spec.seed, spec.flip, spec.storage_options)


def stream_dataset(spec: StreamSpec, work: list[Piece]) -> ray.data.Dataset:
    """A Ray Data dataset of ``work``'s images in order: pieces decoded by CPU tasks, order preserved."""
    rows = [dataclasses.asdict(piece) for piece in work]
    tasks = max(1, -(-len(rows) // FILES_PER_TASK))
    return ray.data.from_items(rows, override_num_blocks=tasks).map_batches(
        functools.partial(decode_pieces, spec=spec), batch_size=1, num_cpus=spec.decode_cpus
    )


class ImageStream:
    """A worker's batches from its place in the order: uint8 ``[B, H, W, C]`` images (and labels) on its device,
    prefetched by Ray Data while the step runs."""

    def __init__(self, spec: StreamSpec, rank: int, world_size: int, start: int, count: int, batch: int) -> None:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # the order is the contract, whatever finishes first
        budget = spec.memory_budget_mb * 2**20
        context.execution_options.resource_limits = ray.data.ExecutionResources(object_store_memory=budget)
        context.enable_progress_bars = False
        self.batch = batch
        work = pieces(spec.layout, spec.seed, rank, world_size, start, count)
        self._batches = iter(
            stream_dataset(spec, work).iter_torch_batches(
                batch_size=batch,
                prefetch_batches=spec.prefetch_batches,
                device="cpu",
                pin_memory=torch.cuda.is_available(),
            )
        )

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next batch: images ``[B, H, W, C]`` uint8 and labels ``[B]`` (None without labels) on ``device``."""
        batch = next(self._batches)
        images = batch["images"].to(device, non_blocking=True)
        labels = batch.get("labels")
        return images, (labels.to(device, non_blocking=True) if labels is not None else None)


def resident_bytes(num_images: int, image_values: int, world_size: int) -> int:
    """Host or device bytes one worker needs for the resident loader: the whole split as uint8 while it is read,
    and the worker's slice as float32 on its device afterwards."""
    return num_images * image_values + -(-num_images // world_size) * image_values * 4


def choose_loader(data: DataSection, num_images: int, image_values: int, world_size: int) -> tuple[Loader, str]:
    """The loader a training run uses (``data.loader``; ``auto``: resident when :func:`resident_bytes` fits
    ``data.memory_budget_mb``) and why, in words."""
    needed = resident_bytes(num_images, image_values, world_size) / 2**20
    budget = f"{needed:,.1f} MiB per worker for a resident slice, data.memory_budget_mb {data.memory_budget_mb:g}"
    if data.loader is not Loader.AUTO:
        return data.loader, f"data.loader={data.loader.value} ({budget})"
    chosen = Loader.RESIDENT if needed <= data.memory_budget_mb else Loader.STREAM
    return chosen, f"data.loader=auto chose {chosen.value}: {budget}"


def training_loader(
    data: DataSection, num_images: int, unet: UNetConfig, workers: int, latent: LatentOutputs | None
) -> tuple[Loader, str]:
    """The loader of ``workers`` workers training ``unet`` on ``num_images`` images (:func:`choose_loader`), or on a
    latent model's ``latent`` posteriors, which are always held resident; and why, in words."""
    if latent is not None:
        return Loader.RESIDENT, f"the {latent.count} posteriors of a latent model's latents, {latent.uri}"
    return choose_loader(data, num_images, unet.in_channels * unet.image_size**2, workers)


def plan_stream(
    data: DataSection,
    train: TrainSection,
    split: tuple[str, int],
    unet: UNetConfig,
    workers: int,
    storage_options: dict[str, Any],
    latent: LatentOutputs | None = None,
) -> tuple[StreamSpec | None, str]:
    """How ``workers`` workers training ``unet`` get the training split ``(URI, images)`` (or a latent model's
    ``latent``): a :class:`StreamSpec`, or None to hold it resident (:func:`training_loader`), and why, in words."""
    uri, num_images = split
    loader, why = training_loader(data, num_images, unet, workers, latent)
    if loader is Loader.RESIDENT:
        return None, why
    layout = split_layout(uri, storage_options)
    check_enough_files(layout, workers)
    flip, budget = train.horizontal_flip, data.memory_budget_mb
    return StreamSpec(layout, train.seed, flip, data.decode_cpus, data.prefetch_batches, budget, storage_options), why
