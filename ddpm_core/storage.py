"""Committed writes to any fsspec URI: payload files first, a manifest with their SHA-256 last.

Object stores have no atomic rename, so a directory counts as complete only when its ``manifest.json`` exists and
every file it lists has the recorded size and checksum. On local disks each file is additionally written under a
temporary name and renamed, so no file ever appears half-written under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

MANIFEST = "manifest.json"


class IncompleteError(FileNotFoundError):
    """A directory has no manifest, or its files do not match it: it was never committed or is corrupt. ``uri`` is
    the directory, ``corrupt`` whether it was committed and has changed since (rather than never written)."""

    def __init__(self, message: str, uri: str = "", corrupt: bool = False) -> None:
        super().__init__(message)
        self.uri, self.corrupt = uri, corrupt

    def __reduce__(self) -> tuple[type[IncompleteError], tuple[str, str, bool]]:  # keeps uri across processes
        return type(self), (str(self), self.uri, self.corrupt)


class StorageUnavailableError(RuntimeError):
    """The storage kept failing after its client's own retries (an outage, lost credentials): the directory being
    written is not committed, and everything committed before is intact."""


@contextlib.contextmanager
def storage_failures_named(uri: str, action: str) -> Iterator[None]:
    """Re-raise any storage failure other than a missing file as a :class:`StorageUnavailableError` naming ``uri``."""
    try:
        yield
    except (FileNotFoundError, StorageUnavailableError):
        raise
    except Exception as error:  # botocore, aiohttp, OS errors: whatever the fsspec backend raises
        raise StorageUnavailableError(
            f"{uri}: {action} failed after the storage client's retries ({type(error).__name__}: {error}). "
            f"Work committed before is intact and a partly written directory never reads as complete: check the "
            f"storage endpoint and credentials, then re-run (committed work is skipped)."
        ) from error


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of a URI (``file://``, ``s3://``, ``memory://``, or a plain local path)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path.rstrip("/")


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write one file so that it is never visible half-written under ``path``."""
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(fs._parent(path), exist_ok=True)
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(temporary, data)
        fs.mv(temporary, path)
    else:
        fs.pipe_file(path, data)  # one PUT: an object store shows the whole object or none


def s3_options(endpoint_url: str | None, region: str | None) -> dict[str, Any]:
    """fsspec options for S3 (credentials from the standard AWS environment variables): fail fast on an unreachable
    endpoint (5 s to connect, 20 s for an answer); throttling and transient errors are retried twice over, botocore's
    standard mode (3 attempts, exponential backoff: the AWS default) inside s3fs's own 5 tries of each call, which
    rides out outages of several seconds. Callers add a total deadline where an endpoint may accept and never
    answer."""
    client: dict[str, Any] = {}
    if endpoint_url:
        client["endpoint_url"] = endpoint_url
    if region:
        client["region_name"] = region
    retries = {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 3, "mode": "standard"}}
    return {"client_kwargs": client, "config_kwargs": retries}


def commit(
    uri: str,
    files: dict[str, bytes],
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Write ``files`` under the directory ``uri``, then its manifest. An existing manifest is removed first, so a
    reader never pairs an old manifest with new files."""
    with storage_failures_named(uri, "commit"):
        fs, root = filesystem(uri, storage_options)
        if fs.exists(f"{root}/{MANIFEST}"):
            fs.rm_file(f"{root}/{MANIFEST}")
        if isinstance(fs, LocalFileSystem) and fs.isdir(root):  # debris of a writer that died mid-file
            for debris in fs.glob(f"{root}/*.tmp-*"):
                fs.rm_file(debris)
        for name, data in files.items():
            write_bytes(fs, f"{root}/{name}", data)
        manifest = {
            "files": {
                name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for name, data in files.items()
            },
            "committed_at": time.time(),
            "metadata": metadata or {},
        }
        write_bytes(fs, f"{root}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True).encode())


def write_listed(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> dict[str, Any]:
    """Write one file of a directory that :func:`commit_written` will commit; returns its manifest entry."""
    write_bytes(fs, path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def commit_written(
    uri: str,
    files: dict[str, dict[str, Any]],
    metadata: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Commit a directory whose files other processes wrote (each with :func:`write_listed`): its manifest, listing
    ``files`` (name -> entry), is written last."""
    with storage_failures_named(uri, "commit"):
        fs, root = filesystem(uri, storage_options)
        manifest = {"files": files, "committed_at": time.time(), "metadata": metadata or {}}
        write_bytes(fs, f"{root}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True).encode())


def read_manifest(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    fs, root = filesystem(uri, storage_options)
    try:
        with storage_failures_named(uri, "reading the manifest"):
            return json.loads(fs.cat_file(f"{root}/{MANIFEST}"))
    except FileNotFoundError:
        raise IncompleteError(
            f"{uri}: no {MANIFEST}; the write was never committed (or the path is wrong)", uri
        ) from None


def is_committed(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, root = filesystem(uri, storage_options)
    with storage_failures_named(uri, "checking the manifest"):
        return fs.exists(f"{root}/{MANIFEST}")


def verify_committed(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Every file of a committed directory has its recorded size and SHA-256 (all of them are read); raises
    :class:`IncompleteError` naming the directory otherwise."""
    read_committed(uri, None, storage_options)


def read_committed(
    uri: str, names: list[str] | None = None, storage_options: dict[str, Any] | None = None
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Read the files of a committed directory, verifying size and SHA-256 of each; returns (files, metadata)."""
    manifest = read_manifest(uri, storage_options)
    fs, root = filesystem(uri, storage_options)
    files = {}
    for name in names or list(manifest["files"]):
        if name not in manifest["files"]:
            raise IncompleteError(f"{uri}: {name} is not listed in its {MANIFEST}", uri)
        try:
            with storage_failures_named(uri, f"reading {name}"):
                data = fs.cat_file(f"{root}/{name}")
        except FileNotFoundError:
            raise IncompleteError(f"{uri}/{name}: listed in the manifest but missing", uri, corrupt=True) from None
        expected = manifest["files"][name]
        if len(data) != expected["size"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise IncompleteError(
                f"{uri}/{name}: size or SHA-256 does not match the manifest (corrupt or overwritten)", uri, corrupt=True
            )
        files[name] = data
    return files, manifest["metadata"]
