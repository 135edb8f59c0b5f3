"""What a stage receives from the runner, and how a stage stops on purpose."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

from mlflow.tracking import MlflowClient

from ddpm_core.precision import NATIVE_BF16_CPU_FLAGS, cpu_has_native_bf16
from pipelines.config import PipelineConfig
from pipelines.runs import RunStore


class StageStopped(RuntimeError):
    """A stage stopped on purpose (e.g. training diverged); the message says what to change. The runner reports it
    without a traceback, and nothing retries it: retrying the same inputs would stop the same way."""


@contextlib.contextmanager
def out_of_memory_advice(where: str, advice: str):
    """Re-raise an allocation failure (CUDA's ``OutOfMemoryError``, or the CPU allocator's) as a ``MemoryError``
    saying where it happened and which settings to change."""
    import torch

    try:
        yield
    except RuntimeError as error:
        if not isinstance(error, torch.OutOfMemoryError) and "can't allocate memory" not in str(error):
            raise
        raise MemoryError(f"out of memory in {where}: {advice}. Allocator: {str(error).splitlines()[0][:300]}") from error


def slow_precision_advice(precision: str, device_type: str, setting: str, cpuinfo: str | None = None) -> str | None:
    """A warning when bf16 was asked for on a CPU known to lack bf16 units (``ddpm_core.precision.cpu_has_native_bf16``
    of this machine, or of the ``cpuinfo`` text given), naming the setting that asked for it; else ``None``."""
    if precision != "bf16" or device_type != "cpu" or cpu_has_native_bf16(cpuinfo) is not False:
        return None
    return (f"warning: {setting}=true on a CPU without bf16 units (no {' or '.join(NATIVE_BF16_CPU_FLAGS)} flag): bf16 "
            f"convolutions fall back to kernels many times slower than float32 (docs/benchmarks.md); set {setting}=false")


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
