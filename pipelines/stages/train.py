"""train: data-parallel DDPM training with Ray Train (DDP over NCCL with bf16 autocast on GPUs, gloo and fp32 on
CPUs; ``train.bf16_on_gpu`` / ``train.bf16_on_cpu``). Progress is counted in images; checkpoints of the full training
state are reported to Ray Train every ``train.checkpoint_every_images``, and a re-run (or a worker-group restart)
resumes from the latest one."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function

from ddpm_core.storage import commit, filesystem
from pipelines.stages.context import StageContext, StageStopped, out_of_memory_advice, slow_precision_advice
from pipelines.tracking import BufferedMetricLogger

PENDING_METRICS = "metrics.json"
DIVERGED = "diverged.txt"  # committed by rank 0 when the loss became non-finite: what to change

GRID_IMAGES = 64


def _generator(seed: int, rank: int, images_seen: int, device: torch.device) -> torch.Generator:
    """Per-rank RNG on the training device, derived from (seed, rank, images seen): a resumed run draws what an
    uninterrupted one would, and batches, timesteps and noise are drawn where they are used."""
    state = np.random.SeedSequence([seed, rank, images_seen]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def divergence_message(images_seen: int, step: int, optim) -> str:
    return (f"training diverged: the loss became non-finite by {images_seen} images (step {step}). The last checkpoint "
            f"before it is kept, but resuming with the same settings would diverge again: lower train.lr (now {optim.lr}), "
            f"keep train.grad_clip > 0 (now {optim.grad_clip}), or lengthen train.warmup_images (now {optim.warmup_images}).")


def trial_metrics(trial: dict[str, Any], x0: torch.Tensor, model, diffusion, unet_config, device, done: bool, client,
                  run_id: str, images_seen: int) -> dict[str, float]:
    """Metrics that rank tuning trials: the NLL bound in bits/dim (Monte Carlo estimate, comparable across schedules
    and T) on the fixed held-out batch ``x0`` at every report, and at the end a proxy FID on a small DDIM sample."""
    from mlflow.entities import Metric

    estimate = diffusion.bits_per_dim_estimate(model, x0, trial["bpd_timesteps"], generator=torch.Generator().manual_seed(0))
    metrics = {"bpd": estimate["total"].mean().item(),
               "bpd_stderr": estimate["stderr"].pow(2).sum().sqrt().item() / len(x0)}
    if done and trial.get("proxy_fid_samples"):
        metrics["fid"] = proxy_fid(trial, model, diffusion, unet_config, device)
    stamp = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, stamp, images_seen) for k, v in metrics.items()])
    return metrics


def proxy_fid(trial: dict[str, Any], model, diffusion, unet_config, device) -> float:
    import io

    from ddpm_core.data import to_uint8
    from ddpm_core.features import extract_features, load_classifier
    from ddpm_core.metrics import FeatureStatistics, frechet_distance_from_stats
    from ddpm_core.samplers import PerIndexNoise, SamplerConfig, sample
    from ddpm_core.storage import read_committed

    shape = (unet_config.in_channels, unet_config.image_size, unet_config.image_size)
    samples = sample(model, diffusion, shape, PerIndexNoise(0, range(trial["proxy_fid_samples"]), device),
                     SamplerConfig(method="ddim", num_steps=trial["proxy_fid_steps"])).samples
    extractor, _ = load_classifier(trial["extractor_uri"], trial["storage_options"])
    reference_file = read_committed(trial["reference_stats_uri"], ["stats.pt"], trial["storage_options"])[0]["stats.pt"]
    reference = FeatureStatistics.from_dict(torch.load(io.BytesIO(reference_file), weights_only=True))
    return frechet_distance_from_stats(FeatureStatistics.from_features(extract_features(extractor, to_uint8(samples))), reference)


def load_initial_weights(model: torch.nn.Module, uri: str, unet_config, storage_options: dict[str, Any]) -> None:
    """Copy a snapshot's weights into ``model``; a snapshot of another architecture is refused by name."""
    from ddpm_core.checkpoint import CheckpointError, load_snapshot

    snapshot = load_snapshot(uri, storage_options)
    if snapshot.unet != unet_config:
        raise CheckpointError(f"train.init_from {uri!r} holds a U-Net with config {snapshot.unet.to_dict()}, but this run's "
                              f"model is {unet_config.to_dict()}; warm-start only from the same model.preset/overrides")
    try:
        model.load_state_dict(snapshot.state_dict)
    except RuntimeError as error:
        raise CheckpointError(f"train.init_from {uri!r}: weights do not fit this model ({error})") from error


