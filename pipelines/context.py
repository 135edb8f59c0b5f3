"""What a stage receives from the runner besides its upstream stages' outputs, and how a stage stops on purpose."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from pipelines.config import PipelineConfig
from pipelines.execution import Device, Execution, runtime_env
from pipelines.runs import RunStore


class StageStopped(RuntimeError):
    """A stage stopped on purpose (e.g. training diverged); the message says what to change. The runner reports it
    without a traceback, and nothing retries it: retrying the same inputs would stop the same way."""


@dataclass(frozen=True)
class StageContext:
    config: PipelineConfig
    store: RunStore
    mlflow_run_id: str  # this stage's nested MLflow run
    fingerprint: str  # of this stage's inputs: partial state (checkpoints, shards) is only resumed under the same one
    tracking_uri: str
    log: Callable[[str], None]  # a line in the job's output, prefixed with the stage's name

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def work_uri(self, stage: str) -> str:
        """Where this stage execution keeps its resumable state (keyed by its input fingerprint)."""
        return self.store.work_uri(stage, self.fingerprint)

    def execution(self, device: Device) -> Execution:
        """How this stage's Ray tasks and actors run on ``device``: the run root's storage options, the environment
        forwarded from the driver, and whether the cluster autoscales."""
        return Execution(self.store.options, runtime_env(), device, self.config.cluster.autoscaling)
