"""register: log the EMA snapshot as an MLflow pyfunc model, register a version, set alias ``challenger``, and
move alias ``champion`` to it when its FID beats the current champion's by more than ``register.promotion_margin``
under the same protocol (the champion re-scored by evaluate in this run, or its recorded FID when the protocol hash
matches), or when there is no champion. A champion scored under another protocol is never compared: the decision
says so."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import infer_signature

from ddpm_core.storage import filesystem, verify_committed
from pipelines.champion import Champion, current_champion
from pipelines.context import StageContext
from pipelines.contracts import EvaluateOutputs, PrepareOutputs, RegisterOutputs, TrainOutputs

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# the pyfunc's params and defaults (method: ancestral, ddim, dpm_solver++_2m, heun; spacing: ddpm_core.samplers.Spacing)
SAMPLING_PARAMS = {
    "seed": 0,
    "method": "ddim",
    "num_steps": 50,
    "eta": 0.0,
    "spacing": "linspace",
    "progressive_frames": 0,
}


def run(
    context: StageContext, prepare: PrepareOutputs, train: TrainOutputs, evaluate: EvaluateOutputs
) -> RegisterOutputs:
    name = context.config.register.model_name
    client = context.client
    version = log_model(context, train.snapshot_uri, prepare)
    champion = current_champion(client, name)  # before this version takes any alias
    tags = {
        "fid": evaluate.scores.fid,
        "protocol_hash": evaluate.protocol_hash,
        "ddpm.run_id": context.config.run_id,
        "extractor_id": evaluate.protocol.extractor_id,
        "data_fingerprint": prepare.fingerprint,
    }
    if evaluate.protocol.conditioning is not None:
        tags["guidance_scale"] = evaluate.protocol.conditioning.guidance_scale
        tags["conditional_accuracy"] = evaluate.scores.conditional_accuracy
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.set_registered_model_alias(name, "challenger", version)
    fid_champion = evaluate.scores.fid_champion
    rescored = (
        (evaluate.champion_version, fid_champion) if evaluate.champion_version and fid_champion is not None else None
    )
    promote, reason = decide(
        evaluate.scores.fid, evaluate.protocol_hash, context.config.register.promotion_margin, champion, rescored
    )
    if promote:
        client.set_registered_model_alias(name, "champion", version)
    decision = ("promoted to champion: " if promote else "champion kept: ") + reason
    client.set_tag(context.mlflow_run_id, "registry.decision", decision)
    client.set_model_version_tag(name, version, "registry.decision", decision)
    context.log(f"register: {name} v{version} -> challenger" + (", champion" if promote else "") + f" ({reason})")
    return RegisterOutputs(
        model_name=name,
        version=version,
        promoted=promote,
        reason=reason,
        previous_champion=champion.version if champion else None,
        challenger_fid=evaluate.scores.fid,
        champion_fid=rescored[1] if rescored else (champion.fid if champion else None),
        model_uri=f"models:/{name}/{version}",
    )


def log_model(context: StageContext, snapshot_uri: str, prepare: PrepareOutputs) -> str:
    """The snapshot as an MLflow pyfunc model (code: ``pipelines/serving.py`` + ``ddpm_core``) in this stage's run,
    registered as a new version of ``register.model_name``; returns the version. A conditional model's signature
    takes a ``label`` column and a ``guidance_scale`` param (default: the scale it was evaluated with)."""
    unet = context.config.model.unet(prepare.num_classes)
    verify_committed(snapshot_uri, context.store.options)  # never register a corrupt snapshot
    mlflow.set_tracking_uri(context.tracking_uri)
    params, example, model_config = dict(SAMPLING_PARAMS), pd.DataFrame({"index": [0, 1]}), None
    if unet.num_classes is not None:
        guidance = context.config.sample.guidance_scale
        params["guidance_scale"] = guidance
        example["label"] = [0, unet.num_classes - 1]
        model_config = {"guidance_scale": guidance, "class_names": list(prepare.class_names or ())}
    with tempfile.TemporaryDirectory() as directory:
        local = os.path.join(directory, "snapshot")
        fs, path = filesystem(snapshot_uri, context.store.options)
        fs.get(f"{path}/", local, recursive=True)
        output = np.zeros((2, unet.image_size, unet.image_size, unet.in_channels), np.uint8)
        signature = infer_signature(example, output, params=params)
        with mlflow.start_run(run_id=context.mlflow_run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PACKAGE_ROOT / "pipelines" / "serving.py"),
                artifacts={"snapshot": local},
                code_paths=[str(PACKAGE_ROOT / "ddpm_core")],
                signature=signature,
                model_config=model_config,
                registered_model_name=context.config.register.model_name,
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    "numpy",
                    "pandas",
                    "safetensors",
                    "fsspec",
                    "pillow",
                    f"mlflow=={mlflow.__version__}",
                ],
            )
    return str(info.registered_model_version)


def decide(
    fid: float,
    protocol_hash: str,
    margin: float,
    champion: Champion | None,
    champion_rescored: tuple[str, float] | None,
) -> tuple[bool, str]:
    """(promote?, reason). The challenger must beat the champion's FID by more than ``margin`` under the same protocol:
    the champion re-scored in this run when available, else the FID recorded with it if its protocol hash matches."""
    if champion is None:
        return True, "no champion yet"
    if champion_rescored is not None and champion_rescored[0] == champion.version:
        champion_fid, basis = champion_rescored[1], "re-scored under this run's protocol"
    elif champion.protocol_hash == protocol_hash and champion.fid is not None:
        champion_fid, basis = champion.fid, "recorded under the same protocol"
    else:
        return (
            False,
            f"champion v{champion.version} was scored under another protocol ({champion.protocol_hash}); not compared",
        )
    threshold = champion_fid - margin
    verdict = "<" if fid < threshold else ">="
    return fid < threshold, (
        f"FID {fid:.4f} {verdict} champion v{champion.version}'s {champion_fid:.4f} ({basis})"
        + (f" - margin {margin:g}" if margin else "")
    )
