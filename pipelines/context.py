"""What a stage receives from the runner besides its settings and its upstream stages' outputs (the execution
context: where its result goes, its MLflow run, how its Ray work runs), and how a stage stops on purpose."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlflow.tracking import MlflowClient

from pipelines.execution import Device, Execution, runtime_env
from pipelines.runs import RunStore


class StageStopped(RuntimeError):
    """A stage stopped on purpose (e.g. training diverged); the message says what to change. The runner reports it
    without a traceback, and nothing retries it: retrying the same inputs would stop the same way."""


@dataclass(frozen=True)
class StageContext:
    """How and where one stage execution runs; nothing here changes what it computes (that is its settings)."""

    stage: str
    store: RunStore
    fingerprint: str  # of this stage's inputs
    mlflow_run_id: str  # this stage's nested MLflow run
    tracking_uri: str
    log: Callable[[str], None]  # a line in the job's output, prefixed with the stage's name
    config_digest: str  # of the run config's inputs: provenance (a registered version is tagged with it)
    autoscaling: bool = False  # cluster.autoscaling: a demand larger than the cluster waits for nodes
    # the values that ran of the settings declared metadata=RESOLVED, by dotted param key (e.g.
    # "evaluate.kid_subset_size": 50), filled in by the stage; the runner logs them when the stage ends
    ran_with: dict[str, Any] = field(default_factory=dict)

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    @property
    def result_uri(self) -> str:
        """This execution's folder: its outputs and, while it runs, its resumable state (a crashed execution with the
        same inputs resumes there; other inputs get another folder)."""
        return self.store.result_uri(self.stage, self.fingerprint)

    def execution(self, device: Device) -> Execution:
        """How this stage's Ray tasks and actors run on ``device``: the run root's storage options, the environment
        forwarded from the driver, and whether the cluster autoscales."""
        return Execution(self.store.options, runtime_env(), device, self.autoscaling)


def params_that_ran(configured: dict[str, str], ran: dict[str, Any]) -> dict[str, str]:
    """MLflow params of settings resolved at run time: each key with the value that ran (the configured one when the
    stage reported none), and the config's value under ``<key>.configured`` only where the two differ."""
    params: dict[str, str] = {}
    for key, value in configured.items():
        params[key] = str(ran.get(key, value))
        if params[key] != value:
            params[f"{key}.configured"] = value
    return params
