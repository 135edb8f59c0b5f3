"""The stage graph, declared once, and the runner that walks it on the job's driver.

A stage is a function ``run(context, *upstream_outputs) -> outputs``: it receives the typed outputs of the stages it
names as upstream, in that order (``None`` for a disabled one), and returns its own (:mod:`pipelines.contracts`),
which the runner commits in the stage's ``stage.json``. A stage is skipped when its committed manifest has the
fingerprint the stage would have now: a hash of the config keys it reads and of its upstream stages' execution
ids. A changed config or a re-executed upstream stage therefore re-runs it and everything downstream;
``from_stage`` forces that from a chosen stage. docs/pipeline.md says how to add a stage.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ddpm_core.data import DataError
from ddpm_core.storage import MANIFEST, IncompleteError, StorageUnavailableError, filesystem
from pipelines.config import ConfigError, PipelineConfig, save_resolved
from pipelines.context import StageContext, StageStopped
from pipelines.contracts import (
    EvaluateOutputs,
    PrepareOutputs,
    RegisterOutputs,
    SampleOutputs,
    StageManifest,
    StageOutputs,
    TrainOutputs,
    TuneOutputs,
)
from pipelines.execution import ClusterTooSmallError, check_outputs_outlive_the_job
from pipelines.failures import find
from pipelines.preflight import preflight
from pipelines.runs import RunStore, now
from pipelines.stages import evaluate, prepare, register, sample, train, tune
from pipelines.tracking import Tracker, flatten, git_commit
from pipelines.typed import SchemaError, to_plain

T = TypeVar("T")


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[..., StageOutputs]  # run(context, *outputs of the upstream stages, in order)
    outputs: type[StageOutputs]
    upstream: tuple[str, ...]
    config_keys: tuple[str, ...]  # the config sections or dotted keys it reads: part of its fingerprint
    switch: str | None = None  # the boolean config key that enables an optional stage (e.g. tune.enabled)
    description: str = ""
    needs_ray: bool = True  # stages that do not are run before Ray is started, so bad input fails early
    check: Callable[[PipelineConfig], None] | None = None  # config checks beyond the config's own, before anything runs

    def enabled(self, config: PipelineConfig) -> bool:
        return self.switch is None or bool(dotted(config.to_dict(), self.switch))


STAGES: tuple[Stage, ...] = (
    Stage(
        "prepare",
        prepare.run,
        PrepareOutputs,
        (),
        (
            "data",
            "model",
            "evaluate.extractor",
            "evaluate.classifier_epochs",
            "evaluate.nll",
            "evaluate.nll_split",
            "tune.enabled",
            "tune.proxy_fid_samples",
        ),
        description="validate data, shards, domain classifier",
        needs_ray=False,
    ),
    Stage(
        "tune",
        tune.run,
        TuneOutputs,
        ("prepare",),
        ("model", "diffusion", "train", "tune"),
        "tune.enabled",
        "Ray Tune trials of the training loop, ASHA on held-out bits/dim",
        check=tune.check,
    ),
    Stage(
        "train",
        train.run,
        TrainOutputs,
        ("prepare", "tune"),
        ("model", "diffusion", "train"),
        description="Ray Train DDP, checkpoints, EMA snapshot",
    ),
    Stage(
        "sample",
        sample.run,
        SampleOutputs,
        ("prepare", "train"),
        ("sample",),
        description="Ray actors, per-index seeds, committed shards",
    ),
    Stage(
        "evaluate",
        evaluate.run,
        EvaluateOutputs,
        ("prepare", "train", "sample"),
        ("evaluate",),
        description="FID, IS, precision/recall, NLL bound; also samples an untrained network and the champion",
    ),
    Stage(
        "register",
        register.run,
        RegisterOutputs,
        ("prepare", "train", "evaluate"),
        ("register",),
        "register.enabled",
        "MLflow model version, challenger/champion aliases",
        needs_ray=False,
    ),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
# Failures whose message says what to change; the CLI prints it alone (docs/reliability.md lists the exit codes).
NAMED_FAILURES = (StageStopped, ConfigError, DataError, ClusterTooSmallError, StorageUnavailableError)
SUMMARY_METRICS = (
    "fid",
    "fid_stderr",
    "fid_floor",
    "fid_over_floor",
    "kid",
    "fid_untrained",
    "fid_holdout_vs_train",
    "inception_score",
    "precision",
    "recall",
    "nll_bpd",
)


class CorruptOutputError(StorageUnavailableError):
    """A committed output was found corrupt or gone while a stage read it; what depends on it was forgotten, so that
    running the same command again recomputes it."""


class Results:
    """The manifests of a run's stages that ran or were up to date, looked up by the type of their outputs."""

    def __init__(self, manifests: dict[str, StageManifest[Any]]) -> None:
        self.manifests = manifests

    def manifest(self, kind: type[T]) -> StageManifest[T] | None:
        for manifest in self.manifests.values():
            if isinstance(manifest.outputs, kind):
                return manifest
        return None

    def outputs(self, kind: type[T]) -> T | None:
        manifest = self.manifest(kind)
        return manifest.outputs if manifest is not None else None


