"""The stage graph, declared once, and the runner that walks it on the job's driver.

A stage is skipped when its committed manifest has the fingerprint the stage would have now: a hash of the config
sections it reads and of its upstream stages' manifests. A changed config or a re-executed upstream stage
therefore re-runs it and everything downstream; ``from_stage`` forces that from a chosen stage.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from pipelines.config import PipelineConfig, save_resolved
from pipelines.runs import RunStore, now
from pipelines.stages import evaluate, prepare, register, sample, train, tune
from pipelines.stages.context import StageContext, StageStopped


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], dict[str, Any]]
    upstream: tuple[str, ...]
    config_sections: tuple[str, ...]  # the config sections or dotted keys it reads: part of its fingerprint
    enabled: Callable[[PipelineConfig], bool] = lambda config: True
    description: str = ""
    needs_ray: bool = True  # stages that do not are run before Ray is started, so bad input fails early


STAGES: tuple[Stage, ...] = (
    Stage("prepare", prepare.run, (), ("data", "model", "evaluate.extractor", "evaluate.classifier_epochs", "evaluate.nll",
                                       "evaluate.nll_split", "tune.enabled", "tune.proxy_fid_samples"),
          description="validate data, shards, domain classifier",
          needs_ray=False),
    Stage("tune", tune.run, ("prepare",), ("model", "diffusion", "train", "tune"), lambda config: config.tune.enabled,
          "Ray Tune trials of the training loop, ASHA on held-out bits/dim"),
    Stage("train", train.run, ("prepare", "tune"), ("model", "diffusion", "train"), description="Ray Train DDP, checkpoints, EMA snapshot"),
    Stage("sample", sample.run, ("train",), ("sample",), description="Ray actors, per-index seeds, committed shards"),
    Stage("evaluate", evaluate.run, ("prepare", "train", "sample"), ("evaluate",),
          description="parallel features: FID, IS, precision/recall; NLL bound; protocol"),
    Stage("register", register.run, ("prepare", "train", "evaluate"), ("register",), lambda config: config.register.enabled,
          "MLflow model version, challenger/champion aliases", needs_ray=False),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


SUMMARY_METRICS = ("fid", "fid_untrained", "fid_holdout_vs_train", "inception_score", "precision", "recall", "nll_bpd")


class PreflightError(RuntimeError):
    """Storage or tracking that cannot be used, found before any stage runs."""


def storage_error(store: RunStore, error: Exception) -> PreflightError:
    return PreflightError(
        f"storage.root {store.storage_root!r} is not writable ({type(error).__name__}: {error}). Check storage.root, "
        "storage.endpoint_url and the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment variables.")


def hold_run_root(store: RunStore, config: PipelineConfig, log: Callable[[str], None] = print):
    """The lease on the run root (see :mod:`pipelines.lease`), renewed in the background until released; an
    unusable storage fails here as a :class:`PreflightError`, a live holder as ``LeaseHeldError``."""
    from pipelines.lease import LeaseHeldError, acquire

    try:
        return acquire(store.root, store.options, config.retrain.lease_ttl_s, config.retrain.lease_wait_s, log=log).keep_alive()
    except LeaseHeldError:
        raise
    except Exception as error:
        raise storage_error(store, error) from error


def preflight(store: RunStore, config: PipelineConfig) -> None:
    """Before any stage: the run root is writable (the resolved config is written there), and the Inception weights,
    when configured, are readable, verified and loadable."""
    try:
        store.save_config()
    except Exception as error:  # botocore / OS errors: name the setting to fix
        raise storage_error(store, error) from error
    if config.evaluate.extractor == "inception":
        from ddpm_core.inception import HOW_TO_PROVIDE, feature_extractor_class, tensors_only_copy
        from ddpm_core.weights import WeightsError, fetch_verified

        try:
            feature_extractor_class()
            path, _ = fetch_verified(config.evaluate.inception_weights_uri, config.evaluate.inception_weights_sha256,
                                     HOW_TO_PROVIDE, store.options)
            tensors_only_copy(path)
        except (WeightsError, ImportError) as error:
            raise PreflightError(f"evaluate.extractor=inception: {error}") from error


def dotted(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def fingerprint(stage: Stage, config: PipelineConfig, manifests: dict[str, dict[str, Any]]) -> str:
    data = config.to_dict()
    payload = {"stage": stage.name, "config": {key: dotted(data, key) for key in stage.config_sections},
               "upstream": {name: manifests[name]["execution_id"] for name in stage.upstream if name in manifests}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def describe() -> str:
    lines = ["Stages (in order):"]
    for stage in STAGES:
        after = f" <- {', '.join(stage.upstream)}" if stage.upstream else ""
        lines.append(f"  {stage.name:<9}{after:<32} {stage.description}")
    lines += ["", "```mermaid", "flowchart LR"]
    for stage in STAGES:
        lines += [f"  {upstream} --> {stage.name}" for upstream in stage.upstream]
    lines.append("```")
    return "\n".join(lines)


def run_pipeline(config: PipelineConfig, from_stage: str | None = None, log: Callable[[str], None] = print,
                 parent_tags: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Run every enabled stage in order, skipping finished ones; returns the stage manifests. ``parent_tags`` are
    added to the MLflow parent run when it is created."""
    from pipelines.ray_env import connect
    from pipelines.tracking import Tracker, git_commit

    if from_stage is not None and from_stage not in STAGE_NAMES:
        raise ValueError(f"--from {from_stage!r} is not a stage; stages: {', '.join(STAGE_NAMES)}")
    store = RunStore(config)
    preflight(store, config)
    try:
        tracker = Tracker(config)
    except Exception as error:
        raise PreflightError(f"MLflow at {config.mlflow.resolved_tracking_uri()!r} cannot be used ({type(error).__name__}: "
                             f"{error}). Check mlflow.tracking_uri and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.") from error
    parent_id: str | None = None
    manifests: dict[str, dict[str, Any]] = {}
    forced = False
    for stage in STAGES:
        if not stage.enabled(config):
            continue
        forced = forced or stage.name == from_stage
        expected = fingerprint(stage, config, manifests)
        existing = store.read_manifest(stage.name)
        if existing and existing.get("status") == "complete" and existing.get("fingerprint") == expected and not forced:
            log(f"[{stage.name}] up to date (finished {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(existing['finished_at']))}), skipped")
            manifests[stage.name] = existing
            continue
        if parent_id is None:
            parent_id = tracker.parent_run({"ddpm.git_commit": git_commit(), "ddpm.data_uri": config.data.uri, **(parent_tags or {})})
            tracker.client.log_text(parent_id, save_resolved(config), "config.yaml")
        if stage.needs_ray:
            connect()
        stage_run_id = tracker.stage_run(parent_id, stage.name)
        store.remove_manifest(stage.name)  # a crash from here on leaves no stale "complete" manifest
        if forced:
            store.remove_work(stage.name, expected)  # --from: recompute, do not resume partial state
        log(f"[{stage.name}] running (MLflow run {stage_run_id})")
        started = now()
        upstream = {name: manifests[name] for name in stage.upstream if name in manifests}  # disabled stages are absent
        context = StageContext(config, store, upstream, stage_run_id, expected,
                               tracker.tracking_uri, lambda message, name=stage.name: log(f"[{name}] {message}"))
        try:
            outputs = stage.run(context)
        except BaseException as error:
            tracker.finish(stage_run_id, ok=False)
            tracker.finish(parent_id, ok=False)
            log(f"[{stage.name}] stopped" if isinstance(error, StageStopped) else f"[{stage.name}] failed:\n{traceback.format_exc()}")
            raise
        tracker.finish(stage_run_id, ok=True)
        manifest = {"stage": stage.name, "status": "complete", "fingerprint": expected, "execution_id": uuid.uuid4().hex,
                    "started_at": started, "finished_at": now(), "mlflow_run_id": stage_run_id, "outputs": outputs}
        store.write_manifest(stage.name, manifest)
        manifests[stage.name] = manifest
        if stage.name == "prepare":
            tracker.client.set_tag(parent_id, "ddpm.data_fingerprint", outputs["fingerprint"])
    if parent_id is not None:
        summary = manifests.get("evaluate", {}).get("outputs", {})
        for key in SUMMARY_METRICS:
            if summary.get(key) is not None:
                tracker.client.log_metric(parent_id, key, summary[key])
        tracker.finish(parent_id, ok=True)
    return manifests
