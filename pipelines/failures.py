"""Finding what went wrong inside the errors Ray hands back: a task's error wraps its cause, a Ray Train worker
group's error holds each worker's, and Python chains them. The runner and the trainer look there for the failures
they can name (a corrupt committed file, a storage outage, a full disk)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import TypeVar

E = TypeVar("E", bound=BaseException)

STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)  # no space, quota, read-only, file too large
# pyarrow (Ray Train's checkpoint upload) raises OSErrors that carry the strerror in their text but no errno
STORAGE_FULL_TEXTS = tuple(os.strerror(number) for number in STORAGE_FULL)


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every error it wraps, each once."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = [
            current.__cause__,
            current.__context__,
            getattr(current, "cause", None),
            getattr(current, "controller_failure", None),
        ]
        failures = getattr(current, "worker_failures", None)  # Ray Train's WorkerGroupError: rank -> error
        if isinstance(failures, dict):
            wrapped += list(failures.values())
        pending += [inner for inner in wrapped if isinstance(inner, BaseException)]


def find(error: BaseException, kind: type[E]) -> E | None:
    """The innermost error of ``kind`` in ``error`` and what it wraps (a Ray task's error is also an instance of its
    cause's type, but only the cause itself carries the cause's attributes and plain message)."""
    found = [inner for inner in causes(error) if isinstance(inner, kind)]
    return found[-1] if found else None


def storage_full(error: BaseException) -> str | None:
    """Why the storage took no more data (no room, a quota, read-only), when ``error`` or what it wraps says so: an
    ``OSError`` with such an errno, or an error whose text says so (pyarrow's carry no errno, and Ray Train's
    worker-group errors carry the workers' tracebacks as text)."""
    for inner in causes(error):
        if isinstance(inner, OSError) and inner.errno in STORAGE_FULL:
            return os.strerror(inner.errno)
        said = [text for text in STORAGE_FULL_TEXTS if text in str(inner)]
        if said:
            return said[0]
    return None