def downstream(name: str) -> tuple[str, ...]:
    """The stages computed, directly or not, from the outputs of stage ``name``, in graph order."""
    found: list[str] = []
    for stage in STAGES:
        if any(upstream == name or upstream in found for upstream in stage.upstream):
            found.append(stage.name)
    return tuple(found)


def check_config(config: PipelineConfig) -> None:
    """The checks of the enabled stages (e.g. tune's search space), and that the run's outputs outlive a job
    submission, so that bad input fails before anything runs."""
    check_outputs_outlive_the_job(config)
    for stage in STAGES:
        if stage.enabled(config) and stage.check is not None:
            stage.check(config)


def check_from_stage(from_stage: str | None, config: PipelineConfig) -> None:
    """``--from``: a stage of the graph that this config runs."""
    if from_stage is None:
        return
    if from_stage not in STAGE_NAMES:
        raise ConfigError(f"--from {from_stage!r} is not a stage; stages: {', '.join(STAGE_NAMES)}")
    stage = STAGES[STAGE_NAMES.index(from_stage)]
    if not stage.enabled(config):
        raise ConfigError(
            f"--from {from_stage}: the {from_stage} stage is disabled in this config ({stage.switch}=false); "
            f"enable it or choose another stage"
        )


def fingerprint(stage: Stage, config: PipelineConfig, manifests: dict[str, StageManifest[Any]]) -> str:
    data = config.to_dict()
    payload = {
        "stage": stage.name,
        "config": {key: dotted(data, key) for key in stage.config_keys},
        "upstream": {name: manifests[name].execution_id for name in stage.upstream if name in manifests},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def dotted(data: dict[str, Any], key: str) -> Any:
    value: Any = data
    for part in key.split("."):
        value = value[part]
    return value


def stage_params(stage: Stage, config: PipelineConfig) -> dict[str, str]:
    """The config a stage reads (its fingerprint's keys), as dotted MLflow params of its run."""
    data, params = config.to_dict(), {}
    for key in stage.config_keys:
        value = dotted(data, key)
        params.update(flatten(value, f"{key}.") if isinstance(value, dict) else flatten({key: value}))
    return params


def stage_description(stage: Stage, config: PipelineConfig) -> str:
    """The run description MLflow shows on a stage's run page (Markdown)."""
    return (
        f"**{stage.name}** stage of pipeline run `{config.run_id}`: {stage.description}. Its params are the config "
        f"it reads; the whole config is `config.yaml` on the parent run. See docs/pipeline.md."
    )


def pipeline_description(config: PipelineConfig) -> str:
    """The parent run's description: what was trained on what, and where the scores are."""
    stages = " -> ".join(stage.name for stage in STAGES if stage.enabled(config))
    sampler = config.sample.sampler
    return (
        f"DDPM pipeline run `{config.run_id}` on `{config.data.uri}`: U-Net preset `{config.model.preset}`, "
        f"{config.train.total_images:,} training images, {config.sample.num_samples:,} samples "
        f"({sampler.method.value}, {sampler.num_steps or config.diffusion.num_timesteps} steps), "
        f"scored with the `{config.evaluate.extractor.value}` extractor. Stages: {stages}; each is a nested run. "
        "The summary scores are this run's metrics; training curves are on the train run, the scores with their "
        "protocol on the evaluate run."
    )


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


def run_pipeline(
    config: PipelineConfig,
    from_stage: str | None = None,
    log: Callable[[str], None] = print,
    parent_tags: dict[str, str] | None = None,
) -> Results:
    """Run every enabled stage in order, skipping finished ones. ``parent_tags`` are added to the MLflow parent run
    when it is created."""
    check_from_stage(from_stage, config)
    store = RunStore(config)
    runner = Runner(config, store, preflight(store, config, log), log, parent_tags or {})
    forced = False
    for stage in STAGES:
        if stage.enabled(config):
            forced = forced or stage.name == from_stage
            runner.run_stage(stage, forced)
    return runner.finish()


class Runner:
    """Walks the stages of one run: skips the up-to-date ones, executes the others under nested MLflow runs."""

    def __init__(
        self,
        config: PipelineConfig,
        store: RunStore,
        tracker: Tracker,
        log: Callable[[str], None],
        parent_tags: dict[str, str],
    ) -> None:
        self.config, self.store, self.tracker, self.log, self.parent_tags = config, store, tracker, log, parent_tags
        self.manifests: dict[str, StageManifest[Any]] = {}
        self.parent_id: str | None = None  # the MLflow parent run, created when the first stage executes

    def run_stage(self, stage: Stage, forced: bool) -> None:
        expected = fingerprint(stage, self.config, self.manifests)
        existing = self.committed(stage)
        if existing is not None and existing.status == "complete" and existing.fingerprint == expected and not forced:
            finished = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(existing.finished_at))
            self.log(f"[{stage.name}] up to date (finished {finished}), skipped")
            self.manifests[stage.name] = existing
            return
        self.manifests[stage.name] = self.execute(stage, expected, forced)

    def committed(self, stage: Stage) -> StageManifest[Any] | None:
        """The stage's committed manifest; one that this version cannot read counts as none (the stage re-runs)."""
        try:
            return self.store.read_manifest(stage.name, stage.outputs)
        except SchemaError as error:
            self.log(f"[{stage.name}] its stage.json cannot be used ({error}); running it again")
            return None

    def execute(self, stage: Stage, fingerprint: str, forced: bool) -> StageManifest[Any]:
        from pipelines.execution import connect

        parent_id = self.parent()
        if stage.needs_ray:
            connect()
        stage_run_id = self.tracker.stage_run(
            parent_id, stage.name, stage_description(stage, self.config), stage_params(stage, self.config)
        )
        # From here on, neither this stage nor one computed from its old outputs reads as complete, even after a crash.
        for name in (stage.name, *downstream(stage.name)):
            self.store.remove_manifest(name)
        if forced:
            self.store.remove_work(stage.name, fingerprint)  # --from: recompute, do not resume partial state
        self.log(f"[{stage.name}] running (MLflow run {stage_run_id})")
        started = now()
        context = StageContext(
            self.config,
            self.store,
            stage_run_id,
            fingerprint,
            self.tracker.tracking_uri,
            functools.partial(self.log_stage, stage.name),
        )
        upstream = [self.manifests[name].outputs if name in self.manifests else None for name in stage.upstream]
        try:
            outputs = stage.run(context, *upstream)
        except BaseException as error:
            self.tracker.finish(stage_run_id, ok=False)
            self.tracker.finish(parent_id, ok=False)
            recovered = self.forget_broken_output(error) if isinstance(error, Exception) else None
            if recovered is not None:
                self.log(f"[{stage.name}] stopped: {recovered}")
                raise recovered from error
            named = isinstance(error, NAMED_FAILURES)  # the message says what to do: no traceback
            self.log(f"[{stage.name}] stopped" if named else f"[{stage.name}] failed:\n{traceback.format_exc()}")
            raise
        self.tracker.finish(stage_run_id, ok=True)
        manifest = StageManifest(
            stage.name, "complete", fingerprint, uuid.uuid4().hex, started, now(), stage_run_id, outputs
        )
        self.store.write_manifest(manifest)
        if isinstance(outputs, PrepareOutputs):
            self.tracker.client.set_tag(parent_id, "ddpm.data_fingerprint", outputs.fingerprint)
        return manifest

    def forget_broken_output(self, error: Exception) -> CorruptOutputError | None:
        """When ``error`` comes from reading a committed folder that is corrupt or gone: forget the folder (its
        manifest) and the completion of the stage that made it and of every stage after it."""
        broken = find(error, IncompleteError)
        if broken is None or not broken.uri:
            return None
        fs, path = filesystem(f"{broken.uri}/{MANIFEST}", self.store.options)
        if fs.exists(path):
            fs.rm_file(path)
        owner = self.producer_of(broken.uri)
        forgotten = (owner, *downstream(owner)) if owner else ()
        for name in forgotten:
            self.store.remove_manifest(name)
        stages = (
            f"the {owner} stage and those after it are marked not done" if owner else "it is recomputed when needed"
        )
        return CorruptOutputError(
            f"{broken}. The folder is no longer marked committed, and {stages}: run the same command again to "
            "recompute them (committed work that is intact is kept)"
        )

    def producer_of(self, uri: str) -> str | None:
        """The earliest finished stage whose folder holds ``uri`` or whose outputs name it."""
        for name, manifest in self.manifests.items():
            if uri.startswith(f"{self.store.stage_uri(name)}/") or uri in json.dumps(to_plain(manifest.outputs)):
                return name
        return None

    def log_stage(self, name: str, message: str) -> None:
        self.log(f"[{name}] {message}")

    def parent(self) -> str:
        if self.parent_id is None:
            self.parent_id = self.tracker.parent_run(
                {"ddpm.git_commit": git_commit(), "ddpm.data_uri": self.config.data.uri, **self.parent_tags},
                pipeline_description(self.config),
            )
            self.tracker.client.log_text(self.parent_id, save_resolved(self.config), "config.yaml")
        return self.parent_id

    def finish(self) -> Results:
        """The summary scores on the parent run, which ends; returns what the run produced."""
        results = Results(self.manifests)
        if self.parent_id is not None:
            evaluation = results.outputs(EvaluateOutputs)
            scores = evaluation.scores.present() if evaluation is not None else {}
            for key in SUMMARY_METRICS:
                if key in scores:
                    self.tracker.client.log_metric(self.parent_id, key, scores[key])
            self.tracker.finish(self.parent_id, ok=True)
        return results
