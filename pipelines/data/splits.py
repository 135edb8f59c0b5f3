"""The one rule that turns images into a run's data splits, whether prepare reads the data set on the driver or in
Ray Data tasks (:mod:`pipelines.data.ingest`): each image's SHA-256 (pixels and label, :func:`ddpm_core.data.
image_hashes`) decides everything, so the same images get the same fingerprint, split and files on both paths.

- **Fingerprint**: :func:`ddpm_core.data.content_fingerprint` of the sum of the hashes (any grouping adds up to it).
- **Split**: an image is held out when its hash's first 8 bytes, read as a number in [0, 1), fall below
  ``data.holdout_fraction``: the split depends on content, not on listing order, and copies of an image never
  straddle the two splits.
- **Files**: the images of a split are ordered by their hash's next 8 bytes (a pseudo-random order of the content)
  and cut into files of ``shard_images``: every file is a uniform random subset of its split, even when the source
  was sorted by class (what the streaming loader's shuffle relies on, :mod:`pipelines.data.streaming`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ddpm_core.data import hash_sum, image_hashes
from ddpm_core.storage import commit_written, filesystem, write_listed
from pipelines.data.shards import npz_bytes

SPLITS = ("shards", "holdout")  # the training split and the hold-out split, as folders of the prepare result


@dataclass(frozen=True)
class ContentSplit:
    """What their content decides for some images (a decode task's, or the whole data set)."""

    hash_sum: int  # their hashes summed modulo 2^256 (ddpm_core.data.hash_sum)
    holdout: np.ndarray  # [n] bool: held out
    keys: np.ndarray  # [n] uint64: their order within their split's files


def split_by_content(images: np.ndarray, labels: np.ndarray | None, holdout_fraction: float) -> ContentSplit:
    """``images`` ``[n, H, W, C]`` uint8 (``labels`` ``[n]``): their hash sum, hold-out flags and order keys."""
    hashes = image_hashes(images, labels)
    held = [int.from_bytes(digest[:8], "big") / 2**64 < holdout_fraction for digest in hashes]
    keys = [int.from_bytes(digest[8:16], "big") for digest in hashes]
    return ContentSplit(hash_sum(hashes), np.array(held, dtype=bool), np.array(keys, dtype=np.uint64))


def file_places(keys: np.ndarray, shard_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(file number, position in the file) ``[n]`` each of every image of a split, from the order keys ``[n]`` of all
    its images: sorted by key (ties in the given order), cut into files of ``shard_images``."""
    rank = np.empty(len(keys), dtype=np.int64)
    rank[np.argsort(keys, kind="stable")] = np.arange(len(keys))
    return rank // shard_images, rank % shard_images


def file_name(number: int) -> str:
    return f"shard-{number:06d}.npz"


def write_file(fs: Any, folder: str, number: int, images: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """One file of a split (images ``[n, H, W, C]`` in file order, and their labels); its manifest entry."""
    arrays = {"images": images}
    if labels is not None:
        arrays["labels"] = labels
    entry = write_listed(fs, f"{folder}/{file_name(number)}", npz_bytes(arrays))
    return {**entry, "name": file_name(number), "count": len(images)}


def write_in_memory(
    uri: str,
    images: np.ndarray,
    labels: np.ndarray | None,
    keys: np.ndarray,
    shard_images: int,
    storage_options: dict[str, Any],
) -> None:
    """A whole split held in memory (``images`` ``[n, H, W, C]``, order ``keys`` ``[n]``) as its committed files."""
    fs, folder = filesystem(uri, storage_options)
    order = np.argsort(keys, kind="stable")
    entries = [
        write_file(fs, folder, number, images[chunk], labels[chunk] if labels is not None else None)
        for number, chunk in enumerate(np.array_split(order, range(shard_images, len(order), shard_images)))
        if len(chunk)
    ]
    commit_split(uri, entries, storage_options, tuple(images.shape[1:]))


def commit_split(
    uri: str, entries: list[dict[str, Any]], storage_options: dict[str, Any], shape: tuple[int, ...]
) -> None:
    """A split's manifest over its written files, with each file's image count (an empty split gets one file of no
    images ``[0, *shape]``)."""
    if not entries:
        fs, folder = filesystem(uri, storage_options)
        entries = [write_file(fs, folder, 0, np.zeros((0, *shape), np.uint8), None)]
    files = {entry["name"]: {"sha256": entry["sha256"], "size": entry["size"]} for entry in entries}
    counts = {entry["name"]: entry["count"] for entry in entries}
    commit_written(uri, files, {"count": sum(counts.values()), "file_counts": counts}, storage_options)
