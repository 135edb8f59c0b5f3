"""Plain data (YAML, JSON) to frozen dataclasses and back, checked against the dataclasses' type hints.

One reader for the config file and the stage manifests: an unknown key, a value of the wrong type, or a value that
a dataclass's ``__post_init__`` refuses raises an error naming the dotted key, the value and what was expected.
Dataclasses check their own ranges and coerce their own enums in ``__post_init__``; errors they raise as
:class:`ddpm_core.fields.FieldError` are rendered under the key the dataclass sits at.

A field declared with ``metadata=INLINE`` embeds a dataclass whose fields are written directly in the parent's
mapping: the pipeline's ``train`` section embeds ``ddpm_core``'s ``OptimConfig`` so that users write ``train.lr``.

A field declared with ``metadata=EXECUTION`` says *how* or *where* something runs, never *what* it computes (CPUs per
worker, retries, the storage endpoint): :func:`to_plain` with ``inputs_only=True`` leaves such fields out, and that
is what stage fingerprints hash (:mod:`pipelines.plan`). Every other field is an input of whatever reads it.

A field declared with ``metadata=RESOLVED`` is a request that the stage reading it resolves while it runs (a size
capped by the data it meets, e.g. ``evaluate.kid_subset_size``): it is an input like any other, but MLflow shows the
value that ran, logged by the stage run when it ends (:func:`resolved_keys`; the config's value beside it, under
``<key>.configured``, only when the two differ), and the parent run leaves it out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Hashable, Mapping
from typing import Any, TypeVar

from ddpm_core.fields import FieldError

T = TypeVar("T")
INLINE: Mapping[str, bool] = types.MappingProxyType({"inline": True})
EXECUTION: Mapping[str, bool] = types.MappingProxyType({"execution": True})
RESOLVED: Mapping[str, bool] = types.MappingProxyType({"resolved": True})
# a path or URI that Ray workers (on any node) open: pipelines.nodes checks that every node reaches it
WORKER_PATH: Mapping[str, bool] = types.MappingProxyType({"worker_path": True})


def type_hints(cls: type) -> Mapping[str, Any]:
    """``typing.get_type_hints`` of the class ``cls``, resolved once: resolving the string annotations is most of the
    time of reading a config and of planning its stages."""
    return _resolved_hints(cls)


@functools.cache
def _resolved_hints(cls: Hashable) -> Mapping[str, Any]:
    return types.MappingProxyType(typing.get_type_hints(cls))


class SchemaError(ValueError):
    """Plain data that does not fit a dataclass; the message names the dotted key."""

    noun = "key"  # how an unknown key is called in messages


def to_plain(value: Any, inputs_only: bool = False) -> Any:
    """Dataclasses as dicts (inline fields merged into their parent), enums as their values, tuples as lists; with
    ``inputs_only``, without the fields declared ``metadata=EXECUTION``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        plain: dict[str, Any] = {}
        for spec in dataclasses.fields(value):
            if inputs_only and is_execution(spec):
                continue
            item = to_plain(getattr(value, spec.name), inputs_only)
            if _is_inline(spec):
                plain.update(item)
            else:
                plain[spec.name] = item
        return plain
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [to_plain(item, inputs_only) for item in value]
    if isinstance(value, Mapping):
        return {key: to_plain(item, inputs_only) for key, item in value.items()}
    return value


def is_execution(spec: dataclasses.Field[Any]) -> bool:
    """Whether a field says how or where something runs (``metadata=EXECUTION``), not what it computes."""
    return bool(spec.metadata.get("execution"))


def resolved_keys(cls: Any) -> set[str]:
    """The dotted keys (as :func:`to_plain` and ``pipelines.tracking.flatten`` write them) of the fields declared
    ``metadata=RESOLVED`` in the dataclass ``cls`` (a class or an instance) and the dataclasses it holds."""
    return marked_keys(cls, "resolved")


def marked_keys(cls: Any, mark: str, prefix: str = "") -> set[str]:
    """The dotted keys (as :func:`to_plain` writes them) of the fields whose metadata holds ``mark`` (e.g.
    ``"resolved"``, ``"worker_path"``) in the dataclass ``cls`` (a class or an instance) and those it holds."""
    cls = cls if isinstance(cls, type) else type(cls)
    found: set[str] = set()
    hints = type_hints(cls)
    for spec in dataclasses.fields(cls):
        if spec.metadata.get(mark):
            found.add(f"{prefix}{spec.name}")
        nested = [
            hint for hint in (hints[spec.name], *typing.get_args(hints[spec.name])) if dataclasses.is_dataclass(hint)
        ]
        for hint in nested:
            found |= marked_keys(hint, mark, prefix if _is_inline(spec) else f"{prefix}{spec.name}.")
    return found


