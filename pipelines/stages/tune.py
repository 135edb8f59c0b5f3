"""tune: search noise schedules, learning rates and any other config key with Ray Tune before the long run.

Each trial is a short Ray Train run of the real training loop (Train V2 pattern: a Tune function trainable that
builds and fits a TorchTrainer whose reports reach Tune through ``TuneReportCallback``). Trials are ranked by a
metric comparable across schedules: the NLL bound in bits/dim on held-out images (never the raw eps-MSE, whose scale
depends on the schedule), or a proxy FID at the trial's end; ASHA stops weak trials early on bits/dim. The training
loop knows nothing of this: a trial hands it :class:`TrialMetrics`, which it calls at every checkpoint report.
Every trial is a nested MLflow run under the tune stage's run. A re-run after a driver crash restores the search.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune import ResultGrid
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from torch import nn

from ddpm_core.data import to_uint8
from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion
from ddpm_core.samplers import Method, Model, PerIndexNoise, SamplerConfig, null_conditioned, sample
from ddpm_core.unet import UNetConfig
from pipelines.config import ConfigError, Extractor, Loader, PipelineConfig, SearchAlgorithm, TuneSection
from pipelines.config import TrialScheduler as SchedulerChoice
from pipelines.config_file import with_overrides
from pipelines.context import StageContext
from pipelines.contracts import AutoencoderOutputs, LatentOutputs, PrepareOutputs, TrialResult, TuneOutputs
from pipelines.data.checks import require_images
from pipelines.data.streaming import plan_stream, training_loader
from pipelines.evaluation.scoring import (
    ExtractorSpec,
    SummaryRequest,
    build_extractor,
    fid_estimate,
    load_reference,
    reference_key,
    reference_summary,
    summary_of,
)
from pipelines.execution import Device, check_fits, cluster_device, runtime_env, train_storage
from pipelines.external import External
from pipelines.training.ema_choice import HeldOut, held_out_bits_per_dim, read_held_out
from pipelines.training.job import TrainJob
from pipelines.training.recipe import TUNABLE_SECTIONS, TrainingRecipe
from pipelines.training.state import committed_checkpoints
from pipelines.training.trainer import WorkerGroup, fit, make_trainer
from pipelines.typed import INLINE

TRIAL_ID_TAG = "ddpm.trial_id"
PROXY_FID_GROUPS = 10  # jackknife groups of the proxy FID's sample set (as evaluate.fid_groups)


class Distribution(str, enum.Enum):
    CHOICE = "choice"  # one of the listed values
    GRID = "grid"  # every listed value (tune.search_alg=grid)
    UNIFORM = "uniform"  # [low, high]
    LOGUNIFORM = "loguniform"  # [low, high], uniform in log space


@dataclass(frozen=True)
class Dimension:
    """One searched config key."""

    distribution: Distribution
    values: tuple[Any, ...]  # the candidates (choice, grid) or (low, high)

    def domain(self) -> Any:
        """The Ray Tune search domain."""
        if self.distribution is Distribution.CHOICE:
            return tune.choice(list(self.values))
        if self.distribution is Distribution.GRID:
            return tune.grid_search(list(self.values))
        low, high = self.values
        return tune.uniform(low, high) if self.distribution is Distribution.UNIFORM else tune.loguniform(low, high)


@dataclass(frozen=True)
class TuneSettings:
    """What the search reads: its own section, and the training recipe every trial starts from."""

    tune: TuneSection
    recipe: TrainingRecipe = field(metadata=INLINE)  # model.*, diffusion.*, train.*, data.*


def settings(config: PipelineConfig, external: External) -> TuneSettings:
    return TuneSettings(config.tune, TrainingRecipe.of(config))


def check(config: PipelineConfig) -> None:
    """The search space, before anything runs (the runner calls this for enabled stages): every value it can
    produce checked as a whole config, so that cross-section rules hold too."""
    search_space(config.tune, lambda key, value: with_overrides(config, {key: value}))


def check_data(settings: TuneSettings, prepare: PrepareOutputs, storage_options: dict[str, Any]) -> None:
    """Trials are ranked on held-out images."""
    require_images(
        prepare, {"the tune stage's held-out bits/dim (at least 1 hold-out image)": prepare.num_holdout >= 1}
    )


def search_space(section: TuneSection, apply: Callable[[str, Any], object]) -> dict[str, Dimension]:
    """``tune.space`` parsed, with every value it can produce checked by ``apply(key, value)``: candidate lists in
    full, and both ends of each range."""
    if not section.space:
        raise ConfigError(
            "tune.space is empty: name at least one config key to search, e.g. train.lr: {loguniform: [1e-4, 1e-3]}"
        )
    return {key: dimension(section, key, spec, apply) for key, spec in section.space.items()}


def dimension(section: TuneSection, key: str, spec: Any, apply: Callable[[str, Any], object]) -> Dimension:
    where = f"tune.space.{key}"
    names = [distribution.value for distribution in Distribution]
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in names:
        raise ConfigError(f"{where}: expected one of {{{', '.join(f'{name}: [...]' for name in names)}}}, got {spec!r}")
    name, values = next(iter(spec.items()))
    distribution = Distribution(name)
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{name}: expected a non-empty list, got {values!r}")
    if distribution in (Distribution.UNIFORM, Distribution.LOGUNIFORM):
        values = range_bounds(f"{where}.{name}", distribution, values)
    if (distribution is Distribution.GRID) != (section.search_alg is SearchAlgorithm.GRID):
        raise ConfigError(f"{where}: use 'grid' with tune.search_alg=grid and choice/uniform/loguniform otherwise")
    if key.split(".", 1)[0] not in TUNABLE_SECTIONS:
        raise ConfigError(
            f"{where}: only keys of {', '.join(TUNABLE_SECTIONS)} are searched (what a trial trains with)"
        )
    for value in values:
        if key == "train.ema_sigma_rel" and isinstance(value, list) and len(value) > 1:
            raise ConfigError(
                f"{where}: value {value!r} is a post-hoc choice after training, which a trial does not make: search "
                "single widths (a trial tracks that EMA and is scored on it), e.g. {choice: [0.05, 0.1, 0.15]}"
            )
        try:
            apply(key, value)
        except ConfigError as error:
            raise ConfigError(f"{where}: value {value!r} is not a valid config: {error}") from None
    return Dimension(distribution, tuple(values))


def range_bounds(where: str, distribution: Distribution, values: list[Any]) -> list[float]:
    if len(values) != 2:
        raise ConfigError(f"{where}: expected [low, high], got {values!r}")
    try:
        low, high = float(values[0]), float(values[1])
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: bounds must be numbers, got {values!r}") from None
    if low > high:
        raise ConfigError(f"{where}: low {low:g} > high {high:g}")
    if distribution is Distribution.LOGUNIFORM and low <= 0:
        raise ConfigError(f"{where}: bounds must be > 0, got {values!r}")
    return [low, high]


@dataclass
class TrialMetrics:
    """The metrics that rank trials, computed on rank 0 at every checkpoint report of a trial (a
    :class:`pipelines.training.job.CheckpointMetrics`): the NLL bound in bits/dim (Monte Carlo estimate, comparable
    across schedules and T) on a fixed held-out batch, and at the end a proxy FID on a small DDIM sample. Each is also
    logged to the trial's MLflow run."""

    unet: UNetConfig  # the trial's network ...
    diffusion: DiffusionConfig  # ... and diffusion
    holdout_uri: str
    holdout_latent: LatentOutputs | None  # a latent model's hold-out latents: the bound is scored on them instead
    bpd_images: int
    bpd_timesteps: int
    proxy_fid_samples: int  # 0: no proxy FID
    proxy_fid_steps: int
    extractor_uri: str | None  # the classifier (the proxy FID's feature network)
    reference_uri: str | None  # its cached statistics of the training split
    storage_options: dict[str, Any]
    tracking_uri: str
    mlflow_run_id: str  # the trial's run
    held_out: HeldOut | None = field(default=None, repr=False)  # bpd_images examples, read at the first report

    def __call__(self, ema_model: nn.Module, images_seen: int, done: bool) -> dict[str, float]:
        device = next(ema_model.parameters()).device
        classes = self.unet.num_classes  # a conditional model is scored as its unconditional (null-class) model
        network = null_conditioned(ema_model, classes) if classes is not None else ema_model
        diffusion = GaussianDiffusion.from_config(self.diffusion)
        if self.held_out is None:
            held_out = read_held_out(self.holdout_uri, self.holdout_latent, self.bpd_images, self.storage_options)
            self.held_out = held_out.to(device)
        bpd, stderr = held_out_bits_per_dim(ema_model, diffusion, self.held_out, self.bpd_timesteps, classes)
        metrics = {"bpd": bpd, "bpd_stderr": stderr}
        if done and self.proxy_fid_samples:
            metrics["fid"] = self.proxy_fid(network, diffusion, device)
        stamp = int(time.time() * 1000)
        client = MlflowClient(self.tracking_uri)
        client.log_batch(
            self.mlflow_run_id, metrics=[Metric(key, value, stamp, images_seen) for key, value in metrics.items()]
        )
        return metrics

    def proxy_fid(self, network: Model, diffusion: GaussianDiffusion, device: torch.device) -> float:
        """FID of a small DDIM sample (a latent model's decoded) against the training split's cached reference
        statistics, scored as the evaluate stage scores (:func:`pipelines.evaluation.scoring.summary_of`,
        :func:`fid_estimate`)."""
        if self.extractor_uri is None or self.reference_uri is None:
            raise RuntimeError("tune: the proxy FID needs the classifier and its reference statistics")
        shape = (self.unet.in_channels, self.unet.image_size, self.unet.image_size)
        noise = PerIndexNoise(0, range(self.proxy_fid_samples), device)
        latent = self.holdout_latent
        sampler = SamplerConfig(method=Method.DDIM, num_steps=self.proxy_fid_steps, clip_denoised=latent is None)
        samples = sample(network, diffusion, shape, noise, sampler).samples  # [n, C, H, W]; a latent model's latents
        if latent is not None:  # decoded into images, as the sample stage decodes them
            samples = latent.space.decoder(self.storage_options, log=lambda _: None)(samples)  # [n, C', H', W']
        request = SummaryRequest(
            ExtractorSpec(Extractor.CLASSIFIER, self.extractor_uri), self.proxy_fid_samples, groups=PROXY_FID_GROUPS
        )
        extractor = build_extractor(request.spec, self.storage_options)
        summary = summary_of(extractor, to_uint8(samples), 0, request, self.storage_options)
        return fid_estimate(summary, load_reference(self.reference_uri, self.storage_options), None).value


