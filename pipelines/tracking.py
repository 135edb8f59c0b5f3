"""MLflow tracking: one parent run per pipeline run, one nested run per stage, looked up by tags so that a
re-run reuses the parent instead of creating duplicates. Uses ``MlflowClient`` with an explicit tracking URI
(Ray workers do not inherit it)."""

from __future__ import annotations

import functools
import getpass
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run, RunStatus
from mlflow.tracking import MlflowClient

from pipelines.config import PipelineConfig
from pipelines.execution import QUIET_URLS
from pipelines.redaction import redact, redacted
from pipelines.typed import resolved_keys, to_plain

RUN_ID_TAG, STAGE_TAG, CONFIG_TAG = "ddpm.run_id", "ddpm.stage", "ddpm.config_sha256"
# MLflow 3's UI opens an experiment of this kind in its model-training view (runs, charts, models), not GenAI's
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
SECRET_MARKERS = ("password", "secret", "token", "key_id", "access_key", "credential")


@functools.cache
def git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_tags() -> dict[str, str]:
    """MLflow's standard tags for who ran what from where: the Source column shows the command and the commit."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or getpass.getuser()
    return {
        "mlflow.source.type": "JOB",
        "mlflow.source.name": "python -m pipelines",
        "mlflow.source.git.commit": git_commit(),
        "mlflow.user": user,
    }


def in_force(config_dict: dict[str, Any], retraining: bool) -> dict[str, Any]:
    """The config sections that act in this run: ``tune`` only when tuning, ``register`` only when registering,
    ``retrain`` only in a scheduled retrain (the full config stays an artifact of the parent run); without the
    settings a stage resolves while it runs (``metadata=RESOLVED``: its own run logs the value that ran)."""
    off = {
        "tune": not config_dict["tune"]["enabled"],
        "register": not config_dict["register"]["enabled"],
        "retrain": not retraining,
    }
    sections = {key: value for key, value in config_dict.items() if not off.get(key, False)}
    resolved = resolved_keys(PipelineConfig)
    return {
        key: {name: item for name, item in value.items() if f"{key}.{name}" not in resolved}
        if isinstance(value, dict)
        else value
        for key, value in sections.items()
    }


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted params for MLflow; any key that looks like a secret is dropped."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if any(marker in key.lower() for marker in SECRET_MARKERS):
            continue
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = redact(str(value))[:500]
    return flat


def config_digest(config: PipelineConfig) -> str:
    """16 hex digits of the SHA-256 of the config's inputs (execution settings left out)."""
    plain = redacted(to_plain(config, inputs_only=True))  # the same for a config read back from a saved copy
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def local_artifact_location(tracking_uri: str) -> str | None:
    """For a local SQLite store, artifacts go to ``mlruns/`` beside the database (MLflow's default is the current
    directory's ``mlruns/``); servers decide for themselves (None)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


# The runs table as the pipeline's users open it (MLflow 3.17's shared view state: an experiment tag
# mlflow.sharedViewState.<key> holding {name, createdAt, updatedAt, state}, opened with ?viewStateShareKey=<key>).
SHARED_VIEW_TAG = "mlflow.sharedViewState."
RUNS_VIEW_KEY, RUNS_VIEW_NAME = "ddpm-scores", "DDPM scores"
RUNS_VIEW_METRICS = (
    "fid",
    "fid_ci_low",
    "fid_ci_high",
    "fid_over_floor",
    "kid",
    "kid_std",
    "inception_score",
    "precision",
    "recall",
    "nll_bpd",
    "conditional_accuracy",
    "loss",
    "images_per_second",
)


def runs_view_state() -> dict[str, Any]:
    """Columns (the stage, duration, each score with its interval, training's loss and rate), the runs of one
    pipeline run grouped together (tag ``ddpm.run_id``) in the order they started (the DAG's), all runs shown."""
    columns = [f"tags.`{STAGE_TAG}`", "attributes.`Duration`", *(f"metrics.`{name}`" for name in RUNS_VIEW_METRICS)]
    return {
        "searchFilter": "",
        "orderByKey": "attributes.start_time",
        "orderByAsc": True,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": columns,
        "columnOrder": columns,
        "groupBy": {"aggregateFunction": "min", "groupByKeys": [{"mode": "tag", "groupByData": RUN_ID_TAG}]},
        "runsHiddenMode": "SHOW_ALL",
    }


class Tracker:
    def __init__(self, config: PipelineConfig) -> None:
        os.environ.update(QUIET_URLS)  # no MLflow run link with the tracking URI's password (pipelines.execution)
        self.config = config
        self.tracking_uri = config.mlflow.resolved_tracking_uri()
        self.client = MlflowClient(self.tracking_uri)
        experiment = self.client.get_experiment_by_name(config.mlflow.experiment)
        self.experiment_id = (
            experiment.experiment_id
            if experiment
            else self.client.create_experiment(
                config.mlflow.experiment,
                artifact_location=local_artifact_location(self.tracking_uri),
                tags=EXPERIMENT_KIND,
            )
        )
        if experiment is not None and not any(key in experiment.tags for key in EXPERIMENT_KIND):
            for key, value in EXPERIMENT_KIND.items():  # an experiment made before: set it, unless someone chose
                self.client.set_experiment_tag(self.experiment_id, key, value)
        self.write_runs_view()

    def write_runs_view(self) -> None:
        """The experiment's saved runs view (:func:`runs_view_state`), rewritten when the pipeline's columns change."""
        key = f"{SHARED_VIEW_TAG}{RUNS_VIEW_KEY}"
        experiment = self.client.get_experiment(self.experiment_id)
        state = json.dumps(runs_view_state(), sort_keys=True)
        saved = json.loads(experiment.tags.get(key, "{}") or "{}")
        if saved.get("state") == state:
            return
        now = int(time.time() * 1000)
        view = {"name": RUNS_VIEW_NAME, "createdAt": saved.get("createdAt", now), "updatedAt": now, "state": state}
        self.client.set_experiment_tag(self.experiment_id, key, json.dumps(view))

    def runs_view_url(self) -> str:
        """The experiment's saved runs view in the UI's model-training view: on the tracking server, or on ``mlflow
        ui``'s default address for a local store. (No search setting may ride along: the UI then ignores the view.)"""
        base = self.tracking_uri if self.tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        view = f"viewStateShareKey={RUNS_VIEW_KEY}&workflowType=machine_learning"
        return f"{redact(base).rstrip('/')}/#/experiments/{self.experiment_id}/runs?{view}"

    def _find(self, filter_string: str) -> Run | None:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string, max_results=1, order_by=["attributes.start_time DESC"]
        )
        return runs[0] if runs else None

    def parent_run(self, tags: dict[str, str], description: str = "") -> str:
        """The pipeline run's MLflow parent run for this config, created on first use, reused (and reopened)
        afterwards; its params are the config sections in force. A run id re-run with another config
        (``--allow-changes``) gets a parent run of its own, as its params differ."""
        digest = config_digest(self.config)
        existing = self._find(
            f"tags.`{RUN_ID_TAG}` = '{self.config.run_id}' and tags.`{STAGE_TAG}` = 'pipeline' "
            f"and tags.`{CONFIG_TAG}` = '{digest}'"
        )
        if existing:
            self.client.update_run(existing.info.run_id, status="RUNNING")
            return existing.info.run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=self.config.run_id,
            tags={
                RUN_ID_TAG: self.config.run_id,
                STAGE_TAG: "pipeline",
                CONFIG_TAG: digest,
                **({"mlflow.note.content": description} if description else {}),
                **source_tags(),
                **tags,
            },
        )
        retraining = any(key.startswith("ddpm.retrain.") for key in tags)
        self.log_params(run.info.run_id, flatten(in_force(self.config.to_dict(), retraining)))
        return run.info.run_id

    def stage_run(self, parent_id: str, stage: str, description: str, params: dict[str, str]) -> str:
        """A stage's nested run: its description, the standard source tags, and the config it reads as params."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.config.run_id}/{stage}",
            tags={
                RUN_ID_TAG: self.config.run_id,
                STAGE_TAG: stage,
                "mlflow.parentRunId": parent_id,
                "mlflow.note.content": description,
                **source_tags(),
            },
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [mlflow.entities.Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[start : start + 100])

    def finish(self, run_id: str, ok: bool) -> None:
        """End ``run_id`` and the nested runs it left running (training's sample grids) as FINISHED or FAILED."""
        status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        for run in self.client.search_runs(
            [self.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}' and attributes.status = 'RUNNING'"
        ):
            self.client.set_terminated(run.info.run_id, status)
        self.client.set_terminated(run_id, status)

    def kill(self, run_id: str) -> None:
        """End ``run_id`` and its nested runs still running (a stage's, Tune's trials) as KILLED: a signal stopped
        them, and MLflow would otherwise show them running forever."""
        running = self.client.search_runs(
            [self.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}' and attributes.status = 'RUNNING'"
        )
        for run in running:
            self.client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


def run_link(experiment_id: str, run_id: str, text: str, tab: str = "") -> str:
    """A Markdown link to a run's page (or one of its tabs: ``model-metrics``, ``artifacts``), relative to the MLflow
    UI's root, in its model-training view."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}" + (f"/{tab}" if tab else "")
    return f"[{text}]({page}?workflowType=machine_learning)"


def set_note_part(client: MlflowClient, run_id: str, opening: str, part: str) -> None:
    """Put ``part`` (a paragraph starting with ``opening``: a link to where a user goes next) first in a run's
    description, where the UI's collapsed description shows it, replacing the paragraph an earlier execution wrote."""
    note = client.get_run(run_id).data.tags.get("mlflow.note.content", "")
    kept = [paragraph for paragraph in note.split("\n\n") if paragraph and not paragraph.startswith(opening)]
    client.set_tag(run_id, "mlflow.note.content", "\n\n".join([part, *kept]))


def nested_run(client: MlflowClient, parent_id: str, suffix: str, stage: str, description: str) -> str:
    """A run under ``parent_id``, named after it with ``/suffix``, without params (the parent holds them): MLflow's
    image cards print every param of their run above the picture, so pictures get a run of their own. It ends with
    its parent (:meth:`Tracker.finish`)."""
    parent = client.get_run(parent_id)
    tags = {
        RUN_ID_TAG: parent.data.tags.get(RUN_ID_TAG, ""),
        STAGE_TAG: stage,
        "mlflow.parentRunId": parent_id,
        "mlflow.note.content": description,
        **source_tags(),
    }
    name = f"{parent.info.run_name}/{suffix}"
    return client.create_run(parent.info.experiment_id, run_name=name, tags=tags).info.run_id


class BufferedMetricLogger:
    """Metrics of one MLflow run that survive a tracking-server outage: a batch that cannot be sent is kept, and
    everything kept is re-sent, in order, before the next batch; training never waits on MLflow longer than one
    short attempt. :meth:`close` makes a last effort and returns what could still not be sent."""

    def __init__(self, client: MlflowClient, run_id: str, log: Callable[[str], None] = print) -> None:
        self.client, self.run_id, self.log = client, run_id, log
        self.pending: list[mlflow.entities.Metric] = []
        self.outage_since: float | None = None

    def send(self, metrics: list[mlflow.entities.Metric]) -> bool:
        import time

        self.pending.extend(metrics)
        try:
            while self.pending:
                self.client.log_batch(self.run_id, metrics=self.pending[:1000])
                self.pending = self.pending[1000:]
        except Exception as error:  # connection refused, timeouts, 5xx after the client's own retries
            if self.outage_since is None:
                self.outage_since = time.time()
                self.log(
                    f"MLflow unreachable ({type(error).__name__}); buffering metrics and retrying at the next log step"
                )
            return False
        if self.outage_since is not None:
            self.log(f"MLflow reachable again after {time.time() - self.outage_since:.0f} s; buffered metrics sent")
            self.outage_since = None
        return True

    def close(self, attempts: int = 12, wait_s: float = 5.0) -> list[mlflow.entities.Metric]:
        import time

        for _ in range(attempts):
            if self.send([]):
                return []
            time.sleep(wait_s)
        return self.pending
