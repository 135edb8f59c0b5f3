"""The stage graph, declared once, and the runner that walks it on the job's driver.

A stage is a function ``run(context, settings, *upstream_outputs) -> outputs``: it receives its settings (built from
the config by the stage's ``settings`` function, :mod:`pipelines.plan`), the typed outputs of the stages it names as
upstream, in that order (``None`` for a disabled one), and the execution context; it returns its own outputs
(:mod:`pipelines.contracts`), which the runner commits in ``{stage}/{fingerprint[:16]}/stage.json``. A stage whose
fingerprint has a committed result is reused; changing a setting recomputes exactly the stages that read it and
those downstream; ``from_stage`` forces that from a chosen stage. docs/pipeline.md says how to add a stage.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from ddpm_core.data import DataError
from ddpm_core.storage import MANIFEST, IncompleteError, StorageUnavailableError, filesystem
from pipelines.config import ConfigError, PipelineConfig
from pipelines.config_file import save_resolved
from pipelines.context import StageContext, StageStopped, params_that_ran
from pipelines.contracts import (
    AutoencoderOutputs,
    DistillOutputs,
    EvaluateOutputs,
    PrepareOutputs,
    RegisterOutputs,
    SampleOutputs,
    StageManifest,
    TrainOutputs,
    TuneOutputs,
)
from pipelines.evaluation.report import link_scores
from pipelines.execution import ClusterTooSmallError, check_outputs_outlive_the_job
from pipelines.external import External, Resolver
from pipelines.failures import find
from pipelines.interruption import Interrupted, unwrapped
from pipelines.plan import PlannedStage, Stage, config_changes, plan
from pipelines.preflight import STORAGE_DEADLINE_S, check_tracking_store, preflight, within
from pipelines.runs import RunStore, now
from pipelines.stages import autoencoder, distill, evaluate, prepare, register, sample, train, tune
from pipelines.tracking import Tracker, config_digest, flatten, git_commit
from pipelines.typed import SchemaError, resolved_keys, to_plain

T = TypeVar("T")

STAGES: tuple[Stage, ...] = (
    Stage(
        "prepare",
        prepare.run,
        prepare.settings,
        PrepareOutputs,
        (),
        description="validate data, shards, domain classifier",
        needs_ray=False,
    ),
    Stage(
        "autoencoder",
        autoencoder.run,
        autoencoder.settings,
        AutoencoderOutputs,
        ("prepare",),
        "autoencoder.latent",
        "a latent model's autoencoder (trained on Ray Train, or loaded), latents, hold-out reconstructions",
        check_data=autoencoder.check_data,
    ),
    Stage(
        "tune",
        tune.run,
        tune.settings,
        TuneOutputs,
        ("prepare", "autoencoder"),
        "tune.enabled",
        "Ray Tune trials of the training loop, ASHA on held-out bits/dim (a latent model's: of its latents)",
        check=tune.check,
        check_data=tune.check_data,
    ),
    Stage(
        "train",
        train.run,
        train.settings,
        TrainOutputs,
        ("prepare", "autoencoder", "tune"),
        description="Ray Train DDP, checkpoints, EMA snapshot",
        check_data=train.check_data,
    ),
    Stage(
        "distill",
        distill.run,
        distill.settings,
        DistillOutputs,
        ("prepare", "train"),
        "distill.enabled",
        "distillation into a few-step student (progressive or consistency), rounds on Ray Train",
    ),
    Stage(
        "sample",
        sample.run,
        sample.settings,
        SampleOutputs,
        ("prepare", "train", "distill"),
        description="Ray actors, per-index seeds, committed shards",
        check_data=sample.check_data,
    ),
    Stage(
        "evaluate",
        evaluate.run,
        evaluate.settings,
        EvaluateOutputs,
        ("prepare", "autoencoder", "train", "sample", "distill"),
        description="FID, IS, precision/recall, NLL bound, class accuracy",
        check_data=evaluate.check_data,
        draws=(
            "an untrained network's set, as the sample stage draws (evaluate.untrained_baseline): the ceiling",
            "the registered champion's, the same way (evaluate.rescore_champion; the champion of register.model_name, "
            "resolved before the run; guided by its own autoguidance guide where it was registered with one)",
            "one set per guidance scale of a conditional model (evaluate.guidance_scales, evaluate.guidance_samples)",
            "a distilled student's teacher at each round's steps with DDIM and DPM-Solver++(2M) and at sample.method/"
            "num_steps, and each earlier round's student (distill.enabled)",
        ),
    ),
    Stage(
        "register",
        register.run,
        register.settings,
        RegisterOutputs,
        ("prepare", "autoencoder", "train", "sample", "evaluate", "distill"),
        "register.enabled",
        "MLflow model version, challenger/champion aliases",
        needs_ray=False,
    ),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
# Failures whose message says what to change; the CLI prints it alone (docs/reliability.md lists the exit codes).
NAMED_FAILURES = (StageStopped, ConfigError, DataError, ClusterTooSmallError, StorageUnavailableError)


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
    """The checks of the enabled stages (e.g. tune's search space), that the run's outputs outlive a job
    submission and that a SQLite tracking store is a file, so that bad input fails before anything runs."""
    check_outputs_outlive_the_job(config)
    check_tracking_store(config)
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
            f"--from {from_stage}: the {from_stage} stage is disabled in this config ({stage.switch} is false); "
            f"enable it or choose another stage"
        )


def external_for(config: PipelineConfig, live: PipelineConfig | None = None) -> Resolver:
    """The state outside the config its stages read: the config's model registry and storage. ``live``: the config
    of this command, whose tracking URI serves when ``config`` is a saved copy whose URI's password was redacted."""
    redacted_away = ":***@" in config.mlflow.resolved_tracking_uri()
    return Resolver(config, live.mlflow.resolved_tracking_uri() if live is not None and redacted_away else None)


def missing_results(planned: dict[str, PlannedStage], store: RunStore) -> list[str]:
    """The planned stages that have no committed result for their fingerprint: what running would compute."""
    return [name for name, stage in planned.items() if committed(store, stage) is None]


def committed(store: RunStore, planned: PlannedStage) -> StageManifest[Any] | None:
    """The committed result of a planned stage; one this version cannot read counts as none."""
    try:
        return store.read_manifest(planned.stage.name, planned.fingerprint, planned.stage.outputs)
    except SchemaError:
        return None


def check_run_config(
    config: PipelineConfig, allow_changes: bool, external: External, log: Callable[[str], None] = print
) -> None:
    """A run id has one config: a config that changes the inputs of stages the run has finished is refused (exit 2,
    naming the keys and the stages it would recompute), before anything is written, unless ``allow_changes``.
    A change that touches no finished stage (a run that stopped early, a fixed typo) or only execution settings
    (CPUs, retries, endpoints) is taken and said."""
    store = RunStore.of(config)
    saved = saved_config(store)
    changes = config_changes(saved, config) if saved is not None else []
    inputs = [change for change in changes if not change.execution]
    if saved is None or not changes:
        return
    planned = plan(STAGES, config, external)
    before = plan(STAGES, saved, external_for(saved, config))  # the champion as the saved config resolves it
    finished = [name for name, stage in before.items() if committed(store, stage) is not None]
    touched = [n for n in finished if n not in planned or planned[n].fingerprint != before[n].fingerprint]
    what = (
        f"run {config.run_id} was made with another config ({store.root}/config.yaml): "
        f"{'; '.join(map(str, inputs or changes))}. With this config, "
        f"{', '.join(missing_results(planned, store)) or 'no stage'} would be computed"
    )
    if touched and not allow_changes:
        raise ConfigError(
            f"{what}. Add --allow-changes to do so (the earlier results stay, listed by `python -m pipelines status "
            f"{config.run_id}`, until `python -m pipelines gc {config.run_id}`), or choose another run_id"
        )
    log(f"{what} ({'--allow-changes' if touched else 'no finished stage read these settings'})")


def saved_config(store: RunStore) -> PipelineConfig | None:
    """The config the run was made with, read within the storage deadline (a storage that cannot be read is named as
    the preflight names it)."""
    from pipelines.preflight import storage_error

    try:
        return within(STORAGE_DEADLINE_S, store.read_config)
    except ConfigError:
        raise
    except Exception as error:
        raise storage_error(store, error) from error


def stage_description(stage: Stage, config: PipelineConfig) -> str:
    """The run description MLflow shows on a stage's run page (Markdown)."""
    return (
        f"**{stage.name}** stage of pipeline run `{config.run_id}`: {stage.description}. Its params are the settings "
        f"it reads (its inputs); the whole config is `config.yaml` on the parent run. See docs/pipeline.md."
    )


def pipeline_description(config: PipelineConfig) -> str:
    """The parent run's description: what was trained on what, and where the scores are."""
    stages = " -> ".join(stage.name for stage in STAGES if stage.enabled(config))
    sampler, distill = config.sample.sampler, config.distill
    drawn = f"{sampler.method.value}, {sampler.num_steps or config.diffusion.num_timesteps} steps"
    if distill.enabled:
        drawn = f"from a {distill.steps}-step student distilled from it ({distill.method.value}), DDIM"
    return (
        f"DDPM pipeline run `{config.run_id}` on `{config.data.uri}`: U-Net preset `{config.model.preset}`, "
        f"{config.train.total_images:,} training images, {config.sample.num_samples:,} samples ({drawn}), "
        f"scored with the `{config.evaluate.extractor.value}` extractor. Stages: {stages}; each is a nested run. "
        "Training curves are on the train run; the scores, with their intervals and protocol, on the evaluate run "
        "only (linked below when it has run, and by the tag ddpm.scores_run_id)."
    )


def describe() -> str:
    lines = ["Stages (in order):"]
    for stage in STAGES:
        after = f" <- {', '.join(stage.upstream)}" if stage.upstream else ""
        lines.append(f"  {stage.name:<9}{after:<40} {stage.description}")
        lines += [f"{'':<52}draws {drawn}" for drawn in stage.draws]
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
    external: External | None = None,
    until: str | None = None,
) -> Results:
    """Run every enabled stage in order, reusing committed results, up to stage ``until`` (None: all).
    ``parent_tags`` are added to the MLflow parent run when it is created; ``external`` answers what the stages ask
    of the world outside the config (the config's registry and storage by default)."""
    check_from_stage(from_stage, config)
    store = RunStore.of(config)
    tracker = preflight(store, config, log)
    planned = plan(STAGES, config, external or external_for(config))
    if from_stage is not None:
        announce_missing_before(from_stage, planned, store, log)
    runner = Runner(config, store, tracker, planned, log, parent_tags or {})
    forced = False
    try:
        for name, stage in planned.items():
            forced = forced or name == from_stage
            runner.run_stage(stage, forced)
            if name == "prepare":
                runner.check_data(planned)
            if name == until:
                break
    except Interrupted:
        if runner.parent_id is not None:
            tracker.kill(runner.parent_id)  # and any stage run a signal left running
        raise
    return runner.finish()


