"""A lease on a run root, so two scheduled runs never write the same run at once.

Leases are numbered generations ``{run root}/_lease/{n:08d}.json``, each created with an exclusive write (S3
``If-None-Match: *``; ``O_EXCL`` on local disks), so of two runs racing for generation n + 1 exactly one wins. A
generation holds the run until its ``expires_at`` (renewed by the holder's heartbeat) or until it is released; a
crashed run's lease simply expires (at once when the next run is on the same host and sees the holder's process
gone) and the next run takes generation n + 1. The holder renews only while no
higher generation exists (fencing): a holder that was paused past its expiry learns that it lost the lease.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ddpm_core.storage import filesystem, write_bytes
from pipelines.typed import from_plain, to_plain

LEASE_DIR = "_lease"


class LeaseHeldError(RuntimeError):
    """Another live run holds the lease."""


def _exclusive_create(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write ``path`` only if it does not exist; False when another writer got there first."""
    if isinstance(fs, LocalFileSystem):  # write a temporary file, then hard-link it: exclusive, and never seen empty
        fs.makedirs(fs._parent(path), exist_ok=True)
        temporary = f"{path}.{uuid.uuid4().hex}.partial"
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
            os.link(temporary, path)
        except FileExistsError:
            return False
        finally:  # also when the write failed (a full disk): no temporary file stays behind
            if os.path.exists(temporary):
                os.remove(temporary)
        return True
    try:
        fs.pipe_file(path, data, mode="create")  # S3: PutObject with If-None-Match: *
    except (FileExistsError, OSError) as error:
        if isinstance(error, FileExistsError) or "PreconditionFailed" in str(error) or "412" in str(error):
            return False
        raise
    return True


@dataclass
class Lease:
    """A held lease; renew it with :meth:`keep_alive` and give it back with :meth:`release`."""

    uri: str  # the run root
    generation: int
    owner: str
    ttl_s: float
    storage_options: dict[str, Any]
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    lost: bool = False

    @property
    def path(self) -> str:
        return f"{self.uri}/{LEASE_DIR}/{self.generation:08d}.json"

    def _write(self, released: bool = False) -> None:
        fs, path = filesystem(self.path, self.storage_options)
        write_bytes(fs, path, _record(self.owner, self.ttl_s, released))

    def renew(self) -> bool:
        """Extend the expiry, unless a newer generation exists (then the lease is lost)."""
        if latest_generation(self.uri, self.storage_options)[0] != self.generation:
            self.lost = True
            return False
        self._write()
        return True

    def keep_alive(self, interval_s: float | None = None, on_lost: Callable[[], None] | None = None) -> Lease:
        """Renew in a daemon thread every ``interval_s`` (a third of the TTL by default)."""
        interval = interval_s or self.ttl_s / 3

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    if not self.renew():
                        if on_lost:
                            on_lost()
                        return
                except Exception:  # a storage hiccup: try again at the next beat; the TTL covers a few misses
                    continue

        self._thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop renewing and mark the lease released. When the storage refuses that (it is full, or gone), the
        lease simply expires after its TTL: the run's own error is what the user needs to see."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            if not self.lost and latest_generation(self.uri, self.storage_options)[0] == self.generation:
                self._write(released=True)
        except Exception as error:  # the storage's own error, whatever the backend raises
            print(f"lease: {self.uri} not marked released ({type(error).__name__}); it expires in {self.ttl_s:g} s")

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class LeaseRecord:
    """One generation's file: who holds it and until when."""

    owner: str  # host:pid:nonce
    renewed_at: float
    expires_at: float
    released: bool

    def holds(self, now: float) -> bool:
        """Whether its holder still holds the run root at ``now``."""
        return not self.released and self.expires_at > now and not _holder_process_is_gone(self.owner)


def _record(owner: str, ttl_s: float, released: bool = False) -> bytes:
    now = time.time()
    return json.dumps(to_plain(LeaseRecord(owner, now, now + ttl_s, released))).encode()


def _holder_process_is_gone(owner: str) -> bool:
    """True when ``owner`` (``host:pid:nonce``) names a process on this host that no longer exists: a crashed run
    re-started on the same machine need not wait for its old lease to expire."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    return False


def latest_generation(uri: str, storage_options: dict[str, Any]) -> tuple[int, LeaseRecord | None]:
    """(highest generation number, its record); (0, None) when no lease was ever taken."""
    fs, root = filesystem(f"{uri}/{LEASE_DIR}", storage_options)
    fs.invalidate_cache(root)
    try:
        names = [name.rsplit("/", 1)[-1] for name in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return 0, None
    # Generations are NNNNNNNN.json (a file being written is NNNNNNNN.json.<nonce>.partial).
    numbers = sorted(int(name[:-5]) for name in names if name.endswith(".json") and name[:-5].isdigit())
    if not numbers:
        return 0, None
    try:
        return numbers[-1], from_plain(LeaseRecord, json.loads(fs.cat_file(f"{root}/{numbers[-1]:08d}.json")))
    except (FileNotFoundError, json.JSONDecodeError):  # being written right now: treat as held
        now = time.time()
        return numbers[-1], LeaseRecord("unknown (being written)", now, now + 1, False)


def acquire(
    uri: str,
    storage_options: dict[str, Any],
    ttl_s: float = 300.0,
    wait_s: float = 0.0,
    poll_s: float = 5.0,
    log: Callable[[str], None] = print,
) -> Lease:
    """Take the lease on the run root ``uri``, waiting up to ``wait_s`` for a live holder to finish; raises
    :class:`LeaseHeldError` naming the holder when it does not."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.time() + wait_s
    while True:
        generation, record = latest_generation(uri, storage_options)
        if record is None or not record.holds(time.time()):
            candidate = Lease(uri, generation + 1, owner, ttl_s, storage_options)
            if _exclusive_create(*filesystem(candidate.path, storage_options), _record(owner, ttl_s)):
                if record is not None and not record.released:
                    log(f"lease: took over {uri} from {record.owner} (its lease expired or its process is gone)")
                return candidate
            continue  # another run won generation + 1: look again
        if time.time() >= deadline:
            left = record.expires_at - time.time()
            raise LeaseHeldError(
                f"run root {uri} is held by {record.owner} (lease renewed "
                f"{time.time() - record.renewed_at:.0f} s ago, expires in {left:.0f} s unless renewed). "
                "Another run of this run_id is in progress; wait for it, or use another run_id."
            )
        log(f"lease: {uri} is held by {record.owner}; waiting")
        time.sleep(max(0.05, min(poll_s, deadline - time.time())))
