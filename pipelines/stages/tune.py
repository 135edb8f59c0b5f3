"""tune: search noise schedules, learning rates and any other config key with Ray Tune before the long run.

Each trial is a short Ray Train run of the real training loop (Train V2 pattern: a Tune function trainable that
builds and fits a TorchTrainer whose reports reach Tune through ``TuneReportCallback``). Trials are ranked by a
metric comparable across schedules: the NLL bound in bits/dim on held-out images (never the raw eps-MSE, whose scale
depends on the schedule), or a proxy FID at the trial's end; ASHA stops weak trials early on bits/dim. Every trial is
a nested MLflow run under the tune stage's run. A re-run after a driver crash restores the search.
"""

from __future__ import annotations

from typing import Any

from pipelines.stages.context import StageContext

TRIAL_ID_TAG = "ddpm.trial_id"


def param_space(parsed: dict[str, tuple[str, list[Any]]]) -> dict[str, Any]:
    from ray import tune

    make = {"choice": tune.choice, "grid": tune.grid_search,
            "uniform": lambda bounds: tune.uniform(*bounds), "loguniform": lambda bounds: tune.loguniform(*bounds)}
    return {key: make[distribution](values) for key, (distribution, values) in parsed.items()}


def search_algorithm(name: str):
    if name in ("random", "grid"):
        return None  # Tune's default variant generator: random draws, or the full grid for grid_search values
    try:
        if name == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch()
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch()
    except ImportError as error:
        raise RuntimeError(f"tune.search_alg={name} needs its package: pip install '{name}' ({error})") from None


def latest_checkpoint(trainer_uri: str, storage_options: dict[str, Any]) -> str | None:
    """The newest committed Ray Train checkpoint folder under a trainer's storage, as a URI."""
    from ddpm_core.storage import filesystem

    fs, path = filesystem(trainer_uri, storage_options)
    folders = sorted(fs.glob(f"{path}/checkpoint_*/manifest.json"))
    if not folders:
        return None
    protocol = trainer_uri.split("://", 1)[0] + "://" if "://" in trainer_uri else ""
    return protocol + folders[-1].rsplit("/", 1)[0]


