"""A Ray cluster of several nodes: what the config must give every node (checked when the job joins the cluster,
before any stage), and where Ray places the training workers."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ddpm_core.storage import MANIFEST
from pipelines.config import ConfigError, PipelineConfig, Placement
from pipelines.config_file import load_config
from pipelines.nodes import ClusterShape, check_reach
from pipelines.typed import marked_keys
from tests.cluster import FAST_HEALTH_CHECKS, ClusterNode, RayCluster, ray_cluster
from tests.services import REPO, mlflow_server, start_job, submit

ONE = ClusterShape(nodes=1, hosts=1, resources=({"CPU": 2.0},))
THREE = ClusterShape(nodes=3, hosts=1, resources=({"CPU": 1.0},) * 3)  # the tests' cluster: three nodes, one host
MACHINES = ClusterShape(nodes=3, hosts=3, resources=({"CPU": 1.0},) * 3)
SERVER = "mlflow.tracking_uri=http://mlflow.internal:5000"
S3 = ["storage.root=s3://bucket/runs", "storage.endpoint_url=http://minio.internal:9000", SERVER]


def refused(shape: ClusterShape, overrides: list[str], autoscaling: bool = False) -> str:
    with pytest.raises(ConfigError) as caught:
        check_reach(load_config(None, overrides), shape, autoscaling)
    return str(caught.value)


def test_one_node_takes_local_paths_and_sqlite():
    check_reach(load_config(None, ["storage.root=/tmp/runs", "mlflow.tracking_uri=sqlite:////tmp/m.db"]), ONE, False)


def test_a_local_root_on_several_nodes_is_refused_naming_the_key_and_both_fixes():
    message = refused(THREE, ["storage.root=/tmp/runs", SERVER])
    assert "3 nodes" in message and "storage.root '/tmp/runs' is a local path" in message
    assert "s3://" in message and "storage.shared_filesystem: true" in message
    assert "mlflow" not in message.split("\n", 1)[1]  # only what is wrong is named
    # an autoscaling cluster of one node adds nodes: the same rule
    assert "storage.root" in refused(ONE, ["storage.root=/tmp/runs", SERVER], autoscaling=True)


def test_a_declared_shared_mount_is_taken_but_a_sqlite_store_and_memory_never():
    shared = ["storage.root=/mnt/nfs/runs", "storage.shared_filesystem=true", "data.uri=/mnt/nfs/digits"]
    check_reach(load_config(None, [*shared, SERVER]), THREE, False)
    message = refused(THREE, [*shared, "mlflow.tracking_uri=sqlite:////mnt/nfs/mlflow.db"])
    assert "mlflow.tracking_uri" in message and "tracking server" in message and "storage.root" not in message
    assert "lives in this process" in refused(THREE, ["storage.root=memory://runs", "storage.shared_filesystem=true"])


def test_every_local_path_a_worker_opens_is_named():
    message = refused(
        THREE,
        [*S3, "data.uri=/data/images", "train.init_from=/models/snap", "evaluate.inception_weights_uri=/w/pt.pth"],
    )
    for key in ("data.uri '/data/images'", "train.init_from '/models/snap'", "evaluate.inception_weights_uri"):
        assert key in message, message
    assert "data.prepare_on=driver" in message
    latent = ["autoencoder.weights_sha256=0123456789ab", "evaluate.nll=false", "train.ema_sigma_rel=0.05"]
    message = refused(THREE, [*S3, *latent, "sample.clip_denoised=false", "autoencoder.weights_uri=/w/vae"])
    assert "autoencoder.weights_uri '/w/vae'" in message, message
    # read on the driver, written to storage.root: fine
    check_reach(load_config(None, [*S3, "data.uri=/data/images", "data.prepare_on=driver"]), THREE, False)
    check_reach(load_config(None, [*S3, "data.uri=builtin:digits"]), THREE, False)  # bundled: on every node


def test_the_paths_workers_open_are_found_by_their_mark():
    """What the check reads comes from the config's fields marked ``metadata=WORKER_PATH``, not a list in
    pipelines/nodes.py: a new field that workers open is checked once it is marked."""
    assert marked_keys(PipelineConfig, "worker_path") == {
        "storage.root",
        "data.uri",
        "train.init_from",
        "evaluate.inception_weights_uri",
        "autoencoder.weights_uri",
    }


def test_loopback_addresses_are_refused_only_across_machines():
    loopback = ["storage.root=s3://bucket/runs", "storage.endpoint_url=http://127.0.0.1:9000", SERVER]
    check_reach(load_config(None, loopback), THREE, False)  # three nodes of one machine share its loopback
    message = refused(MACHINES, loopback)
    assert "on 3 machines" in message and "storage.endpoint_url (or AWS_ENDPOINT_URL) names 127.0.0.1" in message


def test_placement_takes_rays_names_in_any_case_and_refuses_others():
    assert load_config(None, []).train.placement is Placement.PACK
    assert load_config(None, ["train.placement=strict_spread"]).train.placement is Placement.STRICT_SPREAD
    with pytest.raises(ConfigError, match="train.placement 'WIDE' is not one of: PACK, SPREAD, STRICT_SPREAD"):
        load_config(None, ["train.placement=wide"])


# --- a real cluster: a head and two worker nodes on this machine, storage on S3 (moto), MLflow's server ------------

TOTAL = 12288  # room for a node loss past the second checkpoint and a resume from it
COMMON = [
    f"train.total_images={TOTAL}",
    "train.checkpoint_every_images=2048",
    "train.ema_snapshot_every_images=2048",  # the autoguidance guide (at 30%) after the first post-hoc snapshot
    "train.log_every_images=1024",
    "train.grid_every_images=0",
    "train.num_workers=2",
    "train.cpus_per_worker=0.5",
    "sample.num_samples=200",
    "sample.batch_size=50",
    "sample.num_workers=2",
    "sample.num_steps=10",
    "evaluate.classifier_epochs=2",
    "train.ema_choice_images=64",  # the post-hoc EMA choice on a small budget
    "train.ema_choice_timesteps=4",
    "evaluate.untrained_baseline=false",
    "evaluate.nll=false",
    "register.enabled=false",
    "mlflow.experiment=multinode",
]
# a SIGTERMed node drains for 20 s (Ray's default 30 s), Ray Train looks for drains every second (default 5 s), and
# gives up a worker-group start after 15 s (default 60 s: after a node loss it may first ask for the dead node's room)
NODE_ENV = {
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "20",
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15",
}


def progress_lines(total: int) -> re.Pattern[str]:
    """Rank 0's progress lines of a run of ``total`` images; the group: the images seen."""
    return re.compile(rf"train: (\d+)/{total} images")