def train_loop(loop: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from ddpm_core.checkpoint import load_training_state, save_snapshot, save_training_state
    from ddpm_core.data import random_batch, to_model_range, to_uint8
    from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion, Variance
    from ddpm_core.ema import EMA
    from ddpm_core.images import grid
    from ddpm_core.samplers import PerIndexNoise, SamplerConfig, sample
    from ddpm_core.precision import autocast_dtype
    from ddpm_core.training import OptimConfig, RunningTotals, learning_rate, make_optimizer, train_step
    from ddpm_core.unet import UNet, UNetConfig
    from pipelines.stages.prepare import read_shards

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    unet_config, diffusion_config = UNetConfig.from_dict(loop["unet"]), DiffusionConfig.from_dict(loop["diffusion"])
    optim, train = OptimConfig(**loop["optim"]), loop["train"]
    diffusion = GaussianDiffusion.from_config(diffusion_config)
    autocast = autocast_dtype(loop["precision"])

    images, _ = read_shards(loop["shards_uri"], loop["storage_options"])
    data = to_model_range(images[rank::world]).to(device)  # this worker's shard, [N_r, C, H, W], resident on the device
    memory_format = torch.channels_last if train["channels_last"] else torch.contiguous_format

    torch.manual_seed(train["seed"])  # identical initial weights on every rank
    model = UNet(unet_config, learn_variance=diffusion_config.variance is Variance.LEARNED_RANGE)
    if rank == 0 and ray.train.get_checkpoint() is None:
        save_snapshot(loop["initial_snapshot_uri"], model, unet_config, diffusion_config, {"images_seen": 0}, loop["storage_options"])
    if loop.get("init_snapshot_uri") and ray.train.get_checkpoint() is None:  # warm start, e.g. from the champion
        load_initial_weights(model, loop["init_snapshot_uri"], unet_config, loop["storage_options"])
        if rank == 0:
            print(f"train: initial weights from {loop['init_snapshot_uri']}", flush=True)
    model = model.to(memory_format=memory_format)
    wrapped = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"gradient_as_bucket_view": train["gradient_as_bucket_view"]})
    model = wrapped.module if hasattr(wrapped, "module") else wrapped
    step_model = torch.compile(wrapped) if train["compile"] else wrapped
    ema = EMA(model, optim.ema_decay, optim.ema_warmup)
    optimizer = make_optimizer(model, optim)

    images_seen, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_training_state(directory)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        images_seen, step = int(state["images_seen"]), int(state["step"])
        if rank == 0:
            print(f"train: resumed from checkpoint at {images_seen} images (step {step})", flush=True)
    elif loop.get("warm_start_uri"):  # a fresh run initialised from another run's weights (e.g. the best tune trial)
        state = load_training_state(loop["warm_start_uri"])
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        if rank == 0:
            print(f"train: warm start from {loop['warm_start_uri']} ({state['images_seen']} images)", flush=True)
    if rank == 0:
        ddp = f", DDP with gradient_as_bucket_view={wrapped.gradient_as_bucket_view}" if hasattr(wrapped, "module") else ""
        print(f"train: worker group of {world} started at {images_seen} images, {loop['precision']}{ddp}", flush=True)
        advice = slow_precision_advice(loop["precision"], device.type, "train.bf16_on_cpu")
        if advice:
            print(f"train: {advice}", flush=True)
    generator = _generator(train["seed"], rank, images_seen, device)
    # One quick attempt per MLflow call (no minutes of client-side retries): an outage is absorbed by the buffer.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    client = MlflowClient(loop["tracking_uri"]) if rank == 0 else None
    metrics_log = BufferedMetricLogger(client, loop["mlflow_run_id"], lambda m: print(f"train: {m}", flush=True)) if rank == 0 else None
    holdout = None  # the fixed held-out batch of a tuning trial's bits/dim reports, read once
    if rank == 0 and loop.get("trial") is not None:
        held_out_images, _ = read_shards(loop["trial"]["holdout_uri"], loop["trial"]["storage_options"])
        holdout = to_model_range(held_out_images[: loop["trial"]["bpd_images"]]).to(device)

    def next_multiple(every: int) -> int:
        return (images_seen // every + 1) * every if every > 0 else math.inf

    next_log, next_checkpoint = next_multiple(train["log_every_images"]), next_multiple(train["checkpoint_every_images"])
    next_grid = next_multiple(train["grid_every_images"])
    per_worker = train["batch_size"] // world
    totals = RunningTotals(device, dist.all_reduce if world > 1 and dist.is_initialized() else None)
    window_start, window_images = time.time(), 0
    oom_advice = (f"a training step on {device} ({per_worker} images per worker)",
                  f"lower train.batch_size (now {train['batch_size']}), spread it over more workers "
                  f"(train.num_workers, now {world}), or choose a smaller model (model.preset / model.channels)")
    total_images, loop_started = train["total_images"], time.time()
    while images_seen < total_images:
        with record_function("data"):
            batch = random_batch(data, per_worker, generator, train["horizontal_flip"], memory_format)
        with out_of_memory_advice(*oom_advice):
            result = train_step(step_model, diffusion, optimizer, batch, optim, images_seen, ema,
                                generator=generator, autocast_dtype=autocast)
        images_seen, step, window_images = images_seen + train["batch_size"], step + 1, window_images + train["batch_size"]
        totals.add(result)
        done = images_seen >= total_images
        if images_seen >= next_log or images_seen >= next_checkpoint or done:
            # Checked before every log and checkpoint, so no checkpoint holds diverged weights. Every rank sees the same
            # all-reduced sum and so stops at the same step: the group ends cleanly instead of being retried.
            with record_function("logging"):
                window = totals.summed()  # every rank takes part in the reduction
            if not math.isfinite(window.loss_sum):
                if rank == 0:  # read by the driver after fit(): Ray Train keeps only checkpointed reports
                    commit(loop["diverged_uri"], {DIVERGED: divergence_message(images_seen, step, optim).encode()},
                           {"images_seen": images_seen}, loop["storage_options"])
                return
        if images_seen >= next_log or done:
            means = window.means()
            totals.restart()
            if client is not None:
                now, elapsed = int(time.time() * 1000), time.time() - window_start
                values = {**means, "lr": learning_rate(images_seen, optim), "images_per_second": window_images / max(elapsed, 1e-9),
                          "ema_decay": ema.current_decay()}
                metrics_log.send([Metric(k, float(v), now, images_seen) for k, v in values.items()])
                print(f"train: {images_seen}/{total_images} images, loss {means['loss']:.4f}, {values['images_per_second']:.0f} img/s", flush=True)
            window_start, window_images = time.time(), 0
            next_log = next_multiple(train["log_every_images"])
        if images_seen >= next_grid or done:
            if client is not None:
                shape = (unet_config.in_channels, unet_config.image_size, unet_config.image_size)
                samples = sample(ema.model, diffusion, shape, PerIndexNoise(train["seed"], range(GRID_IMAGES), device),
                                 SamplerConfig(method="ddim", num_steps=min(50, diffusion.num_timesteps))).samples
                try:
                    client.log_image(loop["mlflow_run_id"], grid(to_uint8(samples), columns=8), key="samples", step=images_seen)
                except Exception as error:  # a progress picture is not worth stopping training for
                    print(f"train: sample grid at {images_seen} images not logged ({type(error).__name__})", flush=True)
            next_grid = next_multiple(train["grid_every_images"])
        if images_seen >= next_checkpoint or done:
            report = {"images_seen": images_seen, "step": step, "loop_seconds": time.time() - loop_started}
            if rank == 0 and loop.get("trial") is not None:
                report.update(trial_metrics(loop["trial"], holdout, ema.model, diffusion, unet_config, device, done, client,
                                            loop["mlflow_run_id"], images_seen))
            with tempfile.TemporaryDirectory() as directory:
                saved = None
                if rank == 0:
                    save_training_state(directory, {
                        "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": step, "images_seen": images_seen, "config": {"unet": loop["unet"], "diffusion": loop["diffusion"]}})
                    saved = ray.train.Checkpoint.from_directory(directory)
                ray.train.report(report, checkpoint=saved)
            next_checkpoint = next_multiple(train["checkpoint_every_images"])
    if rank == 0:
        save_snapshot(loop["snapshot_uri"], ema.model, unet_config, diffusion_config, {"images_seen": images_seen, "step": step},
                      loop["storage_options"])
        unsent = metrics_log.close()
        if unsent:  # MLflow still down: keep them in storage; the driver sends them when it can
            commit(loop["pending_metrics_uri"], {PENDING_METRICS: json.dumps([m.to_dictionary() for m in unsent]).encode()},
                   {"count": len(unsent)}, loop["storage_options"])
            print(f"train: {len(unsent)} metrics could not reach MLflow; kept at {loop['pending_metrics_uri']}", flush=True)


def loop_config(config, shards_uri: str, work_uri: str, storage_options: dict[str, Any], tracking_uri: str,
                mlflow_run_id: str, use_gpu: bool, trial: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a worker needs, as plain data (workers get no config object, no environment)."""
    return {
        "precision": config.train.precision(use_gpu),
        "unet": config.model.unet().to_dict(), "diffusion": config.diffusion.to_dict(), "optim": config.train.optim().__dict__,
        "train": {k: getattr(config.train, k) for k in ("seed", "batch_size", "total_images", "log_every_images",
                                                         "checkpoint_every_images", "grid_every_images", "horizontal_flip",
                                                         "channels_last", "compile", "gradient_as_bucket_view")},
        "shards_uri": shards_uri, "storage_options": storage_options,
        "snapshot_uri": f"{work_uri}/snapshot", "initial_snapshot_uri": f"{work_uri}/initial_snapshot",
        "pending_metrics_uri": f"{work_uri}/pending_metrics", "diverged_uri": f"{work_uri}/diverged",
        "tracking_uri": tracking_uri, "mlflow_run_id": mlflow_run_id, "trial": trial, "init_snapshot_uri": config.train.init_from,
    }


def make_trainer(config, loop: dict[str, Any], work_uri: str, storage_options: dict[str, Any], use_gpu: bool,
                 num_workers: int, cpus_per_worker: float, callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.ray_env import runtime_env, train_storage

    storage_path, storage_filesystem = train_storage(f"{work_uri}/ray", storage_options)
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    return TorchTrainer(
        train_loop, train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name="trainer", storage_path=storage_path, storage_filesystem=storage_filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=config.train.max_failures,
                                                          controller_failure_limit=config.train.startup_retries),
                             worker_runtime_env=runtime_env(), callbacks=callbacks or []),
    )


def fit(trainer, loop: dict[str, Any]):
    """``trainer.fit()``; raises the workers' error, or ``StageStopped`` when they stopped because the loss diverged."""
    from ddpm_core.storage import is_committed, read_committed

    fs, diverged_path = filesystem(loop["diverged_uri"], loop["storage_options"])
    if fs.exists(diverged_path):  # from an earlier attempt with these settings
        fs.rm(diverged_path, recursive=True)
    result = trainer.fit()
    if result.error:
        raise result.error
    if is_committed(loop["diverged_uri"], loop["storage_options"]):
        message = read_committed(loop["diverged_uri"], [DIVERGED], loop["storage_options"])[0][DIVERGED].decode()
        raise StageStopped(message)
    return result


def send_pending_metrics(uri: str, storage_options: dict[str, Any], context: StageContext) -> None:
    """Metrics a worker kept in storage during an MLflow outage: sent now (the stage fails if MLflow is still down)."""
    from mlflow.entities import Metric

    from ddpm_core.storage import is_committed, read_committed

    if not is_committed(uri, storage_options):
        return
    kept = json.loads(read_committed(uri, [PENDING_METRICS], storage_options)[0][PENDING_METRICS])
    metrics = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in kept]
    for start in range(0, len(metrics), 1000):
        context.client.log_batch(context.mlflow_run_id, metrics=metrics[start:start + 1000])
    fs, path = filesystem(uri, storage_options)
    fs.rm(path, recursive=True)
    context.log(f"train: sent {len(metrics)} metrics kept during an MLflow outage")


def effective_config(context: StageContext):
    """The config to train with: the tune stage's best parameters applied, when a tune stage ran."""
    from pipelines.config import with_overrides

    if "tune" in context.upstream:
        return with_overrides(context.config, context.upstream["tune"]["outputs"]["best_params"])
    return context.config


def run(context: StageContext) -> dict[str, Any]:
    from pipelines.ray_env import has_gpus

    config, store = effective_config(context), context.store
    work_uri = context.work_uri("train")
    use_gpu = has_gpus() if config.train.use_gpu is None else config.train.use_gpu
    loop = loop_config(config, context.output_of("prepare", "shards_uri"), work_uri, store.options, context.tracking_uri,
                       context.mlflow_run_id, use_gpu)
    if "tune" in context.upstream and config.tune.warm_start:
        loop["warm_start_uri"] = context.output_of("tune", "best_checkpoint_uri")
    trainer = make_trainer(config, loop, work_uri, store.options, use_gpu, config.train.num_workers, config.train.cpus_per_worker)
    context.log(f"train: {config.train.num_workers} worker(s), {'GPU (NCCL' if use_gpu else 'CPU (gloo'}, {loop['precision']}), "
                f"{config.train.total_images} images, batch {config.train.batch_size}")
    result = fit(trainer, loop)
    send_pending_metrics(loop["pending_metrics_uri"], store.options, context)
    return {"snapshot_uri": loop["snapshot_uri"], "initial_snapshot_uri": loop["initial_snapshot_uri"],
            "images_seen": int(result.metrics["images_seen"]), "use_gpu": bool(use_gpu),
            "loop_seconds": result.metrics.get("loop_seconds"),  # the final attempt's training loop, checkpoints included
            "checkpoint_path": result.checkpoint.path if result.checkpoint else None,
            "config": {"diffusion": config.diffusion.to_dict(), "train": config.train.optim().__dict__}}
