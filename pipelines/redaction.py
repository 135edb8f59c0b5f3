"""Credentials written into URIs (``http://user:password@host``, ``s3://key:secret@bucket``) never leave the process:
every URI the pipeline prints, logs, stores in a config copy or sends to MLflow goes through :func:`redact`."""

from __future__ import annotations

import re
from typing import Any

USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):(?P<password>[^/@\s]+)@")


def redact(text: str) -> str:
    """``text`` with the password of every URI's user info replaced by ``***`` (the user name is kept)."""
    return USERINFO.sub(lambda match: f"{match['scheme']}{match['user']}:***@", text)


def redacted(plain: Any) -> Any:
    """Plain data (a config as a dict) with :func:`redact` applied to every string in it."""
    if isinstance(plain, str):
        return redact(plain)
    if isinstance(plain, dict):
        return {key: redacted(value) for key, value in plain.items()}
    if isinstance(plain, list):
        return [redacted(value) for value in plain]
    return plain
