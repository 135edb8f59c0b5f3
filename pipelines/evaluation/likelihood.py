"""The NLL bound in bits/dim (Ho et al. 2020, Eq. 5 and Table 2) of held-out real images, over Ray tasks.

Images are cut into fixed chunks of ``batch_size``; chunk c draws its noise from a generator seeded by (seed, c),
so the per-image bounds do not depend on how many workers share the chunks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import ray
import torch

from pipelines.contracts import NllProtocol
from pipelines.execution import Execution


@dataclass(frozen=True)
class NllResult:
    bits_per_dim: float  # mean over images of the per-image bound
    stderr: float  # standard error of that mean over images (includes the Monte Carlo noise of an estimate)
    num_images: int


@ray.remote
def chunk_bits_per_dim(
    snapshot_uri: str, images: np.ndarray, chunk: int, protocol: NllProtocol, storage_options: dict[str, object]
) -> list[float]:
    """Per-image bound of uint8 ``images`` ``[n, H, W, C]``: all T terms, or the unbiased estimate from
    ``protocol.timesteps`` random timesteps, with noise from a generator seeded by (seed, chunk)."""
    from ddpm_core.checkpoint import load_snapshot
    from ddpm_core.data import to_model_range
    from ddpm_core.diffusion import GaussianDiffusion
    from ddpm_core.samplers import null_conditioned

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    snapshot = load_snapshot(snapshot_uri, storage_options)
    network = snapshot.build_model().to(device).eval()
    classes = snapshot.unet.num_classes  # a conditional model's bound is its unconditional (null-class) model's
    model = null_conditioned(network, classes) if classes is not None else network
    diffusion = GaussianDiffusion.from_config(snapshot.diffusion)
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([protocol.seed, chunk]).generate_state(1)[0]))
    x0 = to_model_range(np.array(images)).to(device)  # [n, C, H, W]; a writable copy of the object-store array
    with torch.no_grad():
        if protocol.timesteps is None:
            bound = diffusion.bits_per_dim(model, x0, generator=generator)["total"]
        else:
            bound = diffusion.bits_per_dim_estimate(model, x0, protocol.timesteps, generator=generator)["total"]
    return bound.double().cpu().tolist()


def held_out_bits_per_dim(
    snapshot_uri: str, images: np.ndarray, protocol: NllProtocol, execution: Execution
) -> NllResult:
    """The bound of every image of ``images`` ``[N, H, W, C]`` uint8, in chunks of ``protocol.batch_size`` over Ray
    tasks, and its mean with the standard error over images."""
    size = protocol.batch_size
    futures = [
        chunk_bits_per_dim.options(**execution.options()).remote(
            snapshot_uri, images[start : start + size], start // size, protocol, execution.storage_options
        )
        for start in range(0, len(images), size)
    ]
    per_image = torch.tensor([value for chunk in ray.get(futures) for value in chunk], dtype=torch.float64)  # [N]
    stderr = float(per_image.std(unbiased=True) / math.sqrt(len(per_image))) if len(per_image) > 1 else float("nan")
    return NllResult(float(per_image.mean()), stderr, len(per_image))
