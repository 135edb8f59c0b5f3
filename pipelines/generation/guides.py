"""Autoguidance's guide (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", Eq. 1): the
run's sampled EMA width reconstructed at an earlier point of the same run from its post-hoc snapshots
(:func:`pipelines.training.posthoc.posthoc_snapshot`), committed with the model's weights as one snapshot
(:class:`ddpm_core.checkpoint.Guide`). Whoever samples that snapshot samples the guided model: the sample stage's
actors, evaluate's champion re-scoring, the registered pyfunc. No training is added; sampling costs two network
calls per step. Measured on the quickstart: docs/benchmarks.md, "Autoguidance by an earlier EMA of the same run"."""

from __future__ import annotations

from typing import Any

import ray

from ddpm_core.checkpoint import Guide, load_snapshot, save_snapshot
from ddpm_core.storage import is_committed
from pipelines.config import SampleSection
from pipelines.contracts import Autoguidance, TrainOutputs
from pipelines.training.posthoc import posthoc_snapshot


def autoguidance_of(sample: SampleSection, train: TrainOutputs) -> Autoguidance | None:
    """The guide ``sample.autoguidance_*`` asks of this trained model (None: off). The config has checked that the run
    keeps post-hoc snapshots and samples a power-function EMA width."""
    if not sample.autoguided:
        return None
    if train.ema_sigma_rel is None or train.posthoc_uri is None:
        raise ValueError("autoguidance needs a model trained with post-hoc EMA snapshots and train.ema_sigma_rel")
    images = round(sample.autoguidance_guide_at * train.images_seen)
    interval = sample.autoguidance_interval
    return Autoguidance(sample.autoguidance_weight, sample.autoguidance_guide_at, images, train.ema_sigma_rel, interval)


def commit_guided_snapshot(
    train: TrainOutputs, autoguidance: Autoguidance, uri: str, storage_options: dict[str, Any]
) -> None:
    """``train``'s sampled snapshot with its guide, committed at ``uri`` (kept where already committed)."""
    if is_committed(uri, storage_options):
        return
    snapshot = load_snapshot(train.snapshot_uri, storage_options)
    guide = posthoc_snapshot(train, autoguidance.guide_sigma_rel, storage_options, autoguidance.guide_images)
    provenance = {
        "guide_at": autoguidance.guide_at,
        "guide_images": autoguidance.guide_images,
        "guide_sigma_rel": autoguidance.guide_sigma_rel,
        "guide": "the sampled EMA width, reconstructed from the run's post-hoc snapshots at guide_images",
    }
    network = snapshot.build_network()
    guided = Guide(guide, autoguidance.weight, provenance, autoguidance.interval)
    save_snapshot(uri, network, snapshot.unet, snapshot.diffusion, snapshot.metadata, storage_options, guided)


def guided_snapshot(
    train: TrainOutputs,
    autoguidance: Autoguidance,
    uri: str,
    storage_options: dict[str, Any],
    runtime_env: dict[str, Any],
) -> str:
    """:func:`commit_guided_snapshot` as a Ray task on one CPU (it reads every post-hoc snapshot: the driver is not
    where model-sized data is held); returns ``uri``."""
    task = ray.remote(commit_guided_snapshot).options(num_cpus=1, runtime_env=runtime_env, max_retries=2)
    ray.get(task.remote(train, autoguidance, uri, storage_options))
    return uri
