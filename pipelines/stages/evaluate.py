"""evaluate: FID, Inception Score and precision/recall of the sample set on one feature network, the NLL bound of
held-out real images, and the same FID for an untrained network and for held-out real images (the floor), all
logged to MLflow with the protocol that produced them (docs/evaluation.md)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np

from ddpm_core.images import grid, save_grid
from ddpm_core.metrics import frechet_distance, frechet_distance_from_stats, precision_recall
from pipelines.stages.context import StageContext
from pipelines.stages.likelihood import held_out_bits_per_dim
from pipelines.stages.sample import sample_to_shards
from pipelines.stages.scoring import (ExtractorSpec, Summary, published_reference, read_images, reference_summary,
                                      sample_sources, split_sources, summarize)


def extractor_spec(context: StageContext) -> tuple[ExtractorSpec, str, str | None]:
    """(spec, extractor id, weights SHA-256) of the configured feature network."""
    evaluate, prepare = context.config.evaluate, context.upstream["prepare"]["outputs"]
    if evaluate.extractor == "classifier":
        return ExtractorSpec("classifier", prepare["extractor_uri"]), prepare["extractor_id"], None
    from ddpm_core.inception import HOW_TO_PROVIDE
    from ddpm_core.weights import fetch_verified

    _, digest = fetch_verified(evaluate.inception_weights_uri, evaluate.inception_weights_sha256, HOW_TO_PROVIDE, context.store.options)
    return ExtractorSpec("inception", evaluate.inception_weights_uri, digest), f"inception-v3-compat-{digest[:16]}", digest


def fid_protocol(context: StageContext, extractor_id: str, weights_sha256: str | None, reference: dict[str, Any]) -> dict[str, Any]:
    """Everything that must match for two FIDs to be comparable (hashed into ``fid.protocol_hash``)."""
    sample = context.upstream["sample"]["outputs"]
    return {"num_samples": sample["num_samples"], "sampler": sample["sampler"], "seed": sample["seed"],
            "precision": sample["execution"]["precision"], "extractor_id": extractor_id,
            "extractor_weights_sha256": weights_sha256, **reference}


def protocol_hash(value: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def fid_against(summary: Summary, reference: Summary, published: tuple | None) -> float:
    if published is not None:
        return frechet_distance(summary.fid.mean, summary.fid.covariance, published[0], published[1])
    return frechet_distance_from_stats(summary.fid, reference.fid)


def run(context: StageContext) -> dict[str, Any]:
    from pipelines.ray_env import runtime_env

    store, config, evaluate = context.store, context.config, context.config.evaluate
    prepare, sample = context.upstream["prepare"]["outputs"], context.upstream["sample"]["outputs"]
    options, env, use_gpu = store.options, runtime_env(), context.output_of("train", "use_gpu")
    spec, extractor_id, weights_sha256 = extractor_spec(context)
    champion_version = None
    keep_first = evaluate.precision_recall_samples if evaluate.precision_recall else 0
    reference, reference_uri = reference_summary(
        store.cache_uri("reference", f"{prepare['fingerprint'][:16]}-{extractor_id}"), prepare["shards_uri"], spec,
        {"extractor_id": extractor_id, "data_fingerprint": prepare["fingerprint"]}, options, env, use_gpu, keep_first, context.log)
    published = published_reference(evaluate.reference_stats_uri, options) if evaluate.reference_stats_uri else None
    reference_protocol = ({"reference": "published", "reference_sha256": published[2]} if published else
                          {"reference": "training split", "reference_data_fingerprint": prepare["fingerprint"],
                           "reference_split": f"{config.data.split} minus {config.data.holdout_fraction:g} hold-out",
                           "reference_count": reference.fid.count})

    num_samples = sample["num_samples"]
    splits = evaluate.inception_score_splits if evaluate.inception_score else 0
    context.log(f"evaluate: features of {num_samples} samples with {extractor_id}")
    generated = summarize(sample_sources(context.output_of("sample", "shard_uris"), options), spec, options, env, use_gpu,
                          num_samples, splits, keep_first)
    metrics: dict[str, float] = {"fid": fid_against(generated, reference, published)}
    if generated.inception is not None:
        metrics["inception_score"], metrics["inception_score_std"] = generated.inception.inception_score()
    pr_count = min(len(reference.first_features), len(generated.first_features))  # equal set sizes, as in the paper
    if evaluate.precision_recall:
        metrics["precision"], metrics["recall"] = precision_recall(reference.first_features[:pr_count], generated.first_features[:pr_count],
                                                                   evaluate.precision_recall_k)
    if prepare["num_holdout"] >= 2:
        holdout = summarize(split_sources(prepare["holdout_uri"], options), spec, options, env, use_gpu, prepare["num_holdout"])
        metrics["fid_holdout_vs_train"] = fid_against(holdout, reference, published)
    if evaluate.untrained_baseline:
        context.log("evaluate: sampling an untrained network under the same protocol for the baseline FID")
        baseline_uris, _ = sample_to_shards(context.output_of("train", "initial_snapshot_uri"), f"{context.work_uri('evaluate')}/untrained_shards",
                                         num_samples, config.sample.batch_size, sample["sampler"], sample["execution"], sample["seed"],
                                         config.sample.num_workers, use_gpu, options, context.log, env)
        untrained = summarize(sample_sources(baseline_uris, options), spec, options, env, use_gpu, num_samples)
        metrics["fid_untrained"] = fid_against(untrained, reference, published)
    if evaluate.rescore_champion and config.register.enabled:
        champion = rescore_champion(context, spec, reference, published, use_gpu)
        if champion is not None:
            metrics["fid_champion"] = champion[1]
            champion_version = champion[0]
    nll_protocol = {}
    if evaluate.nll:
        images = held_out_images(context)
        context.log(f"evaluate: NLL bound of {len(images)} {evaluate.nll_split} images "
                    f"({'all T terms' if evaluate.nll_timesteps is None else f'{evaluate.nll_timesteps} random timesteps each'})")
        nll = held_out_bits_per_dim(context.output_of("train", "snapshot_uri"), images, evaluate.nll_batch_size, sample["seed"],
                                    evaluate.nll_timesteps, use_gpu, options, env)
        metrics["nll_bpd"], metrics["nll_bpd_stderr"] = nll.bits_per_dim, nll.stderr
        nll_protocol = {"nll.split": evaluate.nll_split, "nll.num_images": nll.num_images, "nll.batch_size": evaluate.nll_batch_size,
                        "nll.timesteps": "all" if evaluate.nll_timesteps is None else evaluate.nll_timesteps, "nll.seed": sample["seed"]}

    the_protocol = fid_protocol(context, extractor_id, weights_sha256, reference_protocol)
    digest = protocol_hash(the_protocol)
    log_to_mlflow(context, metrics, the_protocol, digest, nll_protocol, reference_uri, pr_count)
    grid_uri = save_sample_grid(context)
    context.log(summary_line(metrics, the_protocol))
    return {**metrics, "protocol": the_protocol, "protocol_hash": digest, "grid_uri": grid_uri, "reference_uri": reference_uri,
            "nll_protocol": nll_protocol, "champion_version": champion_version}


def rescore_champion(context: StageContext, spec: ExtractorSpec, reference: Summary, published: tuple | None,
                     use_gpu: bool) -> tuple[str, float] | None:
    """(version, FID) of the registered champion sampled and scored under exactly this run's protocol, so that the
    register stage compares like with like even when the data (and so the reference statistics) changed."""
    from pipelines.champion import champion_snapshot_uri, current_champion
    from pipelines.ray_env import runtime_env

    config, store, sample = context.config, context.store, context.upstream["sample"]["outputs"]
    champion = current_champion(context.client, config.register.model_name)
    if champion is None:
        return None
    context.log(f"evaluate: re-scoring champion v{champion.version} of {config.register.model_name} under this protocol")
    snapshot_uri = champion_snapshot_uri(store, context.tracking_uri, config.register.model_name, champion)
    uris, _ = sample_to_shards(snapshot_uri, f"{context.work_uri('evaluate')}/champion_v{champion.version}_shards", sample["num_samples"],
                            config.sample.batch_size, sample["sampler"], sample["execution"], sample["seed"], config.sample.num_workers, use_gpu,
                            store.options, context.log, runtime_env())
    scored = summarize(sample_sources(uris, store.options), spec, store.options, runtime_env(), use_gpu, sample["num_samples"])
    return champion.version, fid_against(scored, reference, published)


def held_out_images(context: StageContext) -> np.ndarray:
    evaluate, prepare = context.config.evaluate, context.upstream["prepare"]["outputs"]
    uri = prepare["holdout_uri"] if evaluate.nll_split == "holdout" else prepare["test_uri"]
    images = np.concatenate([read_images(source, context.store.options) for source in split_sources(uri, context.store.options)])
    return images[: evaluate.nll_images] if evaluate.nll_images else images


def log_to_mlflow(context: StageContext, metrics: dict[str, float], the_protocol: dict[str, Any], digest: str,
                  nll_protocol: dict[str, Any], reference_uri: str, pr_count: int) -> None:
    evaluate, client, run_id = context.config.evaluate, context.client, context.mlflow_run_id
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    params = {f"protocol.{k}": v for k, v in the_protocol.items() if k != "sampler"}
    params.update({f"protocol.sampler.{k}": v for k, v in the_protocol["sampler"].items()})
    if evaluate.inception_score:
        params["protocol.inception_score.splits"] = evaluate.inception_score_splits
    if evaluate.precision_recall:
        params["protocol.precision_recall.k"] = evaluate.precision_recall_k
        params["protocol.precision_recall.samples"] = pr_count  # real and generated each
    params.update({f"protocol.{k}": v for k, v in nll_protocol.items()})
    params["protocol.reference_uri"] = reference_uri
    for key, value in params.items():
        client.log_param(run_id, key, str(value))
    client.set_tag(run_id, "fid.protocol_hash", digest)
    description = ("Inception-v3 pool3 (torch-fidelity port of the TF 2015-12-05 graph)" if evaluate.extractor == "inception"
                   else "CNN classifier trained on the data set's labels")
    client.set_tag(run_id, "fid.extractor", f"{the_protocol['extractor_id']} ({description})")


def save_sample_grid(context: StageContext) -> str:
    config, options = context.config, context.store.options
    shard_uris = context.output_of("sample", "shard_uris")
    shards_for_grid = max(1, -(-config.evaluate.grid_size // config.sample.batch_size))  # ceil
    images = np.concatenate([read_images(source, options) for source in sample_sources(shard_uris[:shards_for_grid], options)])
    grid_uri = f"{context.store.stage_uri('evaluate')}/samples.png"
    save_grid(images[: config.evaluate.grid_size], grid_uri, columns=10, storage_options=options)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "samples.png")
        grid(images[: config.evaluate.grid_size], columns=10).save(path)
        context.client.log_artifact(context.mlflow_run_id, path)
    return grid_uri


def summary_line(metrics: dict[str, float], the_protocol: dict[str, Any]) -> str:
    parts = [f"FID {metrics['fid']:.3f} ({the_protocol['num_samples']} samples, {the_protocol['sampler']['method']} "
             f"{the_protocol['sampler']['num_steps']} steps, extractor {the_protocol['extractor_id']})"]
    labels = {"fid_untrained": "untrained network FID", "fid_holdout_vs_train": "hold-out real images FID",
              "fid_champion": "champion FID (re-scored)",
              "inception_score": "IS", "precision": "precision", "recall": "recall", "nll_bpd": "NLL bits/dim"}
    parts += [f"{label} {metrics[key]:.3f}" for key, label in labels.items() if key in metrics]
    return "evaluate: " + "; ".join(parts)
