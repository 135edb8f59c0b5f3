"""Enum-valued fields of frozen config dataclasses, accepted as enum members or their string values."""

from __future__ import annotations

import enum


def coerce_enum_fields(instance: object, section: str, kinds: dict[str, type[enum.Enum]]) -> None:
    """Replace each named field by its enum member; a bad value raises ValueError naming ``section.field`` and the
    allowed values. For use in ``__post_init__`` of frozen dataclasses."""
    for name, kind in kinds.items():
        value = getattr(instance, name)
        try:
            object.__setattr__(instance, name, kind(value))
        except ValueError:
            allowed = ", ".join(member.value for member in kind)
            raise ValueError(f"{section}.{name}: {value!r} is not one of {allowed}") from None
