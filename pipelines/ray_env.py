"""Ray helpers: connecting, forwarding credentials to workers, and Ray Train storage on any fsspec root."""

from __future__ import annotations

import os
from typing import Any

import pyarrow.fs
import ray

from ddpm_core.storage import filesystem

# Variables that workers need and do not inherit from the driver (Ray starts them from the raylet's environment).
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_INSECURE_TLS")


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


def has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def train_storage(uri: str, storage_options: dict[str, Any]) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(storage_path, storage_filesystem) for ``ray.train.RunConfig``: local paths as they are, other fsspec
    URIs through pyarrow's fsspec handler with the scheme stripped (as Ray expects)."""
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://"), None
    fs, path = filesystem(uri, storage_options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
