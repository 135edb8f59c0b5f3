"""Prepare at scale (``data.prepare_on: ray_data``): a folder of images, tar shards or Parquet files becomes the
run's data splits in Ray Data tasks that each hold a few source files, never the data set. The split, the files and
the fingerprint follow the rule of :mod:`pipelines.data.splits`, as on the driver, so both paths give the same
result for the same images.

1. **Decode** (one task per unit: :data:`UNIT_FILES` image files, or one tar or Parquet file): decode, crop and resize
   (``data.image_size``), skip or fail on unreadable images by name (``data.unreadable_images``); split the unit's
   images by content (:func:`~pipelines.data.splits.split_by_content`) and stage them in one file. Each task
   returns counts, its hash sum, its images' order keys, its image shape, its training images' class counts and its
   skipped files.
2. **Place** (on the driver, from the keys alone: 8 bytes an image): each image's file and position in its split.
3. **Write**: Ray Data groups the staged images by destination file (a distributed shuffle that spills to disk) and
   one task writes each file, in key order.
4. **Commit** both splits' manifests (file checksums from the tasks) and remove the staging files.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.data

from ddpm_core.data import DataError, ReadOptions, SourceKind, SourceListing, read_source_files
from ddpm_core.storage import filesystem, write_bytes
from pipelines.data.shards import npz_bytes
from pipelines.data.splits import SPLITS, file_places, split_by_content, write_file
from pipelines.execution import runtime_env
from pipelines.failures import find

UNIT_FILES = 256  # image files per decode task (a tar or Parquet file is a task of its own)


@dataclass(frozen=True)
class IngestPlan:
    """What every task of one prepare shares."""

    listing: SourceListing
    units: tuple[tuple[str, ...], ...]  # the source files of each decode task
    read: ReadOptions
    holdout_fraction: float
    result_uri: str  # the prepare result's folder: the splits go to {result_uri}/shards and /holdout
    data_options: dict[str, Any]  # storage options of the source
    storage_options: dict[str, Any]  # of the run root

    @property
    def staging_uri(self) -> str:
        """The units' decoded images between steps 1 and 3."""
        return f"{self.result_uri}/staging"

    def split_uri(self, split: str) -> str:
        return f"{self.result_uri}/{split}"

    @classmethod
    def units_of(cls, listing: SourceListing) -> tuple[tuple[str, ...], ...]:
        step = UNIT_FILES if listing.kind is SourceKind.IMAGES else 1
        return tuple(listing.paths[start : start + step] for start in range(0, len(listing.paths), step))


@dataclass(frozen=True)
class UnitResult:
    """What a decode task reports about its unit (a Ray Data row, as JSON)."""

    unit: int
    train: int
    holdout: int
    hash_sum: int  # sum of the per-image hashes, modulo 2^256
    shape: tuple[int, ...] | None  # [H, W, C]; None when every image was skipped
    labelled: bool
    train_class_counts: tuple[int, ...]  # by label, up to the largest label of the unit's training images
    max_label: int  # -1 without labels
    skipped: tuple[str, ...]
    keys: dict[str, tuple[int, ...]]  # split -> the order keys of the unit's images in it, in the unit's order

    @classmethod
    def from_json(cls, text: str) -> UnitResult:
        fields = json.loads(text)
        shape = tuple(fields.pop("shape")) if fields["shape"] is not None else None
        counts, skipped = tuple(fields.pop("train_class_counts")), tuple(fields.pop("skipped"))
        keys = {split: tuple(values) for split, values in fields.pop("keys").items()}
        return cls(**fields, shape=shape, train_class_counts=counts, skipped=skipped, keys=keys)


def convert_unit(rows: dict[str, np.ndarray], plan: IngestPlan) -> dict[str, np.ndarray]:
    """Ray Data function: decode one unit, split it by content, stage its images, report."""
    unit = int(rows["unit"][0])
    (images, labels, _), skipped = read_source_files(
        plan.listing, list(plan.units[unit]), plan.read, plan.data_options
    )  # images [n, H, W, C] uint8, labels [n] or None
    content = split_by_content(images, labels, plan.holdout_fraction)
    arrays = {"images": images, "holdout": content.holdout, **({"labels": labels} if labels is not None else {})}
    fs, staging = filesystem(plan.staging_uri, plan.storage_options)
    write_bytes(fs, f"{staging}/unit-{unit:06d}.npz", npz_bytes(arrays))
    train_labels = labels[~content.holdout] if labels is not None else np.zeros(0, np.int64)
    result = UnitResult(
        unit=unit,
        train=int((~content.holdout).sum()),
        holdout=int(content.holdout.sum()),
        hash_sum=content.hash_sum,
        shape=tuple(int(n) for n in images.shape[1:]),
        labelled=labels is not None,
        train_class_counts=tuple(np.bincount(train_labels).tolist()),
        max_label=int(labels.max()) if labels is not None and len(labels) else -1,
        skipped=skipped,
        keys={
            "shards": tuple(content.keys[~content.holdout].tolist()),
            "holdout": tuple(content.keys[content.holdout].tolist()),
        },
    )
    return {"result": np.array([json.dumps(dataclasses.asdict(result))])}


