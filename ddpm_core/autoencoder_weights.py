"""An autoencoder in diffusers' ``AutoencoderKL`` folder format on any fsspec URI: read with a deadline and a
verified SHA-256, written so that a half-written folder never loads.

A folder holds ``config.json`` (:meth:`ddpm_core.autoencoder.AutoencoderConfig.from_diffusers`) and
``diffusion_pytorch_model.safetensors``. The autoencoder's identity is the SHA-256 of its canonical config and of its
weights' digest, so that the same weights under another scaling factor are another autoencoder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ddpm_core.autoencoder import AutoencoderConfig, KLAutoencoder
from ddpm_core.fields import FieldError
from ddpm_core.storage import StorageUnreachableError, filesystem, reach, storage_failures_named, write_bytes
from ddpm_core.weights import DEFAULT_CACHE, WeightsError, fetch_verified

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
HOW_TO_PROVIDE = (
    "Provide a diffusers AutoencoderKL folder (config.json and diffusion_pytorch_model.safetensors, as written by "
    "AutoencoderKL.save_pretrained) at autoencoder.weights_uri, and set autoencoder.weights_sha256 to the output of "
    "`sha256sum diffusion_pytorch_model.safetensors`."
)


def autoencoder_identity(config: AutoencoderConfig, weights_sha256: str) -> str:
    """SHA-256 of the canonical config and the weights' full SHA-256."""
    canonical = json.dumps(config.to_diffusers(), sort_keys=True)
    return hashlib.sha256(f"{canonical}\n{weights_sha256}".encode()).hexdigest()


def read_config(
    uri: str, storage_options: dict[str, Any] | None = None, log: Callable[[str], None] = print
) -> AutoencoderConfig:
    """The folder's ``config.json`` as an :class:`AutoencoderConfig`; a missing, unreadable or unsupported config
    raises :class:`WeightsError` naming the file."""
    location = f"{uri.rstrip('/')}/{CONFIG_FILE}"
    try:
        reach(location, storage_options, log)
        fs, path = filesystem(location, storage_options)
        if not fs.exists(path):
            raise WeightsError(f"{location!r} does not exist. {HOW_TO_PROVIDE}")
        data = json.loads(fs.cat_file(path))
    except (StorageUnreachableError, json.JSONDecodeError, OSError) as error:
        raise WeightsError(f"{location!r} cannot be read: {error}. {HOW_TO_PROVIDE}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{location!r}: expected a JSON object of AutoencoderKL fields, got {type(data).__name__}")
    try:
        return AutoencoderConfig.from_diffusers(data, source=CONFIG_FILE)
    except (FieldError, TypeError) as error:
        raise WeightsError(f"{location!r}: {error}") from None


def load_autoencoder(
    uri: str,
    sha256: str,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | Path = DEFAULT_CACHE,
    log: Callable[[str], None] = print,
) -> tuple[KLAutoencoder, str]:
    """The autoencoder in the folder at ``uri`` (in eval mode, float32, on the CPU) and its identity
    (:func:`autoencoder_identity`). ``sha256`` is the weights file's SHA-256 or a prefix of at least 8 hex digits;
    the weights are cached locally by digest (:func:`ddpm_core.weights.fetch_verified`)."""
    config = read_config(uri, storage_options, log)
    weights_uri = f"{uri.rstrip('/')}/{WEIGHTS_FILE}"
    path, digest = fetch_verified(weights_uri, sha256, HOW_TO_PROVIDE, storage_options, cache_dir, log)
    model = KLAutoencoder(config)
    state = safetensors.torch.load_file(str(path))
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    reshaped = sorted(name for name in set(shapes) & set(state) if tuple(state[name].shape) != shapes[name])
    if missing or unexpected or reshaped:
        raise WeightsError(
            f"{weights_uri!r} does not match its {CONFIG_FILE}: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"of another shape {reshaped[:3]} ({len(missing)}, {len(unexpected)} and {len(reshaped)} in all)"
        )
    model.load_state_dict({name: tensor.float() for name, tensor in state.items()})
    return model.eval(), autoencoder_identity(config, digest)


def save_autoencoder(model: KLAutoencoder, uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """Write ``model`` as a diffusers ``AutoencoderKL`` folder at ``uri`` (weights first, config last: a folder
    without its config does not load) and return the weights' SHA-256."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    weights = safetensors.torch.save(state)
    config = json.dumps(model.config.to_diffusers(), indent=2, sort_keys=True).encode()
    fs, path = filesystem(uri, storage_options)
    with storage_failures_named(uri, "writing the autoencoder"):
        fs.makedirs(path, exist_ok=True)
        write_bytes(fs, f"{path}/{WEIGHTS_FILE}", weights)
        write_bytes(fs, f"{path}/{CONFIG_FILE}", config)
    return hashlib.sha256(weights).hexdigest()


@dataclass(frozen=True)
class LatentSpace:
    """Where a latent diffusion model's data live: the latents ``scaling_factor * (z - shift_factor)`` of the
    autoencoder in the folder ``autoencoder_uri`` (weights verified by ``autoencoder_sha256``), Rombach et al. 2022,
    Sec. 3 and 4.3.2. A snapshot of such a model records it (``Snapshot.latent_space``), so whatever samples the
    snapshot decodes its samples into images."""

    autoencoder_uri: str
    autoencoder_sha256: str  # the weights file's SHA-256 or a prefix of it, as configured (the identity pins all of it)
    autoencoder_identity: str  # autoencoder_identity() of the folder
    scaling_factor: float  # the folder's config's, or 1/std of the data's latents
    shift_factor: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatentSpace:
        return cls(**data)

    def latents(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion model's data from the autoencoder's latents ``z [B, c, h, w]``."""
        return self.scaling_factor * (z - self.shift_factor)

    def decoder(
        self,
        storage_options: dict[str, Any] | None = None,
        folder: str | None = None,
        log: Callable[[str], None] = print,
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function from the model's samples ``[B, c, h, w]`` to images ``[B, C, H, W]`` in [-1, 1] (clipped):
        the autoencoder's decoder, loaded from ``autoencoder_uri`` (or a copy of its folder at ``folder``) and
        verified; on the samples' device, without gradients."""
        model, _ = load_autoencoder(folder or self.autoencoder_uri, self.autoencoder_sha256, storage_options, log=log)

        def decode(samples: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                z = samples.float() / self.scaling_factor + self.shift_factor  # [B, c, h, w]
                return model.to(samples.device).decode(z).clamp(-1.0, 1.0)

        return decode
