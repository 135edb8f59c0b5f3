"""Sampling a snapshot into committed shards with Ray actors (one per GPU, or CPU workers): the sample stage's work,
and the evaluate stage's for its baseline and champion sample sets.

Image i uses the noise stream seeded by (seed, i), and from a class-conditional model the class
``classes[i mod K]``, so the images do not depend on the number of workers; each shard is committed with a manifest
(:mod:`pipelines.data.shards`), and a restart skips the shards already committed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
import torch

from ddpm_core.samplers import SamplerConfig
from ddpm_core.storage import is_committed, verify_committed
from pipelines.advice import out_of_memory_advice, slow_precision_advice
from pipelines.contracts import Conditioning, NetworkExecution, SampleOutputs
from pipelines.data.shards import sample_shard_uris, write_sample_shard
from pipelines.execution import Demand, Execution, check_fits

LONG_SAMPLING_S = 12 * 3600  # a sampling plan that would take longer than this is announced as such


@dataclass(frozen=True)
class SampleRequest:
    """A sample set: images ``0..num_samples-1`` of a snapshot, in shards of ``shard_size``."""

    snapshot_uri: str
    out_uri: str  # the shards go to {out_uri}/shard-NNNNN
    num_samples: int
    shard_size: int
    num_workers: int  # sampling actors
    sampler: SamplerConfig
    seed: int
    network: NetworkExecution
    conditioning: Conditioning | None = None  # a class-conditional snapshot: classes and guidance scale

    @classmethod
    def like(cls, sampled: SampleOutputs, snapshot_uri: str, out_uri: str) -> SampleRequest:
        """The sample stage's request for another snapshot: the same images under the same protocol."""
        return cls(
            snapshot_uri,
            out_uri,
            sampled.num_samples,
            sampled.shard_size,
            sampled.num_workers,
            sampled.sampler,
            sampled.seed,
            sampled.execution,
            sampled.conditioning,
        )


@ray.remote
class SampleWorker:
    """Holds one copy of the network; samples shards of indices and commits each."""

    def __init__(self, request: SampleRequest, storage_options: dict[str, object]) -> None:
        from ddpm_core.checkpoint import load_snapshot
        from ddpm_core.diffusion import GaussianDiffusion
        from ddpm_core.precision import autocast_dtype
        from ddpm_core.samplers import fast_sampling_network, limited_classifier_free_guidance

        snapshot = load_snapshot(request.snapshot_uri, storage_options)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        advice = slow_precision_advice(request.network.precision, self.device.type, "sample.bf16_on_cpu")
        if advice:
            print(f"sample: {advice}", flush=True)
        autocast = autocast_dtype(request.network.precision)
        self.model = snapshot.sampling_model(  # guided by a weaker model where the snapshot stores one: 2 calls a step
            lambda network: fast_sampling_network(network.to(self.device), autocast, request.network.compile)
        )
        self.diffusion = GaussianDiffusion.from_config(snapshot.diffusion)
        conditioning = request.conditioning
        if conditioning is not None:  # one network call of 2B images per step where guided
            self.model = limited_classifier_free_guidance(
                self.model,
                conditioning.guidance_scale,
                conditioning.null_class,
                snapshot.unet.in_channels,
                self.diffusion.alphas_cumprod,
                conditioning.interval,
            )
        self.shape = (snapshot.unet.in_channels, snapshot.unet.image_size, snapshot.unet.image_size)
        self.to_images = snapshot.image_decoder(storage_options)  # a latent model's decoder, else the identity
        self.request, self.storage_options = request, storage_options

    def run_shard(self, uri: str, start: int, stop: int) -> tuple[int, float]:
        """Samples images ``start..stop-1`` and commits them; returns (images, seconds spent sampling)."""
        from ddpm_core.data import to_uint8
        from ddpm_core.samplers import PerIndexNoise, balanced_classes, sample

        started = time.perf_counter()
        conditioning = self.request.conditioning
        labels = None if conditioning is None else balanced_classes(range(start, stop), conditioning.classes)  # [n]
        kwargs = None if labels is None else {"class_labels": labels.to(self.device)}
        with out_of_memory_advice(
            f"sampling {stop - start} images at once on {self.device}", f"lower sample.batch_size (now {stop - start})"
        ):
            noise = PerIndexNoise(self.request.seed, range(start, stop), self.device)
            result = sample(self.model, self.diffusion, self.shape, noise, self.request.sampler, kwargs)
        images = to_uint8(self.to_images(result.samples))  # [n, H, W, C] uint8
        seconds = time.perf_counter() - started
        shard_labels = None if labels is None else labels.numpy()
        write_sample_shard(uri, images, start, self.request.seed, self.storage_options, shard_labels)
        return stop - start, seconds


def sample_to_shards(
    request: SampleRequest, execution: Execution, log: Callable[[str], None]
) -> tuple[list[str], float]:
    """Sample the request's images into committed shards; returns every shard URI and the sampling compute time
    (seconds inside the sampler, summed over shards, divided by the number of actors)."""
    shards = sample_shard_uris(request.out_uri, request.num_samples, request.shard_size)
    pending = [shard for shard in shards if not is_committed(shard[0], execution.storage_options)]
    if len(pending) < len(shards):
        log(f"sample: {len(shards) - len(pending)} of {len(shards)} shards already committed, skipping them")
    if not pending:
        return [uri for uri, _, _ in shards], 0.0
    verify_committed(request.snapshot_uri, execution.storage_options)  # here, not as a failure inside every actor
    actors = min(request.num_workers, len(pending))
    demand = Demand(f"{actors} sampling actors", {execution.resource: float(actors)}, "sample.num_workers")
    check_fits(demand, execution, log)
    # a dead actor is restarted and its shard re-run from the start: a shard is committed whole or not at all, and
    # image i depends only on (seed, i); when the pool ends their CPUs or GPUs are free for the evaluate stage
    with execution.actor_pool(SampleWorker, actors, request, execution.storage_options) as pool:
        busy = run_shards(pool, pending, log)
    return [uri for uri, _, _ in shards], busy / actors


def run_shards(pool: ray.util.ActorPool, pending: list[tuple[str, int, int]], log: Callable[[str], None]) -> float:
    """Each pending shard ``(uri, start, stop)`` sampled by the pool's actors, with progress and the ETA logged;
    returns the seconds spent inside the sampler, summed over shards."""
    start, done_images, todo_images, busy = time.time(), 0, sum(stop - begin for _, begin, stop in pending), 0.0
    warned = False
    for finished, seconds in pool.map_unordered(lambda worker, shard: worker.run_shard.remote(*shard), pending):
        done_images, busy = done_images + finished, busy + seconds
        rate = done_images / (time.time() - start)
        eta = (todo_images - done_images) / rate
        log(f"sample: {done_images}/{todo_images} images ({rate:.1f} img/s, ETA {eta:.0f} s)")
        if eta > LONG_SAMPLING_S and not warned:
            warned = True
            log(
                f"sample: warning: at this rate the remaining {todo_images - done_images} images take about "
                f"{eta / 3600:.0f} h: lower sample.num_samples or sample.num_steps, or add actors (sample.num_workers)"
            )
    return busy
