"""Latent files (:mod:`pipelines.data.latents` writes them): where a split's latents live and how they are read, by
the training workers, the post-hoc EMA choice and the figures, none of which encodes (no Ray Data here)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ddpm_core.storage import read_manifest
from pipelines.contracts import LatentOutputs
from pipelines.data.shards import ImageSource, first_rows, read_split_file

LATENT_FILE = "latents.npz"


def latents_uri(latents_root: str, split: str, autoencoder_identity: str) -> str:
    """The folder of the latents of the split whose identity is ``split`` under one autoencoder."""
    return f"{latents_root}/{split[:16]}-{autoencoder_identity[:16]}"


def file_uri(folder: str, number: int) -> str:
    return f"{folder}/file-{number:05d}"


def read_latent_file(folder: str, number: int, options: dict[str, Any]) -> dict[str, np.ndarray]:
    """One latent file: ``mean`` and ``logvar`` float32 ``[n, c, h, w]`` and, when the split has them, ``labels``."""
    return read_split_file(ImageSource(file_uri(folder, number), LATENT_FILE, 0), options)


def held_out_latents(latent: LatentOutputs, count: int, seed: int, options: dict[str, Any]) -> torch.Tensor:
    """The first ``count`` latents of a committed folder (a hold-out split's) as the diffusion model sees them:
    one sample of each posterior, ``z = mean + exp(logvar / 2) * noise`` with the noise drawn from ``seed`` (the same
    for every network scored on them), in ``latent.space`` (its scaling). float32 ``[n, c, h, w]`` on the CPU."""
    held = read_latents(latent.uri, options, count)
    mean, logvar = torch.as_tensor(held["mean"]), torch.as_tensor(held["logvar"])  # [n, c, h, w] each
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))  # [n, c, h, w]
    return latent.space.latents(mean + torch.exp(0.5 * logvar) * noise)


def read_latents(folder: str, options: dict[str, Any], count: int | None = None) -> dict[str, np.ndarray]:
    """The first ``count`` latents (None: all) of a committed folder, in the split's order, reading only the files
    they are in (:func:`read_latent_file`, :func:`pipelines.data.shards.first_rows`)."""
    files = int(read_manifest(folder, options)["metadata"]["files"])
    return first_rows((read_latent_file(folder, number, options) for number in range(files)), count)
