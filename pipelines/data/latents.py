"""Latent files: a committed data split (:mod:`pipelines.data.shards`) encoded by a KL autoencoder's posterior
``q(z | x)`` (Rombach et al. 2022, Sec. 3.1), one latent file per file of the split, by a pool of Ray Data actors
that each load the encoder once.

**What is stored.** Each latent file holds the posterior's ``mean`` and ``logvar``, float32 ``[n, c, h, w]``, and the
images' ``labels`` when the split has them. A training step draws a fresh ``z = mean + exp(logvar / 2) * noise``
from them, as LDM's diffusion model trains on posterior samples: the model then learns the distribution the decoder
was trained to invert, not the narrower one of the means, and no single noise draw is fixed for every epoch. The
price is twice the bytes of the means alone.

**Where, and resumption.** The latents of one split under one autoencoder live in a folder keyed by both identities
(:func:`pipelines.data.latent_files.latents_uri`: the split's own identity,
:func:`pipelines.data.shards.split_identity`, and :func:`ddpm_core.autoencoder_weights.autoencoder_identity`), each
file a committed directory ``file-NNNNN`` of its own. An encoding that is killed leaves the files it committed, and
the next one encodes only the others. The folder's own manifest is committed last, once every file is there.

**The scaling factor** (LDM Sec. 4.3.2: ``1 / std`` of the latents) is computed over the whole split, exactly, from
moments each file records: for ``z ~ q(z | x)``, ``E[z] = E[mean]`` and ``E[z^2] = E[mean^2 + exp(logvar)]``, so the
variance of the latents the model trains on needs no sampling.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.data
import torch

from ddpm_core.autoencoder import KLAutoencoder
from ddpm_core.autoencoder_weights import load_autoencoder
from ddpm_core.data import to_model_range
from ddpm_core.storage import commit, is_committed, read_manifest
from pipelines.data.ingest import quiet_ray_data
from pipelines.data.latent_files import LATENT_FILE, file_uri, latents_uri
from pipelines.data.shards import npz_bytes, read_split_file, split_identity, split_layout
from pipelines.execution import runtime_env


@dataclass(frozen=True)
class Encoding:
    """One split to encode with one autoencoder, and how: ``batch`` images per forward pass, ``actors`` encoders."""

    split_uri: str
    autoencoder_uri: str
    autoencoder_sha256: str
    latents_root: str  # the folder of every split's latents: this one's goes to latents_uri(latents_root, ...)
    storage_options: dict[str, Any]
    batch: int = 64
    actors: int = 2


@dataclass(frozen=True)
class Moments:
    """Sums over every element of a set of posteriors, for the latents' mean and variance."""

    count: int  # elements: images x c x h x w
    mean_sum: float  # sum of mean
    square_sum: float  # sum of mean^2 + exp(logvar) = sum of E[z^2]

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.mean_sum + other.mean_sum, self.square_sum + other.square_sum)

    @classmethod
    def of(cls, mean: np.ndarray, logvar: np.ndarray) -> Moments:
        mean64 = mean.astype(np.float64)
        return cls(int(mean.size), float(mean64.sum()), float((mean64**2 + np.exp(logvar.astype(np.float64))).sum()))

    def std(self) -> float:
        """Standard deviation of ``z ~ q(z | x)`` over the images and elements summed."""
        first = self.mean_sum / self.count
        return math.sqrt(max(self.square_sum / self.count - first**2, 0.0))


@dataclass(frozen=True)
class LatentSplit:
    """A committed folder of latent files: where, whose, their shape ``[c, h, w]`` and the scaling factor."""

    uri: str
    autoencoder_identity: str
    shape: tuple[int, int, int]
    count: int
    scaling_factor: float  # 1 / std of the latents
    encoded_now: int  # files this call encoded (the others were committed by an earlier one)


