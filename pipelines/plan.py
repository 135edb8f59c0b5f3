"""What a stage reads, by construction, and what a config makes of the graph.

A stage declares its inputs as one frozen *settings* value, built from the config by one function (its
``settings``); the stage receives that value, never the config. Its fingerprint is the hash of the settings (less
the fields declared ``metadata=EXECUTION``: how and where it runs, not what it computes) and of its upstream stages'
fingerprints, so a setting a stage reads is in its fingerprint by construction. External state a stage reads (the
registry's champion, what the data URI holds) is resolved by the settings function through
:class:`~pipelines.external.External`, so it is an input too.

:func:`plan` computes every enabled stage's settings and fingerprint from a config alone, before anything runs:
the runner finds committed results by fingerprint, and a changed config is compared with a run's saved one here
(:func:`config_changes`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.config import PipelineConfig
from pipelines.contracts import PrepareOutputs, StageOutputs
from pipelines.external import External
from pipelines.redaction import redacted
from pipelines.typed import INLINE, is_execution, to_plain, type_hints

SettingsBuilder = Callable[[PipelineConfig, External], Any]


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[..., StageOutputs]  # run(context, settings, *outputs of the upstream stages, in order)
    settings: SettingsBuilder  # the one function that builds what the stage reads from the config
    outputs: type[StageOutputs]
    upstream: tuple[str, ...]
    # what enables an optional stage: a boolean config key (e.g. tune.enabled) or a section's boolean property
    # (autoencoder.latent: autoencoder.weights_uri or autoencoder.train)
    switch: str | None = None
    description: str = ""
    needs_ray: bool = True  # stages that do not are run before Ray is started, so bad input fails early
    check: Callable[[PipelineConfig], None] | None = None  # config checks beyond the config's own, before anything runs
    # checks of the stage's settings against the prepared data, run as soon as the prepare stage's outputs are known
    # (before any Ray work): e.g. sample.classes names classes the data has
    check_data: Callable[[Any, PrepareOutputs, dict[str, Any]], None] | None = None  # (settings, data, storage options)
    draws: tuple[str, ...] = ()  # sample sets it draws besides the sample stage's, with the settings that ask for them

    def enabled(self, config: PipelineConfig) -> bool:
        if self.switch is None:
            return True
        section, key = self.switch.split(".")
        return bool(getattr(getattr(config, section), key))


@dataclass(frozen=True)
class PlannedStage:
    stage: Stage
    settings: Any
    upstream: dict[str, str]  # the fingerprints of its enabled upstream stages, by name
    fingerprint: str

    @property
    def hashed(self) -> dict[str, Any]:
        """The settings as hashed (without execution fields), as plain data."""
        return inputs_of(self.settings)


def inputs_of(settings: Any) -> dict[str, Any]:
    plain: dict[str, Any] = to_plain(settings, inputs_only=True)
    return plain


def fingerprint(name: str, settings: Any, upstream: dict[str, str]) -> str:
    """SHA-256 of the stage's name, its settings (inputs only) and its upstream fingerprints."""
    payload = {"stage": name, "settings": inputs_of(settings), "upstream": upstream}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def plan(stages: Sequence[Stage], config: PipelineConfig, external: External) -> dict[str, PlannedStage]:
    """The enabled stages of ``config`` in graph order, each with its settings and fingerprint."""
    planned: dict[str, PlannedStage] = {}
    for stage in stages:
        if not stage.enabled(config):
            continue
        settings = stage.settings(config, external)
        upstream = {name: planned[name].fingerprint for name in stage.upstream if name in planned}
        planned[stage.name] = PlannedStage(stage, settings, upstream, fingerprint(stage.name, settings, upstream))
    return planned


def leaf_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field[Any], Any]]:
    """(dotted key, field, type hint) of every leaf of a config dataclass, inline fields under their parent's key."""
    hints = type_hints(cls)
    for spec in dataclasses.fields(cls):
        hint = hints[spec.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            yield from leaf_fields(hint, prefix if spec.metadata == INLINE else f"{prefix}{spec.name}.")
        else:
            yield f"{prefix}{spec.name}", spec, hint


def dotted(plain: dict[str, Any], key: str) -> Any:
    value: Any = plain
    for part in key.split("."):
        value = value[part]
    return value


@dataclass(frozen=True)
class Change:
    key: str
    before: Any
    after: Any
    execution: bool  # a field that says how the run runs, not what it computes

    def __str__(self) -> str:
        return f"{self.key} {self.before!r} -> {self.after!r}"


def config_changes(before: PipelineConfig, after: PipelineConfig) -> list[Change]:
    """The leaf keys whose values differ between two configs."""
    old, new = redacted(to_plain(before)), redacted(to_plain(after))  # a saved config holds redacted URIs
    return [
        Change(key, dotted(old, key), dotted(new, key), is_execution(spec))
        for key, spec, _ in leaf_fields(PipelineConfig)
        if dotted(old, key) != dotted(new, key)
    ]
