"""End to end on real components: a moto S3 server, an MLflow tracking server (SQLite + artifacts on S3), a Ray
head started with ``ray start --head`` (token authentication on), and the pipeline submitted with
``ray job submit``. Everything started here is stopped at the end, pass or fail."""

import base64
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import fsspec
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipelines.training.grids import COMPOSITE
from tests.services import FaultyS3Proxy, mlflow_server, ray_head, submit

REPO = Path(__file__).resolve().parents[1]
NLL_IMAGES = 4
TINY = [
    "run_id=e2e",
    "train.total_images=2048",
    "train.checkpoint_every_images=1024",
    "train.log_every_images=512",
    "train.grid_every_images=1024",
    "sample.num_samples=200",
    "sample.batch_size=100",
    "sample.num_steps=10",
    "evaluate.classifier_epochs=2",
    "train.ema_choice_images=64",  # the post-hoc EMA choice on a small budget
    "train.ema_choice_timesteps=4",
    "train.ema_snapshot_every_images=512",  # the quickstart's autoguidance: its guide from the snapshot at 512
    "evaluate.untrained_baseline=false",
    # the bound's every T term (T x the chunk's images through the network, several timesteps per call): 4 images in
    # two chunks, one Ray task each
    f"evaluate.nll_images={NLL_IMAGES}",
    f"evaluate.nll_batch_size={NLL_IMAGES // 2}",
    "register.model_name=ddpm-e2e",
    "mlflow.experiment=e2e",
]


SECRETS = {"aws": "fake-secret-aws-9c41d7e2b8", "mlflow": "fake-secret-mlflow-5b7e0a13f6"}


def test_pipeline_via_ray_job_submit_with_mlflow_server_and_s3(tmp_path, s3_bucket, s3_endpoint, monkeypatch):
    """The pipeline's S3 traffic (driver, Ray workers, Ray Train checkpoints) passes through a proxy that throttles
    every 10th request with 503 SlowDown; MLflow runs its basic-auth app and the pipeline authenticates with
    credentials from the environment. Recognisable fake secrets (moto accepts any key) may not end up in a run root,
    an MLflow artifact, the MLflow databases or the job's output."""
    bucket, options = s3_bucket
    credentials = {"MLFLOW_TRACKING_USERNAME": "pipeline", "MLFLOW_TRACKING_PASSWORD": SECRETS["mlflow"]}
    with FaultyS3Proxy(s3_endpoint, throttle_every=10) as s3_proxy:
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": "FAKEKEYID4e2e7c1",
            "AWS_SECRET_ACCESS_KEY": SECRETS["aws"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": s3_proxy.url,
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
            "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",  # Ray workers inherit it: a short run still has some
            **credentials,
        }
        env.pop("RAY_ADDRESS", None)
        with (
            mlflow_server(
                tmp_path, f"s3://{bucket}/mlflow", env, admin=("pipeline", SECRETS["mlflow"])
            ) as tracking_uri,
            # the cluster's tracking URI carries the MLflow password in its user info too (MLFLOW_TRACKING_URI: a
            # command-line override would be in Ray's own record of the job's entrypoint)
            ray_head(tmp_path, {**env, "MLFLOW_TRACKING_URI": with_password(tracking_uri)}) as (address, ray_env, head),
        ):
            run_pipeline_twice(
                tmp_path,
                bucket,
                options,
                (address, ray_env, head),
                tracking_uri,
                s3_proxy.url,
                credentials,
                monkeypatch,
            )
    assert s3_proxy.injected["throttled"] >= 10, s3_proxy.injected


