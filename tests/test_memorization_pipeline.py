"""Memorization and mode coverage as scores of the evaluate stage, gating promotion (docs/evaluation.md), on real
components: the digits prepared by the prepare stage (with its classifier), "models" whose sample shards are real
images written the way the sample stage writes them, the evaluate and register stages run as the runner runs them,
on a local Ray and a real MLflow store.

A "model" that returns training images scores a copy rate near 1 and is refused promotion, saying why; held-out real
images score near 0; the class coverage of one class is its closed form 1 - p_c and that of the training data 0."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from ddpm_core.checkpoint import save_snapshot
from ddpm_core.memorization import CopyRate
from ddpm_core.precision import Precision
from ddpm_core.samplers import Method, SamplerConfig
from ddpm_core.training import OptimConfig
from ddpm_core.unet import UNet
from pipelines.__main__ import main
from pipelines.config import Extractor, PipelineConfig, RegisterSection
from pipelines.config_file import load_config
from pipelines.context import StageContext
from pipelines.contracts import (
    ChampionRef,
    EvaluateOutputs,
    NetworkExecution,
    PrepareOutputs,
    SampleOutputs,
    TrainedWith,
    TrainOutputs,
)
from pipelines.data.shards import read_split, sample_shard_uris, sample_sources, write_sample_shard
from pipelines.evaluation.scoring import ExtractorSpec, feature_workers
from pipelines.execution import Device
from pipelines.registry.champion import Champion, CopyRateTags
from pipelines.runs import RunStore
from pipelines.stages import evaluate, prepare, register
from pipelines.stages.register import Challenger, decide

OVERRIDES = [
    "run_id=memo",
    "evaluate.classifier_epochs=15",
    "evaluate.nll=false",
    "evaluate.untrained_baseline=false",
    "evaluate.rescore_champion=false",
    "evaluate.kid_subsets=4",
    "evaluate.grid_size=16",
    "register.model_name=memo-digits",
]


class NoChampion:
    """The world outside the config as a first run sees it: no registered champion."""

    def champion(self, model_name: str) -> ChampionRef:
        return ChampionRef(model_name, None)

    def data_listing(self, uri: str) -> str:
        return ""


@dataclasses.dataclass(frozen=True)
class World:
    """A prepared digits run: its config, store, MLflow, prepare outputs, a snapshot standing for the model."""

    config: PipelineConfig
    store: RunStore
    client: MlflowClient
    experiment: str
    parent: str
    prepared: PrepareOutputs
    train: TrainOutputs
    images: np.ndarray  # the training split [N, 8, 8, 1] uint8
    labels: np.ndarray  # [N]
    holdout: np.ndarray  # [M, 8, 8, 1]

    def context(self, stage: str, fingerprint: str) -> StageContext:
        return stage_context(self.client, (self.experiment, self.parent), self.store, stage, fingerprint)


def stage_context(
    client: MlflowClient, parent: tuple[str, str], store: RunStore, stage: str, fingerprint: str
) -> StageContext:
    """A stage's context as the runner makes it: a nested MLflow run of the pipeline run ``parent``
    (experiment id, run id)."""
    tags = {"mlflow.parentRunId": parent[1], "ddpm.run_id": store.run_id, "ddpm.stage": stage}
    run = client.create_run(parent[0], tags=tags)
    return StageContext(stage, store, fingerprint, run.info.run_id, client.tracking_uri, print, "d")


@pytest.fixture(scope="module")
def world(local_ray, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("memo")
    config = load_config("configs/digits.yaml", [*OVERRIDES, f"storage.root={root / 'runs'}"])
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.create_experiment("memo", artifact_location=(root / "mlruns").as_uri())
    parent = client.create_run(experiment).info.run_id
    store = RunStore.of(config)
    context = stage_context(client, (experiment, parent), store, "prepare", "a" * 64)
    prepared = prepare.run(context, prepare.settings(config, NoChampion()))
    unet = config.model.unet()
    snapshot = f"{root}/snapshot"
    save_snapshot(snapshot, UNet(unet), unet, config.diffusion)  # stands for the trained model (register logs it)
    train = TrainOutputs(
        snapshot, snapshot, 0, Device.CPU, None, None, TrainedWith(config.diffusion, OptimConfig(), unet, "digits")
    )
    images, labels = read_split(prepared.shards_uri, {})
    holdout, _ = read_split(prepared.holdout_uri, {})
    assert labels is not None
    return World(config, store, client, experiment, parent, prepared, train, images, labels, holdout)


def as_samples(world: World, name: str, images: np.ndarray) -> SampleOutputs:
    """``images`` ``[n, H, W, C]`` uint8 as a "model"'s sample set: shards of 250 written as the sample stage
    writes them (``pipelines.data.shards.write_sample_shard``)."""
    root = f"{world.store.root}/memo/sample/{name}/shards"
    shards = sample_shard_uris(root, len(images), 250)
    for uri, start, stop in shards:
        write_sample_shard(uri, images[start:stop], start, 1, {})
    return SampleOutputs(
        tuple(uri for uri, _, _ in shards),
        len(images),
        250,
        1,
        SamplerConfig(method=Method.DDIM, num_steps=10),
        1,
        NetworkExecution(Precision.FP32, compile=False),
        0.0,
    )


def evaluated(world: World, name: str, images: np.ndarray) -> tuple[SampleOutputs, EvaluateOutputs]:
    """The sample set of a "model" whose samples are ``images``, and the evaluate stage's outputs for it."""
    sample = as_samples(world, name, images)
    settings = evaluate.settings(world.config, NoChampion())
    context = world.context("evaluate", name.ljust(64, "0"))
    return sample, evaluate.run(context, settings, world.prepared, None, world.train, sample, None)