@dataclass(frozen=True)
class TrialSpec:
    """What every trial of one search shares (each trial adds its parameters)."""

    recipe: TrainingRecipe  # the run's; a trial applies its parameters and the trial length to it
    tune: TuneSection
    run_id: str  # the pipeline run's
    shards_uri: str
    work_uri: str  # trials live under {work_uri}/trials/{trial id}
    storage_options: dict[str, Any]
    device: Device
    group: WorkerGroup
    tracking_uri: str
    experiment_id: str
    parent_run_id: str  # the tune stage's MLflow run
    metrics: TrialMetrics  # with the run's network and diffusion; a trial puts in its own and its MLflow run
    num_classes: int | None  # the data set's classes (a conditional model's, unless model.num_classes)
    num_train: int  # images in the training split (data.loader decides per trial whether they are streamed)
    latent: LatentOutputs | None  # a latent model's training latents (held resident by each trial's workers)
    compile_cache_uri: str  # torch.compile's artifacts, shared with other trials, runs and the train stage

    def trial_recipe(self, params: dict[str, Any]) -> TrainingRecipe:
        """The trial's recipe: its parameters, trained for ``tune.trial_images`` with a report (a checkpoint) every
        ``tune.report_every_images`` and no sample grids."""
        every = self.tune.report_every_images
        return self.recipe.with_overrides(
            {
                **params,
                "train.total_images": self.tune.trial_images,
                "train.checkpoint_every_images": every,
                "train.log_every_images": every,
                "train.grid_every_images": 0,
            },
        )


