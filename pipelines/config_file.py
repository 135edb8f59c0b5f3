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
    data: dict[str, Any] = read_config_file(Path(path)) if path is not None else {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {override!r} must look like section.key=value")
        try:
            value = parse_yaml(raw) if raw.strip() else None
        except DuplicateKeyError as error:
            dotted = ".".join((key.strip(), *error.key))
            raise ConfigError(f"override {override!r} gives key {dotted!r} {len(error.lines)} times") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"override {override!r}: the value is not valid YAML: {error}") from None
        set_dotted(data, key.strip(), value)
    return from_plain(PipelineConfig, data, error=ConfigError)


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping of sections a config file holds; a missing file, a folder, an empty file, a key given twice, text
    that is not YAML or YAML that is not a mapping is a :class:`ConfigError` naming the file."""
    name = repr(str(path))
    if path.is_dir():
        raise ConfigError(f"config file {name} is a folder: --config takes a YAML file (e.g. configs/digits.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {name} does not exist")
    try:
        data = parse_yaml(path.read_text())
    except DuplicateKeyError as error:
        raise ConfigError(f"config file {name}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {name} is not valid YAML: {error}") from None
    if data is None:
        raise ConfigError(
            f"config file {name} is empty: it holds no settings. Give it a mapping of sections (e.g. 'train:' with "
            "'lr: 0.0002' under it), or leave out --config to run the embedded default"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"config file {name} must hold a mapping of sections (e.g. 'train:'), got {data!r}")
    return data


class DuplicateKeyError(ValueError):
    """A YAML mapping that gives one key twice (PyYAML keeps the last silently): the key's path from the document's
    top, and the lines (1-based) it is on."""

    def __init__(self, key: tuple[str, ...], lines: list[int]) -> None:
        self.key, self.lines = key, lines
        at = ", ".join(map(str, lines[:-1])) + f" and {lines[-1]}"
        super().__init__(
            f"key {'.'.join(key)!r} is given {len(lines)} times (lines {at}); YAML would keep only the last "
            "silently: keep one (a section's keys go under one heading)"
        )


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping, at any depth, before anything is built.
    Keys that a merge (``<<: *anchor``) brings in may be overridden, as YAML intends."""

    def construct_document(self, node: yaml.Node) -> Any:
        check_unique_keys(node, (), set())
        return super().construct_document(node)


def check_unique_keys(node: yaml.Node, path: tuple[str, ...], seen: set[int]) -> None:
    """Raise :class:`DuplicateKeyError` naming the dotted key and its lines (1-based) when a mapping under ``node``
    gives a key twice; ``seen``: the nodes already walked (an alias repeats a node, and may point back up)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            check_unique_keys(item, (*path, str(index)), seen)
    if not isinstance(node, yaml.MappingNode):
        return
    lines: dict[tuple[str, str], list[int]] = {}  # (tag, text) of a key: 1 and "1" are two keys
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else f"<{key_node.id}>"
        lines.setdefault((key_node.tag, key), []).append(key_node.start_mark.line + 1)
        check_unique_keys(value_node, (*path, key), seen)
    for (_, key), where in lines.items():
        if len(where) > 1:
            raise DuplicateKeyError((*path, key), where)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice (:class:`DuplicateKeyError`)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: builds plain values only


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
