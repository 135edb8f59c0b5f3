"""Pretrained weights from a configured URI: fetched once through fsspec, verified by SHA-256, cached locally.

Nothing is downloaded from a hard-coded address: the URI is the user's (a bucket, a shared volume, a local path).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddpm_core.storage import StorageUnreachableError, filesystem, reach, without_userinfo

DEFAULT_CACHE = Path(os.environ.get("DDPM_WEIGHTS_CACHE", Path.home() / ".cache" / "ddpm-pipeline" / "weights"))
_HEX = re.compile(r"^[0-9a-f]{8,64}$")


class WeightsError(ValueError):
    """Weights that are missing, unreadable or not the expected file."""


def check_sha256_spec(sha256: str, field: str) -> str:
    """A full SHA-256 (64 hex) or a prefix of at least 8 hex digits, as in torch hub's ``name-<prefix>.pth``."""
    value = sha256.lower()
    if not _HEX.match(value):
        raise WeightsError(f"{field}: expected 8 to 64 lowercase hex digits of the file's SHA-256, got {sha256!r}")
    return value


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_verified(
    uri: str,
    sha256: str,
    how_to_provide: str,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | Path = DEFAULT_CACHE,
    log: Callable[[str], None] = print,
) -> tuple[Path, str]:
    """Local path of the weights at ``uri`` whose SHA-256 starts with ``sha256``, and their full SHA-256.

    The cached copy ``<cache_dir>/<full sha256>/<file name>`` is reused when present; otherwise the file is copied to
    a temporary name, hashed, and moved into place only when the digest matches. ``how_to_provide`` ends the error
    raised when the file is missing. The first contact with a remote host is bounded and each wait is announced
    through ``log`` (:func:`ddpm_core.storage.reach`).
    """
    expected = check_sha256_spec(sha256, "sha256")
    name = Path(uri.rstrip("/")).name
    cache_dir = Path(cache_dir)
    for candidate in cache_dir.glob(f"{expected}*/{name}") if cache_dir.is_dir() else ():
        return candidate, candidate.parent.name
    try:
        reach(uri, storage_options, log)
    except StorageUnreachableError as error:
        raise WeightsError(f"weights URI {without_userinfo(uri)!r} cannot be read: {error}. {how_to_provide}") from None
    try:
        fs, path = filesystem(uri, storage_options)
        exists = fs.exists(path)
    except Exception as error:  # endpoint, credentials
        raise WeightsError(
            f"weights URI {uri!r} cannot be read ({type(error).__name__}: {error}). {how_to_provide}"
        ) from error
    if not exists:
        raise WeightsError(f"weights URI {uri!r} does not exist. {how_to_provide}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=cache_dir, prefix=".partial-")
    os.close(handle)
    try:
        fs.get(path, temporary)
        actual = file_sha256(temporary)
        if not actual.startswith(expected):
            raise WeightsError(
                f"weights at {uri!r} have SHA-256 {actual}, expected one starting with {expected}: "
                "a different or corrupted file"
            )
        target = cache_dir / actual / name
        target.parent.mkdir(exist_ok=True)
        os.replace(temporary, target)
        return target, actual
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
