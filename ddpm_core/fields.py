"""Checks of the library's frozen config dataclasses, with errors that name the field under any key.

A config such as :class:`ddpm_core.training.OptimConfig` names its fields ``optim.lr`` in its own errors; an
application that embeds it under another key (the pipeline's ``train`` section) renders the same error as
``train.lr`` with :meth:`FieldError.under`, so messages never have to be rewritten as text.
"""

from __future__ import annotations

import enum


class FieldError(ValueError):
    """A bad value of one field: ``under(section)`` reads ``{section}.{field}{problem}``.

    ``problem`` follows the dotted key directly (``" is out of range: -1.0"``, ``": 'warp' is not one of ..."``) and
    names other fields of the same config by their bare names."""

    def __init__(self, section: str, field: str, problem: str) -> None:
        self.field, self.problem = field, problem
        super().__init__(self.under(section))

    def under(self, section: str) -> str:
        """The message with the field's key under ``section`` (a dotted prefix such as ``model.overrides``)."""
        return f"{section}.{self.field}{self.problem}"


def coerce_enum_fields(instance: object, section: str, kinds: dict[str, type[enum.Enum]]) -> None:
    """Replace each named field by its enum member (members and their string values are accepted); a bad value
    raises :class:`FieldError` listing the allowed values. For use in ``__post_init__`` of frozen dataclasses."""
    for name, kind in kinds.items():
        value = getattr(instance, name)
        try:
            object.__setattr__(instance, name, kind(value))
        except ValueError:
            raise FieldError(section, name, f": {value!r} is not one of {allowed_values(kind)}") from None


def allowed_values(kind: type[enum.Enum]) -> str:
    """``a, b, c``: the values of an enum, for error messages."""
    return ", ".join(str(member.value) for member in kind)


def check_ranges(section: str, checks: dict[str, tuple[bool, object]]) -> None:
    """``checks``: field name -> (value is in range, value); the first one out of range raises :class:`FieldError`."""
    for name, (ok, value) in checks.items():
        if not ok:
            raise FieldError(section, name, f" is out of range: {value!r}")
