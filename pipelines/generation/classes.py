"""The classes a class-conditional sample set draws: ``sample.classes`` as labels of the data set."""

from __future__ import annotations

from pipelines.config import ConfigError


def sample_labels(chosen: tuple[int | str, ...] | None, names: list[str], num_classes: int) -> tuple[int, ...]:
    """``sample.classes`` as labels (each a class name or a label in 0..K-1); all classes when it is null."""
    if chosen is None:
        return tuple(range(num_classes))
    labels = []
    for item in chosen:
        if isinstance(item, int) and 0 <= item < num_classes:
            labels.append(item)
        elif isinstance(item, str) and item in names:
            labels.append(names.index(item))
        else:
            raise ConfigError(
                f"sample.classes names {item!r}, which the data does not have: use labels 0..{num_classes - 1} or "
                f"the class names {names}"
            )
    return tuple(labels)
