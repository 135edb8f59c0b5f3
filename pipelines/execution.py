"""Where a stage's Ray work runs: joining the cluster, the environment workers need, and one :class:`Execution` value
(storage options, runtime environment, device kind) handed to everything that starts Ray tasks or actors."""

from __future__ import annotations

import contextlib
import enum
import json
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.fs
import ray

from ddpm_core.storage import filesystem
from pipelines.config import ConfigError, PipelineConfig

# Settings that workers need and do not inherit from the driver (Ray starts them from the raylet's environment),
# passed in every task's runtime environment. Ray writes runtime environments to its logs in plain text: none of
# these is a secret.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_INSECURE_TLS",
)
# MLflow prints run links with the tracking URI, user info (a password) and all, unless told not to: the pipeline
# prints its own, redacted
QUIET_URLS = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
# Ray Train's controller checks on its workers every 2 s by default, and a fit returns only at the check after its
# workers finished: 0.5 s ends each fit (a training run, a Tune trial, an autoencoder) about 2.9 s sooner on a tiny
# run, for one cheap call per worker each half second. A check that goes unanswered still fails a worker only after
# RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (10 min). A value set in the driver's environment is kept.
TRAIN_CHECKS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
# Credentials are never put in a runtime environment's env_vars. Workers read them from their node's environment
# (an instance role or a secret mount on a real cluster); when the driver has them, they reach the job's workers
# through a worker-process setup hook (connect), which Ray keeps pickled with the job and never writes as text.
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


class Device(str, enum.Enum):
    """The kind of device the Ray workers of a stage compute on."""

    CPU = "cpu"
    GPU = "gpu"


RELEASE_DEADLINE_S = 10.0  # how long a stage waits for the resources of the actors it stopped
# An actor whose process or node dies is restarted (on any node with room) and its call re-run: every call returns or
# commits a whole result that depends only on its arguments, so a re-run changes nothing
ACTOR_RESTARTS = 3


@dataclass(frozen=True)
class Execution:
    """How a stage's Ray work runs (not what it computes)."""

    storage_options: dict[str, Any]  # fsspec options of the run root (credentials come from the environment)
    runtime_env: dict[str, Any]  # Ray runtime environment of every task, actor and training worker
    device: Device
    autoscaling: bool = False  # cluster.autoscaling: a demand larger than the cluster waits for nodes

    @property
    def use_gpu(self) -> bool:
        return self.device is Device.GPU

    def options(self) -> dict[str, Any]:
        """``.options(...)`` of a Ray task or actor: a GPU each on a GPU cluster, else a CPU, the runtime environment,
        and spread over the nodes that have room (Ray's default packs them onto the nodes it tried first)."""
        resources = {"num_gpus": 1} if self.use_gpu else {"num_cpus": 1}
        return {**resources, "runtime_env": self.runtime_env, "scheduling_strategy": "SPREAD"}

    def actor_options(self) -> dict[str, Any]:
        """:meth:`options` of an actor that a dead process or node restarts, its calls re-run (:data:`ACTOR_RESTARTS`).
        A stage's many short calls go to actors rather than tasks: Ray hands a queued task to a worker that just
        finished one, so short tasks end up on the node whose worker started first, whatever the strategy says."""
        return {**self.options(), "max_restarts": ACTOR_RESTARTS, "max_task_retries": ACTOR_RESTARTS}

    @property
    def resource(self) -> str:
        """The Ray resource one task or actor of :meth:`options` holds a unit of."""
        return "GPU" if self.use_gpu else "CPU"

    def free_slots(self) -> int:
        """How many actors of :meth:`options` the cluster has room for now."""
        return int(ray.available_resources().get(self.resource, 0.0))

    @contextlib.contextmanager
    def actor_pool(self, actor_class: Any, count: int, *args: Any) -> Iterator[ray.util.ActorPool]:
        """``count`` actors ``actor_class.remote(*args)`` made with :meth:`actor_options`, as a pool; when the block
        ends they are :meth:`release`d, and when it raises they are stopped without waiting for their resources."""
        actors = [actor_class.options(**self.actor_options()).remote(*args) for _ in range(count)]
        try:
            yield ray.util.ActorPool(actors)
        except BaseException:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            raise
        self.release(actors)

    def release(self, actors: Sequence[Any], deadline_s: float = RELEASE_DEADLINE_S) -> None:
        """Stop ``actors`` (each made with :meth:`options`) and wait, at most ``deadline_s``, until each has exited and
        the cluster shows its CPU or GPU free again: stopping only asks, and a stage that starts Ray work at once would
        otherwise find them taken and place all of it on the nodes that happen to have room. Each actor is asked to exit
        (``__ray_terminate__``: its worker sends its buffered task events on the way out, so Ray's state API and
        dashboard see its last calls start and end; ``ray.kill`` drops them), and killed only if it has not exited by
        the deadline: killing one on its way out makes the raylet report "A worker died or was killed ... unexpected
        system error" to the driver's log. The request is not retried: the actor's exit ends it, which a retried call
        would report to the driver's log as a failed task."""
        deadline = time.monotonic() + deadline_s
        free_before = ray.available_resources().get(self.resource, 0.0)
        exits = [actor.__ray_terminate__.options(max_task_retries=0).remote() for actor in actors]
        _, alive = ray.wait(exits, num_returns=len(exits), timeout=deadline_s)  # an exited actor's call errs at once
        wanted = min(free_before + len(exits) - len(alive), ray.cluster_resources().get(self.resource, 0.0))
        while ray.available_resources().get(self.resource, 0.0) < wanted and time.monotonic() < deadline:
            time.sleep(0.05)
        for actor, exit_call in zip(actors, exits, strict=True):
            if exit_call in alive:
                ray.kill(actor, no_restart=True)  # still alive past the deadline


