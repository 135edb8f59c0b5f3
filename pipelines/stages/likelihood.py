"""The NLL bound in bits/dim (Ho et al. 2020, Eq. 5 and Table 2) of held-out real images, over Ray tasks.

Images are cut into fixed chunks of ``batch_size``; chunk c draws its noise from a generator seeded by (seed, c),
so the per-image bounds do not depend on how many workers share the chunks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch


@dataclass(frozen=True)
class NllResult:
    bits_per_dim: float  # mean over images of the per-image bound
    stderr: float  # standard error of that mean over images (includes the Monte Carlo noise of an estimate)
    num_images: int


@ray.remote
def chunk_bits_per_dim(snapshot_uri: str, images: np.ndarray, chunk: int, seed: int, timesteps: int | None,
                       storage_options: dict[str, Any]) -> list[float]:
    """Per-image bound of uint8 ``images`` ``[n, H, W, C]``: all T terms, or the unbiased estimate from ``timesteps``."""
    from ddpm_core.checkpoint import load_snapshot
    from ddpm_core.data import to_model_range
    from ddpm_core.diffusion import GaussianDiffusion

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    snapshot = load_snapshot(snapshot_uri, storage_options)
    model = snapshot.build_model().to(device).eval()
    diffusion = GaussianDiffusion.from_config(snapshot.diffusion)
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0]))
    x0 = to_model_range(np.array(images)).to(device)  # [n, C, H, W]; a writable copy of the object-store array
    with torch.no_grad():
        if timesteps is None:
            bound = diffusion.bits_per_dim(model, x0, generator=generator)["total"]
        else:
            bound = diffusion.bits_per_dim_estimate(model, x0, timesteps, generator=generator)["total"]
    return bound.double().cpu().tolist()


def held_out_bits_per_dim(snapshot_uri: str, images: np.ndarray, batch_size: int, seed: int, timesteps: int | None,
                          use_gpu: bool, storage_options: dict[str, Any], runtime_env: dict[str, Any]) -> NllResult:
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    futures = [chunk_bits_per_dim.options(**resources, runtime_env=runtime_env).remote(
        snapshot_uri, images[start:start + batch_size], start // batch_size, seed, timesteps, storage_options)
        for start in range(0, len(images), batch_size)]
    per_image = torch.tensor([value for chunk in ray.get(futures) for value in chunk], dtype=torch.float64)  # [N]
    stderr = float(per_image.std(unbiased=True) / math.sqrt(len(per_image))) if len(per_image) > 1 else float("nan")
    return NllResult(float(per_image.mean()), stderr, len(per_image))