PROGRESS = progress_lines(TOTAL)


@dataclass
class World:
    bucket: str
    s3: Any  # an s3fs filesystem on the moto server
    env: dict[str, str]  # clients' environment: S3 credentials and endpoint, the tracking server
    overrides: list[str]  # COMMON, storage and tracking
    cluster: RayCluster
    workdir: Path

    def run_root(self, run_id: str) -> str:
        return f"{self.bucket}/runs/{run_id}"

    def outputs(self, run_id: str, stage: str) -> dict[str, Any]:
        return self.stage_json(run_id, stage)["outputs"]

    def result(self, run_id: str) -> dict[str, Any]:
        """What must not depend on where the work ran: the stages' fingerprints, the EMA snapshot's hash, the FID
        and every sample shard's images."""
        self.s3.invalidate_cache()
        snapshot = self.outputs(run_id, "train")["snapshot_uri"].removeprefix("s3://")
        shards = self.outputs(run_id, "sample")["shard_uris"]
        return {
            "stages": json.loads(self.s3.cat_file(f"{self.run_root(run_id)}/run.json"))["stages"],
            "snapshot_sha256": hashlib.sha256(self.s3.cat_file(f"{snapshot}/model.safetensors")).hexdigest(),
            "fid": self.outputs(run_id, "evaluate")["scores"]["fid"],
            "shards": [
                hashlib.sha256(self.s3.cat_file(f"{uri.removeprefix('s3://')}/images.npy")).hexdigest()
                for uri in shards
            ],
        }

    def stage_json(self, run_id: str, stage: str) -> dict[str, Any]:
        fingerprint = json.loads(self.s3.cat_file(f"{self.run_root(run_id)}/run.json"))["stages"][stage]
        return json.loads(self.s3.cat_file(f"{self.run_root(run_id)}/{stage}/{fingerprint[:16]}/stage.json"))

    def losses(self, run_id: str) -> list[tuple[int, float]]:
        """The train run's logged ``loss`` (step: images seen), in the order it was logged, repeats included."""
        from mlflow.tracking import MlflowClient

        tracking_uri = next(o.split("=", 1)[1] for o in self.overrides if o.startswith("mlflow.tracking_uri="))
        train_run = self.stage_json(run_id, "train")["mlflow_run_id"]
        history = MlflowClient(tracking_uri).get_metric_history(train_run, "loss")
        return [(metric.step, metric.value) for metric in sorted(history, key=lambda m: (m.timestamp, m.step))]

    def shard_range(self, uri: str) -> tuple[int, int]:
        """The sample indices a committed shard holds, from its manifest."""
        manifest = json.loads(self.s3.cat_file(f"{uri.removeprefix('s3://')}/{MANIFEST}"))
        return int(manifest["metadata"]["start"]), int(manifest["metadata"]["stop"])

    def sample_images(self, run_id: str) -> np.ndarray:
        """A run's samples ``[N, H, W, C]`` uint8, in index order."""
        uris = sorted(self.outputs(run_id, "sample")["shard_uris"], key=lambda uri: self.shard_range(uri)[0])
        return np.concatenate(
            [np.load(io.BytesIO(self.s3.cat_file(f"{uri.removeprefix('s3://')}/images.npy"))) for uri in uris]
        )

    def progress_past(self, job: subprocess.Popen, log: Path, pattern: re.Pattern[str], after: int = 0) -> int:
        """Waits for a progress line after character ``after`` of the job's log; returns the images it shows."""
        deadline = time.time() + 600
        while not (found := pattern.findall(log.read_text()[after:])):
            assert job.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        return int(found[-1])

    def training_node_past(
        self, job: subprocess.Popen, log: Path, progress: re.Pattern[str], images: int
    ) -> ClusterNode:
        """Once the job's log shows training past ``images``, a worker node (not the head) that runs a training
        worker."""
        deadline = time.time() + 600
        while max([0, *map(int, progress.findall(log.read_text()))]) < images:
            assert job.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        running = {actor["node_id"] for actor in self.actors("RayTrainWorker") if actor["state"] == "ALIVE"}
        return next(node for node in self.cluster.workers if node.node_id in running)

    def actors(self, class_name: str) -> list[dict[str, Any]]:
        """The state API's actors of ``class_name`` (alive and dead) of this cluster."""
        return self._filtered("actors", "class_name", class_name)

    def job_actors(self, class_name: str, output: str) -> list[dict[str, Any]]:
        """The actors of ``class_name`` whose process ids a job's output names (``(RayTrainWorker pid=123)``)."""
        pids = {int(pid) for pid in re.findall(rf"\({class_name} pid=(\d+)\)", output)}
        return [actor for actor in self.actors(class_name) if actor.get("pid") in pids]

    def job_tasks(self, job_id: str) -> list[dict[str, Any]]:
        return self._filtered("tasks", "job_id", job_id)

    def tasks(self, name: str) -> list[dict[str, Any]]:
        return self._filtered("tasks", "name", name)

    def _filtered(self, kind: str, key: str, value: str) -> list[dict[str, Any]]:
        where = f"filter_keys={key}&filter_predicates=%3D&filter_values={value}"
        return self._state(f"{kind}?detail=true&limit=10000&{where}")

    def _state(self, query: str) -> list[dict[str, Any]]:
        request = urllib.request.Request(
            f"{self.cluster.dashboard}/api/v0/{query}",
            headers={"Authorization": f"Bearer {self.cluster.env['RAY_AUTH_TOKEN']}"},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.load(answer)["data"]["result"]["result"]


@pytest.fixture(scope="module")
def world(s3_endpoint, tmp_path_factory) -> Iterator[World]:
    """A bucket, MLflow's server (artifacts on S3), the run ``single`` done on one node (the job's own local Ray
    instance), and a cluster of a head and two worker nodes of 1 CPU each, with fast node-death detection."""
    import boto3
    import s3fs

    workdir = tmp_path_factory.mktemp("multinode")
    bucket = f"multinode-{uuid.uuid4().hex[:8]}"
    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        **{"region_name": "us-east-1", "aws_access_key_id": "testing", "aws_secret_access_key": "testing"},
    ).create_bucket(Bucket=bucket)
    env = {**os.environ, **credentials, "AWS_ENDPOINT_URL": s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    s3 = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_endpoint)
    with mlflow_server(workdir, f"s3://{bucket}/mlflow", env) as tracking_uri:
        overrides = [*COMMON, f"storage.root=s3://{bucket}/runs", f"mlflow.tracking_uri={tracking_uri}"]
        single = subprocess.run(
            [sys.executable, "-m", "pipelines", "run", "--config", "configs/digits.yaml", *overrides, "run_id=single"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert single.returncode == 0, single.stdout[-4000:] + single.stderr[-4000:]
        nodes_env = {**env, **NODE_ENV}
        with ray_cluster(workdir, nodes_env, nodes=(1, 1), head_cpus=1, head_env=FAST_HEALTH_CHECKS) as cluster:
            yield World(bucket, s3, env, overrides, cluster, workdir)


def node_of_each(records: list[dict[str, Any]]) -> set[str]:
    return {record["node_id"] for record in records if record.get("node_id")}


# an undisturbed cluster run (95 s): make test-all. In CI: the run below, whose node loss in training leaves the
# sampling actors and evaluation tasks two nodes, and which must equal the one-node run all the same
@pytest.mark.slow
def test_three_nodes_with_spread_workers_give_the_one_node_result(world):
    """``ray job submit`` to the head; the two training workers on two nodes (train.placement=SPREAD), sampling
    actors and evaluation tasks on more than one node; fingerprints, snapshot, FID and shards as on one node."""
    cluster = world.cluster
    assert len(cluster.nodes) == 3 and len({node.node_id for node in cluster.nodes}) == 3
    job = submit(
        cluster.dashboard,
        cluster.env,
        [*world.overrides, "run_id=multi", "train.placement=SPREAD"],
        world.workdir / "multi.log",
    )
    assert job.returncode == 0, job.stdout[-6000:]
    assert world.result("multi") == world.result("single")
    assert len(node_of_each(world.actors("RayTrainWorker"))) == 2  # SPREAD: one worker per node
    assert len(node_of_each(world.actors("SampleWorker"))) == 2
    assert len(node_of_each(world.tasks("FeatureWorker.summarize"))) >= 2


def test_a_node_lost_in_training_resumes_on_the_rest_to_the_same_weights(world):
    """``ray job submit`` to the head, the two training workers on two nodes (train.placement=SPREAD); a worker node
    killed (SIGKILL of every process of it) after the first checkpoint, while it runs a training worker: Ray Train
    restarts the worker group on the nodes left, from the last checkpoint; the sampling actors and evaluation tasks
    run on the two nodes left, and the run ends with the fingerprints, EMA snapshot, FID and shards of the
    uninterrupted one-node run."""
    cluster = world.cluster
    log = world.workdir / "lost.log"
    job = start_job(cluster.dashboard, cluster.env, [*world.overrides, "run_id=lost", "train.placement=SPREAD"], log)
    try:
        cluster.kill(world.training_node_past(job, log, PROGRESS, 4608))  # past the 2nd checkpoint
        job.wait(timeout=900)
    finally:
        job.kill()
    output = log.read_text()
    assert job.returncode == 0, output[-6000:]
    restarts = re.findall(r"train: worker group of 2 started at (\d+) images", output)
    assert len(restarts) == 2 and int(restarts[1]) > 0 and int(restarts[1]) % 2048 == 0, restarts  # a checkpoint
    assert world.result("lost") == world.result("single")
    # the cluster's actors and tasks: this run's, and in make test-all the undisturbed run's above too
    assert len(node_of_each(world.actors("RayTrainWorker"))) >= 2  # SPREAD: the first group's two on two nodes
    assert len(node_of_each(world.actors("SampleWorker"))) >= 2
    assert len(node_of_each(world.tasks("FeatureWorker.summarize"))) >= 2
    cluster.add_node()  # the cluster as it was, for whatever runs next


# another cluster run (170 s undisturbed): make test-all. In CI: node loss in training, above; image i independent of
# the actors in test_sampling
@pytest.mark.slow
def test_a_node_lost_while_sampling_loses_no_image_and_duplicates_none(world):
    """A worker node killed while a sampling actor on it works through 60 shards (after the first commits): Ray
    restarts the actor on a node with room and retries its shard; every index 0..2999 is in exactly one committed
    shard, and the first 200 images are the one-node run's (image i depends only on the snapshot, the seed and i)."""
    cluster, total = world.cluster, 3000
    log = world.workdir / "sampling-lost.log"
    overrides = [*world.overrides, "run_id=sampling-lost", f"sample.num_samples={total}", "sample.num_workers=2"]
    job = start_job(cluster.dashboard, cluster.env, overrides, log)
    try:
        world.progress_past(job, log, re.compile(rf"sample: (\d+)/{total} images"))  # a shard is committed
        workers = {node.node_id: node for node in cluster.workers}
        sampling = {a["node_id"]: a["actor_id"] for a in world.actors("SampleWorker") if a["state"] == "ALIVE"}
        victim = next(node for node in sampling if node in workers)
        cluster.kill(workers[victim])
        job.wait(timeout=900)
    finally:
        job.kill()
    output = log.read_text()
    assert job.returncode == 0, output[-6000:]
    finished = re.findall(rf"sample: (\d+)/{total} images", output)
    assert int(finished[-1]) == total and len(finished) == total // 50, output[-3000:]  # one line per shard
    restarted = next(a for a in world.actors("SampleWorker") if a["actor_id"] == sampling[victim])
    assert int(restarted["num_restarts"]) >= 1, restarted  # the lost actor came back elsewhere
    ranges = sorted(world.shard_range(uri) for uri in world.outputs("sampling-lost", "sample")["shard_uris"])
    assert [index for start, stop in ranges for index in range(start, stop)] == list(range(total))
    first = world.sample_images("sampling-lost")[:200]
    assert (first == world.sample_images("single")).all()
    cluster.add_node()


# another cluster run (make test-all): a streamed resume is in CI in tests/test_streaming_pipeline.py, node loss above
@pytest.mark.slow
def test_streamed_data_is_decoded_on_other_nodes_and_a_lost_node_resumes_at_the_exact_position(world):
    """``data.loader=stream``: the Ray Data decode tasks of each share's stream run on nodes other than the training
    workers' (Ray Data spreads its tasks); a worker node killed mid-training (its worker's stream with it) resumes
    every share's stream at the checkpoint's position (steps x images per share), so the run ends with the weights
    of the uninterrupted streamed run."""
    cluster, total = world.cluster, 8192  # streaming is slower: a shorter run
    streamed = [*world.overrides, "data.loader=stream", "data.decode_cpus=0.5", f"train.total_images={total}"]
    streamed.append("sample.autoguidance_weight=1")  # unguided: half the sampling, and the stream is the point
    reference = submit(cluster.dashboard, cluster.env, [*streamed, "run_id=streamed"], world.workdir / "streamed.log")
    assert reference.returncode == 0, reference.stdout[-6000:]
    trainers = world.job_actors("RayTrainWorker", reference.stdout)
    decoders = [task for task in world.job_tasks(trainers[0]["job_id"]) if "decode_pieces" in task["name"]]
    assert decoders and node_of_each(decoders) - node_of_each(trainers), (node_of_each(trainers), decoders[:2])
    log = world.workdir / "streamed-lost.log"
    job = start_job(cluster.dashboard, cluster.env, [*streamed, "run_id=streamed-lost", "train.placement=SPREAD"], log)
    try:
        progress = progress_lines(total)
        cluster.kill(world.training_node_past(job, log, progress, 4608))  # past the 2nd checkpoint
        job.wait(timeout=900)
    finally:
        job.kill()
    output = log.read_text()
    assert job.returncode == 0, output[-6000:]
    starts = re.findall(r"streaming the training split from image (\d+) of each share's order", output)  # rank 0's
    # each share's position: images seen / 2 shares, at a checkpoint past the first
    assert len(starts) == 2 and starts[0] == "0" and 2 * int(starts[1]) in (4096, 6144), starts
    result, expected = world.result("streamed-lost"), world.result("streamed")
    assert result["snapshot_sha256"] == expected["snapshot_sha256"] and result["fid"] == expected["fid"]
    cluster.add_node()


# a measurement of lost work, minutes (in make test-all); node loss and resume are in CI above
@pytest.mark.slow
def test_a_preempted_node_costs_the_last_seconds_not_a_checkpoint_interval(world):
    """SIGTERM to a worker node's ``ray start`` (what Kubernetes sends a pod, and a spot reclaim's shutdown): Ray
    drains the node with a deadline (20 s here, 30 s by default), Ray Train tells the workers, and they checkpoint
    at once and again LAST_CALL_S before the deadline, if the node is still there (in one CI run a notice gave 19 s
    and the node went before the last call; in another it lived past it); the group restarts on the
    other nodes from its latest checkpoint (the notice's, the last call's, or a scheduled one that came after them,
    which Ray Train may not have registered before the node went: a worker's report waits in a queue for the
    controller). A hard kill at the same moment would go back to the last scheduled checkpoint (every 16,384 images
    here): the images lost each way are printed."""
    cluster, total, every = world.cluster, 65536, 16384
    log = world.workdir / "preempted.log"
    overrides = [*world.overrides, "run_id=preempted", "train.placement=SPREAD", f"train.total_images={total}"]
    job = start_job(cluster.dashboard, cluster.env, [*overrides, f"train.checkpoint_every_images={every}"], log)
    progress = progress_lines(total)
    try:
        cluster.terminate(world.training_node_past(job, log, progress, 2560))  # ray start only: the node drains
        job.wait(timeout=900)
    finally:
        job.kill()
    output = log.read_text()
    assert job.returncode == 0, output[-6000:]
    noticed = re.search(r"is being preempted, \d+ s left: checkpoint recorded at (\d+) images", output)
    assert noticed, output[-6000:]
    last_call = re.search(r"\(last call\): checkpoint recorded at (\d+) images", output)  # absent: the node went first
    taken = int((last_call or noticed)[1])  # the last checkpoint the preemption made
    restarted_at = [int(n) for n in re.findall(r"worker group of 2 started at (\d+) images", output)]
    assert len(restarted_at) == 2, restarted_at
    before_restart = output[: output.index(f"worker group of 2 started at {restarted_at[1]} images")]
    reached = max(map(int, progress.findall(before_restart)))  # the last progress line of the drained group
    scheduled = ((reached - 1) // every) * every  # the last scheduled checkpoint surely written: a hard kill's resume
    # the group resumes from its latest checkpoint: the preemption's, or a scheduled one that came after it
    assert restarted_at[1] >= max(taken, scheduled), (restarted_at, taken, reached)
    print(
        f"preemption: noticed at {noticed[1]} images, last call {last_call[1] if last_call else 'none (node gone)'}; "
        f"trained to >= {reached} images; resumed at {restarted_at[1]} (lost <= "
        f"{reached - restarted_at[1]}); a hard kill would have resumed at {scheduled} (lost {reached - scheduled})"
    )
    cluster.add_node()


# two more cluster runs (the elastic one 181 s undisturbed): make test-all. In CI: one worker taking both shares
# equals two workers to the bit (test_elastic_math)
@pytest.mark.slow
def test_elastic_training_shrinks_to_one_worker_grows_back_and_ends_with_the_fixed_groups_weights(world):
    """``train.num_workers=[1, 2]`` with a whole CPU per worker: both worker nodes killed after the first checkpoint
    leave capacity for one worker (the head's CPU), and Ray Train's elastic group goes on with it from the last
    checkpoint instead of waiting; a node added then is found by the resize monitor (every 5 s here) and the group
    grows back to two. The global batch is the same two shares throughout (one worker takes both, its gradients
    accumulated), so the weights, the FID, the sample shards and every logged loss equal those of a fixed two-worker
    run of the same length exactly: the tolerance is zero, below any run-to-run noise."""
    cluster, total = world.cluster, 32768  # long enough for the group to shrink and grow back while it trains
    longer = [*world.overrides, f"train.total_images={total}"]
    fixed = submit(cluster.dashboard, cluster.env, [*longer, "run_id=fixed"], world.workdir / "fixed.log")
    assert fixed.returncode == 0, fixed.stdout[-6000:]
    log = world.workdir / "elastic.log"
    overrides = [*longer, "run_id=elastic", "train.num_workers=[1, 2]", "train.cpus_per_worker=1"]
    job = start_job(cluster.dashboard, cluster.env, [*overrides, "train.elastic_resize_interval_s=5"], log)
    started = re.compile(r"train: worker group of (\d) started at (\d+) images")
    try:
        world.training_node_past(job, log, progress_lines(total), 3072)  # past the first checkpoint
        for node in list(cluster.workers):  # the head's one CPU is left: room for one worker
            cluster.kill(node)
        shrunk_at = len(log.read_text())
        world.progress_past(job, log, re.compile(r"train: worker group of (1) started"), shrunk_at)
        cluster.add_node()  # while the one worker trains
        job.wait(timeout=900)
    finally:
        job.kill()
    output = log.read_text()
    assert job.returncode == 0, output[-6000:]
    groups = [(int(size), int(at)) for size, at in started.findall(output)]
    sizes = [size for size, _ in groups]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2 and sizes.index(1) < len(sizes) - 1, groups
    assert all(at % 2048 == 0 for _, at in groups[1:]), groups  # each restart from a checkpoint
    assert "2 shares of the batch per worker" in output  # the one worker took both shares
    assert world.stage_json("elastic", "train")["outputs"]["images_seen"] == total
    losses, elastic = dict(world.losses("fixed")), world.losses("elastic")
    assert {step for step, _ in elastic} == set(losses), "a loss at every log step of the fixed run, and no other"
    assert all(value == losses[step] for step, value in elastic), (losses, elastic)  # repeats: the restarts' windows
    same = ("snapshot_sha256", "fid", "shards")
    result, reference = world.result("elastic"), world.result("fixed")
    assert {key: result[key] for key in same} == {key: reference[key] for key in same}
    cluster.add_node()  # two worker nodes again, for whatever runs next


def test_a_local_root_on_the_cluster_is_refused_before_any_stage(world, tmp_path):
    """The driver joins the three-node cluster (RAY_ADDRESS) and refuses a local run root and a SQLite store at once,
    exit code 2, naming both keys and their fixes; no run folder, no MLflow store, no Ray work."""
    args = [
        *(sys.executable, "-m", "pipelines", "run", "--config", "configs/digits.yaml", *COMMON),
        *(f"storage.root={tmp_path / 'runs'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"),
    ]
    run = subprocess.run(args, cwd=REPO, env=world.cluster.env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(r"this Ray cluster has \d nodes", run.stderr) and "storage.shared_filesystem: true" in run.stderr
    assert "mlflow.tracking_uri" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    assert "[prepare]" not in run.stdout