@dataclass(frozen=True)
class Demand:
    """Resources one step of a stage needs at the same time, and the settings that size them."""

    what: str  # e.g. "2 training workers"
    resources: dict[str, float]  # Ray resource name -> amount, e.g. {"CPU": 2.0}
    settings: str  # the keys to change, e.g. "train.num_workers / train.cpus_per_worker"


class ClusterTooSmallError(ValueError):
    """A stage asks for more than the cluster has, on a cluster that does not add nodes."""


def check_fits(demand: Demand, execution: Execution, log: Callable[[str], None]) -> None:
    """Fail at once, with the numbers, when the cluster's total resources cannot ever hold ``demand`` (Ray would
    wait for them forever); on an autoscaling cluster only say that the stage waits for nodes."""
    total = ray.cluster_resources()
    short = {name: amount for name, amount in demand.resources.items() if amount > total.get(name, 0.0)}
    if not short:
        return
    numbers = ", ".join(
        f"{amount:g} {name} asked, the cluster has {total.get(name, 0.0):g}" for name, amount in short.items()
    )
    if execution.autoscaling:
        log(f"{demand.what}: {numbers}; waiting for the autoscaler to add nodes (cluster.autoscaling=true)")
        return
    raise ClusterTooSmallError(
        f"{demand.what} need more than this cluster has ({numbers}): lower {demand.settings}, or run on a larger "
        "cluster (cluster.autoscaling=true on one that adds nodes on demand)"
    )


