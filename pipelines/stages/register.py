"""register: log the EMA snapshot as an MLflow pyfunc model, register a version, set alias ``challenger``, and
move alias ``champion`` to it when its FID beats the current champion's under the same protocol (or when there is
no champion). A champion scored under a different protocol is never compared: the decision says so."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from ddpm_core.storage import filesystem
from pipelines.stages.context import StageContext

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
SAMPLING_PARAMS = {"seed": 0, "method": "ddim", "num_steps": 50, "eta": 0.0}  # the pyfunc's params and defaults


def decide(client, name: str, fid: float, protocol_hash: str) -> tuple[bool, str, dict[str, Any] | None]:
    """(promote?, reason, current champion summary)."""
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return True, "no champion yet", None
    summary = {"version": champion.version, "fid": champion.tags.get("fid"), "protocol_hash": champion.tags.get("protocol_hash")}
    if summary["protocol_hash"] != protocol_hash:
        return False, f"champion v{champion.version} was scored under another protocol ({summary['protocol_hash']}); not compared", summary
    if fid < float(summary["fid"]):
        return True, f"FID {fid:.4f} < champion v{champion.version}'s {float(summary['fid']):.4f}", summary
    return False, f"FID {fid:.4f} >= champion v{champion.version}'s {float(summary['fid']):.4f}", summary


def run(context: StageContext) -> dict[str, Any]:
    config, store = context.config, context.store
    name = config.register.model_name
    evaluation = context.upstream["evaluate"]["outputs"]
    snapshot_uri = context.output_of("train", "snapshot_uri")
    mlflow.set_tracking_uri(context.tracking_uri)
    client = context.client
    with tempfile.TemporaryDirectory() as directory:
        local = os.path.join(directory, "snapshot")
        fs, path = filesystem(snapshot_uri, store.options)
        fs.get(f"{path}/", local, recursive=True)
        example = pd.DataFrame({"index": [0, 1]})
        unet = config.model.unet()
        signature = infer_signature(example, np.zeros((2, unet.image_size, unet.image_size, unet.in_channels), np.uint8), params=SAMPLING_PARAMS)
        with mlflow.start_run(run_id=context.mlflow_run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(PACKAGE_ROOT / "pipelines" / "serving.py"), artifacts={"snapshot": local},
                code_paths=[str(PACKAGE_ROOT / "ddpm_core")], signature=signature, registered_model_name=name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas", "safetensors", "fsspec", "pillow",
                                  f"mlflow=={mlflow.__version__}"])
    version = str(info.registered_model_version)
    for key, value in {"fid": evaluation["fid"], "protocol_hash": evaluation["protocol_hash"], "ddpm.run_id": config.run_id,
                       "extractor_id": evaluation["protocol"]["extractor_id"]}.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.set_registered_model_alias(name, "challenger", version)
    promote, reason, champion = decide(client, name, evaluation["fid"], evaluation["protocol_hash"])
    if promote:
        client.set_registered_model_alias(name, "champion", version)
    client.set_tag(context.mlflow_run_id, "registry.decision", ("promoted to champion: " if promote else "champion kept: ") + reason)
    context.log(f"register: {name} v{version} -> challenger" + (", champion" if promote else "") + f" ({reason})")
    return {"model_name": name, "version": version, "promoted": promote, "reason": reason, "previous_champion": champion,
            "model_uri": f"models:/{name}/{version}"}
