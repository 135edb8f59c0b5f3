"""Run layout on storage. A run lives at ``{root}/{run_id}/``:

- ``config.yaml``: the run's one config (changed only by ``run --allow-changes``);
- ``{stage}/{fingerprint[:16]}/``: one stage result per input fingerprint, its ``stage.json`` manifest written last
  (the only proof the result exists), beside its outputs and, while it runs, its resumable state (checkpoints,
  shards). Results are found by fingerprint, so going back to an earlier config finds that config's results;
- ``run.json``: the run's head, the fingerprint each stage's current result has (what ``status`` and ``gc`` read).

``{root}/_cache/`` holds what runs share (feature extractors, reference statistics, champions' snapshots, compiled
artifacts)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from ddpm_core.storage import filesystem, reach, storage_failures_named, write_bytes
from pipelines.config import ConfigError, PipelineConfig
from pipelines.config_file import save_resolved
from pipelines.contracts import StageManifest
from pipelines.typed import SchemaError, from_plain, to_plain

STAGE_MANIFEST, RUN_HEAD, RUN_CONFIG = "stage.json", "run.json", "config.yaml"
FINGERPRINT_FOLDER = 16  # hex digits of a fingerprint that name its result folder
T = TypeVar("T")


@dataclass(frozen=True)
class RunStore:
    """Where one pipeline run keeps its results."""

    storage_root: str  # the resolved storage.root (fsspec URI or absolute path)
    run_id: str
    options: dict[str, Any] = field(default_factory=dict)  # fsspec storage options (StorageSection.options)

    @classmethod
    def of(cls, config: PipelineConfig) -> RunStore:
        return cls(config.storage.resolved_root(), config.run_id, config.storage.options())

    @property
    def root(self) -> str:
        return f"{self.storage_root}/{self.run_id}"

    def stage_uri(self, stage: str) -> str:
        """The folder of every result of ``stage``."""
        return f"{self.root}/{stage}"

    def result_uri(self, stage: str, fingerprint: str) -> str:
        """The folder of the result of ``stage`` for the inputs with ``fingerprint``: its outputs, its resumable state
        while it runs (a crashed execution with the same inputs resumes it), and its manifest last."""
        return f"{self.stage_uri(stage)}/{fingerprint[:FINGERPRINT_FOLDER]}"

    def cache_uri(self, kind: str, key: str) -> str:
        """Shared across runs: e.g. feature extractors and reference statistics keyed by data fingerprint."""
        return f"{self.storage_root}/_cache/{kind}/{key}"

    def read_manifest(self, stage: str, fingerprint: str, outputs: type[T]) -> StageManifest[T] | None:
        """The committed result of ``stage`` for ``fingerprint``, its outputs typed as ``outputs``; None when there is
        none (or the folder holds another fingerprint's, which a 16-digit prefix makes a theoretical case)."""
        manifest = read_manifest(self.result_uri(stage, fingerprint), outputs, self.options)
        return manifest if manifest is not None and manifest.fingerprint == fingerprint else None

    def write_manifest(self, manifest: StageManifest[Any]) -> None:
        uri = f"{self.result_uri(manifest.stage, manifest.fingerprint)}/{STAGE_MANIFEST}"
        with storage_failures_named(uri, "writing the stage manifest"):
            fs, path = filesystem(uri, self.options)
            write_bytes(fs, path, json.dumps(to_plain(manifest), indent=2, sort_keys=True).encode())

    def remove_manifest(self, stage: str, fingerprint: str) -> None:
        uri = f"{self.result_uri(stage, fingerprint)}/{STAGE_MANIFEST}"
        with storage_failures_named(uri, "removing the stage manifest"):
            fs, path = filesystem(uri, self.options)
            if fs.exists(path):
                fs.rm_file(path)

    def remove_result(self, stage: str, fingerprint: str) -> None:
        """The whole folder of one result (``--from``, ``gc``)."""
        fs, path = filesystem(self.result_uri(stage, fingerprint), self.options)
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def results(self, stage: str) -> dict[str, dict[str, Any] | None]:
        """Every result folder of ``stage`` by folder name: its manifest as plain data, or None while it is partial
        (an execution that has not finished, or crashed) or its manifest cannot be read."""
        fs, path = filesystem(self.stage_uri(stage), self.options)
        if not fs.exists(path):
            return {}
        found: dict[str, dict[str, Any] | None] = {}
        for entry in sorted(fs.ls(path, detail=False)):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            try:
                found[name] = json.loads(fs.cat_file(f"{entry.rstrip('/')}/{STAGE_MANIFEST}"))
            except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
                found[name] = None  # not (or not readably) committed
        return found

    def save_config(self, config: PipelineConfig) -> None:
        fs, path = filesystem(f"{self.root}/{RUN_CONFIG}", self.options)
        write_bytes(fs, path, save_resolved(config).encode())

    def read_config(self) -> PipelineConfig | None:
        """The run's config as saved by its last run; None for a new run id. The first contact with a remote root is
        bounded, each wait announced (:func:`ddpm_core.storage.reach`)."""
        reach(self.root, self.options)
        fs, path = filesystem(f"{self.root}/{RUN_CONFIG}", self.options)
        try:
            text = fs.cat_file(path).decode()
        except FileNotFoundError:
            return None
        try:
            return from_plain(PipelineConfig, yaml.safe_load(text) or {}, error=ConfigError)
        except (yaml.YAMLError, SchemaError) as error:
            raise ConfigError(f"{self.root}/{RUN_CONFIG} cannot be read as a config of this version: {error}") from None

    def read_head(self) -> dict[str, str]:
        """Stage name -> the fingerprint of its current result (the last run's), from ``run.json``."""
        fs, path = filesystem(f"{self.root}/{RUN_HEAD}", self.options)
        try:
            return dict(json.loads(fs.cat_file(path))["stages"])
        except FileNotFoundError:
            return {}

    def write_head(self, stages: dict[str, str]) -> None:
        uri = f"{self.root}/{RUN_HEAD}"
        with storage_failures_named(uri, "writing the run's head"):
            fs, path = filesystem(uri, self.options)
            write_bytes(fs, path, json.dumps({"stages": stages}, indent=2, sort_keys=True).encode())

    def current_manifest(self, stage: str, outputs: type[T]) -> StageManifest[T] | None:
        """The current result of ``stage`` (the one ``run.json`` names), for tools that read a finished run."""
        fingerprint = self.read_head().get(stage)
        return self.read_manifest(stage, fingerprint, outputs) if fingerprint else None


def read_manifest(
    result_uri: str, outputs: type[T], storage_options: dict[str, Any] | None = None
) -> StageManifest[T] | None:
    """The ``stage.json`` in ``result_uri`` with its outputs read as ``outputs`` (also for tools that hold only a
    result's folder, such as the benchmarks); None when it does not exist."""
    fs, path = filesystem(f"{result_uri}/{STAGE_MANIFEST}", storage_options)
    try:
        data = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SchemaError(f"{result_uri}/{STAGE_MANIFEST} is not readable JSON ({error})") from None
    manifest: StageManifest[Any] = from_plain(StageManifest, data)
    return dataclasses.replace(manifest, outputs=from_plain(outputs, manifest.outputs, "outputs"))


def now() -> float:
    return round(time.time(), 3)
