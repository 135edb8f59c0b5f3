"""What every benchmark script shares: device synchronisation, the device's name, fast-path variant names, and the JSON
result file."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from ddpm_core.precision import cpu_flags


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock interval measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    """The CPU's model name and the instruction sets that decide float32 and bf16 speed (Linux), else the machine."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
        platform.machine(),
    )
    flags = cpu_flags(cpuinfo)
    isa = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if name in flags]
    return f"{model} ({', '.join(isa) or 'no AVX2'})"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def variant_switches(variant: str, allowed: tuple[str, ...]) -> set[str]:
    """The switches a fast-path variant name turns on: ``eager`` is none, else names from ``allowed`` joined by ``+``
    (e.g. ``channels_last+compile``); an unknown name raises ValueError listing the allowed ones."""
    switches = set() if variant == "eager" else set(variant.split("+"))
    unknown = switches - set(allowed)
    if unknown:
        raise ValueError(
            f"variant {variant!r}: unknown {', '.join(sorted(unknown))}; a variant is 'eager' or names "
            f"joined by '+' from {', '.join(allowed)}"
        )
    return switches


def write_result(path: Path, result: dict) -> None:
    """Writes the JSON under a temporary name and renames it: a benchmark killed mid-write leaves the last whole
    file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(result, indent=2))
    partial.replace(path)