def run_trial(params: dict[str, Any], spec: TrialSpec) -> None:
    """One trial, running in its own Tune actor: a short Ray Train run under a nested MLflow run."""
    trial_id = tune.get_context().get_trial_id()
    recipe = spec.trial_recipe(params)
    client = MlflowClient(spec.tracking_uri)
    run_id = trial_run(client, spec, trial_id, params)
    work_uri = f"{spec.work_uri}/trials/{trial_id}"
    unet = recipe.model.unet(spec.num_classes)
    metrics = dataclasses.replace(spec.metrics, unet=unet, diffusion=recipe.diffusion, mlflow_run_id=run_id)
    split, workers = (spec.shards_uri, spec.num_train), spec.group.num_workers
    stream, _ = plan_stream(recipe.data, recipe.train, split, unet, workers, spec.storage_options, spec.latent)
    job = TrainJob(
        unet=unet,
        diffusion=recipe.diffusion,
        train=recipe.train,
        device=spec.device,
        shards_uri=spec.shards_uri,
        stream=stream,
        work_uri=work_uri,
        storage_options=spec.storage_options,
        tracking_uri=spec.tracking_uri,
        mlflow_run_id=run_id,
        checkpoint_metrics=metrics,
        compile_cache_uri=spec.compile_cache_uri,
        latent=spec.latent,
    )
    trainer = make_trainer(job, spec.group, runtime_env(), callbacks=[TuneReportCallback()])
    try:
        fit(trainer, job)  # a diverged trial raises: Tune records it as errored, and it is never ranked
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def trial_run(client: MlflowClient, spec: TrialSpec, trial_id: str, params: dict[str, Any]) -> str:
    """The trial's MLflow run under the tune stage's run: a restored trial keeps the one it had."""
    existing = client.search_runs(
        [spec.experiment_id],
        f"tags.`{TRIAL_ID_TAG}` = '{trial_id}' and tags.`mlflow.parentRunId` = '{spec.parent_run_id}'",
        max_results=1,
    )
    if existing:
        return str(existing[0].info.run_id)
    run_id = str(
        client.create_run(
            spec.experiment_id,
            run_name=f"trial {trial_id}",
            tags={
                TRIAL_ID_TAG: trial_id,
                "mlflow.parentRunId": spec.parent_run_id,
                "ddpm.run_id": spec.run_id,
                "ddpm.stage": "tune-trial",
            },
        ).info.run_id
    )
    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])
    return run_id


