"""Feature extractors for FID, Inception Score and precision/recall, and the domain extractor for small data sets.

Every extractor maps uint8 images ``[N, H, W, C]`` to ``(features [N, d], logits [N, K])`` and has an ``id`` naming
its weights, so scores computed with different networks are never compared by mistake. Where Inception features are
meaningless (8x8 digits, MNIST), a small CNN classifier trained on the data set's own labels is the extractor: its
penultimate activations (after global average pooling) are the features, its class logits feed the Inception Score
formula, and its identity is the SHA-256 of its weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from ddpm_core.data import to_model_range
from ddpm_core.storage import commit, read_committed


class FeatureExtractor(Protocol):
    id: str

    def __call__(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[N, H, W, C]`` -> (float32 features ``[N, d]``, float32 class logits ``[N, K]``)."""
        ...


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int
    num_classes: int
    width: int = 32  # channels of the first conv; features have 4 * width dimensions


class Classifier(nn.Module):
    """conv(w) -> conv(2w) -> pool -> conv(4w) -> global average pool -> features [B, 4w] -> linear logits."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        w = config.width
        self.config = config
        self.body = nn.Sequential(
            nn.Conv2d(config.in_channels, w, 3, padding=1),
            nn.GroupNorm(8, w),
            nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.GroupNorm(8, 2 * w),
            nn.SiLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1),
            nn.GroupNorm(8, 4 * w),
            nn.SiLU(),
        )
        self.head = nn.Linear(4 * w, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in [-1, 1] -> ``[B, 4w]``."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(
    images: np.ndarray, labels: np.ndarray, epochs: int, seed: int = 0, batch_size: int = 128
) -> Classifier:
    """Train on uint8 ``[N, H, W, C]`` images and int labels with Adam and light shift augmentation."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = to_model_range(images), torch.as_tensor(labels, dtype=torch.long)
    model = Classifier(ClassifierConfig(in_channels=x.shape[1], num_classes=int(y.max()) + 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            shift = tuple(torch.randint(-1, 2, (2,), generator=generator).tolist())
            logits = model(torch.roll(x[batch], shifts=shift, dims=(2, 3)))
            loss = F.cross_entropy(logits, y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: Classifier, images: np.ndarray, labels: np.ndarray) -> float:
    predictions = model(to_model_range(images)).argmax(1)
    return float((predictions == torch.as_tensor(labels)).float().mean())


@torch.no_grad()
def extract_features(model: Classifier, images: np.ndarray, batch_size: int = 500) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` -> float32 features ``[N, d]``."""
    x = to_model_range(images)
    return (
        torch.cat([model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
        if len(x)
        else torch.zeros(0, 4 * model.config.width)
    )


class ClassifierExtractor:
    """A trained :class:`Classifier` as a :class:`FeatureExtractor`."""

    def __init__(self, model: Classifier, batch_size: int = 500) -> None:
        self.model, self.batch_size, self.id = model.eval(), batch_size, extractor_id(model)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        features = extract_features(self.model, images, self.batch_size)  # [N, 4w]
        return features, self.model.head(features)


def extractor_id(model: Classifier) -> str:
    """``classifier-<sha256 of the weights, 16 hex>``."""
    digest = hashlib.sha256(save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()})).hexdigest()
    return f"classifier-{digest[:16]}"


def save_classifier(uri: str, model: Classifier, metadata: dict, storage_options: dict | None = None) -> None:
    weights = save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()})
    config = json.dumps({"config": asdict(model.config), "metadata": metadata}).encode()
    commit(
        uri,
        {"classifier.safetensors": weights, "classifier.json": config},
        {"kind": "feature_extractor"},
        storage_options,
    )


def load_classifier(uri: str, storage_options: dict | None = None) -> tuple[Classifier, dict]:
    files, _ = read_committed(uri, ["classifier.safetensors", "classifier.json"], storage_options)
    description = json.loads(files["classifier.json"])
    model = Classifier(ClassifierConfig(**description["config"]))
    model.load_state_dict(load_safetensors(files["classifier.safetensors"]))
    return model.eval(), description["metadata"]
