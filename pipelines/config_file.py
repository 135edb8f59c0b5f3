"""The config file: a YAML mapping of sections plus ``section.key=value`` overrides (values parsed as YAML), read
into one checked :class:`~pipelines.config.PipelineConfig`; and the resolved config written back as YAML (the run
root's ``config.yaml``, the parent MLflow run's artifact)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipelines.config import ConfigError, PipelineConfig
from pipelines.redaction import redacted
from pipelines.typed import from_plain


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML config (or the embedded default when ``path`` is None), apply ``key=value`` overrides (values
    parsed as YAML), and check everything."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {str(path)!r} must hold a mapping of sections (e.g. 'train:'), got {data!r}"
            )
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} must look like section.key=value")
        set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return from_plain(PipelineConfig, data, error=ConfigError)


def with_overrides(config: PipelineConfig, overrides: dict[str, Any]) -> PipelineConfig:
    """``config`` with dotted-key values replaced (e.g. the tune stage's best parameters), checked again."""
    data = config.to_dict()
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return from_plain(PipelineConfig, data, error=ConfigError)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``data[a][b][c] = value`` for ``dotted`` = ``a.b.c``, creating sections on the way."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def save_resolved(config: PipelineConfig) -> str:
    """The resolved config as YAML, as it is saved in the run root."""
    return yaml.safe_dump(redacted(config.to_dict()), sort_keys=False)
