"""Prepare at scale (``data.prepare_on: ray_data``): a folder of images, tar shards or Parquet files becomes the
run's data splits in Ray Data tasks that each hold a few source files, never the data set.

1. **Decode** (one task per unit: :data:`UNIT_FILES` image files, or one tar or Parquet file): decode, crop and resize
   (``data.image_size``), skip or fail on unreadable images by name (``data.unreadable_images``); hash each image with
   its label; put it in the hold-out split when its hash falls below ``data.holdout_fraction`` (so a split depends on
   content, not on listing order, and duplicates never straddle the two splits); write the unit's hold-out images as
   files of the hold-out split and its training images to a staging file. Each task returns counts, the sum of its
   hashes, its image shape, its training images' class counts and its skipped files.
2. **Shuffle** the staged training images with Ray Data's ``random_shuffle`` (a distributed shuffle that spills to
   disk) and write them in files of the split's size: every file is a uniform random subset of the split, as the
   streaming loader requires (:mod:`pipelines.data.streaming`).
3. **Commit** both splits' manifests (file checksums from the tasks) and remove the staging files.

The fingerprint hashes the shape, the count and the sum modulo 2^256 of the per-image hashes: it is computed in
parallel, does not depend on how the files are listed or split into tasks, and changes with any pixel or label. It is
not the driver path's fingerprint of the same images (that one hashes the array in order).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.data

from ddpm_core.data import DataError, ReadOptions, SourceKind, SourceListing, read_source_files
from ddpm_core.storage import commit_written, filesystem, write_listed
from pipelines.data.shards import npz_bytes
from pipelines.execution import runtime_env
from pipelines.failures import find

UNIT_FILES = 256  # image files per decode task (a tar or Parquet file is a task of its own)
HASH_MODULUS = 2**256


@dataclass(frozen=True)
class IngestPlan:
    """What every task of one prepare shares."""

    listing: SourceListing
    units: tuple[tuple[str, ...], ...]  # the source files of each decode task
    read: ReadOptions
    holdout_fraction: float
    staging_uri: str  # the units' training images before the shuffle
    holdout_uri: str
    shards_uri: str
    data_options: dict[str, Any]  # storage options of the source
    storage_options: dict[str, Any]  # of the run root

    @property
    def folders(self) -> tuple[str, str]:
        """Where the decode tasks write: (staged training images, the hold-out split)."""
        return self.staging_uri, self.holdout_uri

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
    holdout_file: dict[str, Any] | None  # its manifest entry, with "name" and "count"

    @classmethod
    def from_json(cls, text: str) -> UnitResult:
        fields = json.loads(text)
        shape = tuple(fields.pop("shape")) if fields["shape"] is not None else None
        counts, skipped = tuple(fields.pop("train_class_counts")), tuple(fields.pop("skipped"))
        return cls(**fields, shape=shape, train_class_counts=counts, skipped=skipped)


def image_hashes(images: np.ndarray, labels: np.ndarray | None) -> list[bytes]:
    """SHA-256 of each image's shape, pixels and label (``images`` ``[n, H, W, C]`` uint8)."""
    hashes = []
    for number, image in enumerate(images):
        digest = hashlib.sha256(repr(image.shape).encode() + np.ascontiguousarray(image).tobytes())
        if labels is not None:
            digest.update(int(labels[number]).to_bytes(8, "little", signed=True))
        hashes.append(digest.digest())
    return hashes


def held_out(hashes: list[bytes], fraction: float) -> np.ndarray:
    """``[n]`` bool: the images whose hash, read as a number in [0, 1), is below ``fraction``."""
    return np.array([int.from_bytes(h[:8], "big") / 2**64 < fraction for h in hashes], dtype=bool)


def convert_unit(rows: dict[str, np.ndarray], plan: IngestPlan) -> dict[str, np.ndarray]:
    """Ray Data function: decode one unit, write its hold-out file and its staged training images, report."""
    unit = int(rows["unit"][0])
    (images, labels, _), skipped = read_source_files(
        plan.listing, list(plan.units[unit]), plan.read, plan.data_options
    )  # images [n, H, W, C] uint8, labels [n] or None
    hashes = image_hashes(images, labels)
    holdout = held_out(hashes, plan.holdout_fraction)
    (fs, staging), (_, holdout_root) = (filesystem(uri, plan.storage_options) for uri in plan.folders)
    write = functools.partial(unit_file, fs, images, labels)
    write(~holdout, f"{staging}/unit-{unit:06d}.npz")
    holdout_file = None
    if holdout.any():
        name = f"shard-{unit:06d}.npz"
        holdout_file = {**write(holdout, f"{holdout_root}/{name}"), "name": name, "count": int(holdout.sum())}
    train_labels = labels[~holdout] if labels is not None else np.zeros(0, np.int64)
    result = UnitResult(
        unit=unit,
        train=int((~holdout).sum()),
        holdout=int(holdout.sum()),
        hash_sum=sum(int.from_bytes(h, "big") for h in hashes) % HASH_MODULUS,
        shape=tuple(int(n) for n in images.shape[1:]),
        labelled=labels is not None,
        train_class_counts=tuple(np.bincount(train_labels).tolist()),
        max_label=int(labels.max()) if labels is not None and len(labels) else -1,
        skipped=skipped,
        holdout_file=holdout_file,
    )
    return {"result": np.array([json.dumps(dataclasses.asdict(result))])}


