"""What a training run computes from: the network, the diffusion, the training section and how its data is loaded.
The train stage's settings hold one, and every tune trial trains its own, with the trial's parameters applied."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ddpm_core.diffusion import DiffusionConfig
from pipelines.config import ConfigError, DataSection, ModelSection, PipelineConfig, TrainSection
from pipelines.config_file import set_dotted
from pipelines.typed import from_plain, to_plain

TUNABLE_SECTIONS = ("model", "diffusion", "train")  # what tune.space may search


@dataclass(frozen=True)
class TrainingRecipe:
    model: ModelSection
    diffusion: DiffusionConfig
    train: TrainSection
    data: DataSection  # its loader choice (data.loader, data.memory_budget_mb) and streaming knobs

    @classmethod
    def of(cls, config: PipelineConfig) -> TrainingRecipe:
        return cls(config.model, config.diffusion, config.train, config.data)

    def with_overrides(self, params: dict[str, Any]) -> TrainingRecipe:
        """The recipe with dotted config keys replaced (a tune trial's parameters), checked again."""
        plain = to_plain(self)
        for key, value in params.items():
            if key.split(".", 1)[0] not in TUNABLE_SECTIONS:
                raise ConfigError(f"{key}: only {', '.join(f'{name}.*' for name in TUNABLE_SECTIONS)} keys are tuned")
            set_dotted(plain, key, value)
        return from_plain(TrainingRecipe, plain, error=ConfigError)
