"""Checkpoints on any fsspec URI, committed atomically through :mod:`ddpm_core.storage`.

Two kinds, as in EDM: the *training state* (model, EMA, optimizer, step, images seen, RNG states, config) to
resume training, and the *inference snapshot* (EMA weights + U-Net and diffusion configs) to sample. Opening
either runs no code from the file: the training state loads with ``torch.load(weights_only=True)``, the snapshot
is safetensors + JSON.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ddpm_core.autoencoder_weights import LatentSpace
from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion, Model, Variance
from ddpm_core.distillation import ConsistencyFunction
from ddpm_core.samplers import autoguidance, guidance_interval
from ddpm_core.storage import commit, read_committed
from ddpm_core.unet import UNet, UNetConfig

TRAINING_STATE = "training_state.pt"
WEIGHTS = "model.safetensors"
GUIDE_WEIGHTS = "guide.safetensors"
CONFIG = "config.json"
AUTOGUIDANCE = "autoguidance"  # the metadata key of a snapshot stored with a guide: its weight and provenance


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, corrupt, or for a different model."""


def save_training_state(uri: str, state: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    """Commit a training state: a dict of tensors, state dicts and JSON-able values (``torch.save`` format)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    commit(
        uri, {TRAINING_STATE: buffer.getvalue()}, {"kind": "training_state", "step": state.get("step")}, storage_options
    )


def load_training_state(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a committed training state with ``weights_only=True`` (no pickled code runs)."""
    try:
        files, _ = read_committed(uri, [TRAINING_STATE], storage_options)
        return torch.load(io.BytesIO(files[TRAINING_STATE]), map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"cannot load training state: {error}") from error
    except Exception as error:  # torch.load's UnpicklingError / RuntimeError on foreign or damaged content
        raise CheckpointError(f"{uri}/{TRAINING_STATE} is not a loadable training state: {error}") from error


@dataclass(frozen=True)
class Guide:
    """A weaker version of a snapshot's model that guides it (autoguidance: Karras et al. 2024, "Guiding a Diffusion
    Model with a Bad Version of Itself", Eq. 1): the same network with other weights, e.g. an earlier EMA of the same
    run, stored beside the model's weights (``guide.safetensors``) so that whoever samples the snapshot samples the
    guided model."""

    state_dict: dict[str, torch.Tensor]
    weight: float  # w of ``pred = guide + w (model - guide)``; 1: the model alone
    provenance: dict[str, Any]  # how the guide was made (JSON; in the snapshot's metadata beside the weight)
    # the noise levels sigma in (low, high] where it guides (ddpm_core.samplers.guidance_interval); None: every step
    interval: tuple[float, float] | None = None


@dataclass
class Snapshot:
    """An inference snapshot: everything needed to rebuild the network and the diffusion and to sample."""

    unet: UNetConfig
    diffusion: DiffusionConfig
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    guide: Guide | None = None  # autoguidance by a weaker model, applied by :meth:`sampling_model`

    @property
    def consistency_student(self) -> bool:
        """Whether the weights are a consistency-distilled student's (``metadata["distilled"]["method"]``), whose
        network is read through the skip scalings (:class:`ddpm_core.distillation.ConsistencyFunction`)."""
        return self.metadata.get("distilled", {}).get("method") == "consistency"

    @property
    def latent_space(self) -> LatentSpace | None:
        """A latent diffusion model's latent space (``metadata["latent"]``); None for a model of pixels."""
        latent = self.metadata.get("latent")
        return None if latent is None else LatentSpace.from_dict(latent)

    def image_decoder(
        self, storage_options: dict[str, Any] | None = None, folder: str | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """From the model's samples ``[B, C', H', W']`` to images ``[B, C, H, W]`` in [-1, 1]: the identity for a model
        of pixels, the autoencoder's decoder for a latent one (:meth:`LatentSpace.decoder`; ``folder``: a local copy of
        the autoencoder's folder)."""
        space = self.latent_space
        if space is None:
            return lambda samples: samples
        return space.decoder(storage_options, folder, log=lambda _: None)

    def build_model(self) -> torch.nn.Module:
        """The network as samplers call it, in eval mode: :meth:`build_network`, read as a consistency model where the
        snapshot is a consistency student (answering in its diffusion's prediction either way)."""
        network = self.build_network()
        if not self.consistency_student:
            return network
        return ConsistencyFunction(network, GaussianDiffusion.from_config(self.diffusion)).eval()

    def sampling_model(
        self, prepare: Callable[[torch.nn.Module], Model] = lambda network: network, weight: float | None = None
    ) -> Model:
        """What samplers call: :meth:`build_model`, guided by the snapshot's :class:`Guide` where it has one (Karras et
        al. 2024, Eq. 1, at the stored weight or ``weight``; 1: unguided, one network call per step), in the guide's
        interval of noise levels where it has one (:func:`ddpm_core.samplers.guidance_interval`). ``prepare`` readies
        each network for sampling (device, precision, compilation)."""
        model = prepare(self.build_model())
        if self.guide is None:
            return model
        weight = self.guide.weight if weight is None else weight
        if weight == 1:
            return model
        guide = prepare(self.build_network(self.guide.state_dict))
        guided = autoguidance(model, guide, weight, self.unet.in_channels)
        alphas_cumprod = GaussianDiffusion.from_config(self.diffusion).alphas_cumprod  # [T]
        return guidance_interval(guided, model, alphas_cumprod, self.guide.interval)

    def build_network(self, state_dict: dict[str, torch.Tensor] | None = None) -> UNet:
        """The U-Net with the snapshot's weights (or ``state_dict``: its guide's), in eval mode. Raises
        :class:`CheckpointError` on a mismatch."""
        model = UNet(self.unet, learn_variance=self.diffusion.variance is Variance.LEARNED_RANGE)
        try:
            model.load_state_dict(self.state_dict if state_dict is None else state_dict)
        except RuntimeError as error:
            raise CheckpointError(f"snapshot weights do not fit its U-Net config: {error}") from error
        return model.eval()


def save_snapshot(
    uri: str,
    model: torch.nn.Module,
    unet: UNetConfig,
    diffusion: DiffusionConfig,
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    guide: Guide | None = None,
) -> None:
    """Commit an inference snapshot: ``model.safetensors`` (weights) and ``config.json`` (configs + metadata); with a
    ``guide``, also ``guide.safetensors``, its weight, interval and provenance under ``metadata["autoguidance"]``."""
    metadata = {name: value for name, value in (metadata or {}).items() if name != AUTOGUIDANCE}
    files = {WEIGHTS: save_safetensors(tensors_of(model.state_dict()))}
    if guide is not None:
        interval = {} if guide.interval is None else {"interval": list(guide.interval)}
        metadata[AUTOGUIDANCE] = {"weight": guide.weight, **interval, **guide.provenance}
        files[GUIDE_WEIGHTS] = save_safetensors(tensors_of(guide.state_dict))
    config = {"unet": unet.to_dict(), "diffusion": diffusion.to_dict(), "metadata": metadata}
    commit(uri, {**files, CONFIG: json.dumps(config, indent=2).encode()}, {"kind": "snapshot"}, storage_options)


def tensors_of(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as safetensors stores it: detached, on the CPU, contiguous."""
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}


def read_snapshot_config(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[UNetConfig, DiffusionConfig]:
    """The U-Net and diffusion configs of a committed snapshot, without reading its weights."""
    try:
        files, _ = read_committed(uri, [CONFIG], storage_options)
    except FileNotFoundError as error:
        raise CheckpointError(f"cannot load snapshot: {error}") from error
    try:
        config = json.loads(files[CONFIG])
        return UNetConfig.from_dict(config["unet"]), DiffusionConfig.from_dict(config["diffusion"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{uri}: snapshot config is invalid: {error}") from error


def guide_of(stored: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Guide:
    """The :class:`Guide` whose weight, interval (absent: every step) and provenance ``stored`` holds."""
    provenance = {name: value for name, value in stored.items() if name not in ("weight", "interval")}
    interval = stored.get("interval")
    low_high = None if interval is None else (float(interval[0]), float(interval[1]))
    return Guide(state_dict, float(stored["weight"]), provenance, low_high)


def load_snapshot(uri: str, storage_options: dict[str, Any] | None = None) -> Snapshot:
    """Load a committed inference snapshot (safetensors + JSON only), with its guide where it has one."""
    try:
        files, _ = read_committed(uri, None, storage_options)
    except FileNotFoundError as error:
        raise CheckpointError(f"cannot load snapshot: {error}") from error
    try:
        config = json.loads(files[CONFIG])
        metadata = config.get("metadata", {})
        guide = None
        if AUTOGUIDANCE in metadata:
            guide = guide_of(metadata[AUTOGUIDANCE], load_safetensors(files[GUIDE_WEIGHTS]))
        return Snapshot(
            UNetConfig.from_dict(config["unet"]),
            DiffusionConfig.from_dict(config["diffusion"]),
            load_safetensors(files[WEIGHTS]),
            metadata,
            guide,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{uri}: snapshot config or weights are invalid: {error}") from error
