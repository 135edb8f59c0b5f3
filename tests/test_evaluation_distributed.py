"""Feature statistics computed over shards by a pool of Ray actors in worker processes (one call per shard) equal the
single-process statistics to float64 rounding; so do the Inception Score statistics and the precision/recall
features."""

import dataclasses
import io
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from ddpm_core.data import load_dataset
from ddpm_core.features import ClassifierExtractor, save_classifier, train_classifier
from ddpm_core.metrics import ClassProbabilityStatistics, FeatureStatistics
from ddpm_core.storage import commit
from pipelines.config import Extractor
from pipelines.data.shards import sample_sources
from pipelines.evaluation.scoring import ExtractorSpec, SummaryRequest, feature_workers, summarize
from pipelines.execution import Device, Execution

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_with_state_api():
    """conftest's local Ray instance (2 CPUs), with the dashboard that Ray's state API (``ray.util.state``) reads task
    records from; shut down at the end of the module as conftest's is."""
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    ray.init(
        num_cpus=2, include_dashboard=True, _temp_dir=temp_dir, runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}}
    )
    yield
    ray.shutdown()


def finished_tasks(function_name: str, count: int, timeout_s: float = 60.0) -> list:
    """Ray's records of the tasks of ``function_name`` (workers report task events about once a second), once
    ``count`` of them have finished."""
    from ray.util.state import list_tasks

    address = ray.get_runtime_context().gcs_address  # this test's cluster, whatever else runs on the machine
    deadline = time.monotonic() + timeout_s
    while True:
        tasks = list_tasks(
            address=address,
            filters=[("func_or_class_name", "=", function_name)],
            detail=True,
            raise_on_missing_output=True,
        )
        if sum(task.state == "FINISHED" for task in tasks) >= count or time.monotonic() > deadline:
            return tasks
        time.sleep(0.5)


def feature_actors() -> list:
    """Ray's records of this test cluster's feature actors (a killed actor's last task events may lack its process
    id; its actor record keeps it)."""
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address
    return list_actors(address=address, filters=[("class_name", "=", "FeatureWorker")], detail=True)


@dataclass(frozen=True)
class Shards:
    """900 digits in three committed sample shards of uneven sizes, and a classifier of them."""

    images: np.ndarray  # [900, H, W, C] uint8
    model: torch.nn.Module
    spec: ExtractorSpec  # the classifier, committed
    uris: list[str]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Shards:
    folder = tmp_path_factory.mktemp("shards")
    dataset = load_dataset("builtin:digits")
    images = dataset.images[:900]
    model = train_classifier(images, dataset.labels[:900], epochs=1)
    save_classifier(str(folder / "extractor"), model, {})
    uris = []
    for number, (start, stop) in enumerate(((0, 250), (250, 600), (600, 900))):  # uneven shards across IS splits
        buffer = io.BytesIO()
        np.save(buffer, images[start:stop])
        uri = str(folder / f"shard-{number}")
        commit(uri, {"images.npy": buffer.getvalue()}, {"start": start, "stop": stop})
        uris.append(uri)
    return Shards(images, model, ExtractorSpec(Extractor.CLASSIFIER, str(folder / "extractor")), uris)


