"""The two shard formats of a run, in one place: data splits written by prepare, and sample shards written by the
sampling actors. Both are committed directories (:mod:`ddpm_core.storage`) of uint8 images ``[n, H, W, C]``.

- A **data split** (``prepare/shards``, ``prepare/holdout``, ``prepare/test``): ``shard-NNNNN.npz`` files of
  ``shard_images`` images each (the last one fewer; at most :data:`SHARD_IMAGES`, fewer for large images:
  :func:`shard_images_for`), each with ``images`` and ``labels`` when the data set has them, one manifest for all
  (metadata: ``count``, ``shard_images``; a split written by Ray Data tasks, :mod:`pipelines.data.ingest`, has files of
  varied sizes and lists them: ``file_counts``). Prepare writes a training split of several files in a random order of
  the data, so every file is a uniform random subset of it (what the streaming loader's shuffle relies on:
  :mod:`pipelines.data.streaming`).
- A **sample shard** (``sample/<fingerprint>/shards/shard-NNNNN``): ``images.npy`` of the images with sample indices
  ``start..stop-1`` and, from a class-conditional model, ``labels.npy`` (int64 ``[n]``, the class each image was asked
  for); the manifest's metadata records ``start``, ``stop`` and ``seed``.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ddpm_core.data import ImageDataset
from ddpm_core.storage import commit, read_committed, read_manifest

SHARD_IMAGES = 10_000  # images per file of a data split
SAMPLE_FILE = "images.npy"
LABELS_FILE = "labels.npy"


@dataclass(frozen=True)
class ImageSource:
    """One committed file of uint8 images ``[n, H, W, C]``; its first image has global index ``first_index``."""

    uri: str
    file: str  # images.npy (sample shards) or shard-NNNNN.npz (data splits)
    first_index: int


@dataclass(frozen=True)
class SplitLayout:
    """The files of a committed data split, in index order, and how many images each holds."""

    sources: tuple[ImageSource, ...]
    counts: tuple[int, ...]

    @property
    def count(self) -> int:
        return sum(self.counts)


def shard_images_for(image_shape: tuple[int, ...], shard_mb: float) -> int:
    """Images per data-split file: as many uint8 images of ``image_shape`` as fit in ``shard_mb`` MiB, at least one
    and at most :data:`SHARD_IMAGES` (32x32 RGB: 10,000 = 29 MiB; 256x256 RGB at 64 MiB: 341)."""
    image_bytes = int(np.prod(image_shape))
    return max(1, min(SHARD_IMAGES, int(shard_mb * 2**20) // image_bytes))


def write_split(
    uri: str,
    dataset: ImageDataset,
    indices: np.ndarray,
    storage_options: dict[str, Any],
    shard_images: int = SHARD_IMAGES,
) -> None:
    """The images (and labels) of ``dataset`` at ``indices``, in that order, as one committed data split of files of
    ``shard_images`` images."""
    files = {}
    for number, start in enumerate(range(0, max(len(indices), 1), shard_images)):
        chunk = indices[start : start + shard_images]
        arrays = {"images": dataset.images[chunk]}
        if dataset.labels is not None:
            arrays["labels"] = dataset.labels[chunk]
        files[f"shard-{number:05d}.npz"] = npz_bytes(arrays)
    commit(uri, files, {"count": len(indices), "shard_images": shard_images}, storage_options)


def read_split(uri: str, storage_options: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """A whole data split: images ``[N, H, W, C]`` uint8 and labels ``[N]`` (None when it has none)."""
    files, _ = read_committed(uri, None, storage_options)
    parts = [_load_npz(files[name]) for name in sorted(files)]
    labels = np.concatenate([part["labels"] for part in parts]) if "labels" in parts[0] else None
    return np.concatenate([part["images"] for part in parts]), labels


def split_layout(uri: str, storage_options: dict[str, Any]) -> SplitLayout:
    """The files of a data split and their image counts, from its manifest (no image is read)."""
    manifest = read_manifest(uri, storage_options)
    names, metadata = sorted(manifest["files"]), manifest["metadata"]
    if "file_counts" in metadata:  # written by tasks (pipelines.data.ingest): each file's own count
        counts = tuple(int(metadata["file_counts"][name]) for name in names)
    else:
        per_file, count = int(metadata.get("shard_images", SHARD_IMAGES)), int(metadata["count"])
        counts = tuple(min(per_file, count - number * per_file) for number in range(len(names)))
    starts = [0, *itertools.accumulate(counts)][: len(counts)]
    sources = tuple(ImageSource(uri, name, start) for name, start in zip(names, starts, strict=True))
    return SplitLayout(sources, counts)


def split_identity(uri: str, storage_options: dict[str, Any]) -> str:
    """The identity of a committed data split, from its manifest alone: the SHA-256 of its files' names and SHA-256s.
    What is computed from a split and cached across runs (its latents, its reference statistics, the classifier
    trained on it) is keyed by it, not by the data set's fingerprint: the same images split another way
    (``data.holdout_fraction``) or cut into other files are another split, and the same split written again is the
    same one (a file's bytes depend only on its images)."""
    files = read_manifest(uri, storage_options)["files"]
    listed = sorted((name, entry["sha256"]) for name, entry in files.items())
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()


def read_first_images(uri: str, count: int | None, storage_options: dict[str, Any]) -> np.ndarray:
    """The first ``count`` images ``[n, H, W, C]`` of a data split (None: all), reading only the files they are in."""
    return read_first(uri, count, storage_options)[0]


def read_first(uri: str, count: int | None, storage_options: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """The first ``count`` images ``[n, H, W, C]`` of a data split (None: all) and their labels ``[n]`` (None when
    the split has none), reading only the files they are in."""
    files = (read_split_file(source, storage_options) for source in split_layout(uri, storage_options).sources)
    arrays = first_rows(files, count)
    return arrays["images"], arrays.get("labels")


def first_rows(files: Iterator[dict[str, np.ndarray]], count: int | None) -> dict[str, np.ndarray]:
    """The first ``count`` rows (None: all) of a split's files, given in order, each named array concatenated. Reads
    no further file once ``count`` rows are held, so a caller passes the files as a generator that reads them."""
    parts, held = [], 0
    for arrays in files:
        parts.append({name: array[: None if count is None else count - held] for name, array in arrays.items()})
        held += len(next(iter(parts[-1].values())))
        if count is not None and held >= count:
            break
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def read_images_at(layout: SplitLayout, indices: list[int], storage_options: dict[str, Any]) -> np.ndarray:
    """The images ``[len(indices), H, W, C]`` of a data split at ``indices`` (each in 0..count-1), reading only the
    files they are in."""
    starts = [source.first_index for source in layout.sources]
    files: dict[int, np.ndarray] = {}
    picked = []
    for index in indices:
        number = bisect.bisect_right(starts, index) - 1  # the file whose range holds the index
        if number not in files:
            files[number] = read_images(layout.sources[number], storage_options)
        picked.append(files[number][index - layout.sources[number].first_index])
    return np.stack(picked)


def split_sources(uri: str, storage_options: dict[str, Any]) -> list[ImageSource]:
    """The files of a data split, in index order."""
    return list(split_layout(uri, storage_options).sources)


def write_sample_shard(
    uri: str,
    images: np.ndarray,
    start: int,
    seed: int,
    storage_options: dict[str, Any],
    labels: np.ndarray | None = None,
) -> None:
    """Commit the samples ``images`` ``[n, H, W, C]`` uint8 with indices ``start..start+n-1`` drawn with ``seed``, and
    the classes ``labels`` ``[n]`` they were asked for (conditional models)."""
    files = {SAMPLE_FILE: _npy_bytes(images)}
    if labels is not None:
        files[LABELS_FILE] = _npy_bytes(labels.astype(np.int64))
    commit(uri, files, {"start": start, "stop": start + len(images), "seed": seed}, storage_options)


def read_sample_labels(uri: str, storage_options: dict[str, Any]) -> np.ndarray:
    """The requested classes ``[n]`` int64 of a conditional model's sample shard."""
    data = read_committed(uri, [LABELS_FILE], storage_options)[0][LABELS_FILE]
    return np.load(io.BytesIO(data), allow_pickle=False)


def sample_shard_uris(root: str, num_samples: int, shard_size: int) -> list[tuple[str, int, int]]:
    """(URI, start, stop) of every sample shard of ``num_samples`` images in shards of ``shard_size``."""
    return [
        (f"{root}/shard-{start // shard_size:05d}", start, min(start + shard_size, num_samples))
        for start in range(0, num_samples, shard_size)
    ]


def sample_sources(shard_uris: tuple[str, ...] | list[str], storage_options: dict[str, Any]) -> list[ImageSource]:
    """Sample shards, each with its first sample index from its manifest."""
    return [
        ImageSource(uri, SAMPLE_FILE, int(read_manifest(uri, storage_options)["metadata"]["start"]))
        for uri in shard_uris
    ]


def read_images(source: ImageSource, storage_options: dict[str, Any]) -> np.ndarray:
    """The images ``[n, H, W, C]`` uint8 of one file of either format."""
    data = read_committed(source.uri, [source.file], storage_options)[0][source.file]
    if source.file.endswith(".npz"):
        return _load_npz(data)["images"]
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_split_file(source: ImageSource, storage_options: dict[str, Any]) -> dict[str, np.ndarray]:
    """One file of a data split: ``images`` ``[n, H, W, C]`` uint8 and, when the split has them, ``labels`` ``[n]``."""
    return _load_npz(read_committed(source.uri, [source.file], storage_options)[0][source.file])


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}
