"""The autoencoder stage's training loop on Ray Train (:mod:`pipelines.training.autoencoder`): a stop asked for by
the driver (what a signal does) checkpoints the step it is seen at and saves nothing, and the same job run again
resumes from that checkpoint to exactly the weights of a run that was never stopped (the patch discriminator, which
joins at the second step, with them); a diverged loss stops the run with what to change."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from ddpm_core.autoencoder_weights import load_autoencoder
from ddpm_core.data import load_dataset
from ddpm_core.storage import commit, is_committed, read_committed
from pipelines.config import AutoencoderSection
from pipelines.context import StageStopped
from pipelines.data.shards import write_split
from pipelines.training.autoencoder import (
    DIVERGED_FILE,
    STOP_FILE,
    AutoencoderJob,
    fit,
    make_trainer,
    record_divergence,
)

SECTION = AutoencoderSection(
    train=True,
    block_out_channels=(32, 32),
    latent_channels=3,
    images=320,
    batch_size=32,
    checkpoint_every_images=160,
    discriminator_start_images=32,  # from the second step: checkpoints hold the discriminator and its optimizer too
    discriminator_layers=1,  # 2x2 patches of the 8x8 digits
)


def job_in(root: Path, tracking: str) -> AutoencoderJob:
    """A job of :data:`SECTION` on the split beside ``root``, logging to a fresh MLflow run."""
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("autoencoder") or client.get_experiment(
        client.create_experiment("autoencoder")
    )
    run_id = client.create_run(experiment.experiment_id).info.run_id
    shards = str(root.parent / "shards")
    return AutoencoderJob(SECTION.architecture(1), SECTION, shards, str(root), {}, tracking, run_id)


def trained(job: AutoencoderJob) -> dict[str, torch.Tensor]:
    """``job`` run to its end; the saved folder's weights."""
    result = fit(make_trainer(job, {}), job)
    assert result.metrics["images_seen"] == SECTION.images and result.metrics["world_size"] == 1
    weights = Path(job.folder_uri, "diffusion_pytorch_model.safetensors").read_bytes()
    model, _ = load_autoencoder(job.folder_uri, hashlib.sha256(weights).hexdigest())
    return model.state_dict()


# three Ray Train fits (58 s): make test-all. In CI: the autoencoder stage trains on Ray Train through the pipeline
# (tests/test_latent_pipeline.py), and a stopped diffusion training run resumes to the uninterrupted weights
# (tests/test_resume_and_corruption.py: SIGTERM, exit 143, the same command again)
@pytest.mark.slow
def test_a_stopped_run_resumes_to_the_weights_of_one_never_stopped(tmp_path, local_ray):
    write_split(str(tmp_path / "shards"), load_dataset("builtin:digits"), np.arange(256), {})
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    whole_job = job_in(tmp_path / "whole", tracking)
    whole = trained(whole_job)
    logged = MlflowClient(tracking).get_run(whole_job.mlflow_run_id).data.metrics
    assert {"discriminator_hinge_loss", "autoencoder_adaptive_weight", "autoencoder_adversarial"} <= set(logged)

    stopped = job_in(tmp_path / "stopped", tracking)
    # what a signal's safe point does: commit the marker while the workers run (fit removes an earlier one first)
    asking = threading.Timer(1.0, commit, (stopped.stop_uri, {STOP_FILE: b"a test"}, {}, {}))
    asking.start()
    first = fit(make_trainer(stopped, {}), stopped)
    asking.join()
    assert 0 < first.metrics["images_seen"] < SECTION.images  # checkpointed where the stop was seen
    assert first.checkpoint is not None and not Path(stopped.folder_uri).exists()  # nothing saved as if finished

    resumed = trained(stopped)  # the same job again: Ray Train hands the group the stopped run's checkpoint
    assert not is_committed(stopped.stop_uri, {})
    resumed_at = MlflowClient(tracking).get_run(stopped.mlflow_run_id).data.metrics["autoencoder_resumed_at_images"]
    assert resumed_at == first.metrics["images_seen"]  # it went on from the checkpoint, not from the start
    for name, tensor in whole.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


def test_a_diverged_run_stops_with_what_to_change_and_saves_nothing(tmp_path, local_ray):
    write_split(str(tmp_path / "shards"), load_dataset("builtin:digits"), np.arange(64), {})
    job = job_in(tmp_path / "diverging", f"sqlite:///{tmp_path / 'mlflow.db'}")
    job = dataclasses.replace(job, section=dataclasses.replace(SECTION, learning_rate=1e12))
    with pytest.raises(StageStopped, match=r"diverged: the loss became non-finite by \d+ images\. Lower autoencoder"):
        fit(make_trainer(job, {}), job)
    assert not Path(job.folder_uri).exists()


@pytest.mark.parametrize("seen, named", [(32, False), (64, True)])
def test_the_divergence_message_names_the_discriminator_once_it_has_joined(tmp_path, seen, named):
    """The discriminator joins after 32 images (SECTION): a loss that diverges later names its weight too."""
    job = job_in(tmp_path / "job", f"sqlite:///{tmp_path / 'mlflow.db'}")
    record_divergence(job, seen)
    files, _ = read_committed(job.diverged_uri, None, {})
    message = files[DIVERGED_FILE].decode()
    assert f"non-finite by {seen} images" in message and "autoencoder.learning_rate" in message
    assert ("autoencoder.discriminator_weight (now 0.5" in message) == named
