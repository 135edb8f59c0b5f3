"""ddpm_core: a pure-PyTorch DDPM library (Ho, Jain & Abbeel 2020) with its well-known follow-ups.

No Ray, no MLflow: every piece here runs and is tested in one process.
"""

from ddpm_core.checkpoint import (
    CheckpointError,
    Snapshot,
    load_snapshot,
    load_training_state,
    save_snapshot,
    save_training_state,
)
from ddpm_core.data import DataError, ImageDataset, load_dataset, random_horizontal_flip, to_model_range, to_uint8
from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion, Loss, Prediction, Variance
from ddpm_core.ema import EMA
from ddpm_core.metrics import FeatureStatistics, frechet_distance, frechet_distance_from_stats
from ddpm_core.samplers import GeneratorNoise, Method, PerIndexNoise, SamplerConfig, Spacing, sample
from ddpm_core.schedules import Schedule, make_betas
from ddpm_core.training import OptimConfig, train_step
from ddpm_core.unet import UNet, UNetConfig, unet_preset

__all__ = [
    "EMA",
    "CheckpointError",
    "DataError",
    "DiffusionConfig",
    "FeatureStatistics",
    "GaussianDiffusion",
    "GeneratorNoise",
    "ImageDataset",
    "Loss",
    "Method",
    "OptimConfig",
    "PerIndexNoise",
    "Prediction",
    "SamplerConfig",
    "Schedule",
    "Snapshot",
    "Spacing",
    "UNet",
    "UNetConfig",
    "Variance",
    "frechet_distance",
    "frechet_distance_from_stats",
    "load_dataset",
    "load_snapshot",
    "load_training_state",
    "make_betas",
    "random_horizontal_flip",
    "sample",
    "save_snapshot",
    "save_training_state",
    "to_model_range",
    "to_uint8",
    "train_step",
    "unet_preset",
]
