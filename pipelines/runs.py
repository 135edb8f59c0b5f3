"""Run layout on storage: ``{root}/{run_id}/{stage}/`` with a ``stage.json`` manifest written last, and
``{root}/_cache/`` for what runs share (feature extractors, reference statistics, champions' snapshots, compiled
artifacts)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any, TypeVar

from ddpm_core.storage import filesystem, storage_failures_named, write_bytes
from pipelines.config import PipelineConfig, save_resolved
from pipelines.contracts import StageManifest
from pipelines.typed import SchemaError, from_plain, to_plain

STAGE_MANIFEST = "stage.json"
T = TypeVar("T")


@dataclass(frozen=True)
class RunStore:
    """Where one pipeline run keeps its outputs."""

    config: PipelineConfig

    @property
    def storage_root(self) -> str:
        return self.config.storage.resolved_root()

    @property
    def options(self) -> dict[str, Any]:
        return self.config.storage.options()

    @property
    def root(self) -> str:
        return f"{self.storage_root}/{self.config.run_id}"

    def stage_uri(self, stage: str) -> str:
        return f"{self.root}/{stage}"

    def cache_uri(self, kind: str, key: str) -> str:
        """Shared across runs: e.g. feature extractors and reference statistics keyed by data fingerprint."""
        return f"{self.storage_root}/_cache/{kind}/{key}"

    def read_manifest(self, stage: str, outputs: type[T]) -> StageManifest[T] | None:
        """The stage's manifest with its outputs typed as ``outputs``; None when the stage never completed."""
        return read_manifest(self.stage_uri(stage), outputs, self.options)

    def write_manifest(self, manifest: StageManifest[Any]) -> None:
        uri = f"{self.stage_uri(manifest.stage)}/{STAGE_MANIFEST}"
        with storage_failures_named(uri, "writing the stage manifest"):
            fs, path = filesystem(uri, self.options)
            write_bytes(fs, path, json.dumps(to_plain(manifest), indent=2, sort_keys=True).encode())

    def remove_manifest(self, stage: str) -> None:
        uri = f"{self.stage_uri(stage)}/{STAGE_MANIFEST}"
        with storage_failures_named(uri, "removing the stage manifest"):
            fs, path = filesystem(uri, self.options)
            if fs.exists(path):
                fs.rm_file(path)

    def work_uri(self, stage: str, fingerprint: str) -> str:
        """Resumable partial state of one stage execution (Ray Train checkpoints, sample shards), keyed by the
        stage's input fingerprint: a changed input starts afresh, a crashed execution resumes."""
        return f"{self.stage_uri(stage)}/{fingerprint[:12]}"

    def remove_work(self, stage: str, fingerprint: str) -> None:
        fs, path = filesystem(self.work_uri(stage, fingerprint), self.options)
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def save_config(self) -> None:
        fs, path = filesystem(f"{self.root}/config.yaml", self.options)
        write_bytes(fs, path, save_resolved(self.config).encode())


def read_manifest(
    stage_uri: str, outputs: type[T], storage_options: dict[str, Any] | None = None
) -> StageManifest[T] | None:
    """The ``stage.json`` under ``stage_uri`` with its outputs read as ``outputs`` (also for tools that hold only a
    run's folder, such as the benchmarks); None when it does not exist."""
    fs, path = filesystem(f"{stage_uri}/{STAGE_MANIFEST}", storage_options)
    try:
        data = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SchemaError(f"{stage_uri}/{STAGE_MANIFEST} is not readable JSON ({error})") from None
    manifest: StageManifest[Any] = from_plain(StageManifest, data)
    return dataclasses.replace(manifest, outputs=from_plain(outputs, manifest.outputs, "outputs"))


def now() -> float:
    return round(time.time(), 3)
