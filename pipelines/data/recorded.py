"""The training data as an MLflow dataset: its name, digest (the data fingerprint) and source (``data.uri``,
redacted), recorded as an input of the runs that read it, so that the MLflow UI shows which data a run and a model
used. Only metadata is recorded: no image is uploaded."""

from __future__ import annotations

import json

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipelines.contracts import PrepareOutputs
from pipelines.redaction import redact

DIGEST_CHARS = 36  # MLflow keeps at most 36 characters of a dataset digest: the fingerprint's first 36 hex digits
TRAINING = "training"  # MLflow's context of a data set a model was trained on
REFERENCE = "fid_reference"  # the evaluate run's: the reference statistics of its FIDs are of this data


def dataset_name(uri: str) -> str:
    """What a person calls the data: a builtin's name (``builtin:digits`` -> ``digits``), else the last part of
    the URI (``s3://bucket/cifar10/`` -> ``cifar10``)."""
    if uri.startswith("builtin:"):
        return uri.removeprefix("builtin:")
    return redact(uri).rstrip("/").rsplit("/", 1)[-1] or redact(uri)


def source_type(uri: str) -> str:
    """MLflow's source type of ``data.uri``: its scheme (``s3``, ``gs``, ``http``...), ``builtin`` or ``local``."""
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        return "http" if scheme == "https" else scheme
    return "builtin" if uri.startswith("builtin:") else "local"


def training_dataset(prepare: PrepareOutputs) -> Dataset:
    """The prepared training split as an MLflow dataset entity; its profile holds the whole fingerprint and the
    split's sizes."""
    source = redact(prepare.source_uri)
    profile = {
        "fingerprint": prepare.fingerprint,
        "split": prepare.described(),
        "num_train": prepare.num_train,
        "num_holdout": prepare.num_holdout,
        "num_classes": prepare.num_classes,
    }
    return Dataset(
        name=dataset_name(prepare.source_uri),
        digest=prepare.fingerprint[:DIGEST_CHARS],
        source_type=source_type(source),
        source=json.dumps({"url" if source.startswith(("http://", "https://")) else "uri": source}),
        profile=json.dumps(profile),
    )


def log_training_data(client: MlflowClient, run_id: str, prepare: PrepareOutputs, context: str = TRAINING) -> None:
    """Record the prepared data as an input of run ``run_id`` (``context``: how the run used it)."""
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
    client.log_inputs(run_id, datasets=[DatasetInput(training_dataset(prepare), tags)])
