"""MLflow tracking: one parent run per pipeline run, one nested run per stage, looked up by tags so that a
re-run reuses the parent instead of creating duplicates. Uses ``MlflowClient`` with an explicit tracking URI
(Ray workers do not inherit it)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run, RunStatus
from mlflow.tracking import MlflowClient

from pipelines.config import PipelineConfig

RUN_ID_TAG, STAGE_TAG = "ddpm.run_id", "ddpm.stage"
SECRET_MARKERS = ("password", "secret", "token", "key_id", "access_key", "credential")


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
            flat[name] = str(value)[:500]
    return flat


def local_artifact_location(tracking_uri: str) -> str | None:
    """For a local SQLite store, artifacts go to ``mlruns/`` beside the database (MLflow's default is the current
    directory's ``mlruns/``); servers decide for themselves (None)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


class Tracker:
    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.tracking_uri = config.mlflow.resolved_tracking_uri()
        self.client = MlflowClient(self.tracking_uri)
        experiment = self.client.get_experiment_by_name(config.mlflow.experiment)
        self.experiment_id = (
            experiment.experiment_id
            if experiment
            else self.client.create_experiment(
                config.mlflow.experiment, artifact_location=local_artifact_location(self.tracking_uri)
            )
        )

    def _find(self, filter_string: str) -> Run | None:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string, max_results=1, order_by=["attributes.start_time DESC"]
        )
        return runs[0] if runs else None

    def parent_run(self, tags: dict[str, str]) -> str:
        """The pipeline run's MLflow parent run, created on first use, reused (and reopened) afterwards."""
        existing = self._find(f"tags.`{RUN_ID_TAG}` = '{self.config.run_id}' and tags.`{STAGE_TAG}` = 'pipeline'")
        if existing:
            self.client.update_run(existing.info.run_id, status="RUNNING")
            return existing.info.run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=self.config.run_id,
            tags={RUN_ID_TAG: self.config.run_id, STAGE_TAG: "pipeline", **tags},
        )
        self.client.log_batch(
            run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in flatten(self.config.to_dict()).items()]
        )
        return run.info.run_id

    def stage_run(self, parent_id: str, stage: str) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.config.run_id}/{stage}",
            tags={RUN_ID_TAG: self.config.run_id, STAGE_TAG: stage, "mlflow.parentRunId": parent_id},
        )
        return run.info.run_id

    def finish(self, run_id: str, ok: bool) -> None:
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))


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
