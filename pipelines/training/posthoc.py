"""Post-hoc EMA in a training job's outputs (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", Sec. 3 and Appendix C; the math is :mod:`ddpm_core.phema`): the snapshots of the power-function
EMA profiles that rank 0 keeps (``train.ema_profiles``), committed every ``train.ema_snapshot_every_images`` and at
the end, and the EMA of any width reconstructed from them after training (Appendix C.3, Algorithm 3).

Layout: one committed folder per snapshot time, ``{TrainJob.posthoc_uri}/{images_seen:015d}/`` (names sort by
images seen), holding one ``profile_{i}.safetensors`` per profile (floating tensors as float32) and, in its
manifest's metadata, the images seen and each profile's ``sigma_rel``, ``gamma`` and buffer names.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ddpm_core.phema import PosthocSnapshot, reconstruct
from ddpm_core.storage import commit, committed_folders, is_committed, read_committed
from pipelines.contracts import TrainOutputs


def snapshot_uri(posthoc_uri: str, images_seen: int) -> str:
    """The committed folder of the snapshots taken at ``images_seen``."""
    return f"{posthoc_uri}/{images_seen:015d}"


def profile_file(index: int) -> str:
    return f"profile_{index}.safetensors"


def commit_snapshots(posthoc_uri: str, snapshots: list[PosthocSnapshot], storage_options: dict[str, Any]) -> bool:
    """Commit one time's snapshots (every profile's, all at the same images seen); returns False, writing nothing,
    when that time is committed already: a resumed run passing it again holds the same weights (training is
    deterministic), so the folder is kept rather than rewritten."""
    (images_seen,) = {snap.images_seen for snap in snapshots}
    uri = snapshot_uri(posthoc_uri, images_seen)
    if is_committed(uri, storage_options):
        return False
    files = {
        profile_file(index): save_safetensors({key: value.contiguous() for key, value in snap.state_dict.items()})
        for index, snap in enumerate(snapshots)
    }
    profiles = [
        {
            "file": profile_file(index),
            "sigma_rel": snap.sigma_rel,
            "gamma": snap.gamma,
            "buffer_names": sorted(snap.buffer_names),
        }
        for index, snap in enumerate(snapshots)
    ]
    commit(uri, files, {"kind": "posthoc_ema", "images_seen": images_seen, "profiles": profiles}, storage_options)
    return True


def read_snapshots(posthoc_uri: str, storage_options: dict[str, Any]) -> list[PosthocSnapshot]:
    """Every committed snapshot under ``posthoc_uri``, by images seen, then by profile (each file's size and SHA-256
    checked against its manifest)."""
    snapshots = []
    for uri in committed_folders(posthoc_uri, "[0-9]*", storage_options):
        files, metadata = read_committed(uri, None, storage_options)
        for profile in metadata["profiles"]:
            snapshots.append(
                PosthocSnapshot(
                    sigma_rel=float(profile["sigma_rel"]),
                    gamma=float(profile["gamma"]),
                    images_seen=int(metadata["images_seen"]),
                    state_dict=load_safetensors(files[profile["file"]]),
                    buffer_names=frozenset(profile["buffer_names"]),
                )
            )
    return snapshots


def posthoc_snapshot(
    train: TrainOutputs, sigma_rel: float, storage_options: dict[str, Any], images: int | None = None
) -> dict[str, torch.Tensor]:
    """The state dict of the power-function EMA of width ``sigma_rel`` at the end of training (or at ``images`` seen:
    autoguidance's guide), reconstructed by least squares from the run's committed snapshots (Karras et al. 2024,
    Appendix C.3; :func:`ddpm_core.phema.reconstruct`). Floating tensors are float32; it loads into the network of
    ``train.snapshot_uri``."""
    if train.posthoc_uri is None:
        raise ValueError("this run kept no post-hoc EMA profiles: train with train.ema_profiles (e.g. [0.05, 0.10])")
    snapshots = read_snapshots(train.posthoc_uri, storage_options)
    if not snapshots:
        raise ValueError(f"{train.posthoc_uri}: no committed post-hoc EMA snapshots")
    return reconstruct(snapshots, sigma_rel, train.images_seen if images is None else images)
