"""The paper's figures of a finished run, from its EMA snapshot: latent interpolation between two held-out images
(Ho et al. 2020, Sec. 4.4, Fig. 9) and progressive decoding, the predicted x_0 along the reverse chain (Sec. 4.3,
Fig. 6). ``python -m pipelines interpolate RUN_ID`` and ``python -m pipelines progressive RUN_ID`` write them as PNG
grids. A class-conditional model is drawn as its null-class (unconditional) model. A latent model (Rombach et al.
2022) interpolates the held-out images' latents, as the autoencoder stage encoded them, and decodes what it draws.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ddpm_core.checkpoint import load_snapshot
from ddpm_core.data import DataError, to_model_range, to_uint8
from ddpm_core.diffusion import GaussianDiffusion, Model
from ddpm_core.images import save_grid
from ddpm_core.interpolation import interpolate
from ddpm_core.samplers import Method, PerIndexNoise, SamplerConfig, null_conditioned, sample
from pipelines.config import ConfigError, PipelineConfig
from pipelines.contracts import AutoencoderOutputs, PrepareOutputs, TrainOutputs
from pipelines.data.latent_files import read_latent_file
from pipelines.data.shards import read_images_at, split_layout
from pipelines.runs import RunStore


@dataclass(frozen=True)
class TrainedModel:
    network: Model  # unconditional: the network itself; conditional: its null-class model
    diffusion: GaussianDiffusion
    shape: tuple[int, int, int]  # (C, H, W) of the network's data: images, or a latent model's latents
    to_images: Callable[[torch.Tensor], torch.Tensor]  # the network's data -> images in [-1, 1]
    latent: bool


def trained_model(store: RunStore) -> TrainedModel:
    """The run's EMA snapshot, ready to sample on this machine's CPU."""
    train = store.current_manifest("train", TrainOutputs)
    if train is None:
        raise ConfigError(f"run {store.root}: the train stage has not finished (see `python -m pipelines status`)")
    snapshot = load_snapshot(train.outputs.snapshot_uri, store.options)
    network = snapshot.build_model()
    classes = snapshot.unet.num_classes
    model = null_conditioned(network, classes) if classes is not None else network
    unet = snapshot.unet
    return TrainedModel(
        model,
        GaussianDiffusion.from_config(snapshot.diffusion),
        (unet.in_channels, unet.image_size, unet.image_size),
        snapshot.image_decoder(store.options),
        snapshot.latent_space is not None,
    )


def held_out_split(store: RunStore) -> str:
    """The split the figures draw sources from: the hold-out split, or the training split when there is none."""
    prepare = store.current_manifest("prepare", PrepareOutputs)
    if prepare is None:
        raise ConfigError(f"run {store.root}: the prepare stage has not finished")
    return prepare.outputs.holdout_uri if prepare.outputs.num_holdout else prepare.outputs.shards_uri


def holdout_images(store: RunStore, indices: Sequence[int]) -> np.ndarray:
    """Held-out images ``[n, H, W, C]`` uint8 by index (the training split when there is no hold-out)."""
    layout = split_layout(held_out_split(store), store.options)
    wrong = [index for index in indices if not 0 <= index < layout.count]
    if wrong:
        raise DataError(
            f"--pair: image index {wrong[0]} is outside the {layout.count} held-out images of {store.root} "
            f"(0 to {layout.count - 1})"
        )
    return read_images_at(layout, list(indices), store.options)  # only the files holding them


def holdout_latents(store: RunStore, indices: Sequence[int]) -> torch.Tensor:
    """A latent model's latents of the held-out images at ``indices`` (those of :func:`holdout_images`): each
    posterior's mean, as the autoencoder stage encoded it (one latent file per file of the split), in the model's
    space (its scaling factor). ``[n, c, h, w]``."""
    autoencoder = store.current_manifest("autoencoder", AutoencoderOutputs)
    if autoencoder is None:
        raise ConfigError(f"run {store.root}: the autoencoder stage has not finished")
    outputs = autoencoder.outputs
    latent = outputs.holdout_latent if outputs.holdout_latent is not None else outputs.latent
    starts = [source.first_index for source in split_layout(held_out_split(store), store.options).sources]
    means = []
    for index in indices:
        number = bisect.bisect_right(starts, index) - 1  # the file holding it
        means.append(read_latent_file(latent.uri, number, store.options)["mean"][index - starts[number]])
    return latent.space.latents(torch.as_tensor(np.stack(means)))


def interpolation_figure(
    config: PipelineConfig, pair: tuple[int, int], timesteps: Sequence[int], columns: int, seed: int
) -> np.ndarray:
    """Rows of Fig. 9: for each t, the first source, ``columns`` decoded mixtures (w from 0 to 1) and the second
    source; ``[len(timesteps) * (columns + 2), H, W, C]`` uint8. Every row uses the same encoding and reverse-process
    noise, so the rows differ only by t."""
    store = RunStore.of(config)
    sources = holdout_images(store, pair)  # [2, H, W, C]
    trained = trained_model(store)
    last = trained.diffusion.num_timesteps - 1
    if any(not 0 <= t <= last for t in timesteps):
        raise ConfigError(f"--timesteps must lie in [0, {last}], got {list(timesteps)}")
    # [C, H, W] each: the images in [-1, 1], or a latent model's latents of them
    first, second = holdout_latents(store, pair) if trained.latent else to_model_range(sources)
    encoding = torch.randn(trained.shape, generator=torch.Generator().manual_seed(seed))  # [C, H, W]
    weights = np.linspace(0.0, 1.0, columns).tolist()
    rows = []
    for t in timesteps:
        noise = PerIndexNoise(seed, range(columns))
        mixtures = interpolate(
            trained.network, trained.diffusion, first, second, t, weights, noise, encoding, not trained.latent
        )
        rows.append(np.concatenate([sources[:1], to_uint8(trained.to_images(mixtures)), sources[1:]]))
    return np.concatenate(rows)


def progressive_figure(config: PipelineConfig, count: int, frames: int, seed: int) -> np.ndarray:
    """Rows of Fig. 6: for each of ``count`` samples (indices 0..count-1 of ``seed``), the predicted x_0 at
    ``frames`` evenly spaced steps of the 1000-step reverse process, the last being the sample;
    ``[count * frames, H, W, C]`` uint8."""
    trained = trained_model(RunStore.of(config))
    steps = trained.diffusion.num_timesteps
    every = max(1, steps // (frames - 1)) if frames > 1 else steps
    noise = PerIndexNoise(seed, range(count))
    sampler = SamplerConfig(Method.ANCESTRAL, clip_denoised=not trained.latent)  # latents are not in [-1, 1]
    result = sample(trained.network, trained.diffusion, trained.shape, noise, sampler, record_x0_every=every)
    assert result.pred_x0 is not None
    chosen = result.pred_x0[np.linspace(0, len(result.pred_x0) - 1, frames).round().astype(int)]  # [F, n, C, H, W]
    return np.concatenate([to_uint8(trained.to_images(chosen[:, index])) for index in range(count)])


def write_figure(images: np.ndarray, columns: int, uri: str, config: PipelineConfig) -> None:
    save_grid(images, uri, columns=columns, storage_options=config.storage.options())