def run(
    context: StageContext, settings: TuneSettings, prepare: PrepareOutputs, autoencoder: AutoencoderOutputs | None
) -> TuneOutputs:
    """Ray Tune trials of the training loop, ranked on the held-out bound (a latent model's: on its hold-out
    latents, :mod:`pipelines.training.ema_choice`) or the proxy FID."""
    section, recipe = settings.tune, settings.recipe
    space = search_space(section, lambda key, value: recipe.with_overrides({key: value}))
    spec = trial_spec(context, settings, (prepare, autoencoder))
    unet = spec.metrics.unet
    loader, why = training_loader(recipe.data, prepare.num_train, unet, spec.group.num_workers, spec.latent)
    context.log(f"tune: trials use the {loader.value} data loader ({why})")
    one_trial = spec.group.demand(
        spec.device,
        "a tuning trial's actor and its training workers",
        "tune.workers_per_trial / tune.cpus_per_worker / tune.cpus_per_trial",
        extra_cpus=section.cpus_per_trial,
        decode_cpus=recipe.data.decode_cpus if loader is Loader.STREAM else 0.0,
    )
    check_fits(one_trial, context.execution(spec.device), context.log)
    tuner = make_tuner(context, spec, space)
    on = " (bpd: of the hold-out latents, in latent bits/dim)" if spec.latent is not None else ""
    context.log(f"tune: {section.search_alg.value} search over {sorted(space)}, ranking by {section.metric.value}{on}")
    outputs = search_outcome(tuner.fit(), space, spec)
    close_trial_runs(context, spec, outputs)
    context.log(
        f"tune: best of {outputs.trials} trials ({outputs.stopped_early} stopped early): {outputs.best_params} "
        f"with {section.metric.value} {outputs.best_metric[section.metric.value]:.4f}"
    )
    return outputs