def unit_file(fs: Any, images: np.ndarray, labels: np.ndarray | None, chosen: np.ndarray, path: str) -> dict[str, Any]:
    """The ``chosen`` images (and labels) of a unit as one .npz file at ``path``; its manifest entry."""
    arrays = {"images": images[chosen]}
    if labels is not None:
        arrays["labels"] = labels[chosen]
    return write_listed(fs, path, npz_bytes(arrays))


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


def staged_images(rows: dict[str, np.ndarray], plan: IngestPlan, labelled: bool) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data function: the staged training images of units (rows ``unit``), as rows of images (and labels)."""
    fs, root = filesystem(plan.staging_uri, plan.storage_options)
    for unit in rows["unit"]:
        with np.load(io.BytesIO(fs.cat_file(f"{root}/unit-{int(unit):06d}.npz")), allow_pickle=False) as archive:
            batch = {"images": archive["images"]}
            if labelled:
                batch["labels"] = archive["labels"]
            if len(batch["images"]):
                yield batch


def write_shard(batch: dict[str, np.ndarray], plan: IngestPlan) -> dict[str, np.ndarray]:
    """Ray Data function: one file of the training split, named by its content; its manifest entry."""
    data = npz_bytes(dict(batch))
    name = f"shard-{hashlib.sha256(data).hexdigest()[:20]}.npz"
    fs, root = filesystem(plan.shards_uri, plan.storage_options)
    entry = write_listed(fs, f"{root}/{name}", data)
    return {"entry": np.array([json.dumps({**entry, "name": name, "count": len(batch["images"])})])}


def shuffle_to_shards(plan: IngestPlan, units: list[int], labelled: bool, shard_images: int, seed: int) -> list[dict]:
    """Step 2: the staged training images, shuffled over the whole split, in files of ``shard_images``."""
    read = functools.partial(staged_images, plan=plan, labelled=labelled)
    dataset = ray.data.from_items([{"unit": unit} for unit in units], override_num_blocks=max(1, len(units)))
    shuffled = dataset.map_batches(read, batch_size=1, runtime_env=runtime_env()).random_shuffle(seed=seed)
    write = functools.partial(write_shard, plan=plan)
    written = shuffled.map_batches(write, batch_size=shard_images, runtime_env=runtime_env()).take_all()
    return [json.loads(row["entry"]) for row in written]


def commit_split(uri: str, entries: list[dict], storage_options: dict[str, Any], shape: tuple[int, ...]) -> None:
    """Step 3 for one split: its manifest over the files the tasks wrote, with each file's image count (an empty
    split gets one file of no images ``[0, *shape]``, as on the driver)."""
    if not entries:
        fs, root = filesystem(uri, storage_options)
        empty = write_listed(fs, f"{root}/shard-000000.npz", npz_bytes({"images": np.zeros((0, *shape), np.uint8)}))
        entries = [{**empty, "name": "shard-000000.npz", "count": 0}]
    files = {entry["name"]: {"sha256": entry["sha256"], "size": entry["size"]} for entry in entries}
    counts = {entry["name"]: entry["count"] for entry in entries}
    metadata = {"count": sum(counts.values()), "file_counts": counts}
    commit_written(uri, files, metadata, storage_options)


def fingerprint_of(results: list[UnitResult], shape: tuple[int, ...], labelled: bool) -> str:
    """The data set's fingerprint from the tasks' hash sums (order-free: see the module docstring)."""
    total = sum(result.hash_sum for result in results) % HASH_MODULUS
    count = sum(result.train + result.holdout for result in results)
    head = json.dumps({"shape": list(shape), "count": count, "labelled": labelled, "hash": "sum-sha256"})
    return hashlib.sha256(head.encode() + total.to_bytes(32, "big")).hexdigest()


def train_class_counts(results: list[UnitResult], num_classes: int) -> tuple[int, ...]:
    """Training images per class over every unit."""
    counts = np.zeros(num_classes, np.int64)
    for result in results:
        counts[: len(result.train_class_counts)] += result.train_class_counts
    return tuple(int(count) for count in counts)


def remove_staging(plan: IngestPlan) -> None:
    fs, root = filesystem(plan.staging_uri, plan.storage_options)
    if fs.exists(root):
        fs.rm(root, recursive=True)
