"""Where a stage's Ray work runs: joining the cluster, the environment workers need, and one :class:`Execution` value
(storage options, runtime environment, device kind) handed to everything that starts Ray tasks or actors."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any

import pyarrow.fs
import ray

from ddpm_core.storage import filesystem

# Variables that workers need and do not inherit from the driver (Ray starts them from the raylet's environment).
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_INSECURE_TLS",
)


class Device(str, enum.Enum):
    """The kind of device the Ray workers of a stage compute on."""

    CPU = "cpu"
    GPU = "gpu"


@dataclass(frozen=True)
class Execution:
    """How a stage's Ray work runs (not what it computes)."""

    storage_options: dict[str, Any]  # fsspec options of the run root (credentials come from the environment)
    runtime_env: dict[str, Any]  # Ray runtime environment of every task, actor and training worker
    device: Device

    @property
    def use_gpu(self) -> bool:
        return self.device is Device.GPU

    def options(self) -> dict[str, Any]:
        """``.options(...)`` of a Ray task or actor: a GPU each on a GPU cluster, else a CPU, and the runtime
        environment."""
        resources = {"num_gpus": 1} if self.use_gpu else {"num_cpus": 1}
        return {**resources, "runtime_env": self.runtime_env}


def forwarded_env() -> dict[str, str]:
    return {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}


def runtime_env() -> dict[str, Any]:
    return {"env_vars": forwarded_env()}


def connect() -> None:
    """Join the cluster this job runs on (``ray job submit`` sets RAY_ADDRESS), else start a local instance."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(log_to_driver=True)


def cluster_device(use_gpu: bool | None) -> Device:
    """The device kind asked for (``train.use_gpu``), or GPUs when the cluster has them and nothing was asked."""
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    return Device.GPU if use_gpu else Device.CPU


def train_storage(uri: str, storage_options: dict[str, Any]) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(storage_path, storage_filesystem) for ``ray.train.RunConfig``: local paths as they are, other fsspec
    URIs through pyarrow's fsspec handler with the scheme stripped (as Ray expects)."""
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://"), None
    fs, path = filesystem(uri, storage_options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