def assert_ray_records_the_evaluate_tasks(address: str, ray_env: dict[str, str], evaluate_run) -> None:
    """What benchmarks/pipeline_overhead.py counts as evaluate's compute, read from this cluster's state API: the
    feature and NLL tasks ran inside the evaluate run's window, and cover part of it, not more; the sample stage's
    actor methods ran before it."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from pipeline_overhead import covered_seconds, executed_intervals

    intervals = executed_intervals(address, ray_env)
    window = (evaluate_run.start_time / 1000, evaluate_run.end_time / 1000)
    inside = {name for name, start, end in intervals if window[0] <= start and end <= window[1]}
    assert {"FeatureWorker.summarize", "chunk_bits_per_dim"} <= inside, inside
    assert "SampleWorker.run_shard" not in inside, inside
    sampled = [(start, end) for name, start, end in intervals if name == "SampleWorker.run_shard"]
    assert sampled and all(end <= window[0] for _, end in sampled), (sampled, window)
    assert 0 < covered_seconds([(start, end) for _, start, end in intervals], window) < window[1] - window[0]


def rest(tracking_uri: str, credentials: dict[str, str], path: str) -> dict:
    """GET ``/api/2.0/mlflow/<path>`` as the MLflow UI does, with basic auth."""
    token = base64.b64encode(
        f"{credentials['MLFLOW_TRACKING_USERNAME']}:{credentials['MLFLOW_TRACKING_PASSWORD']}".encode()
    ).decode()
    request = urllib.request.Request(
        f"{tracking_uri}/api/2.0/mlflow/{path}", headers={"Authorization": f"Basic {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def assert_the_registry_leads_to_the_scores(tracking_uri: str, credentials: dict[str, str], by_stage: dict) -> None:
    """From the champion, through MLflow's REST API: the version's source run names the scores' one home, the
    evaluate run, which holds them with their uncertainty and interval (the source run and the parent hold none);
    its description links the train and evaluate runs, which exist; the logged model lists the evaluate run's scores;
    runs have descriptions and the standard source tags; the train run has its hyperparameters, optimizer steps
    beside images seen and system metrics, its grids' run a sample grid at step 0; the parent logs only the sections
    in force; the experiment opens in the model-training view."""
    version = rest(tracking_uri, credentials, "registered-models/alias?name=ddpm-e2e&alias=champion")["model_version"]
    source = rest(tracking_uri, credentials, f"runs/get?run_id={version['run_id']}")["run"]
    home = by_stage["evaluate"].info.run_id
    assert {"key": "ddpm.scores_run_id", "value": home} in source["data"]["tags"]
    assert not source["data"].get("metrics") and not by_stage["pipeline"].data.metrics  # one home per score
    metrics = by_stage["evaluate"].data.metrics
    assert {"fid", "fid_stderr", "fid_ci_low", "fid_ci_high", "fid_inf", "fid_floor", "kid", "kid_std"} <= set(metrics)
    assert metrics["fid_ci_low"] < metrics["fid"] < metrics["fid_ci_high"]
    experiment = source["info"]["experiment_id"]
    for stage in ("train", "evaluate"):
        assert f"[{stage} run](#/experiments/{experiment}/runs/{by_stage[stage].info.run_id}" in version["description"]
    assert "FID" in version["description"] and "floor" in version["description"]
    assert (
        "champion"
        in rest(tracking_uri, credentials, "registered-models/get?name=ddpm-e2e")["registered_model"]["description"]
    )
    assert version["source"].startswith("models:/m-")  # the logged model: its page shows the scores too
    logged = rest(tracking_uri, credentials, f"logged-models/{version['source'].removeprefix('models:/')}")["model"]
    assert {"fid", "fid_stderr"} <= {metric["key"] for metric in logged["data"]["metrics"]}
    assert {metric["run_id"] for metric in logged["data"]["metrics"]} == {home}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    for stage, run in by_stage.items():
        tags = run.data.tags
        assert tags["mlflow.note.content"] and tags["mlflow.user"], stage
        assert tags["mlflow.source.name"] == "python -m pipelines" and tags["mlflow.source.git.commit"] in (
            commit,
            "unknown",  # ray job submit uploads the working tree without .git
        )
    train = by_stage["train"].data
    assert train.params["train.total_images"] == "2048" and "model.preset" in train.params
    assert "optimizer_steps" in train.metrics and any(key.startswith("system/cpu") for key in train.metrics)
    parent = by_stage["pipeline"].data.params
    assert "train.total_images" in parent and not any(key.startswith(("tune.", "retrain.")) for key in parent)
    grids = by_stage["train samples"].info.run_id  # the grids' own run, under the train run
    images = rest(tracking_uri, credentials, f"artifacts/list?run_id={grids}&path=images")
    assert any("+step+0+" in item["path"] for item in images.get("files", [])), images  # the untrained network
    kind = rest(tracking_uri, credentials, f"experiments/get?experiment_id={experiment}")["experiment"]["tags"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in kind


def with_password(uri: str) -> str:
    return uri.replace("http://", f"http://pipeline:{SECRETS['mlflow']}@")


def run_pipeline_twice(tmp_path, bucket, options, cluster, tracking_uri, s3_url, credentials, monkeypatch):
    address, ray_env, ray_head_node = cluster
    for headers in ({}, {"Authorization": "Basic " + base64.b64encode(b"pipeline:wrong-password").decode()}):
        request = urllib.request.Request(
            f"{tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1", headers=headers
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
    overrides = [
        *TINY,
        f"storage.root=s3://{bucket}/runs",
        f"storage.endpoint_url={s3_url}",
    ]
    first = submit(address, ray_env, overrides, tmp_path / "job1.log")
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
    assert "extractor classifier-" in first.stdout
    assert re.search(r"real-data floor: +[0-9.]+( ± [0-9.]+)? at 200 images", first.stdout), first.stdout[-3000:]

    for name, value in credentials.items():
        monkeypatch.setenv(name, value)

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("e2e")
    runs = client.search_runs([experiment.experiment_id])
    by_stage = {run.data.tags["ddpm.stage"]: run for run in runs}
    assert sorted(by_stage) == ["evaluate", "pipeline", "prepare", "register", "sample", "train", "train samples"]
    parent, grids = by_stage["pipeline"], by_stage["train samples"]
    assert all(
        run.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        for name, run in by_stage.items()
        if name not in ("pipeline", "train samples")
    )
    assert grids.data.tags["mlflow.parentRunId"] == by_stage["train"].info.run_id and not grids.data.params
    assert grids.info.status == "FINISHED" and "sample grids run" in by_stage["train"].data.tags["mlflow.note.content"]
    assert {artifact.path for artifact in client.list_artifacts(grids.info.run_id)} >= {"images", COMPOSITE}
    assert parent.info.status == "FINISHED" and parent.data.tags["ddpm.data_fingerprint"]
    evaluation = by_stage["evaluate"].data
    assert np.isfinite(evaluation.metrics["fid"])
    assert (
        evaluation.params["protocol.num_samples"] == "200" and evaluation.params["protocol.sampler.num_steps"] == "10"
    )
    assert evaluation.params["protocol.extractor_id"].startswith("classifier-")
    assert 1.0 <= evaluation.metrics["inception_score"] <= 10.0  # 10 classes bound the score
    assert 0.0 <= evaluation.metrics["precision"] <= 1.0 and 0.0 <= evaluation.metrics["recall"] <= 1.0
    # A bound on -log2 p: positive.
    assert evaluation.metrics["nll_bpd"] > 0 and evaluation.metrics["nll_bpd_stderr"] > 0
    nll = (evaluation.params["protocol.nll.num_images"], evaluation.params["protocol.nll.timesteps"])
    assert nll == (str(NLL_IMAGES), "all")
    assert evaluation.params["protocol.precision_recall.samples"] == "200"
    assert evaluation.params["protocol.reference_count"] == "1602"  # builtin:digits minus its hold-out (by hash)
    assert len(evaluation.tags["fid.protocol_hash"]) == 16 and evaluation.params["protocol.precision"] == "fp32"
    assert_ray_records_the_evaluate_tasks(address, ray_env, by_stage["evaluate"].info)
    train_metrics = by_stage["train"].data.metrics
    assert {"loss", "loss_q0", "loss_q3", "grad_norm", "lr", "images_per_second"} <= set(train_metrics)
    assert [m.step for m in client.get_metric_history(by_stage["train"].info.run_id, "loss")][-1] == 2048

    s3 = fsspec.filesystem("s3", **options)
    s3.invalidate_cache()
    mlflow_objects = s3.find(f"{bucket}/mlflow")
    assert any(path.endswith("/samples.png") for path in mlflow_objects)  # the evaluate grid, via the server
    assert any("/images/" in path or "samples" in path for path in mlflow_objects)  # training-progress grids
    # run.json names each stage's current result folder, {stage}/{fingerprint[:16]}, which holds its outputs
    head = json.loads(s3.cat_file(f"{bucket}/runs/e2e/run.json"))["stages"]
    assert sorted(head) == ["evaluate", "prepare", "register", "sample", "train"]
    result = {stage: f"{bucket}/runs/e2e/{stage}/{fingerprint[:16]}" for stage, fingerprint in head.items()}
    assert all(s3.exists(f"{folder}/stage.json") for folder in result.values())
    assert s3.glob(f"{result['train']}/ray/trainer/checkpoint_*/training_state.pt")
    assert s3.exists(f"{result['sample']}/shards/shard-00001/manifest.json")
    assert s3.exists(f"{result['train']}/snapshot/model.safetensors")

    champion = client.get_model_version_by_alias("ddpm-e2e", "champion")
    assert client.get_model_version_by_alias("ddpm-e2e", "challenger").version == champion.version
    assert_the_registry_leads_to_the_scores(tracking_uri, credentials, by_stage)
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model("models:/ddpm-e2e@champion")
    images = model.predict(pd.DataFrame({"index": range(4)}), params={"seed": 3, "num_steps": 5})
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    defaults = {param.name: param.default for param in model.metadata.get_params_schema().params}
    evaluated = by_stage["evaluate"].data.params  # the model samples as it was scored unless told otherwise
    assert (defaults["method"], str(defaults["num_steps"])) == (
        evaluated["protocol.sampler.method"],
        evaluated["protocol.sampler.num_steps"],
    )

    # The same run again: every stage is up to date, nothing new in MLflow.
    second = submit(address, ray_env, overrides, tmp_path / "job2.log")
    assert second.returncode == 0, second.stdout[-4000:]
    assert second.stdout.count("up to date") == 5
    assert all(
        f"[{stage}] up to date (result {fingerprint[:16]}," in second.stdout for stage, fingerprint in head.items()
    )
    assert len(client.search_runs([experiment.experiment_id])) == len(runs)
    assert len(client.search_model_versions("name='ddpm-e2e'")) == 1

    secrets = {**SECRETS, "ray token": ray_env["RAY_AUTH_TOKEN"]}
    blobs = {path: s3.cat_file(path) for path in s3.find(bucket)}  # run root, caches and MLflow artifacts
    blobs["mlflow.db"] = (tmp_path / "mlflow.db").read_bytes()  # params, tags, metrics of every run
    blobs["basic_auth.db"] = (tmp_path / "basic_auth.db").read_bytes()  # users: a salted hash, never the password
    blobs.update({str(log): log.read_bytes() for log in tmp_path.rglob("*.log")})  # the jobs' output, the servers'
    leaks = [
        (name, where) for name, secret in secrets.items() for where, blob in blobs.items() if secret.encode() in blob
    ]
    assert len(blobs) > 50 and not leaks, leaks
    # Ray's session folder, its logs included (runtime_env_agent.log writes every runtime environment in plain text):
    # none of the credentials the pipeline had (Ray's own token is Ray's business there)
    ray_files = [
        path
        for path in ray_head_node.temp_dir.rglob("*")
        if path.is_file() and not path.is_socket() and "_ray_pkg_" not in str(path)  # (this repo, this file included)
    ]
    leaks = [
        (name, str(path))
        for name, secret in SECRETS.items()
        for path in ray_files
        if secret.encode() in path.read_bytes()
    ]
    assert len(ray_files) > 20 and not leaks, leaks
