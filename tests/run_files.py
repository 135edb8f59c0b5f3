"""Reading a run's folder the way the pipeline lays it out (pipelines/runs.py): each stage's results live in
``{run root}/{stage}/{fingerprint[:16]}/`` and ``run.json`` names the current one of each stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def head(run_root: Path) -> dict[str, str]:
    """Stage -> the fingerprint of its current result ({} before any stage finished)."""
    path = run_root / "run.json"
    return json.loads(path.read_text())["stages"] if path.exists() else {}


def result_dir(run_root: Path, stage: str) -> Path:
    """The folder of the stage's current result."""
    return run_root / stage / head(run_root)[stage][:16]


def manifest(run_root: Path, stage: str) -> dict[str, Any]:
    """The current result's ``stage.json``."""
    return json.loads((result_dir(run_root, stage) / "stage.json").read_text())


def outputs(run_root: Path, stage: str) -> dict[str, Any]:
    return manifest(run_root, stage)["outputs"]


def completed(run_root: Path, stage: str) -> list[Path]:
    """Every committed result of the stage (any config)."""
    return sorted((run_root / stage).glob("*/stage.json"))
