"""Autoguidance in the pipeline (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"; the
combination itself is tested in tests/test_autoguidance.py): with ``sample.autoguidance_weight``, the sample stage
reconstructs the sampled EMA width at ``sample.autoguidance_guide_at`` of the run from the post-hoc snapshots,
commits it beside the model's weights, and samples the guided model, here only in ``sample.autoguidance_interval``
(Kynkaanniemi et al. 2024); evaluate logs how, with the guide's network evaluations; the registered model samples
the same images and takes ``autoguidance_weight`` (1: unguided). Bad settings are refused before anything runs, with
exit code 2 and the key named."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from ddpm_core.checkpoint import load_snapshot
from ddpm_core.data import to_uint8
from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.samplers import PerIndexNoise, SamplerConfig, autoguidance, guidance_interval, sample
from pipelines.contracts import Autoguidance, SampleOutputs, TrainOutputs
from pipelines.registry.champion import champion_snapshot_uri
from pipelines.runs import RunStore
from pipelines.training.posthoc import posthoc_snapshot
from pipelines.typed import from_plain
from tests.run_files import outputs, result_dir
from tests.test_bad_inputs import run_cli
from tests.test_posthoc_ema_pipeline import RUN, TOTAL

WEIGHT, GUIDE_AT = 2.0, 0.5  # the guide: the sampled width at 768 of the run's 1536 images (snapshots: 512, 1024, ...)
# sampled in four steps, t = 999, 666, 333, 0 (sigma 157, 9.5, 1.5, 0.01): guided at the middle two only
STEPS, INTERVAL = 4, (1.0, 10.0)
GUIDED = (
    *RUN,
    f"sample.autoguidance_weight={WEIGHT}",
    f"sample.autoguidance_guide_at={GUIDE_AT}",
    f"sample.autoguidance_interval=[{INTERVAL[0]}, {INTERVAL[1]}]",
    f"sample.num_steps={STEPS}",
)


@pytest.fixture(scope="module")
def guided(guided_run) -> Path:
    """The root of a finished, registered run that samples its model autoguided: the session's ``guided_run``
    (tests/conftest.py, ``GUIDED`` with register on), which tests/test_bad_inputs.py and tests/test_mlflow_ui.py
    inspect too."""
    result = guided_run.result
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return guided_run.root / "quickstart"


def images_of(
    snapshot_uri: str,
    weight: float | None,
    sampler: SamplerConfig,
    seed: int,
    indices: Sequence[int],
    interval: tuple[float, float] | None = INTERVAL,
):
    """Images ``indices`` of ``seed`` drawn here from the snapshot's model, guided by its stored guide's weights at
    ``weight`` with :func:`ddpm_core.samplers.autoguidance` (None: the model alone) in ``interval`` (None: at every
    step)."""
    snapshot = load_snapshot(snapshot_uri)
    model = snapshot.build_model()
    diffusion = GaussianDiffusion.from_config(snapshot.diffusion)
    if weight is not None:
        assert snapshot.guide is not None
        guide = snapshot.build_network(snapshot.guide.state_dict)
        guided = autoguidance(model, guide, weight, snapshot.unet.in_channels)
        model = guided if interval is None else guidance_interval(guided, model, diffusion.alphas_cumprod, interval)
    shape = (snapshot.unet.in_channels, snapshot.unet.image_size, snapshot.unet.image_size)
    return to_uint8(sample(model, diffusion, shape, PerIndexNoise(seed, indices), sampler).samples)


def test_the_sample_stage_samples_the_model_guided_by_its_own_earlier_ema(guided):
    train = from_plain(TrainOutputs, outputs(guided, "train"))
    sampled = from_plain(SampleOutputs, outputs(guided, "sample"))
    assert train.ema_sigma_rel is not None
    assert sampled.autoguidance == Autoguidance(WEIGHT, GUIDE_AT, TOTAL // 2, train.ema_sigma_rel, INTERVAL)
    assert sampled.snapshot_uri == str(result_dir(guided, "sample") / "guided_snapshot")
    stored, trained = load_snapshot(sampled.snapshot_uri), load_snapshot(train.snapshot_uri)
    assert all(torch.equal(stored.state_dict[key], value) for key, value in trained.state_dict.items())
    assert stored.guide is not None and stored.guide.weight == WEIGHT and stored.guide.interval == INTERVAL
    assert stored.metadata["autoguidance"]["guide_images"] == TOTAL // 2
    earlier = posthoc_snapshot(train, train.ema_sigma_rel, {}, TOTAL // 2)  # reconstructed here, independently
    assert stored.guide.state_dict.keys() == earlier.keys()
    assert all(torch.equal(stored.guide.state_dict[key], value) for key, value in earlier.items())
    assert any(not torch.equal(earlier[key], value) for key, value in trained.state_dict.items())

    first = np.load(Path(sampled.shard_uris[0]) / "images.npy")  # [10, H, W, C]
    indices = range(len(first))
    np.testing.assert_array_equal(first, images_of(sampled.snapshot_uri, WEIGHT, sampled.sampler, 1, indices))
    unguided = images_of(train.snapshot_uri, None, sampled.sampler, 1, indices)
    assert np.abs(first.astype(int) - unguided.astype(int)).max() > 8  # the guide moved the samples
    everywhere = images_of(sampled.snapshot_uri, WEIGHT, sampled.sampler, 1, indices, interval=None)
    assert np.abs(first.astype(int) - everywhere.astype(int)).max() > 8  # ... not as the guide at every step


def test_evaluate_logs_the_guide_and_counts_both_networks_evaluations_in_its_interval(guided):
    client = MlflowClient(f"sqlite:///{guided.parents[1] / 'mlflow.db'}")
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    (run,) = client.search_runs(experiments, "tags.`ddpm.stage` = 'evaluate'")
    params, sampled = run.data.params, outputs(guided, "sample")
    assert params["protocol.autoguidance.weight"] == str(WEIGHT)
    assert params["protocol.autoguidance.guide_images"] == str(TOTAL // 2)
    assert params["protocol.autoguidance.interval"] == str(list(INTERVAL))
    assert sampled["sampler"]["num_steps"] == STEPS  # the middle two steps call model and guide: 6 calls
    assert params["protocol.sampler.network_evaluations"] == "6"
    (registered,) = client.search_model_versions("name = 'ddpm-digits'")
    ema = outputs(guided, "train")["ema_sigma_rel"]
    assert f"autoguided (w = 2, at noise levels sigma in (1, 10]) by its EMA sigma_rel {ema:g}" in (
        registered.description
    )


def test_the_registered_model_samples_the_guided_model_and_takes_its_weight(guided):
    sampled = from_plain(SampleOutputs, outputs(guided, "sample"))
    sampler = SamplerConfig(method="ddim", num_steps=3)
    mlflow.set_tracking_uri(f"sqlite:///{guided.parents[1] / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/ddpm-digits@challenger")
    rows, params = pd.DataFrame({"index": range(3)}), {"seed": 4, "method": "ddim", "num_steps": 3}
    expected = images_of(sampled.snapshot_uri, WEIGHT, sampler, 4, range(3))
    np.testing.assert_array_equal(model.predict(rows, params=params), expected)
    unguided = model.predict(rows, params={**params, "autoguidance_weight": 1.0})
    np.testing.assert_array_equal(unguided, images_of(sampled.snapshot_uri, None, sampler, 4, range(3)))
    with pytest.raises(Exception, match="autoguidance_weight must be >= 1"):
        model.predict(rows, params={**params, "autoguidance_weight": 0.5})


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["sample.autoguidance_weight=1.5"], "train.ema_profiles"),  # no post-hoc snapshots to reconstruct from
        ([*GUIDED, "sample.autoguidance_guide_at=0.2"], "sample.autoguidance_guide_at 0.2"),  # before the first one
        ([*GUIDED, "distill.enabled=true"], "not a distilled student"),
        (["sample.autoguidance_weight=0.5"], "sample.autoguidance_weight must be >= 1"),
        (["sample.autoguidance_guide_at=1.0"], "sample.autoguidance_guide_at must lie in (0, 1)"),
        ([*GUIDED, "sample.autoguidance_interval=[1.0, 0.5]"], "sample.autoguidance_interval [1.0, 0.5] must be"),
        ([*GUIDED, "sample.autoguidance_interval=[0, 1, 2]"], "sample.autoguidance_interval [0.0, 1.0, 2.0] must"),
        ([*GUIDED, "sample.autoguidance_interval=[0, low]"], "sample.autoguidance_interval[1]: expected a number"),
    ],
)
def test_bad_autoguidance_settings_are_refused_before_anything_runs(overrides, named, tmp_path, capsys):
    location = [f"storage.root={tmp_path / 'runs'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    code, said, seconds = run_cli(["run", *overrides, *location], capsys)
    assert code == 2 and named in said and seconds < 10
    assert not (tmp_path / "runs").exists()


def test_a_guided_champion_is_copied_with_its_guide_for_re_scoring(guided, tmp_path):
    """The copy a later run re-scores the champion from (evaluate.rescore_champion) is the registered model as it was
    sampled: the model's weights and its guide at its weight, not the model alone."""
    sampled = load_snapshot(outputs(guided, "sample")["snapshot_uri"])
    store = RunStore(str(tmp_path / "runs"), "later")
    copy = load_snapshot(
        champion_snapshot_uri(store, f"sqlite:///{guided.parents[1] / 'mlflow.db'}", "ddpm-digits", "1")
    )
    assert copy.guide is not None and sampled.guide is not None and copy.guide.weight == WEIGHT
    assert all(torch.equal(copy.guide.state_dict[key], value) for key, value in sampled.guide.state_dict.items())
    assert all(torch.equal(copy.state_dict[key], value) for key, value in sampled.state_dict.items())
    assert copy.metadata["autoguidance"] == sampled.metadata["autoguidance"]