def quiet_ray_data() -> None:
    """Ray Data's settings for prepare: no progress bars and no INFO dumps of its operators' statistics in the job's
    output (prepare logs its own lines), and a task's :class:`DataError` raised as itself."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the job's output gets one line per step instead
    context.raise_original_map_exception = True  # a DataError naming a file reaches the driver as itself


def decode_units(plan: IngestPlan) -> list[UnitResult]:
    """Step 1 over every unit; an unreadable image (when not skipped) raises the reader's :class:`DataError`."""
    quiet_ray_data()
    rows = [{"unit": unit} for unit in range(len(plan.units))]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        functools.partial(convert_unit, plan=plan), batch_size=1, runtime_env=runtime_env()
    )
    try:
        reported = dataset.take_all()
    except Exception as error:
        named = find(error, DataError)
        if named is None:
            raise
        raise DataError(str(named).split("\n", 1)[0]) from None  # its message, without Ray's retry advice
    results = [UnitResult.from_json(row["result"]) for row in reported]
    return sorted(results, key=lambda result: result.unit)


def places(results: list[UnitResult], shard_images: int) -> dict[int, dict[str, list[list[int]]]]:
    """Step 2: unit -> split -> [files, positions] of the unit's images of that split, in the unit's order."""
    placed: dict[int, dict[str, list[list[int]]]] = {result.unit: {} for result in results}
    for split in SPLITS:
        keys = np.array([key for result in results for key in result.keys[split]], dtype=np.uint64)
        files, positions = file_places(keys, shard_images)
        start = 0
        for result in results:
            stop = start + len(result.keys[split])
            placed[result.unit][split] = [files[start:stop].tolist(), positions[start:stop].tolist()]
            start = stop
    return placed


def unit_rows(rows: dict[str, np.ndarray], plan: IngestPlan) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data function: a staged unit's images as rows with their destination (split, file, position)."""
    fs, staging = filesystem(plan.staging_uri, plan.storage_options)
    for unit, placed in zip(rows["unit"], rows["places"], strict=True):
        destinations = json.loads(str(placed))
        with np.load(io.BytesIO(fs.cat_file(f"{staging}/unit-{int(unit):06d}.npz")), allow_pickle=False) as archive:
            images, holdout = archive["images"], archive["holdout"]
            labels = archive["labels"] if "labels" in archive.files else np.full(len(images), -1, np.int64)
        for number, split in enumerate(SPLITS):
            chosen = holdout if split == "holdout" else ~holdout
            files, positions = destinations[split]
            if len(files):
                yield {
                    "split": np.full(len(files), number),
                    "file": np.array(files, dtype=np.int64),
                    "position": np.array(positions, dtype=np.int64),
                    "image": images[chosen],
                    "label": labels[chosen],
                }


def write_group(batch: dict[str, np.ndarray], plan: IngestPlan, labelled: bool) -> dict[str, np.ndarray]:
    """Ray Data function: the images of one file of a split (one group), written in position order."""
    order = np.argsort(batch["position"])
    split, number = SPLITS[int(batch["split"][0])], int(batch["file"][0])
    fs, folder = filesystem(plan.split_uri(split), plan.storage_options)
    labels = batch["label"][order] if labelled else None
    entry = write_file(fs, folder, number, batch["image"][order], labels)
    return {"entry": np.array([json.dumps({**entry, "split": split})])}


def write_splits(
    plan: IngestPlan, results: list[UnitResult], shard_images: int, labelled: bool
) -> dict[str, list[dict[str, Any]]]:
    """Steps 2 and 3: every staged image written to its file; split -> the files' manifest entries."""
    placed = places(results, shard_images)
    rows = [{"unit": r.unit, "places": json.dumps(placed[r.unit])} for r in results if r.train + r.holdout]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    staged = dataset.map_batches(functools.partial(unit_rows, plan=plan), batch_size=1, runtime_env=runtime_env())
    write = functools.partial(write_group, plan=plan, labelled=labelled)
    written = staged.groupby(["split", "file"]).map_groups(write, batch_format="numpy").take_all()
    entries: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for row in written:
        entry = json.loads(row["entry"])
        entries[entry.pop("split")].append(entry)
    return entries


def remove_staging(plan: IngestPlan) -> None:
    fs, root = filesystem(plan.staging_uri, plan.storage_options)
    if fs.exists(root):
        fs.rm(root, recursive=True)
