"""rFID, the floor of a latent model (Rombach et al. 2022, Sec. 4.1 and Table 8): the held-out images passed through
the autoencoder, ``D(mean of q(z | x))``, scored like any image set. No latent model's samples can be nearer the data
than what its decoder makes of real latents, so the gap between rFID and the hold-out's own FID (the same images, not
reconstructed) is the part of the model's FID that the autoencoder, not the diffusion model, accounts for."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
import torch

from ddpm_core.autoencoder import KLAutoencoder
from ddpm_core.autoencoder_weights import LatentSpace, load_autoencoder
from ddpm_core.data import to_model_range, to_uint8
from ddpm_core.storage import is_committed
from pipelines.data.shards import ImageSource, read_images, sample_sources, split_sources, write_sample_shard
from pipelines.execution import Execution

BATCH = 64  # images per encoder and decoder pass


@torch.no_grad()
def reconstruct(model: KLAutoencoder, images: torch.Tensor) -> torch.Tensor:
    """``D(mean of q(z | x))`` for images ``x [n, C, H, W]`` in [-1, 1], clipped to [-1, 1] as decoded samples are
    (``LatentSpace.decoder``): the posterior mean, not a draw, as LDM reports rFID."""
    parts = [model.decode(model.encode(part).mean).clamp(-1.0, 1.0) for part in images.split(BATCH)]
    return torch.cat(parts)  # [n, C, H, W]


@ray.remote
class Reconstructor:
    """Holds one autoencoder, loaded and verified once, and reconstructs data-split files with it."""

    def __init__(self, space: LatentSpace, storage_options: dict[str, Any]) -> None:
        self.model, _ = load_autoencoder(space.autoencoder_uri, space.autoencoder_sha256, storage_options)
        self.storage_options = storage_options

    def reconstruct(self, source: ImageSource, uri: str) -> str:
        """The images of ``source``, reconstructed, committed at ``uri`` as a sample shard with the same indices."""
        images = read_images(source, self.storage_options)  # [n, H, W, C] uint8
        reconstructed = to_uint8(reconstruct(self.model, to_model_range(images)))  # [n, H, W, C] uint8
        write_sample_shard(uri, reconstructed, source.first_index, 0, self.storage_options)
        return uri


def reconstructed_sources(
    space: LatentSpace, holdout_uri: str, folder: str, execution: Execution, log: Callable[[str], None]
) -> list[ImageSource]:
    """The hold-out split's files reconstructed through the autoencoder of ``space``, one committed shard per file
    under ``folder`` (a re-run keeps the shards committed before), on a pool of :class:`Reconstructor` actors."""
    options = execution.storage_options
    sources = split_sources(holdout_uri, options)
    targets = [f"{folder}/shard-{number:05d}" for number in range(len(sources))]
    todo = [(source, uri) for source, uri in zip(sources, targets, strict=True) if not is_committed(uri, options)]
    if todo:
        log(f"autoencoder: reconstructing {len(todo)} hold-out file(s) for the reconstruction grid and rFID")
        count = max(1, min(len(todo), execution.free_slots()))
        with execution.actor_pool(Reconstructor, count, space, options) as pool:
            list(pool.map(lambda actor, job: actor.reconstruct.remote(*job), todo))
    return sample_sources(targets, options)
