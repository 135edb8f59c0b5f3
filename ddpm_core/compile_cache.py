"""``torch.compile``'s artifacts kept in storage, so that a restarted worker, or the next run of the same model on the
same kind of device, loads them instead of compiling again.

torch's "mega-cache" (``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``) serialises what this process
compiled: inductor's graphs and kernels and AOTAutograd's forward/backward split, each entry keyed by its graph and
settings, so that an entry which does not match is a cache miss, never a wrong kernel. Loading skips code generation
and kernel compilation; Dynamo still traces the model. The file is named by the torch version and the device, which
compiled code depends on, and by the caller's key (the model and how it runs)."""

from __future__ import annotations

import hashlib
import json
import platform
import re
import warnings
from typing import Any

import torch

from ddpm_core.storage import filesystem, write_bytes


def cache_file_uri(directory_uri: str, device: torch.device, key: dict[str, Any]) -> str:
    """``{directory}/torch-{version}-{device}-{hash of key}.bin``: one file per torch version, device model and
    ``key`` (JSON-serialisable: e.g. the network's configuration, precision, memory layout and batch shape)."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"torch-{torch.__version__}-{device_name}-{digest}")
    return f"{directory_uri}/{name}.bin"


def load_compiled(uri: str, storage_options: dict[str, Any] | None = None) -> int:
    """Hot-loads the artifacts stored at ``uri`` into torch's compile caches, before the first compiled call; returns
    their size in bytes, 0 when there are none. A file torch cannot read is reported and skipped: compiling starts
    from scratch, as without a file (storage errors are raised, as for every other file of the run)."""
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        return 0
    data = fs.cat_file(path)
    try:
        info = torch.compiler.load_cache_artifacts(data)  # None when torch rejects the bytes (e.g. a bad checksum)
    except Exception as error:  # another torch's format: compile from scratch
        info, reason = None, f"{type(error).__name__}: {error}"
    else:
        reason = "torch rejected its contents"
    if info is None:
        warnings.warn(f"compile cache {uri} not loaded ({reason}); compiling", stacklevel=2)
        return 0
    return len(data)


def save_compiled(uri: str, storage_options: dict[str, Any] | None = None) -> int:
    """Stores every artifact this process has compiled at ``uri`` (never visible half-written); returns the bytes
    written, 0 when nothing was compiled."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return 0
    data, _ = artifacts
    fs, path = filesystem(uri, storage_options)
    write_bytes(fs, path, data)
    return len(data)