def announce_missing_before(
    from_stage: str, planned: dict[str, PlannedStage], store: RunStore, log: Callable[[str], None]
) -> None:
    """``--from STAGE`` re-executes that stage and those after it; the stages before it that have no committed result
    for this config run first, as in any run: said in one line, so that a run that does more than asked is not
    silent about it."""
    names = list(planned)
    missing = [name for name in names[: names.index(from_stage)] if committed(store, planned[name]) is None]
    if missing:
        has, run = ("has", "runs") if len(missing) == 1 else ("have", "run")
        log(f"--from {from_stage}: {', '.join(missing)} {has} no result for this config yet and {run} first")


class Runner:
    """Walks the planned stages of one run: reuses committed results, executes the others under nested MLflow runs,
    and keeps the run's head (``run.json``) naming the result each stage now has."""

    def __init__(
        self,
        config: PipelineConfig,
        store: RunStore,
        tracker: Tracker,
        planned: dict[str, PlannedStage],
        log: Callable[[str], None],
        parent_tags: dict[str, str],
    ) -> None:
        self.config, self.store, self.tracker, self.planned = config, store, tracker, planned
        self.log, self.parent_tags = log, parent_tags
        self.manifests: dict[str, StageManifest[Any]] = {}
        self.parent_id: str | None = None  # the MLflow parent run, created when the first stage executes

    def run_stage(self, planned: PlannedStage, forced: bool) -> None:
        name = planned.stage.name
        existing = None if forced else self.committed(planned)
        if existing is not None:
            finished = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(existing.finished_at))
            self.log(f"[{name}] up to date (result {planned.fingerprint[:16]}, finished {finished}), reused")
            self.manifests[name] = existing
        else:
            self.manifests[name] = self.execute(planned, forced)
        self.store.write_head({stage: manifest.fingerprint for stage, manifest in self.manifests.items()})

    def committed(self, planned: PlannedStage) -> StageManifest[Any] | None:
        """The stage's committed result; one that this version cannot read counts as none (the stage re-runs)."""
        try:
            return self.store.read_manifest(planned.stage.name, planned.fingerprint, planned.stage.outputs)
        except SchemaError as error:
            self.log(f"[{planned.stage.name}] its stage.json cannot be used ({error}); running it again")
            return None

    def check_data(self, planned: dict[str, PlannedStage]) -> None:
        """What the later stages ask of the prepared data, before any of them runs."""
        prepared = self.manifests["prepare"].outputs
        for stage in planned.values():
            if stage.stage.check_data is not None:
                stage.stage.check_data(stage.settings, prepared, self.store.options)

    def execute(self, planned: PlannedStage, forced: bool) -> StageManifest[Any]:
        from pipelines.execution import connect

        stage, fingerprint = planned.stage, planned.fingerprint
        parent_id = self.parent()
        if stage.needs_ray:
            connect()
        description = stage_description(stage, self.config)
        params, resolved = self.stage_params(planned)
        stage_run_id = self.tracker.stage_run(parent_id, stage.name, description, params)
        # From here on, this result does not read as complete until it is, even after a crash; a forced one (--from)
        # starts afresh, and what was computed from its old outputs does not read as complete either.
        self.store.remove_manifest(stage.name, fingerprint)
        if forced:
            self.store.remove_result(stage.name, fingerprint)
            self.forget(downstream(stage.name))
        self.log(f"[{stage.name}] running (result {fingerprint[:16]}, MLflow run {stage_run_id})")
        started = now()
        context = StageContext(
            stage.name,
            self.store,
            fingerprint,
            stage_run_id,
            self.tracker.tracking_uri,
            lambda message: self.log(f"[{stage.name}] {message}"),
            config_digest(self.config),
            self.config.cluster.autoscaling,
        )
        upstream = [self.manifests[name].outputs if name in self.manifests else None for name in stage.upstream]
        try:
            outputs = stage.run(context, planned.settings, *upstream)
        except BaseException as caught:
            named = self.failed(stage.name, stage_run_id, unwrapped(caught))
            if named is caught:
                raise
            raise named from caught
        finally:
            self.tracker.log_params(stage_run_id, params_that_ran(resolved, context.ran_with))
        self.tracker.finish(stage_run_id, ok=True)
        manifest = StageManifest(
            stage.name,
            "complete",
            fingerprint,
            planned.hashed,
            planned.upstream,
            started,
            now(),
            stage_run_id,
            outputs,
        )
        self.store.write_manifest(manifest)
        if isinstance(outputs, PrepareOutputs):
            self.tracker.client.set_tag(parent_id, "ddpm.data_fingerprint", outputs.fingerprint)
        return manifest

    def stage_params(self, planned: PlannedStage) -> tuple[dict[str, str], dict[str, str]]:
        """A stage run's params, as they run: its settings with the tune stage's choices in place of the config's
        values (the config's under ``<key>.configured``); and, apart, the settings it resolves while it runs
        (``metadata=RESOLVED``), logged when it ends."""
        params = flatten(planned.hashed)
        resolved = {key: params.pop(key) for key in sorted(resolved_keys(planned.settings)) if key in params}
        tune = self.manifests.get("tune")
        chosen = tune.outputs.best_params if tune is not None and isinstance(tune.outputs, TuneOutputs) else {}
        params.update(params_that_ran({key: params[key] for key in chosen if key in params}, chosen))
        return params, resolved

    def failed(self, name: str, stage_run_id: str, error: BaseException) -> BaseException:
        """End the stage's and the parent's MLflow runs as failed (killed, when a signal stopped the run); the error
        to raise (a broken committed output is forgotten first, and then named)."""
        if isinstance(error, Interrupted):
            self.tracker.kill(stage_run_id)
            self.log(f"[{name}] {error}; its MLflow runs are marked KILLED, its committed work is kept")
            return error
        self.tracker.finish(stage_run_id, ok=False)
        if self.parent_id is not None:
            self.tracker.finish(self.parent_id, ok=False)
        recovered = self.forget_broken_output(error) if isinstance(error, Exception) else None
        if recovered is not None:
            self.log(f"[{name}] stopped: {recovered}")
            return recovered
        named = isinstance(error, NAMED_FAILURES)  # the message says what to do: no traceback
        self.log(f"[{name}] stopped" if named else f"[{name}] failed:\n{traceback.format_exc()}")
        return error

    def forget_broken_output(self, error: Exception) -> CorruptOutputError | None:
        """When ``error`` comes from reading a committed folder that is corrupt or gone: forget the folder (its
        manifest) and the result of the stage that made it and of every stage after it."""
        broken = find(error, IncompleteError)
        if broken is None or not broken.uri:
            return None
        fs, path = filesystem(f"{broken.uri}/{MANIFEST}", self.store.options)
        if fs.exists(path):
            fs.rm_file(path)
        owner = self.producer_of(broken.uri)
        self.forget((owner, *downstream(owner)) if owner else ())
        stages = (
            f"the {owner} stage and those after it are marked not done" if owner else "it is recomputed when needed"
        )
        return CorruptOutputError(
            f"{broken}. The folder is no longer marked committed, and {stages}: run the same command again to "
            "recompute them (committed work that is intact is kept)"
        )

    def forget(self, stages: tuple[str, ...]) -> None:
        """The committed results of ``stages`` for this config no longer read as complete."""
        for name in stages:
            if name in self.planned:
                self.store.remove_manifest(name, self.planned[name].fingerprint)

    def producer_of(self, uri: str) -> str | None:
        """The earliest finished stage whose result folder holds ``uri`` or whose outputs name it."""
        for name, manifest in self.manifests.items():
            folder = self.store.result_uri(name, manifest.fingerprint)
            if uri.startswith(f"{folder}/") or uri in json.dumps(to_plain(manifest.outputs)):
                return name
        return None

    def parent(self) -> str:
        if self.parent_id is None:
            self.parent_id = self.tracker.parent_run(
                {"ddpm.git_commit": git_commit(), "ddpm.data_uri": self.config.data.uri, **self.parent_tags},
                pipeline_description(self.config),
            )
            self.tracker.client.log_text(self.parent_id, save_resolved(self.config), "config.yaml")
        return self.parent_id

    def finish(self) -> Results:
        """The parent run, which ends, points to the run that holds the scores; returns what the run produced."""
        results = Results(self.manifests)
        if self.parent_id is not None:
            evaluation = results.manifest(EvaluateOutputs)
            if evaluation is not None:
                link_scores(self.tracker.client, self.parent_id, evaluation.mlflow_run_id, evaluation.outputs)
            self.tracker.finish(self.parent_id, ok=True)
        return results