def run_trial(params: dict[str, Any], setup: dict[str, Any]) -> None:
    """One trial, running in its own Tune actor: a short Ray Train run under a nested MLflow run."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.config import PipelineConfig, with_overrides
    from pipelines.stages.train import fit, loop_config, make_trainer

    trial_id = tune.get_context().get_trial_id()
    base = with_overrides(PipelineConfig(), setup["config"])
    config = with_overrides(base, {**params, "train.total_images": setup["trial_images"],
                                   "train.checkpoint_every_images": setup["report_every_images"],
                                   "train.log_every_images": setup["report_every_images"], "train.grid_every_images": 0})
    client = MlflowClient(setup["tracking_uri"])
    existing = client.search_runs([setup["experiment_id"]], f"tags.`{TRIAL_ID_TAG}` = '{trial_id}' and "
                                  f"tags.`mlflow.parentRunId` = '{setup['parent_run_id']}'", max_results=1)
    if existing:  # a restored trial keeps its MLflow run
        run_id = existing[0].info.run_id
    else:
        run_id = client.create_run(setup["experiment_id"], run_name=f"trial {trial_id}", tags={
            TRIAL_ID_TAG: trial_id, "mlflow.parentRunId": setup["parent_run_id"], "ddpm.run_id": config.run_id,
            "ddpm.stage": "tune-trial"}).info.run_id
        client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])
    work_uri = f"{setup['work_uri']}/trials/{trial_id}"
    loop = loop_config(config, setup["shards_uri"], work_uri, setup["storage_options"], setup["tracking_uri"], run_id,
                       setup["use_gpu"], trial=setup["trial"])
    trainer = make_trainer(config, loop, work_uri, setup["storage_options"], setup["use_gpu"], setup["workers_per_trial"],
                           setup["cpus_per_worker"], callbacks=[TuneReportCallback()])
    try:
        fit(trainer, loop)  # a diverged trial raises: Tune records it as errored, and it is never ranked
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def run(context: StageContext) -> dict[str, Any]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from pipelines.config import search_space_values
    from pipelines.ray_env import has_gpus, train_storage

    config, store = context.config, context.store
    settings = config.tune
    parsed = search_space_values(config)
    prepare = context.upstream["prepare"]["outputs"]
    work_uri = context.work_uri("tune")
    use_gpu = has_gpus() if config.train.use_gpu is None else config.train.use_gpu
    client = context.client
    setup = {
        "config": config.to_dict(), "trial_images": settings.trial_images, "report_every_images": settings.report_every_images,
        "tracking_uri": context.tracking_uri, "experiment_id": client.get_run(context.mlflow_run_id).info.experiment_id,
        "parent_run_id": context.mlflow_run_id, "shards_uri": prepare["shards_uri"], "storage_options": store.options,
        "work_uri": work_uri, "use_gpu": use_gpu, "workers_per_trial": settings.workers_per_trial,
        "cpus_per_worker": settings.cpus_per_worker,
        "trial": {"holdout_uri": prepare["holdout_uri"], "storage_options": store.options, "bpd_images": settings.bpd_images,
                  "bpd_timesteps": settings.bpd_timesteps, "extractor_uri": prepare["extractor_uri"],
                  "reference_stats_uri": prepare["reference_stats_uri"],
                  "proxy_fid_samples": settings.proxy_fid_samples, "proxy_fid_steps": settings.proxy_fid_steps},
    }
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    {"cpu": settings.cpus_per_trial, **({"gpu": 0} if use_gpu else {})})
    scheduler = (ASHAScheduler(time_attr="images_seen", metric="bpd", mode="min", max_t=settings.trial_images,
                               grace_period=settings.grace_period_images, reduction_factor=settings.reduction_factor)
                 if settings.scheduler == "asha" else FIFOScheduler())
    storage_path, storage_filesystem = train_storage(f"{work_uri}/ray", store.options)
    experiment_path = f"{storage_path}/search"
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=storage_filesystem):
        context.log(f"tune: restoring the interrupted search from {experiment_path}")
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_errored=True, storage_filesystem=storage_filesystem)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space(parsed),
            tune_config=tune.TuneConfig(num_samples=settings.num_samples, max_concurrent_trials=settings.max_concurrent_trials,
                                        scheduler=scheduler, search_alg=search_algorithm(settings.search_alg)),
            run_config=tune.RunConfig(name="search", storage_path=storage_path, storage_filesystem=storage_filesystem),
        )
    context.log(f"tune: {settings.search_alg} search over {sorted(parsed)}, ranking by {settings.metric}")
    results = tuner.fit()
    ranked = [result for result in results if result.metrics and settings.metric in result.metrics]
    if not ranked:
        raise RuntimeError(f"tune: no trial reported {settings.metric}; see the trial errors in the Ray logs")
    # Compare at equal training length: among the trials that ran to the end, when any did.
    finished = [r for r in ranked if r.metrics.get("images_seen", 0) >= settings.trial_images] or ranked
    best = min(finished, key=lambda result: result.metrics[settings.metric])
    best_params = {key: best.config[key] for key in parsed}
    best_checkpoint_uri = latest_checkpoint(f"{work_uri}/trials/{best.metrics['trial_id']}/ray/trainer", store.options)
    stopped_early = [r for r in results if r.metrics and r.metrics.get("images_seen", 0) < settings.trial_images]
    trial_runs = client.search_runs([setup["experiment_id"]], f"tags.`mlflow.parentRunId` = '{context.mlflow_run_id}'")
    reached = {r.metrics["trial_id"]: r.metrics.get("images_seen", 0) >= settings.trial_images for r in results if r.metrics}
    for trial_run in trial_runs:  # Tune ends a trial's actor (ASHA stop, or max_t) before the trial can close its run
        trial_id = trial_run.data.tags.get(TRIAL_ID_TAG)
        if trial_run.info.status == "RUNNING":
            client.set_terminated(trial_run.info.run_id, "FINISHED" if reached.get(trial_id) else "KILLED")
        if trial_id == best.metrics["trial_id"]:
            client.set_tag(trial_run.info.run_id, "ddpm.best_trial", "true")
    for key, value in best_params.items():
        client.log_param(context.mlflow_run_id, f"best.{key}", str(value))
    client.log_metric(context.mlflow_run_id, f"best_{settings.metric}", best.metrics[settings.metric])
    client.log_metric(context.mlflow_run_id, "trials", len(results))
    client.log_metric(context.mlflow_run_id, "trials_stopped_early", len(stopped_early))
    context.log(f"tune: best of {len(results)} trials ({len(stopped_early)} stopped early): {best_params} with "
                f"{settings.metric} {best.metrics[settings.metric]:.4f}")
    return {"best_params": best_params, "best_metric": {settings.metric: best.metrics[settings.metric]},
            "best_trial_id": best.metrics["trial_id"], "best_checkpoint_uri": best_checkpoint_uri,
            "trials": len(results), "stopped_early": len(stopped_early),
            "trial_results": [{"trial_id": r.metrics.get("trial_id"), "params": {k: r.config.get(k) for k in parsed},
                               "images_seen": r.metrics.get("images_seen"), "bpd": r.metrics.get("bpd"), "fid": r.metrics.get("fid")}
                              for r in results if r.metrics]}
