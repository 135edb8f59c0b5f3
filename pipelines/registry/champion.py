"""The registered model's current champion: its tags (FID, protocol, data fingerprint) and a committed copy of its
EMA snapshot in storage, for warm starts and for re-scoring it under a challenger's protocol."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ddpm_core.checkpoint import load_snapshot, save_snapshot
from ddpm_core.storage import is_committed
from pipelines.runs import RunStore


@dataclass(frozen=True)
class Champion:
    version: str
    fid: float | None
    protocol_hash: str | None
    data_fingerprint: str | None
    run_id: str | None  # the pipeline run that produced it
    fid_stderr: float | None = None  # recorded since the jackknife interval (None on older versions)


def current_champion(client: MlflowClient, model_name: str) -> Champion | None:
    try:
        version = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None
    tags = version.tags
    return Champion(
        str(version.version),
        float(tags["fid"]) if "fid" in tags else None,
        tags.get("protocol_hash"),
        tags.get("data_fingerprint"),
        tags.get("ddpm.run_id"),
        float(tags["fid_stderr"]) if "fid_stderr" in tags else None,
    )


def champion_snapshot_uri(store: RunStore, tracking_uri: str, model_name: str, champion: Champion) -> str:
    """The champion's snapshot, copied once from its MLflow model artifacts into ``_cache/champions/`` (committed)."""
    import mlflow

    uri = store.cache_uri("champions", f"{model_name}-v{champion.version}")
    if is_committed(uri, store.options):
        return uri
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as directory:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model_name}/{champion.version}", dst_path=directory
        )
        snapshot = load_snapshot(os.path.join(local, "artifacts", "snapshot"))
        save_snapshot(
            uri,
            snapshot.build_model(),
            snapshot.unet,
            snapshot.diffusion,
            {**snapshot.metadata, "champion_version": champion.version},
            store.options,
        )
    return uri