def test_bad_settings_fail_before_ray_starts_naming_the_key(capsys):
    for override, key in (
        ("evaluate.copy_false_positive_rate=0", "evaluate.copy_false_positive_rate"),
        ("evaluate.copy_false_positive_rate=1.5", "evaluate.copy_false_positive_rate"),
        ("evaluate.coverage_resamples=0", "evaluate.coverage_resamples"),
        ("register.max_copy_rate=1.5", "register.max_copy_rate"),
    ):
        assert main(["run", "--config", "configs/digits.yaml", override]) == 2
        assert key in capsys.readouterr().err
    assert PipelineConfig().register.max_copy_rate == 0.05 and PipelineConfig().evaluate.memorization


def test_a_model_that_returns_training_images_is_flagged_and_refused_promotion(world):
    sample, outputs = evaluated(world, "copies", world.images)  # every training image, once
    memorized = outputs.memorization
    assert memorized is not None and outputs.memorization_skipped is None
    assert memorized.copy_rate.total == len(world.images) and memorized.copy_rate.low >= 0.95
    assert memorized.copy_rate_pixels.low >= 0.95
    assert memorized.heldout_rate.high <= 0.1 and memorized.training_images == len(world.images)
    assert all(pair.ratio == 0 and pair.sample_index == pair.training_index for pair in memorized.closest_pairs)
    assert len(memorized.closest_pairs) == 8
    run = world.client.get_run(outputs.scores_run_id)
    assert run.data.metrics["copy_rate"] == memorized.copy_rate.rate
    assert run.data.metrics["copy_rate_ci_low"] >= 0.95 and "copy_rate_pixels_ci_high" in run.data.metrics
    assert run.data.params["protocol.memorization.false_positive_rate"] == "0.01"
    assert run.data.params["protocol.memorization.feature_space"].startswith(world.prepared.extractor_id or "?")
    artifacts = {item.path for item in world.client.list_artifacts(run.info.run_id, "memorization")}
    assert "memorization/closest_pairs.png" in artifacts and Path(memorized.closest_pairs_uri).is_file()
    coverage = outputs.coverage  # the training data itself: its own class histogram
    assert coverage is not None and coverage.tvd < 0.03 and min(coverage.recall) > 0.9
    # the resampled sets' TVDs carry sampling noise the training data itself has not: near 0 they lie above it,
    # about where a perfect model's as many samples would (the floor)
    assert coverage.tvd_low <= coverage.tvd_floor <= coverage.tvd_high

    settings = register.settings(world.config, NoChampion())
    context = world.context("register", "r" * 64)
    registered = register.run(context, settings, world.prepared, None, world.train, sample, outputs, None)
    assert not registered.promoted and "register.max_copy_rate 0.05" in registered.reason
    name = registered.model_name
    version = world.client.get_model_version(name, registered.version)
    assert "not promoted: copy rate 1.000" in version.description and "whatever its FID" in version.description
    assert version.tags["copy_rate"] == "1.0"
    with pytest.raises(mlflow.exceptions.MlflowException):
        world.client.get_model_version_by_alias(name, "champion")