def trial_spec(
    context: StageContext, tune_settings: TuneSettings, upstream: tuple[PrepareOutputs, AutoencoderOutputs | None]
) -> TrialSpec:
    """What the trials share (``upstream``: the prepared splits, and a latent model's autoencoder stage); computes (or
    reuses) the reference statistics of the proxy FID first."""
    settings, recipe, store = tune_settings.tune, tune_settings.recipe, context.store
    prepare, autoencoder = upstream
    device = cluster_device(recipe.train.use_gpu)
    reference_uri = None
    if settings.proxy_fid and prepare.extractor_uri is not None and prepare.extractor_id is not None:
        key = reference_key(prepare.shards_uri, prepare.extractor_id, store.options)
        reference_uri = store.cache_uri("reference", key)
        spec = ExtractorSpec(Extractor.CLASSIFIER, prepare.extractor_uri)
        reference_summary(
            reference_uri,
            prepare.shards_uri,
            SummaryRequest(spec, 0),
            {"extractor_id": prepare.extractor_id, "data_fingerprint": prepare.fingerprint},
            context.execution(device),
            lambda line: context.log(f"tune: {line}"),
        )
    metrics = TrialMetrics(
        unet=recipe.model.unet(prepare.num_classes),
        diffusion=recipe.diffusion,
        holdout_uri=prepare.holdout_uri,
        holdout_latent=autoencoder.holdout_latent if autoencoder is not None else None,
        bpd_images=settings.bpd_images,
        bpd_timesteps=settings.bpd_timesteps,
        proxy_fid_samples=settings.proxy_fid_samples,
        proxy_fid_steps=settings.proxy_fid_steps,
        extractor_uri=prepare.extractor_uri,
        reference_uri=reference_uri,
        storage_options=store.options,
        tracking_uri=context.tracking_uri,
        mlflow_run_id="",  # each trial puts in its own
    )
    train = recipe.train
    group = WorkerGroup(
        settings.workers_per_trial, settings.cpus_per_worker, train.max_failures, train.startup_retries, train.placement
    )
    return TrialSpec(
        recipe=recipe,
        tune=settings,
        run_id=store.run_id,
        shards_uri=prepare.shards_uri,
        work_uri=context.result_uri,
        storage_options=store.options,
        device=device,
        group=group,
        tracking_uri=context.tracking_uri,
        experiment_id=context.client.get_run(context.mlflow_run_id).info.experiment_id,
        parent_run_id=context.mlflow_run_id,
        metrics=metrics,
        num_classes=prepare.num_classes,
        num_train=prepare.num_train,
        compile_cache_uri=store.cache_uri("compile", "train"),
        latent=autoencoder.latent if autoencoder is not None else None,
    )


def make_tuner(context: StageContext, spec: TrialSpec, space: dict[str, Dimension]) -> tune.Tuner:
    """The search over ``space``, or the interrupted one restored from its storage."""
    settings = spec.tune
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec),
        {"cpu": settings.cpus_per_trial, **({"gpu": 0} if spec.device is Device.GPU else {})},
    )
    storage_path, storage_filesystem = train_storage(f"{spec.work_uri}/ray", spec.storage_options)
    experiment_path = f"{storage_path}/search"
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=storage_filesystem):
        context.log(f"tune: restoring the interrupted search from {experiment_path}")
        return tune.Tuner.restore(
            experiment_path, trainable, resume_errored=True, storage_filesystem=storage_filesystem
        )
    return tune.Tuner(
        trainable,
        param_space={key: dimension.domain() for key, dimension in space.items()},
        tune_config=tune.TuneConfig(
            num_samples=settings.num_samples,
            max_concurrent_trials=settings.max_concurrent_trials,
            scheduler=trial_scheduler(settings),
            search_alg=search_algorithm(settings.search_alg),
        ),
        run_config=tune.RunConfig(name="search", storage_path=storage_path, storage_filesystem=storage_filesystem),
    )