def test_three_shards_on_ray_workers_equal_one_process(ray_with_state_api, shards):
    images, model, spec, shard_uris = shards.images, shards.model, shards.spec, shards.uris
    request = SummaryRequest(spec, len(images), inception_splits=10, keep_first=900)
    distributed = summarize(sample_sources(shard_uris, {}), request, Execution({}, {}, Device.CPU))
    # summarize called FeatureWorker.summarize once per shard (this module calls it nowhere else), each to
    # completion in a Ray worker process, not in this driver, on a pool of one actor per free CPU (two: each loaded
    # the extractor once); the actors' CPUs are free again when it returns
    tasks = finished_tasks("FeatureWorker.summarize", len(shard_uris))
    assert [(task.state, task.type) for task in tasks] == [("FINISHED", "ACTOR_TASK")] * len(shard_uris), tasks
    actors = feature_actors()
    assert {task.actor_id for task in tasks} == {actor.actor_id for actor in actors} and len(actors) == 2, actors
    assert all(actor.pid not in (None, os.getpid()) for actor in actors), actors
    assert ray.available_resources().get("CPU", 0.0) == 2.0

    # The merge adds nothing but float64 rounding: the three tasks' merged sums equal one pass over the same
    # features (returned here in index order).
    single = FeatureStatistics.from_features(distributed.first_features)
    assert distributed.fid.count == single.count == 900
    torch.testing.assert_close(distributed.fid.sum, single.sum, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(distributed.fid.sum_outer, single.sum_outer, rtol=1e-12, atol=1e-10)

    # The workers' features are this process's (float32 convolutions differ across processes only in rounding),
    # and the Inception Score statistics, split by global index, match one process over all logits.
    features, logits = ClassifierExtractor(model)(images)
    torch.testing.assert_close(distributed.first_features, features, rtol=1e-5, atol=1e-5)
    inception = ClassProbabilityStatistics.empty(900, 10, logits.shape[1])
    inception.update(logits, torch.arange(900))
    assert distributed.inception.inception_score() == pytest.approx(inception.inception_score(), rel=1e-6)


def test_summaries_on_held_workers_start_them_once_and_equal_summaries_on_pools_of_their_own(
    ray_with_state_api, shards
):
    """The evaluate stage computes its reference statistics, its training features and the summaries of its sample
    set and of the held-out images on one held pool: each worker's start (a process importing torch, loading the
    network) happens once, and every summary is the one a pool of its own gives, to the bit."""
    execution, sources = Execution({}, {}, Device.CPU), sample_sources(shards.uris, {})
    whole, first_two = SummaryRequest(shards.spec, 900, keep_first=900), SummaryRequest(shards.spec, 600, groups=3)
    started = len(feature_actors())
    alone = [summarize(sources, whole, execution), summarize(sources[:2], first_two, execution)]
    assert len(feature_actors()) == started + 4  # two pools of two actors, one per free CPU
    with feature_workers(shards.spec, len(sources), execution) as workers:
        held = [summarize(sources, whole, execution, workers), summarize(sources[:2], first_two, execution, workers)]
        other = dataclasses.replace(whole, spec=ExtractorSpec(Extractor.CLASSIFIER, "another-classifier"))
        with pytest.raises(ValueError, match="feature workers of .* were handed features to compute with"):
            summarize(sources, other, execution, workers)
    assert len(feature_actors()) == started + 6  # one pool of two for both summaries
    assert ray.available_resources().get("CPU", 0.0) == 2.0
    for mine, theirs in zip(held, alone, strict=True):
        assert torch.equal(mine.fid.sum, theirs.fid.sum) and torch.equal(mine.fid.sum_outer, theirs.fid.sum_outer)
        assert torch.equal(mine.first_features, theirs.first_features)
        assert sorted(mine.groups) == sorted(theirs.groups) and all(
            torch.equal(mine.groups[g].sum, theirs.groups[g].sum) for g in mine.groups
        )
    assert held[1].fid.count == 600 and sorted(held[1].groups) == [0, 1, 2]


@ray.remote
class Holder:
    def ready(self) -> bool:
        return True


def test_actors_a_stage_releases_leave_their_cpus_free_for_the_next_stages_tasks(ray_with_state_api):
    """``ray.kill`` only asks: a stage that ends with it hands the next one a cluster whose CPUs still look taken, and
    the next stage's tasks, spread over the nodes with room, land on one node (seen in the three-node test)."""
    execution = Execution({}, {}, Device.CPU)
    actors = [Holder.options(**execution.options()).remote() for _ in range(2)]  # type: ignore[attr-defined]
    assert ray.get([actor.ready.remote() for actor in actors]) == [True, True]
    assert ray.available_resources().get("CPU", 0.0) == 0.0
    started = time.monotonic()
    execution.release(actors)
    assert ray.available_resources().get("CPU", 0.0) == 2.0
    assert time.monotonic() - started < 5


@ray.remote(max_concurrency=2)
class Finishing:
    def ready(self) -> bool:
        return True

    def finish(self, seconds: float) -> str:
        time.sleep(seconds)
        return "finished"


def test_a_released_actor_exits_on_its_own_though_the_cluster_has_cpus_to_spare(ray_with_state_api):
    """One actor on a cluster with a CPU to spare, still finishing a call when its stage releases it: it is killed only
    past the deadline, not as soon as the cluster shows a free CPU (the spare one). Killed on its way out, its worker
    made the raylet print "A worker died or was killed ... unexpected system error" in the quickstart's output."""
    execution = Execution({}, {}, Device.CPU)
    actor = Finishing.options(**execution.options()).remote()  # type: ignore[attr-defined]
    assert ray.get(actor.ready.remote()) and ray.available_resources().get("CPU", 0.0) == 1.0
    call = actor.finish.remote(1.0)
    execution.release([actor])
    assert ray.get(call) == "finished"
    assert ray.available_resources().get("CPU", 0.0) == 2.0


@ray.remote
class Called:
    def ready(self) -> bool:
        return True


def test_a_released_actors_last_calls_are_recorded_with_their_start(ray_with_state_api):
    """Ray's state API (what benchmarks/pipeline_overhead.py and the dashboard read) learns when a call started from
    the actor's worker, which sends its task events once a second: ``ray.kill`` right after the last call dropped
    them (the e2e test then saw no sample call at all), an actor asked to exit sends them first."""
    from ray.util.state import list_tasks

    execution = Execution({}, {}, Device.CPU)
    for _ in range(3):
        actors = [Called.options(**execution.options()).remote() for _ in range(2)]  # type: ignore[attr-defined]
        assert ray.get([actor.ready.remote() for actor in actors]) == [True, True]
        execution.release(actors)
    address, deadline = ray.get_runtime_context().gcs_address, time.monotonic() + 30
    while True:  # the caller reports FINISHED about once a second too
        calls = [task for task in list_tasks(address=address, detail=True, limit=1000) if task.name == "Called.ready"]
        settled = len(calls) == 6 and all(task.start_time_ms and task.state == "FINISHED" for task in calls)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [(bool(task.start_time_ms), task.state) for task in calls] == [(True, "FINISHED")] * 6


RELEASE_SCRIPT = """
import time, ray
from pipelines.execution import Device, Execution

@ray.remote
class Called:
    def ready(self) -> bool:
        return True

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
with Execution({}, {}, Device.CPU).actor_pool(Called, 2) as pool:
    assert list(pool.map(lambda actor, _: actor.ready.remote(), range(4))) == [True] * 4
time.sleep(3)  # the raylet's messages reach the driver's log in batches
print("released", flush=True)
"""


def test_a_release_writes_no_failed_task_to_the_drivers_log(tmp_path):
    """A stage's actor pool, restartable (``max_task_retries``) as the sample and evaluate stages make it, released:
    its exit requests are not retried, so the driver's log (what a user of the quickstart reads) shows no "Task
    ...__ray_terminate__ failed ... will be retried" line for an exit that went as asked."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-c", RELEASE_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    said = result.stdout + result.stderr
    assert result.returncode == 0 and "released" in result.stdout, said[-3000:]
    assert "__ray_terminate__" not in said and "failed" not in said, said[-3000:]