def encode_images(model: KLAutoencoder, images: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[n, H, W, C]`` -> the posterior's ``mean`` and ``logvar``, float32 ``[n, c, h, w]`` each,
    encoded ``batch`` at a time (every image on its own: the result does not depend on the batch)."""
    means, logvars = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            posterior = model.encode(to_model_range(images[start : start + batch]))  # x [b, C, H, W] in [-1, 1]
            means.append(posterior.mean.numpy())
            logvars.append(posterior.logvar.numpy())
    return np.concatenate(means), np.concatenate(logvars)


class FileEncoder:
    """Ray Data actor: one autoencoder, loaded (and verified by its SHA-256) once; each call encodes the split's files
    named in the batch and commits each as it is done."""

    def __init__(self, encoding: Encoding, folder: str) -> None:
        torch.set_num_threads(1)  # one CPU per actor, as Ray reserved
        self.encoding, self.folder = encoding, folder
        self.model, _ = load_autoencoder(
            encoding.autoencoder_uri, encoding.autoencoder_sha256, encoding.storage_options, log=lambda _: None
        )
        self.layout = split_layout(encoding.split_uri, encoding.storage_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        numbers = [int(number) for number in batch["file"]]
        for number in numbers:
            self.encode_file(number)
        return {"file": np.array(numbers, dtype=np.int64)}

    def encode_file(self, number: int) -> None:
        options = self.encoding.storage_options
        arrays = read_split_file(self.layout.sources[number], options)
        mean, logvar = encode_images(self.model, arrays["images"], self.encoding.batch)
        stored = {"mean": mean, "logvar": logvar, **({"labels": arrays["labels"]} if "labels" in arrays else {})}
        metadata = {
            "count": len(mean),
            "shape": list(mean.shape[1:]),
            "first_index": self.layout.sources[number].first_index,
            "moments": dataclasses.asdict(Moments.of(mean, logvar)),
            "encoded_by": {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()},
        }
        commit(file_uri(self.folder, number), {LATENT_FILE: npz_bytes(stored)}, metadata, options)


def encode_split(encoding: Encoding, log: Callable[[str], None] = print) -> LatentSplit:
    """The latents of ``encoding.split_uri``: the committed folder when there is one, else every file not yet
    committed encoded by ``encoding.actors`` Ray Data actors, then the folder committed with the scaling factor."""
    options = encoding.storage_options
    _, identity = load_autoencoder(encoding.autoencoder_uri, encoding.autoencoder_sha256, options, log=log)
    folder = latents_uri(encoding.latents_root, split_identity(encoding.split_uri, options), identity)
    if is_committed(folder, options):
        log(f"latents: reusing {folder}")
        return committed_split(folder, options, encoded_now=0)
    layout = split_layout(encoding.split_uri, options)
    missing = [n for n in range(len(layout.sources)) if not is_committed(file_uri(folder, n), options)]
    log(
        f"latents: encoding {len(missing)} of {len(layout.sources)} files of {encoding.split_uri} with "
        f"{min(encoding.actors, max(len(missing), 1))} Ray Data actors into {folder}"
    )
    if missing:
        run_encoders(encoding, folder, missing)
    commit_folder(folder, len(layout.sources), identity, options)
    return committed_split(folder, options, encoded_now=len(missing))


def run_encoders(encoding: Encoding, folder: str, numbers: list[int]) -> None:
    """Encode and commit the files ``numbers`` on a pool of Ray Data actors, one file per call."""
    quiet_ray_data()
    actors = min(encoding.actors, len(numbers))
    rows = [{"file": number} for number in numbers]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        FileEncoder,
        fn_constructor_args=(encoding, folder),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        runtime_env=runtime_env(),
    )
    dataset.materialize()


def commit_folder(folder: str, files: int, identity: str, options: dict[str, Any]) -> None:
    """The folder's manifest, last: its files, the latent shape and the scaling factor over all of them."""
    metadata = [read_manifest(file_uri(folder, n), options)["metadata"] for n in range(files)]
    moments = sum((Moments(**entry["moments"]) for entry in metadata), Moments(0, 0.0, 0.0))
    summary = {
        "autoencoder_identity": identity,
        "shape": metadata[0]["shape"],
        "count": sum(entry["count"] for entry in metadata),
        "files": len(metadata),
        "scaling_factor": 1.0 / moments.std(),
        "moments": dataclasses.asdict(moments),
    }
    commit(folder, {"summary.json": json.dumps(summary, sort_keys=True).encode()}, summary, options)


def committed_split(folder: str, options: dict[str, Any], encoded_now: int) -> LatentSplit:
    summary = read_manifest(folder, options)["metadata"]
    return LatentSplit(
        folder,
        summary["autoencoder_identity"],
        (int(summary["shape"][0]), int(summary["shape"][1]), int(summary["shape"][2])),
        int(summary["count"]),
        float(summary["scaling_factor"]),
        encoded_now,
    )