def trial_scheduler(settings: TuneSection) -> TrialScheduler:
    if settings.scheduler is SchedulerChoice.NONE:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="images_seen",
        metric="bpd",
        mode="min",
        max_t=settings.trial_images,
        grace_period=settings.grace_period_images,
        reduction_factor=settings.reduction_factor,
    )


def search_algorithm(choice: SearchAlgorithm) -> Any:
    """Tune's search algorithm; None for Tune's own variant generator (random draws, or the full grid)."""
    if choice in (SearchAlgorithm.RANDOM, SearchAlgorithm.GRID):
        return None
    try:
        if choice is SearchAlgorithm.OPTUNA:
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch()
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch()
    except ImportError as error:
        raise RuntimeError(
            f"tune.search_alg={choice.value} needs its package: pip install '{choice.value}' ({error})"
        ) from None


@dataclass(frozen=True)
class Reported:
    """A trial's last report to Tune: its parameters and metrics (``trial_id``, ``images_seen``, ``bpd``, ``fid``)."""

    params: dict[str, Any]
    metrics: dict[str, Any]


def reported_trials(results: ResultGrid) -> list[Reported]:
    """The trials that reported at least once (an errored trial may not have)."""
    trials = []
    for index in range(len(results)):
        result = results[index]
        if result.metrics:
            trials.append(Reported(result.config or {}, result.metrics))
    return trials


def search_outcome(results: ResultGrid, space: dict[str, Dimension], spec: TrialSpec) -> TuneOutputs:
    """The best trial by ``tune.metric``, compared at equal training length: among the trials that ran to the end,
    when any did."""
    settings = spec.tune
    metric, length = settings.metric.value, settings.trial_images
    reported = reported_trials(results)
    ranked = [trial for trial in reported if metric in trial.metrics]
    if not ranked:
        raise RuntimeError(f"tune: no trial reported {metric}; see the trial errors in the Ray logs")
    finished = [trial for trial in ranked if trial.metrics.get("images_seen", 0) >= length]
    best = min(finished or ranked, key=lambda trial: trial.metrics[metric])
    checkpoints = committed_checkpoints(f"{spec.work_uri}/trials/{best.metrics['trial_id']}/ray", spec.storage_options)
    return TuneOutputs(
        best_params={key: best.params[key] for key in space},
        best_metric={metric: best.metrics[metric]},
        best_trial_id=best.metrics["trial_id"],
        best_checkpoint_uri=checkpoints[-1] if checkpoints else None,
        trials=len(results),
        stopped_early=sum(trial.metrics.get("images_seen", 0) < length for trial in reported),
        trial_results=tuple(
            TrialResult(
                trial.metrics["trial_id"],
                {key: trial.params.get(key) for key in space},
                trial.metrics.get("images_seen", 0),
                trial.metrics.get("bpd"),
                trial.metrics.get("fid"),
            )
            for trial in reported
        ),
    )


def close_trial_runs(context: StageContext, spec: TrialSpec, outputs: TuneOutputs) -> None:
    """End the trials' MLflow runs (Tune ends a trial's actor, on an ASHA stop or at max_t, before the trial can),
    tag the best one, and log the search's result on the tune stage's run."""
    client, settings = context.client, spec.tune
    reached = {trial.trial_id: trial.images_seen >= settings.trial_images for trial in outputs.trial_results}
    for trial_run in client.search_runs([spec.experiment_id], f"tags.`mlflow.parentRunId` = '{context.mlflow_run_id}'"):
        trial_id = trial_run.data.tags.get(TRIAL_ID_TAG, "")
        if trial_run.info.status == "RUNNING":
            client.set_terminated(trial_run.info.run_id, "FINISHED" if reached.get(trial_id) else "KILLED")
        if trial_id == outputs.best_trial_id:
            client.set_tag(trial_run.info.run_id, "ddpm.best_trial", "true")
    for key, value in outputs.best_params.items():
        client.log_param(context.mlflow_run_id, f"best.{key}", str(value))
    for name, value in outputs.best_metric.items():
        client.log_metric(context.mlflow_run_id, f"best_{name}", value)
    client.log_metric(context.mlflow_run_id, "trials", outputs.trials)
    client.log_metric(context.mlflow_run_id, "trials_stopped_early", outputs.stopped_early)
