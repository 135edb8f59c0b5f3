"""How the scores reach MLflow, on a real SQLite store (no mocks): the evaluate run logs each score once with its 95%
interval and protocol; the parent and register runs and the logged model link to it instead of copying; settings a
stage resolves while it runs are logged as they ran; the training data is a dataset input; the printed and
described numbers are rounded to their meaning while the metrics keep every digit. The pipeline tests
(tests/test_conditional_pipeline.py) check the same on a real run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from ddpm_core.precision import Precision
from ddpm_core.samplers import Method, SamplerConfig
from pipelines.config import Extractor, PipelineConfig
from pipelines.context import StageContext, params_that_ran
from pipelines.contracts import (
    ChampionRef,
    EvaluateOutputs,
    FidProtocol,
    PrepareOutputs,
    ReferenceSet,
    ScoreProtocol,
    Scores,
    StageManifest,
    TuneOutputs,
)
from pipelines.dag import STAGES, Runner
from pipelines.data.recorded import dataset_name, log_training_data, training_dataset
from pipelines.evaluation.report import as_summary, link_scores, score_lines, significant, with_spread
from pipelines.plan import plan
from pipelines.stages.evaluate import log_to_mlflow, settings_that_ran
from pipelines.stages.register import link_model_scores
from pipelines.tracking import flatten, in_force

EVALUATION = EvaluateOutputs(
    Scores(0.631712345, fid_stderr=0.0405321, fid_inf=0.48391, kid=0.00172345, kid_std=0.00182111),
    FidProtocol(
        1000,
        SamplerConfig(method=Method.DDIM, num_steps=50),
        0,
        Precision.FP32,
        "classifier-cda20e7fdd43c68b",
        None,
        ReferenceSet("training split", reference_data_fingerprint="f" * 64, reference_count=1602),
    ),
    "0123456789abcdef",
    None,
    "grid.png",
    "ref",
    None,
    ScoreProtocol(10, 195, 1000, 50, kid_subset_size=500, kid_subsets=100),
)
PREPARED = PrepareOutputs(
    "0123456789abcdef" * 4, 1602, 195, "s", "h", 10, source_uri="s3://user:hunter2@bucket/data/digits/"
)


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> MlflowClient:
    """One store for the module (creating a SQLite store takes seconds); each test makes its own experiment."""
    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")


def evaluate_run(client: MlflowClient, tmp_path: Path) -> tuple[str, str]:
    """(experiment id, the id of an evaluate run that logged EVALUATION as the stage does)."""
    experiment = client.create_experiment(tmp_path.name, artifact_location=(tmp_path / "mlruns").as_uri())
    run_id = client.create_run(experiment).info.run_id
    context = StageContext("evaluate", None, "f" * 64, run_id, client.tracking_uri, print, "d")  # type: ignore[arg-type]
    log_to_mlflow(context, Extractor.CLASSIFIER, EVALUATION)
    client.set_terminated(run_id)
    return experiment, run_id


def test_the_evaluate_run_logs_the_interval_and_the_protocol(client, tmp_path):
    _, run_id = evaluate_run(client, tmp_path)
    data = client.get_run(run_id).data
    low, high = data.metrics["fid_ci_low"], data.metrics["fid_ci_high"]
    assert low < data.metrics["fid"] < high and high - low == pytest.approx(2 * 1.96 * 0.0405321)
    assert data.metrics["fid"] == 0.631712345 and data.metrics["kid_std"] == 0.00182111  # every digit
    assert data.params["protocol.extractor_id"] == "classifier-cda20e7fdd43c68b"
    assert data.params["protocol.num_samples"] == "1000" and data.params["protocol.sampler.method"] == "ddim"
    assert data.params["protocol.sampler.network_evaluations"] == "50"
    assert data.params["protocol.reference"] == "training split"
    assert "jackknife" in data.params["protocol.fid.interval"] and "1.96" in data.params["protocol.fid.interval"]
    assert data.params["protocol.kid.subset_size"] == "500"


def test_numbers_are_written_to_their_meaning():
    assert [significant(value) for value in (0.63171, 40.013, 123.45, -0.051)] == ["0.632", "40.0", "123", "-0.0510"]
    assert with_spread(0.00172, 0.00182) == "0.0017 ± 0.0018" and with_spread(4.995, 0.031) == "4.995 ± 0.031"
    summary = as_summary(score_lines(EVALUATION))
    assert "FID:" in summary
    assert "0.632 (95% interval 0.552 to 0.711; stderr 0.041, jackknife over 10 groups)" in summary
    assert "0.0017 ± 0.0018 (std over 100 subsets of 500 images each" in summary
    assert "0.63171" not in summary and "0.48391" not in summary and "0.484" in summary


def test_each_score_has_one_home_the_others_link_to_it(client, tmp_path):
    """The logged model lists the evaluate run's scores with that run as their source, and the evaluate run's
    history keeps one entry per score; a linked run gets the tag and one 'Scores:' line, replaced on a re-run."""
    experiment, home = evaluate_run(client, tmp_path)
    model = client.create_logged_model(experiment)
    link_model_scores(client, home, model.model_id, training_dataset(PREPARED))
    link_model_scores(client, home, model.model_id, training_dataset(PREPARED))  # a re-run of register: no copy
    logged = client.get_logged_model(model.model_id).metrics or []
    assert {metric.key for metric in logged} == set(EVALUATION.scores.metrics())
    assert {metric.run_id for metric in logged} == {home}
    assert {metric.dataset_digest for metric in logged} == {PREPARED.fingerprint[:36]}
    assert all(len(client.get_metric_history(home, key)) == 1 for key in EVALUATION.scores.metrics())

    parent = client.create_run(experiment, tags={"mlflow.note.content": "DDPM pipeline run `x`."}).info.run_id
    link_scores(client, parent, home, EVALUATION)
    link_scores(client, parent, home, EVALUATION)
    tags = client.get_run(parent).data.tags
    assert tags["ddpm.scores_run_id"] == home and not client.get_run(parent).data.metrics
    note = tags["mlflow.note.content"]
    assert note.startswith("Scores: FID 0.632 (95% interval") and note.count("Scores: ") == 1  # first: not folded
    assert note.endswith("DDPM pipeline run `x`.")
    assert f"[evaluate run](#/experiments/{experiment}/runs/{home}?workflowType=machine_learning)" in note


def test_params_are_what_ran_and_sections_that_are_off_are_not_logged():
    ran = settings_that_ran(PipelineConfig().evaluate, EVALUATION)
    assert ran["evaluate.kid_subset_size"] == 500 and ran["evaluate.precision_recall_samples"] == 1000
    params = params_that_ran({"evaluate.kid_subset_size": "1000", "evaluate.fid_groups": "10"}, ran)
    assert params == {
        "evaluate.kid_subset_size": "500",
        "evaluate.kid_subset_size.configured": "1000",
        "evaluate.fid_groups": "10",
    }
    parent = flatten(in_force(PipelineConfig().to_dict(), retraining=False))
    assert not any(key.startswith(("tune.", "retrain.")) for key in parent)
    assert "evaluate.kid_subset_size" not in parent and "evaluate.kid_subsets" in parent  # on the stage run, as ran


def test_the_training_data_is_a_dataset_input_without_its_password(client, tmp_path):
    experiment = client.create_experiment(tmp_path.name, artifact_location=(tmp_path / "mlruns").as_uri())
    run_id = client.create_run(experiment).info.run_id
    log_training_data(client, run_id, PREPARED)
    (found,) = client.get_run(run_id).inputs.dataset_inputs
    dataset = found.dataset
    assert dataset.name == "digits" and dataset.digest == PREPARED.fingerprint[:36]
    assert dataset.source_type == "s3" and "hunter2" not in dataset.source and "bucket/data/digits" in dataset.source
    assert json.loads(dataset.profile)["fingerprint"] == PREPARED.fingerprint
    assert [(tag.key, tag.value) for tag in found.tags] == [("mlflow.data.context", "training")]
    assert not list((tmp_path / "mlruns").rglob("*.npy"))  # metadata only: nothing uploaded
    assert dataset_name("builtin:digits") == "digits" and dataset_name("/data/pets/") == "pets"


def test_a_metric_relinked_to_a_model_is_not_a_second_entry(client, tmp_path):
    """The property link_model_scores rests on, in the pinned MLflow: an entry logged again with the same key,
    value, timestamp and step is stored once in the run."""
    experiment = client.create_experiment(tmp_path.name, artifact_location=(tmp_path / "mlruns").as_uri())
    run_id = client.create_run(experiment).info.run_id
    model = client.create_logged_model(experiment)
    client.log_batch(run_id, metrics=[Metric("fid", 1.5, 1000, 0)])
    client.log_batch(run_id, metrics=[Metric("fid", 1.5, 1000, 0, model_id=model.model_id)])
    assert len(client.get_metric_history(run_id, "fid")) == 1
    assert [metric.key for metric in client.get_logged_model(model.model_id).metrics or []] == ["fid"]


class NoWorld:
    """The state outside the config, as a run with no registered model and an unlisted data source sees it."""

    def champion(self, model_name: str) -> ChampionRef:
        return ChampionRef(model_name, None)

    def data_listing(self, uri: str) -> str:
        return ""


def test_stage_params_show_the_tuned_values_and_leave_resolved_ones_for_the_end():
    config = PipelineConfig(tune=dataclasses.replace(PipelineConfig().tune, enabled=True))
    planned = plan(STAGES, config, NoWorld())
    runner = Runner(config, None, None, planned, print, {})  # type: ignore[arg-type]
    tuned = TuneOutputs({"train.lr": 0.002}, {"bpd": 3.5}, "t1", None, 4, 1, ())
    runner.manifests["tune"] = StageManifest("tune", "complete", "f", {}, {}, 0.0, 1.0, "r", tuned)
    train, _ = runner.stage_params(planned["train"])
    assert train["train.lr"] == "0.002" and train["train.lr.configured"] == "0.001"
    assert "train.batch_size.configured" not in train
    evaluate, resolved = runner.stage_params(planned["evaluate"])
    assert "evaluate.kid_subset_size" not in evaluate and resolved["evaluate.kid_subset_size"] == "1000"
