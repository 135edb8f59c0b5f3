"""What a stage receives from the runner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from mlflow.tracking import MlflowClient

from pipelines.config import PipelineConfig
from pipelines.runs import RunStore


@dataclass
class StageContext:
    config: PipelineConfig
    store: RunStore
    upstream: dict[str, dict[str, Any]]  # manifests of upstream stages (their "outputs" hold URIs and values)
    mlflow_run_id: str  # this stage's nested MLflow run
    fingerprint: str  # of this stage's inputs: partial state (checkpoints, shards) is only resumed under the same one
    tracking_uri: str
    log: Callable[[str], None]

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def work_uri(self, stage: str) -> str:
        return self.store.work_uri(stage, self.fingerprint)

    def output_of(self, stage: str, key: str) -> Any:
        return self.upstream[stage]["outputs"][key]
