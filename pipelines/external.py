"""The state outside the config that stages read, resolved before a run and hashed into the fingerprints of the
stages that read it (:mod:`pipelines.plan`): the registered champion a run compares against, and what a data URI
holds now (a listing of its files: names, sizes, versions). A champion that moves, or a data file added, removed or
rewritten, re-runs exactly what depends on it."""

from __future__ import annotations

from typing import Protocol

from ddpm_core.data import source_identity
from pipelines.config import PipelineConfig
from pipelines.contracts import ChampionRef
from pipelines.registry.champion import MlflowRegistry
from pipelines.tracking import config_digest


class External(Protocol):
    """What settings functions may ask of the world outside the config."""

    def champion(self, model_name: str) -> ChampionRef: ...

    def data_listing(self, uri: str) -> str: ...


class Resolver:
    """The config's model registry and storage, each question answered once per process."""

    def __init__(self, config: PipelineConfig, tracking_uri: str | None = None) -> None:
        """``tracking_uri``: the registry's address when not the config's (a saved config holds it redacted)."""
        uri = tracking_uri or config.mlflow.resolved_tracking_uri()
        self.registry = MlflowRegistry(uri, config.run_id, config_digest(config))
        self.storage_options = config.storage.options()
        self.listings: dict[str, str] = {}

    def champion(self, model_name: str) -> ChampionRef:
        return self.registry.champion(model_name)

    def data_listing(self, uri: str) -> str:
        """:func:`ddpm_core.data.source_identity` of ``data.uri`` (the storage options apply per protocol:
        ``storage.endpoint_url`` to data on S3 too, whatever the root). The first contact with a remote host is
        bounded and each wait announced; a host that never answers fails naming ``data.uri``."""
        from pipelines.preflight import reach_named  # it imports the training modules

        if uri not in self.listings:
            reach_named("data.uri", uri, self.storage_options)
            self.listings[uri] = source_identity(uri, self.storage_options)
        return self.listings[uri]
