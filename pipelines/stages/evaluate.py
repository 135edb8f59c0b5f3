"""evaluate: feature statistics of the sample shards computed in parallel (Ray tasks), merged exactly in float64,
and the Frechet distance to the reference statistics of the training set, logged to MLflow with its protocol."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from typing import Any

import numpy as np
import ray
import torch

from ddpm_core.images import grid, save_grid
from ddpm_core.metrics import FeatureStatistics, frechet_distance_from_stats
from ddpm_core.storage import read_committed
from pipelines.stages.context import StageContext
from pipelines.stages.sample import sample_to_shards


def read_shard_images(uri: str, storage_options: dict[str, Any]) -> np.ndarray:
    files, _ = read_committed(uri, ["images.npy"], storage_options)
    return np.load(io.BytesIO(files["images.npy"]), allow_pickle=False)


@ray.remote(num_cpus=1)
def shard_statistics(shard_uri: str, extractor_uri: str, storage_options: dict[str, Any]) -> dict[str, torch.Tensor]:
    from ddpm_core.features import extract_features, load_classifier

    model, _ = load_classifier(extractor_uri, storage_options)
    return FeatureStatistics.from_features(extract_features(model, read_shard_images(shard_uri, storage_options))).to_dict()


def merged_statistics(shard_uris: list[str], extractor_uri: str, storage_options: dict[str, Any], runtime_env) -> FeatureStatistics:
    parts = ray.get([shard_statistics.options(runtime_env=runtime_env).remote(uri, extractor_uri, storage_options) for uri in shard_uris])
    stats = FeatureStatistics.from_dict(parts[0])
    for part in parts[1:]:
        stats = stats.merge(FeatureStatistics.from_dict(part))
    return stats


def protocol(context: StageContext) -> dict[str, Any]:
    """Everything that must match for two FIDs to be comparable."""
    sample = context.upstream["sample"]["outputs"]
    prepare = context.upstream["prepare"]["outputs"]
    return {"num_samples": sample["num_samples"], "sampler": sample["sampler"], "seed": sample["seed"],
            "extractor_id": prepare["extractor_id"], "reference_data_fingerprint": prepare["fingerprint"],
            "reference_split": f"{context.config.data.split} minus {context.config.data.holdout_fraction:g} hold-out",
            "reference_count": prepare["reference_count"]}


def protocol_hash(value: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def run(context: StageContext) -> dict[str, Any]:
    from pipelines.ray_env import runtime_env

    store, config = context.store, context.config
    prepare = context.upstream["prepare"]["outputs"]
    options, env = store.options, runtime_env()
    reference = FeatureStatistics.from_dict(torch.load(io.BytesIO(read_committed(prepare["reference_stats_uri"], ["stats.pt"], options)[0]["stats.pt"]), weights_only=True))
    shard_uris = context.output_of("sample", "shard_uris")
    fid = frechet_distance_from_stats(merged_statistics(shard_uris, prepare["extractor_uri"], options, env), reference)
    the_protocol = protocol(context)
    metrics = {"fid": fid}
    if prepare.get("fid_holdout_vs_train") is not None:
        metrics["fid_holdout_vs_train"] = prepare["fid_holdout_vs_train"]
    if config.evaluate.untrained_baseline:
        context.log("evaluate: sampling an untrained network under the same protocol for the baseline FID")
        sample = context.upstream["sample"]["outputs"]
        baseline_uris = sample_to_shards(context.output_of("train", "initial_snapshot_uri"), f"{context.work_uri('evaluate')}/untrained_shards",
                                         sample["num_samples"], config.sample.batch_size, sample["sampler"], sample["seed"],
                                         config.sample.num_workers, context.output_of("train", "use_gpu"), options, context.log, env)
        metrics["fid_untrained"] = frechet_distance_from_stats(merged_statistics(baseline_uris, prepare["extractor_uri"], options, env), reference)

    shards_for_grid = max(1, -(-config.evaluate.grid_size // config.sample.batch_size))  # ceil
    images = np.concatenate([read_shard_images(uri, options) for uri in shard_uris[:shards_for_grid]])
    grid_uri = f"{store.stage_uri('evaluate')}/samples.png"
    save_grid(images[: config.evaluate.grid_size], grid_uri, columns=10, storage_options=options)
    client = context.client
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "samples.png")
        grid(images[: config.evaluate.grid_size], columns=10).save(path)
        client.log_artifact(context.mlflow_run_id, path)
    for key, value in metrics.items():
        client.log_metric(context.mlflow_run_id, key, value)
    flat = {"protocol.num_samples": the_protocol["num_samples"], "protocol.seed": the_protocol["seed"],
            "protocol.extractor_id": the_protocol["extractor_id"], "protocol.reference_data_fingerprint": the_protocol["reference_data_fingerprint"],
            "protocol.reference_split": the_protocol["reference_split"], "protocol.reference_count": the_protocol["reference_count"],
            **{f"protocol.sampler.{k}": v for k, v in the_protocol["sampler"].items()}}
    for key, value in flat.items():
        client.log_param(context.mlflow_run_id, key, str(value))
    digest = protocol_hash(the_protocol)
    client.set_tag(context.mlflow_run_id, "fid.protocol_hash", digest)
    client.set_tag(context.mlflow_run_id, "fid.extractor", f"{the_protocol['extractor_id']} (CNN classifier trained on the data set's labels)")
    context.log(f"evaluate: FID {fid:.3f} ({the_protocol['num_samples']} samples, {the_protocol['sampler']['method']} "
                f"{the_protocol['sampler']['num_steps']} steps, extractor {the_protocol['extractor_id']})"
                + (f"; untrained network: {metrics['fid_untrained']:.3f}" if "fid_untrained" in metrics else "")
                + (f"; hold-out real images: {metrics['fid_holdout_vs_train']:.3f}" if "fid_holdout_vs_train" in metrics else ""))
    return {**metrics, "protocol": the_protocol, "protocol_hash": digest, "grid_uri": grid_uri}
