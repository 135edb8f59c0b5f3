"""sample: draw N images from the EMA snapshot with Ray actors (one per GPU, or CPU workers). Image i uses the
noise stream seeded by (seed, i), so the images do not depend on the number of workers; each shard is committed
with a manifest, and a restarted stage skips the shards already committed."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import ray

from ddpm_core.storage import is_committed
from pipelines.stages.context import StageContext, out_of_memory_advice, slow_precision_advice


@ray.remote
class SampleWorker:
    """Holds one copy of the network; samples shards of indices and commits each as ``images.npy``.
    ``execution`` is :meth:`SampleSection.execution`: the precision and whether the network is compiled."""

    def __init__(self, snapshot_uri: str, sampler: dict[str, Any], execution: dict[str, Any], seed: int,
                 storage_options: dict[str, Any]) -> None:
        import torch

        from ddpm_core.checkpoint import load_snapshot
        from ddpm_core.diffusion import GaussianDiffusion
        from ddpm_core.precision import autocast_dtype
        from ddpm_core.samplers import SamplerConfig, fast_sampling_network

        snapshot = load_snapshot(snapshot_uri, storage_options)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        advice = slow_precision_advice(execution["precision"], self.device.type, "sample.bf16_on_cpu")
        if advice:
            print(f"sample: {advice}", flush=True)
        autocast = autocast_dtype(execution["precision"])
        self.model = fast_sampling_network(snapshot.build_model().to(self.device), autocast, execution["compile"])
        self.diffusion = GaussianDiffusion.from_config(snapshot.diffusion)
        self.shape = (snapshot.unet.in_channels, snapshot.unet.image_size, snapshot.unet.image_size)
        self.sampler, self.seed, self.storage_options = SamplerConfig(**sampler), seed, storage_options

    def run_shard(self, uri: str, start: int, stop: int) -> tuple[int, float]:
        """Samples images ``start..stop-1`` and commits them; returns (images, seconds spent sampling)."""
        import io

        from ddpm_core.data import to_uint8
        from ddpm_core.samplers import PerIndexNoise, sample
        from ddpm_core.storage import commit

        started = time.perf_counter()
        with out_of_memory_advice(f"sampling {stop - start} images at once on {self.device}",
                                  f"lower sample.batch_size (now {stop - start})"):
            result = sample(self.model, self.diffusion, self.shape, PerIndexNoise(self.seed, range(start, stop), self.device),
                            self.sampler)
        buffer = io.BytesIO()
        np.save(buffer, to_uint8(result.samples))  # [n, H, W, C] uint8
        seconds = time.perf_counter() - started
        commit(uri, {"images.npy": buffer.getvalue()}, {"start": start, "stop": stop, "seed": self.seed}, self.storage_options)
        return stop - start, seconds


def shard_uris(root: str, num_samples: int, shard_size: int) -> list[tuple[str, int, int]]:
    return [(f"{root}/shard-{start // shard_size:05d}", start, min(start + shard_size, num_samples))
            for start in range(0, num_samples, shard_size)]


def sample_to_shards(snapshot_uri: str, out_uri: str, num_samples: int, shard_size: int, sampler: dict[str, Any],
                     execution: dict[str, Any], seed: int, num_workers: int, use_gpu: bool, storage_options: dict[str, Any],
                     log: Callable[[str], None], runtime_env: dict[str, Any]) -> tuple[list[str], float]:
    """Sample ``num_samples`` images into committed shards under ``out_uri``; returns every shard URI and the
    sampling compute time (seconds inside the sampler, summed over shards, divided by the number of actors)."""
    shards = shard_uris(out_uri, num_samples, shard_size)
    pending = [shard for shard in shards if not is_committed(shard[0], storage_options)]
    if len(pending) < len(shards):
        log(f"sample: {len(shards) - len(pending)} of {len(shards)} shards already committed, skipping them")
    if not pending:
        return [uri for uri, _, _ in shards], 0.0
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    workers = [SampleWorker.options(**resources, runtime_env=runtime_env).remote(snapshot_uri, sampler, execution, seed, storage_options)
               for _ in range(min(num_workers, len(pending)))]
    pool = ray.util.ActorPool(workers)
    start, done_images, todo_images, busy = time.time(), 0, sum(stop - begin for _, begin, stop in pending), 0.0
    for finished, seconds in pool.map_unordered(lambda worker, shard: worker.run_shard.remote(*shard), pending):
        done_images, busy = done_images + finished, busy + seconds
        elapsed = time.time() - start
        eta = elapsed / done_images * (todo_images - done_images)
        log(f"sample: {done_images}/{todo_images} images ({done_images / elapsed:.1f} img/s, ETA {eta:.0f} s)")
    for worker in workers:
        ray.kill(worker)
    return [uri for uri, _, _ in shards], busy / len(workers)


def run(context: StageContext) -> dict[str, Any]:
    from pipelines.ray_env import runtime_env

    config = context.config.sample
    use_gpu = context.output_of("train", "use_gpu")
    execution = config.execution(use_gpu)
    uris, sampling_seconds = sample_to_shards(context.output_of("train", "snapshot_uri"), f"{context.work_uri('sample')}/shards",
                            config.num_samples, config.batch_size, config.sampler().to_dict(), execution, config.seed,
                            config.num_workers, use_gpu, context.store.options, context.log, runtime_env())
    context.client.log_metric(context.mlflow_run_id, "num_samples", config.num_samples)
    return {"shard_uris": uris, "num_samples": config.num_samples, "sampler": config.sampler().to_dict(), "seed": config.seed,
            "execution": execution, "sampling_seconds": sampling_seconds}
