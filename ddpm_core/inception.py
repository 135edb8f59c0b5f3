"""The standard FID network: torch-fidelity's port of the TF 2015-12-05 Inception-v3 graph (the one pytorch-fid,
torch-fidelity, torchmetrics and the published diffusion FIDs use), with its TF1-compatible bilinear resize to
299x299, returning pool3 features ``[N, 2048]`` and the 1008-way logits for the Inception Score.

The weights file (``pt_inception-2015-12-05-6726825d.pth``) comes from a configured URI through
:func:`ddpm_core.weights.fetch_verified`; torch-fidelity is in the ``eval`` extra (it needs torchvision).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm_core.weights import DEFAULT_CACHE, WeightsError, fetch_verified

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
HOW_TO_PROVIDE = (
    f"Copy {WEIGHTS_FILE} (from the pytorch-fid / torch-fidelity releases, on a machine with internet access) "
    "to storage your workers can read and set evaluate.inception_weights_uri to it; see docs/evaluation.md, "
    "'Inception weights'."
)
FEATURES, LOGITS = "2048", "logits_unbiased"


def feature_extractor_class() -> type:
    """torch-fidelity's Inception-v3 feature extractor class; an ImportError says how to install it."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as error:
        raise ImportError(
            "evaluate.extractor=inception needs torch-fidelity and torchvision: pip install 'ddpm-pipeline[eval]'"
        ) from error
    return FeatureExtractorInceptionV3


class InceptionExtractor:
    """pool3 features and logits of uint8 images of any size; grayscale images are repeated to 3 channels."""

    def __init__(
        self, weights_path: str | Path, weights_sha256: str, device: torch.device | str = "cpu", batch_size: int = 250
    ) -> None:
        network = feature_extractor_class()(
            name="inception-v3-compat",
            features_list=[FEATURES, LOGITS],
            feature_extractor_weights_path=str(weights_path),
        )
        self.network = network.eval().to(device)
        self.device, self.batch_size = torch.device(device), batch_size
        self.id = f"inception-v3-compat-{weights_sha256[:16]}"
        self.weights_sha256 = weights_sha256

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[N, H, W, C]`` -> (features ``[N, 2048]``, logits ``[N, 1008]``), float32 on the CPU."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # [N, C, H, W] uint8
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        features, logits = [], []
        for start in range(0, x.shape[0], self.batch_size):
            pooled, logit = self.network(x[start : start + self.batch_size].contiguous().to(self.device))
            features.append(pooled.float().cpu())
            logits.append(logit.float().cpu())
        if not features:
            return torch.zeros(0, 2048), torch.zeros(0, 1008)
        return torch.cat(features), torch.cat(logits)


def tensors_only_copy(path: Path) -> Path:
    """torch-fidelity opens its weights with ``torch.load(weights_only=False)``, which would run code pickled into
    the file. Open them here with ``weights_only=True`` (tensors only) and hand torch-fidelity a copy re-saved from
    those tensors, written under a temporary name and renamed."""
    clean = path.with_name(path.name + ".tensors-only.pt")
    if not clean.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise WeightsError(
                f"{path}: not a tensors-only PyTorch state dict ({type(error).__name__}: {error})"
            ) from error
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightsError(f"{path}: expected a state dict of tensors")
        temporary = clean.with_name(f"{clean.name}.{uuid.uuid4().hex}.partial")  # concurrent workers may race here
        torch.save(state, temporary)
        os.replace(temporary, clean)
    return clean


def load_inception(
    weights_uri: str,
    weights_sha256: str,
    storage_options: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    cache_dir: str | Path = DEFAULT_CACHE,
) -> InceptionExtractor:
    """Fetch (or reuse the cached copy of) the verified weights and build the extractor."""
    path, digest = fetch_verified(weights_uri, weights_sha256, HOW_TO_PROVIDE, storage_options, cache_dir)
    return InceptionExtractor(tensors_only_copy(path), digest, device)
