"""What every benchmark script shares: device synchronisation, the device's name, and the JSON result file."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock interval measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
