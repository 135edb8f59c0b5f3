"""Reading a run's folder the way the pipeline lays it out (pipelines/runs.py): each stage's results live in
``{run root}/{stage}/{fingerprint[:16]}/`` and ``run.json`` names the current one of each stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


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


def finished_run(root: Path, config: str, overrides: list[str]) -> Path:
    """``python -m pipelines run --config configs/<config>`` with ``overrides``, its storage and MLflow store under
    ``root`` and its own local Ray (no RAY_ADDRESS); the output kept in ``root/job.log``; asserts exit 0 and returns
    ``root``. The working directory is ``root``: MLflow's local artifact store (./mlruns) lands there, not in the
    repository."""
    args = [
        sys.executable,
        "-m",
        "pipelines",
        "run",
        "--config",
        str(REPO / "configs" / config),
        *overrides,
        f"storage.root={root / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
    ]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    (root / "job.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return root