def test_held_out_real_images_score_near_zero(world):
    _, outputs = evaluated(world, "holdout", world.holdout)
    memorized = outputs.memorization
    assert memorized is not None and memorized.copy_rate.total == len(world.holdout)
    assert memorized.copy_rate.rate <= 0.02 and memorized.copy_rate.high <= 0.1
    assert memorized.copy_rate_pixels.high <= 0.1 and memorized.heldout_rate.high <= 0.1
    assert all(pair.ratio > 0.2 for pair in memorized.closest_pairs)  # nothing like the copies' 0


def test_the_coverage_of_one_class_is_one_minus_its_training_share(world):
    label = 3
    sample = as_samples(world, "threes", world.images[world.labels == label])
    section = world.config.evaluate
    execution = world.context("evaluate", "c" * 64).execution(Device.CPU)
    assert world.prepared.extractor_uri is not None
    spec = ExtractorSpec(Extractor.CLASSIFIER, world.prepared.extractor_uri)
    with feature_workers(spec, len(sample.shard_uris), execution) as workers:
        sources = sample_sources(sample.shard_uris, execution.storage_options)
        classes = evaluate.classified(world.prepared, sources, workers)
    assert classes.shape == (sample.num_samples,)  # one class per sample, in index order
    coverage = evaluate.mode_coverage(section, world.prepared, sample, classes)
    share = float(np.mean(world.labels == label))
    assert coverage.tvd == pytest.approx(1 - share, abs=0.02)  # closed form: 1/2 (1 - p_c + sum_{k != c} p_k)
    assert coverage.recall[label] == 1.0 and max(coverage.recall[:label] + coverage.recall[label + 1 :]) < 0.1
    assert coverage.tvd_low <= coverage.tvd <= coverage.tvd_high
    again = evaluate.mode_coverage(section, world.prepared, sample, classes)
    assert again == coverage  # seeded bootstrap


def test_what_is_not_scored_says_why(world):
    section = dataclasses.replace(world.config.evaluate, memorization=False)
    assert evaluate.memorization_skip_reason(section, world.prepared) == "evaluate.memorization is off"
    unlabelled = dataclasses.replace(world.prepared, class_counts=None, class_names=None, num_classes=None)
    sample = as_samples(world, "few", world.holdout[:10])
    assert evaluate.coverage_skip_reason(world.config.evaluate, unlabelled, sample) == "the data has no class labels"
    no_holdout = dataclasses.replace(world.prepared, num_holdout=0)
    assert "held-out" in (evaluate.memorization_skip_reason(world.config.evaluate, no_holdout) or "")


def rate(value: float, low: float, high: float) -> CopyRate:
    return CopyRate(value, low, high, round(value * 1000), 1000)


def test_the_gate_compares_intervals_with_the_champions_and_holds_old_champions_to_the_ceiling():
    rule = RegisterSection(max_copy_rate=None, promotion_z=0.0)
    old = Champion("m", "4", 2.0, "hash-a", "fp", None, None)  # registered before copy rates were scored
    recorded = dataclasses.replace(old, copy_rate=CopyRateTags(0.01, 0.005, 0.018))
    copying = Challenger(1.0, None, "hash-a", copy_rate=rate(0.03, 0.021, 0.043))
    promoted, reason = decide(copying, rule, recorded)
    assert not promoted and "significantly above champion v4's 0.010" in reason
    assert decide(copying, rule, old)[0]  # no recorded copy rate: the FID decides
    assert not decide(copying, RegisterSection(max_copy_rate=0.02, promotion_z=0.0), old)[0]  # the ceiling
    overlapping = Challenger(1.0, None, "hash-a", copy_rate=rate(0.015, 0.009, 0.025))
    assert decide(overlapping, rule, recorded)[0]  # intervals overlap: not significantly above
    other_protocol = Challenger(1.0, None, "hash-b", copy_rate=rate(0.03, 0.021, 0.043))
    assert "another protocol" in decide(other_protocol, rule, recorded)[1]
