"""The registered model's champion: resolved before a run as an input of the stages that compare against it
(:class:`ChampionRef`), its tags (FID, protocol, data fingerprint), and a committed copy of its EMA snapshot in
storage, for warm starts and for re-scoring it under a challenger's protocol."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ddpm_core.checkpoint import load_snapshot, save_snapshot
from ddpm_core.storage import is_committed
from pipelines.contracts import ChampionRef
from pipelines.redaction import redact
from pipelines.runs import RunStore

COMPARED_WITH_TAG = "ddpm.compared_with"  # on a version: the champion version it was compared with ("none": none)
DATA_SOURCE_TAG = "data_source"  # on a version: the data set it was trained on, "<data.uri>#<split>"
SNAPSHOT_TAG = "snapshot_uri"  # on a version: the committed snapshot its weights were logged from
CONFIG_TAG = "ddpm.config_sha256"  # on a version: the digest of the inputs of the run config that registered it


@dataclass(frozen=True)
class CopyRateTags:
    """A version's copy rate and its 95% interval, as tagged (``copy_rate``, ``copy_rate_ci_low``,
    ``copy_rate_ci_high``)."""

    rate: float
    low: float
    high: float


@dataclass(frozen=True)
class Champion:
    model_name: str
    version: str
    fid: float | None
    protocol_hash: str | None
    data_fingerprint: str | None
    run_id: str | None  # the pipeline run that produced it
    config_digest: str | None  # ... and the digest of that run's config inputs
    fid_stderr: float | None = None  # recorded since the jackknife interval (None on older versions)
    compared_with: str | None = None  # the champion version this one was compared with when registered
    data_listing: str | None = None  # the listing identity of the data it was trained on (ddpm_core.data)
    data_source: str | None = None  # the data set it was trained on: data.uri and split (DATA_SOURCE_TAG)
    copy_rate: CopyRateTags | None = None  # recorded since memorization was scored (None on older versions)


class MlflowRegistry:
    """The champion of a registered model, as a run compares against it: the version with alias ``champion``, unless
    this run registered it with this same config (a re-run of a finished run), then the champion that version was
    compared with, so that a finished run reads the same input again. Each name is looked up once per process,
    within a deadline."""

    def __init__(self, tracking_uri: str, run_id: str, config_digest: str) -> None:
        self.tracking_uri, self.run_id, self.config_digest = tracking_uri, run_id, config_digest
        self.found: dict[str, ChampionRef] = {}

    def champion(self, model_name: str) -> ChampionRef:
        from pipelines.preflight import MLFLOW_DEADLINE_S, PreflightError, within

        if model_name not in self.found:
            try:
                version = within(MLFLOW_DEADLINE_S, lambda: self.resolve(model_name))
            except (TimeoutError, MlflowException, OSError) as error:
                raise PreflightError(
                    f"the model registry at {redact(self.tracking_uri)!r} did not say which version of "
                    f"{model_name!r} is the champion ({type(error).__name__}: {redact(str(error))}): check "
                    "mlflow.tracking_uri and that the server runs"
                ) from error
            self.found[model_name] = ChampionRef(model_name, version)
        return self.found[model_name]

    def registered(self, champion: Champion) -> bool:
        """Whether this run, with this config, registered ``champion``."""
        return champion.run_id == self.run_id and champion.config_digest == self.config_digest

    def resolve(self, model_name: str) -> str | None:
        local = self.tracking_uri.removeprefix("sqlite:///")
        if local != self.tracking_uri and not os.path.exists(local):
            return None  # a local store not made yet registers nothing (and asking would create it)
        client = MlflowClient(self.tracking_uri)
        champion = current_champion(client, model_name)
        seen: set[str] = set()
        while champion is not None and champion.version not in seen and self.registered(champion):
            seen.add(champion.version)
            before = champion.compared_with
            champion = champion_version(client, model_name, before) if before and before != "none" else None
        return champion.version if champion is not None else None


def current_champion(client: MlflowClient, model_name: str) -> Champion | None:
    """The version with alias ``champion`` now; None when there is none (or no such model)."""
    try:
        version = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None
    return champion_of(version)


def champion_version(client: MlflowClient, model_name: str, version: str) -> Champion | None:
    """Version ``version`` of ``model_name`` as a champion; None when it no longer exists."""
    try:
        return champion_of(client.get_model_version(model_name, version))
    except MlflowException:
        return None


def champion_of(version: ModelVersion) -> Champion:
    tags = version.tags
    return Champion(
        version.name,
        str(version.version),
        float(tags["fid"]) if "fid" in tags else None,
        tags.get("protocol_hash"),
        tags.get("data_fingerprint"),
        tags.get("ddpm.run_id"),
        tags.get(CONFIG_TAG),
        float(tags["fid_stderr"]) if "fid_stderr" in tags else None,
        tags.get(COMPARED_WITH_TAG),
        tags.get("data_listing"),
        tags.get(DATA_SOURCE_TAG),
        copy_rate_of(tags),
    )


def copy_rate_of(tags: dict[str, str]) -> CopyRateTags | None:
    """The copy rate a version was tagged with, or None (a version registered before it was scored)."""
    if not {"copy_rate", "copy_rate_ci_low", "copy_rate_ci_high"} <= tags.keys():
        return None
    return CopyRateTags(float(tags["copy_rate"]), float(tags["copy_rate_ci_low"]), float(tags["copy_rate_ci_high"]))


def champion_snapshot_uri(store: RunStore, tracking_uri: str, model_name: str, version: str) -> str:
    """The champion's snapshot, copied once from its MLflow model artifacts into ``_cache/champions/`` (committed)."""
    import mlflow

    uri = store.cache_uri("champions", f"{model_name}-v{version}")
    if is_committed(uri, store.options):
        return uri
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as directory:
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}", dst_path=directory)
        snapshot = load_snapshot(os.path.join(local, "artifacts", "snapshot"))
        save_snapshot(
            uri,
            snapshot.build_network(),  # the weights as stored (a consistency student stays one by its metadata)
            snapshot.unet,
            snapshot.diffusion,
            {**snapshot.metadata, "champion_version": version},
            store.options,
            snapshot.guide,  # a champion sampled with autoguidance is re-scored with its own guide
        )
    return uri