def submitted_with_working_dir() -> bool:
    """Whether this driver runs under ``ray job submit --working-dir``: its working directory is then Ray's
    runtime-resources folder, which goes with the Ray session."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return False
    return bool((job.get("runtime_env") or {}).get("working_dir"))


def check_outputs_outlive_the_job(config: PipelineConfig) -> None:
    """Refuse, under a job submitted with a working directory, outputs that would be written inside it: a relative
    ``storage.root`` and the default (or a relative SQLite) MLflow store."""
    if not submitted_with_working_dir():
        return
    inside = []
    root = config.storage.root
    if "://" not in root and not os.path.isabs(os.path.expanduser(root)):
        inside.append(f"storage.root {root!r}")
    tracking = config.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking or (tracking.startswith("sqlite:///") and not tracking.startswith("sqlite:////")):
        inside.append(f"the MLflow store {tracking or 'sqlite:///mlflow.db (the default)'}")
    if inside:
        raise ConfigError(
            f"{' and '.join(inside)} would be written inside {os.getcwd()}, the working directory that "
            "`ray job submit --working-dir` gives the job and deletes with the Ray session: set storage.root to an "
            "absolute path or an s3:// URI, and mlflow.tracking_uri (or MLFLOW_TRACKING_URI) to a tracking server "
            "or an absolute sqlite://// path"
        )


def forwarded_env() -> dict[str, str]:
    return {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}


def runtime_env() -> dict[str, Any]:
    return {"env_vars": {**forwarded_env(), **QUIET_URLS}}


def connect() -> None:
    """Join the cluster RAY_ADDRESS names (``ray job submit`` sets it), else start a local instance for this job
    (:func:`ray_address`). Every worker of the job runs :func:`worker_setup`: the driver's credentials reach it
    through the hook, not through logged env_vars, and Ray's state API finds the worker's own cluster."""
    if ray.is_initialized():
        return
    credentials = {name: os.environ[name] for name in SECRET_ENV if name in os.environ}
    checks = train_checks(os.environ)
    os.environ.update(checks)  # a fit's controller has the environment of the process that calls fit: the driver's
    job_env: dict[str, Any] = {  # every worker of the job, Tune's trial actors and Ray Train's own actors included
        "env_vars": {**QUIET_URLS, **checks},  # a Tune trial calls fit in its own actor
        "worker_process_setup_hook": worker_setup(credentials),
    }
    ours = signal.getsignal(signal.SIGTERM)
    ray.init(address=ray_address(os.environ), log_to_driver=True, runtime_env=job_env)
    signal.signal(signal.SIGTERM, ours)  # ray.init sets sys.exit as the driver's (pipelines.interruption stops cleanly)


def train_checks(environ: Mapping[str, str]) -> dict[str, str]:
    """:data:`TRAIN_CHECKS`, each as ``environ`` sets it if it does."""
    return {name: environ.get(name, value) for name, value in TRAIN_CHECKS.items()}


def ray_address(environ: Mapping[str, str]) -> str:
    """Where this job's Ray runs: the cluster RAY_ADDRESS names, else ``"local"``, a new instance of its own. Ray's
    default (``address=None``) joins the instance whose address ``ray start`` left in
    ``/tmp/ray/ray_current_cluster`` (warning "Found multiple active Ray instances" when more run on the host), which
    may be another user's, or gone; the job never joins an instance it was not told to."""
    return environ.get("RAY_ADDRESS", "").strip() or "local"


def worker_setup(credentials: dict[str, str]) -> Callable[[], None]:
    """A worker-process setup hook: it sets ``credentials`` in a worker's environment (unless its node set them), and
    RAY_ADDRESS to the worker's own cluster (unless set). Ray's state API, which Ray Train's placement-group cleaner
    calls in its own actor, otherwise looks for the cluster among the host's processes, and raises "Found multiple
    active Ray instances" when a second pipeline's local instance runs on the host."""

    def set_up() -> None:
        for name, value in credentials.items():
            os.environ.setdefault(name, value)
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)

    return set_up


def cluster_device(use_gpu: bool | None) -> Device:
    """The device kind asked for (``train.use_gpu``), or GPUs when the cluster has them and nothing was asked."""
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    return Device.GPU if use_gpu else Device.CPU


def train_storage(uri: str, storage_options: dict[str, Any]) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(storage_path, storage_filesystem) for ``ray.train.RunConfig``: local paths as they are, other fsspec
    URIs through pyarrow's fsspec handler with the scheme stripped (as Ray expects)."""
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://"), None
    fs, path = filesystem(uri, storage_options)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
