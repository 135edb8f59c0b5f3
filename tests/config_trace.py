"""Which config keys code reads: every section class of the config gets a recording ``__getattribute__`` for the
duration of a ``with trace.installed():`` block, and each read of a leaf field of the traced config is kept with
the phase the test was in (e.g. "settings of train", "running train")."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from pipelines.config import PipelineConfig
from pipelines.typed import INLINE, is_execution, type_hints


def section_classes(cls: type = PipelineConfig) -> set[type]:
    """The config class and every dataclass it embeds."""
    found = {cls}
    for hint in type_hints(cls).values():
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            found |= section_classes(hint)
    return found


class ReadTrace:
    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.prefix: dict[int, str] = {}  # id of a section instance of ``config`` -> its dotted prefix
        self.leaves: dict[int, set[str]] = {}  # id -> the leaf keys under it
        self.execution: set[str] = set()  # leaf keys declared metadata=EXECUTION
        self._walk(config, "")
        self.phase = "outside"
        self.reads: list[tuple[str, str, int]] = []  # (phase, leaf key, id of the instance read)

    def _walk(self, instance: Any, prefix: str) -> set[str]:
        self.prefix[id(instance)] = prefix
        leaves = set()
        for spec in dataclasses.fields(instance):
            value = object.__getattribute__(instance, spec.name)
            if dataclasses.is_dataclass(value):
                leaves |= self._walk(value, prefix if spec.metadata == INLINE else f"{prefix}{spec.name}.")
            else:
                leaves.add(f"{prefix}{spec.name}")
                if is_execution(spec):
                    self.execution.add(f"{prefix}{spec.name}")
        self.leaves[id(instance)] = leaves
        return leaves

    @contextlib.contextmanager
    def installed(self) -> Iterator[ReadTrace]:
        patched = []
        for cls in section_classes():
            names = {spec.name for spec in dataclasses.fields(cls)}
            own = cls.__dict__.get("__getattribute__")
            cls.__getattribute__ = self._recorder(names)  # type: ignore[method-assign]
            patched.append((cls, own))
        try:
            yield self
        finally:
            for cls, own in patched:
                if own is None:
                    del cls.__getattribute__
                else:
                    cls.__getattribute__ = own  # type: ignore[method-assign]

    def _recorder(self, names: set[str]) -> Any:
        trace = self

        def getattribute(instance: Any, name: str) -> Any:
            value = object.__getattribute__(instance, name)
            if name in names and not dataclasses.is_dataclass(value):
                prefix = trace.prefix.get(id(instance))
                if prefix is not None:
                    trace.reads.append((trace.phase, f"{prefix}{name}", id(instance)))
            return value

        return getattribute

    def read_in(self, phase: str) -> set[str]:
        return {key for recorded, key, _ in self.reads if recorded == phase}

    def embedded(self, value: Any) -> set[int]:
        """Ids of the traced section instances held (at any depth) by a settings value."""
        found: set[int] = set()
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            if id(value) in self.prefix:
                found.add(id(value))
            for spec in dataclasses.fields(value):
                found |= self.embedded(object.__getattribute__(value, spec.name))
        elif isinstance(value, (tuple, list)):
            for item in value:
                found |= self.embedded(item)
        return found

    def embedded_leaves(self, value: Any) -> set[str]:
        """The leaf keys of the config sections a settings value holds whole."""
        return {key for instance in self.embedded(value) for key in self.leaves[instance]}
