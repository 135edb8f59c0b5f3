"""Committed writes to any fsspec URI: payload files first, a manifest with their SHA-256 last.

Object stores have no atomic rename, so a directory counts as complete only when its ``manifest.json`` exists and
every file it lists has the recorded size and checksum. On local disks each file is additionally written under a
temporary name and renamed, so no file ever appears half-written under its final name.

Every filesystem is made by :func:`filesystem`, which gives each remote protocol its deadlines unless the caller set
them (:func:`resolved_options`), and :func:`reach` is the announced, bounded first contact with a remote host.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
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
    """The fsspec filesystem and path of a URI (``file://``, ``s3://``, ``http(s)://``, ``memory://``, or a plain
    local path), with the options :func:`resolved_options` makes of ``storage_options`` (per protocol, deadlines
    filled in)."""
    fs, path = fsspec.core.url_to_fs(uri, **resolved_options(uri, storage_options))
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
    """fsspec options for S3 (credentials from the standard AWS environment variables) with the deadlines that
    :func:`filesystem` gives every S3 URL anyway (:func:`s3_deadlines`)."""
    client: dict[str, Any] = {}
    if endpoint_url:
        client["endpoint_url"] = endpoint_url
    if region:
        client["region_name"] = region
    return {"client_kwargs": client, "config_kwargs": s3_deadlines()}


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


def committed_folders(parent_uri: str, pattern: str, storage_options: dict[str, Any]) -> list[str]:
    """The committed folders (those with a manifest) under ``parent_uri`` whose names match the glob ``pattern``,
    sorted by name, as URIs."""
    fs, path = filesystem(parent_uri, storage_options)
    fs.invalidate_cache(path)
    folders = sorted(manifest.rsplit("/", 1)[0] for manifest in fs.glob(f"{path}/{pattern}/{MANIFEST}"))
    protocol = parent_uri.split("://", 1)[0] + "://" if "://" in parent_uri else ""
    return [protocol + folder for folder in folders]


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


# Deadlines of every remote call (the same for the run root, data, snapshots and weights). No request waits longer
# than CONNECT_TIMEOUT_S for a connection or READ_TIMEOUT_S for the next bytes of an answer. S3: botocore's standard
# retry mode (S3_ATTEMPTS attempts, exponential backoff: the AWS default) inside s3fs's own 5 tries of each call, which
# rides out outages of several seconds and bounds a call at 5 x S3_ATTEMPTS x (connect + read). HTTP(S): no retries
# (fsspec makes none), at most HTTP_TOTAL_S per request (aiohttp's own total, kept so a large file may take minutes).
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 20.0
S3_ATTEMPTS = 3
HTTP_TOTAL_S = 300.0
LOCAL_PROTOCOLS = frozenset({"file", "local", "memory"})


def s3_deadlines() -> dict[str, Any]:
    """botocore ``Config`` arguments (s3fs's ``config_kwargs``) of an S3 call's deadlines and retries."""
    return {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "read_timeout": READ_TIMEOUT_S,
        "retries": {"max_attempts": S3_ATTEMPTS, "mode": "standard"},
    }


def protocol_names(uri: str) -> tuple[str, ...]:
    """Every name of the protocol of ``uri`` (``("s3", "s3a")``, ``("http", "https")``; ``("file",)`` for a plain
    path), the first its canonical one."""
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    try:
        names = fsspec.get_filesystem_class(protocol).protocol
    except (ValueError, ImportError):  # unknown or not installed: url_to_fs names the problem
        return (protocol,)
    names = (names,) if isinstance(names, str) else tuple(names)
    return names if protocol in names else (protocol, *names)


def with_deadlines(names: tuple[str, ...], options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for a filesystem of the protocol ``names`` with the deadlines of its client added where the caller
    did not set them (S3: botocore's connect/read timeouts and retries; HTTP: an aiohttp ``ClientTimeout``)."""
    if "s3" in names:
        return {**options, "config_kwargs": {**s3_deadlines(), **(options.get("config_kwargs") or {})}}
    if "http" in names:
        import aiohttp  # fsspec's HTTP filesystem needs it anyway

        timeout = aiohttp.ClientTimeout(total=HTTP_TOTAL_S, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        return {**options, "client_kwargs": {"timeout": timeout, **(options.get("client_kwargs") or {})}}
    return options


def resolved_options(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options :func:`filesystem` opens ``uri`` with. ``storage_options`` may hold entries keyed by protocol
    (fsspec's convention for chained URLs), e.g. ``{"s3": {...}}`` from ``StorageSection.options``: the entry of the
    URI's protocol applies (over the plain keys), the others are left out, so one set of options serves every URL a
    run touches. Then each remote protocol gets its deadlines unless the caller set them (:func:`with_deadlines`)."""
    given = dict(storage_options or {})
    keyed = {k: v for k, v in given.items() if isinstance(v, dict) and k in fsspec.available_protocols()}
    if "::" in uri:  # a chained URL: fsspec hands each layer its protocol's entry
        for bit in uri.split("::"):
            bit = bit if "://" in bit else f"{bit}://"  # as fsspec reads a layer named without a path
            protocol, names = fsspec.core.split_protocol(bit)[0] or "file", protocol_names(bit)
            entry = next((keyed[name] for name in (protocol, *names) if name in keyed), {})
            given[protocol] = with_deadlines(names, entry)
        return given
    names = protocol_names(uri)
    plain = {k: v for k, v in given.items() if k not in keyed}
    entry = next((keyed[name] for name in names if name in keyed), {})
    return with_deadlines(names, {**plain, **entry})


# The first contact with a remote host (listing data.uri, opening train.init_from, reading the run's config): a host
# that accepts connections and never answers is named after FIRST_CONTACT.total_s, with each attempt announced.
ANNOUNCE_AFTER_S = 2.0  # an attempt that has not answered by then is announced
ANSWERS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


@dataclass(frozen=True)
class Contact:
    """How long the first contact with a remote host may take: ``attempts`` tries of ``attempt_s`` each, ``pause_s``
    apart."""

    attempts: int = 3
    attempt_s: float = 8.0
    pause_s: float = 1.0

    @property
    def total_s(self) -> float:
        """The bounded total of every attempt and pause."""
        return self.attempts * self.attempt_s + (self.attempts - 1) * self.pause_s


FIRST_CONTACT = Contact()
_answered: set[tuple[str, str]] = set()  # (protocol, host) of the hosts that answered a first contact in this process


class StorageUnreachableError(StorageUnavailableError):
    """A remote host that did not answer the first contact within its bounded total (:func:`reach`); ``host`` is
    its address without credentials."""

    def __init__(self, message: str, host: str = "") -> None:
        super().__init__(message)
        self.host = host

    def __reduce__(self) -> tuple[type[StorageUnreachableError], tuple[str, str]]:  # keeps host across processes
        return type(self), (str(self), self.host)


def without_userinfo(text: str) -> str:
    """``text`` with the ``user:password@`` of every URI in it left out."""
    return _USERINFO.sub(lambda match: match["scheme"], text)


def is_remote(uri: str) -> bool:
    """Whether ``uri`` is read over a network (not a local path, ``file://``, ``memory://`` or ``builtin:``)."""
    return fsspec.core.split_protocol(uri)[0] not in (None, *LOCAL_PROTOCOLS)


def host_of(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """The host a remote URI's calls go to, without credentials: an S3 URL's endpoint (its storage options, else
    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS's), the host and port of any other URL."""
    names = protocol_names(uri)
    address = uri
    if "s3" in names:
        options = resolved_options(uri, storage_options)
        address = (
            (options.get("client_kwargs") or {}).get("endpoint_url")
            or options.get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or "https://s3.amazonaws.com"
        )
    netloc = urllib.parse.urlsplit(address).netloc.rsplit("@", 1)[-1]
    return netloc if "s3" in names or "http" in names else f"{names[0]}://{netloc}"


def unanswered(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) says the host did not answer: a timeout, a refused or
    dropped connection; not an answer such as "no such file" or "access denied"."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and not isinstance(seen, ANSWERS):
            return True
        if any(cls.__name__.endswith("ConnectionError") for cls in type(seen).__mro__):  # botocore's, not OSErrors
            return True
        seen = seen.__cause__
    return False


def describe(error: BaseException) -> str:
    """An error in one short line, without credentials: the error it was raised from when it wraps one (fsspec's
    HTTP filesystem says "file not found" for a host that does not answer)."""
    shown = error.__cause__ if isinstance(error, ANSWERS) and error.__cause__ is not None else error
    return without_userinfo(f"{type(shown).__name__}: {shown}")[:300]


def _attempt(action: Callable[[], Any], seconds: float, slow: Callable[[], None]) -> Exception | None:
    """``action()`` in a daemon thread (an unanswered call cannot be cancelled; it ends with its client's own
    deadlines): None when it returned within ``seconds``, else its error or a ``TimeoutError``. ``slow()`` is called
    when it has not ended after :data:`ANNOUNCE_AFTER_S`."""
    future: Future[None] = Future()

    def run() -> None:
        try:
            action()
            future.set_result(None)
        except Exception as error:
            future.set_exception(error)

    threading.Thread(target=run, name="reach", daemon=True).start()
    first = min(ANNOUNCE_AFTER_S, seconds)
    for wait in (first, seconds - first):
        try:
            future.result(timeout=wait)
            return None
        except FutureTimeout:
            if wait == first:
                slow()
        except Exception as error:
            return error
    return TimeoutError(f"no answer within {seconds:g} s")


def reach(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    contact: Contact | None = None,
) -> None:
    """The first contact with the host of a remote ``uri`` (one ``info`` call), bounded and announced: an attempt
    that has not answered after a few seconds, and each retry, is logged as "waiting for HOST (attempt n of m)"; a
    host that never answers raises :class:`StorageUnreachableError` naming it after ``contact.total_s``. Any answer
    (even "no such file": the caller's own call says what it means) ends the contact, and a host that answered once
    is not probed again in this process. Local URIs return at once. ``contact``: :data:`FIRST_CONTACT` when None."""
    contact = contact or FIRST_CONTACT
    target = uri.split("::")[-1]  # the innermost layer of a chained URL holds the data
    if not is_remote(target):
        return
    host = host_of(target, storage_options)
    key = (protocol_names(target)[0], host)
    if key in _answered:
        return
    fs, path = filesystem(target, storage_options)
    attempts, error, started = contact.attempts, None, time.monotonic()
    slow = f"waiting for {host} (attempt 1 of {attempts}, up to {contact.attempt_s:g} s each)"
    for attempt in range(1, attempts + 1):
        if error is not None:
            log(f"waiting for {host} (attempt {attempt} of {attempts}; the last: {describe(error)})")
        announce = (lambda: log(slow)) if attempt == 1 else (lambda: None)
        error = _attempt(lambda: fs.info(path), contact.attempt_s, announce)
        if error is None or (isinstance(error, ANSWERS) and not unanswered(error)):
            _answered.add(key)
            return
        if not unanswered(error):  # e.g. no credentials, a server error: the caller's own call reports it
            return
        if attempt < attempts:
            time.sleep(contact.pause_s)
    assert error is not None
    raise StorageUnreachableError(
        f"{host} does not answer: {attempts} attempts over {time.monotonic() - started:.0f} s (each given "
        f"{contact.attempt_s:g} s, {contact.total_s:g} s in all); the last: {describe(error)}",
        host,
    )