def from_plain(
    cls: type[T], data: Any, key: str = "", base: T | None = None, error: type[SchemaError] = SchemaError
) -> T:
    """Build ``cls`` from the mapping ``data`` found at ``key``. Fields that ``data`` leaves out keep ``base``'s
    values (the class defaults when there is no ``base``)."""
    if not isinstance(data, Mapping):
        raise error(f"{key or 'the top level'}: expected a mapping, got {data!r}")
    specs = {spec.name: spec for spec in dataclasses.fields(cls) if spec.init}  # type: ignore[arg-type]
    hints = type_hints(cls)
    inline = {name: spec for name, spec in specs.items() if _is_inline(spec)}
    inline_names = {name: owner for owner in inline for name in _field_names(hints[owner])}
    allowed = sorted((set(specs) - set(inline)) | set(inline_names))
    unknown = sorted(str(name) for name in set(data) - set(allowed))
    if unknown:
        where = f" under {key}" if key else ""
        raise error(f"unknown {error.noun} {_join(key, unknown[0])!r}; allowed keys{where}: {', '.join(allowed)}")
    values: dict[str, Any] = {}
    for name in inline:
        given = {item: value for item, value in data.items() if inline_names.get(item) == name}
        if given:
            values[name] = from_plain(hints[name], given, key, _current(specs[name], base), error)
    for name, value in data.items():
        if name not in inline_names:
            values[name] = _convert(value, hints[name], _join(key, name), _current(specs[name], base), error)
    return _construct(cls, values, key, base, error)


def _construct(cls: type[T], values: dict[str, Any], key: str, base: T | None, error: type[SchemaError]) -> T:
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)  # type: ignore[type-var]
    except SchemaError:
        raise
    except FieldError as problem:
        raise error(problem.under(key) if key else str(problem)) from None
    except (ValueError, TypeError) as problem:
        raise error(f"{key}: {problem}" if key else str(problem)) from None


def _convert(value: Any, hint: Any, key: str, current: Any, error: type[SchemaError]) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, args, key, current, error)
    if dataclasses.is_dataclass(hint):
        return from_plain(hint, value, key, current if dataclasses.is_dataclass(current) else None, error)  # type: ignore[arg-type]
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            raise error(f"{key}: expected a mapping, got {value!r}")
        item_hint = args[1] if args else Any
        return {name: _convert(item, item_hint, _join(key, str(name)), None, error) for name, item in value.items()}
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise error(f"{key}: expected a list, got {value!r}")
        item_hint = args[0] if args else Any
        items = [_convert(item, item_hint, f"{key}[{index}]", None, error) for index, item in enumerate(value)]
        return tuple(items) if origin is tuple or hint is tuple else items
    return _convert_scalar(value, hint, key, error)


def _convert_union(value: Any, options: tuple[Any, ...], key: str, current: Any, error: type[SchemaError]) -> Any:
    if value is None and type(None) in options:
        return None
    problems = []
    for option in options:
        if option is not type(None):
            try:
                return _convert(value, option, key, current, error)
            except SchemaError as problem:
                problems.append(problem)
    raise problems[0]


def _convert_scalar(value: Any, hint: Any, key: str, error: type[SchemaError]) -> Any:
    if hint is bool and not isinstance(value, bool):
        raise error(f"{key}: expected true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise error(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise error(f"{key}: expected a string, got {value!r}")
    return value  # enums and other types: checked by the dataclass itself


def _is_inline(spec: dataclasses.Field[Any]) -> bool:
    return bool(spec.metadata.get("inline"))


def _field_names(cls: type) -> list[str]:
    return [spec.name for spec in dataclasses.fields(cls) if spec.init]


def _current(spec: dataclasses.Field[Any], base: Any) -> Any:
    """The value a field has before ``data`` is applied: ``base``'s, else the field's default."""
    if base is not None:
        return getattr(base, spec.name)
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return None if spec.default is dataclasses.MISSING else spec.default


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name
