"""The driver's side of training: a Ray Train ``TorchTrainer`` for a :class:`TrainJob`, running it, and what the
workers left for the driver (a divergence message, metrics kept during an MLflow outage)."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

from ddpm_core.checkpoint import CheckpointError
from ddpm_core.storage import IncompleteError, StorageUnavailableError, filesystem, is_committed, read_committed
from pipelines.config import Placement, TrainSection
from pipelines.context import StageContext, StageStopped
from pipelines.execution import Demand, Device, check_fits, train_storage
from pipelines.failures import find, storage_full
from pipelines.interruption import STOP
from pipelines.nodes import check_strict_spread
from pipelines.training.hooks import DIVERGED, PENDING_METRICS
from pipelines.training.job import TrainJob
from pipelines.training.loop import train_loop
from pipelines.training.stopping import ask_to_stop, clear_stop

T = TypeVar("T")


@dataclass(frozen=True)
class WorkerGroup:
    """The Ray Train worker group of one training run."""

    num_workers: int  # the most workers (the shares of the global batch)
    cpus_per_worker: float
    max_failures: int  # restarts from the last checkpoint after a worker fails
    startup_retries: int  # worker-group start attempts (60 s each) before failing
    placement: Placement = Placement.PACK  # how the workers' bundles spread over the nodes
    min_workers: int | None = None  # elastic: the fewest workers the group goes on with (None: fixed size)
    resize_interval_s: float = 60.0  # elastic: how often a running group looks for capacity to grow into

    @classmethod
    def of(cls, train: TrainSection) -> WorkerGroup:
        """The group ``train`` configures (``train.num_workers``, a number or ``[min, max]``, and how it runs)."""
        return cls(
            train.max_workers,
            train.cpus_per_worker,
            train.max_failures,
            train.startup_retries,
            train.placement,
            train.min_workers,
            train.elastic_resize_interval_s,
        )

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    def scaling(self) -> int | tuple[int, int]:
        """Ray Train's ``num_workers``: the number, or ``(min, max)`` for its elastic worker group."""
        return (self.min_workers or self.num_workers, self.num_workers) if self.elastic else self.num_workers

    def bundle(self, device: Device) -> dict[str, float]:
        """One worker's resources."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1.0} if device is Device.GPU else {})}

    def demand(
        self, device: Device, what: str, settings: str, extra_cpus: float = 0.0, decode_cpus: float = 0.0
    ) -> Demand:
        """What the group needs at once to start (all its workers, or an elastic group's fewest), plus ``extra_cpus``
        (e.g. a Tune trial's own actor) and a streamed split's decode task of ``decode_cpus``."""
        if decode_cpus:
            what, settings = f"{what} and a Ray Data decode task", f"{settings} / data.decode_cpus"
        workers = self.min_workers or self.num_workers
        cpus = {"CPU": workers * self.cpus_per_worker + extra_cpus + decode_cpus}
        return Demand(what, {**cpus, **({"GPU": float(workers)} if device is Device.GPU else {})}, settings)


def make_trainer(
    job: TrainJob,
    group: WorkerGroup,
    runtime_env: dict[str, Any],
    callbacks: list[Any] | None = None,
) -> TorchTrainer:
    """A trainer that runs :func:`train_loop` on ``group``, keeping its checkpoints under ``job.trainer_uri`` (so a
    re-run with the same job resumes from the latest)."""
    storage_path, storage_filesystem = train_storage(job.trainer_uri, job.storage_options)
    use_gpu = job.device is Device.GPU
    resources = group.bundle(job.device)
    return TorchTrainer(
        functools.partial(train_loop, job),
        # ray.train re-exports Train V2's ScalingConfig at run time (elastic (min, max) and its resize monitor)
        scaling_config=ScalingConfig(
            num_workers=group.scaling(),  # type: ignore[arg-type]
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=group.placement.value,
            elastic_resize_monitor_interval_s=group.resize_interval_s,  # type: ignore[call-arg]
        ),
        # ray.train re-exports Train V2's RunConfig and FailureConfig at run time; mypy sees the V1 classes.
        run_config=RunConfig(
            name="trainer",
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,  # type: ignore[call-arg]
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(
                max_failures=group.max_failures,  # type: ignore[call-arg]
                controller_failure_limit=group.startup_retries,
            ),
            worker_runtime_env=without_print_patch(runtime_env),
            callbacks=callbacks or [],
        ),
    )


def without_print_patch(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """The workers' runtime environment with Ray Train's print patch off: it sends each ``print`` both to the
    worker's (redirected) stdout and to a logger that prints it again, so every progress line reached the job's
    output twice."""
    env_vars = {**runtime_env.get("env_vars", {}), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    return {**runtime_env, "env_vars": env_vars}


def run_job(context: StageContext, job: TrainJob, workers: str, decode_cpus: float = 0.0) -> Result:
    """``job`` on its worker group, from the driver: fail early when the cluster can never hold the group (and a
    streamed split's decode task of ``decode_cpus``) or a strict spread, fit, and send the metrics the workers kept
    during an MLflow outage. ``workers`` names them in messages ("training workers"). Returns the final report; when
    a signal stopped the job (``STOP.requested``), the report of the checkpoint it stopped at, and the caller says
    where and calls ``STOP.check()``."""
    group, train = WorkerGroup.of(job.train), job.train
    execution = context.execution(job.device)
    what, keys = f"{train.min_workers} {workers}", "train.num_workers / train.cpus_per_worker"
    check_fits(group.demand(job.device, what, keys, decode_cpus=decode_cpus), execution, context.log)
    check_strict_spread(train.placement, group.bundle(job.device), train.min_workers, execution, context.log)
    with STOP.safe_point(lambda: ask_to_stop(job)):
        result = fit(make_trainer(job, group, execution.runtime_env), job)
    if not STOP.requested:
        send_pending_metrics(job, context.client, context.log)
    return result


def fit(trainer: TorchTrainer, job: TrainJob) -> Result:
    """``trainer.fit()``; raises the workers' error, or :class:`StageStopped` when they stopped because the loss
    diverged."""
    fs, diverged_path = filesystem(job.diverged_uri, job.storage_options)
    if fs.exists(diverged_path):  # from an earlier attempt with these settings
        fs.rm(diverged_path, recursive=True)
    clear_stop(job)
    set_aside_unreadable_record(job)
    try:
        result = off_the_main_thread(trainer.fit)  # raises the workers' error (TrainingFailedError), not returns it
    except Exception as error:
        named = named_failure(error, job)
        if named is None:
            raise
        raise named from error
    if is_committed(job.diverged_uri, job.storage_options):
        raise StageStopped(read_committed(job.diverged_uri, [DIVERGED], job.storage_options)[0][DIVERGED].decode())
    return result


def set_aside_unreadable_record(job: TrainJob) -> None:
    """Ray Train's record of a run's checkpoints (a JSON file it rewrites in place, not atomically) renamed aside
    when a full disk or a crash left it unreadable: Ray Train would refuse to start. The workers then resume from the
    newest readable committed checkpoint themselves (``state.starting_weights``)."""
    fs, path = filesystem(f"{job.trainer_uri}/trainer/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}", job.storage_options)
    try:
        json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return
    except ValueError:  # empty, truncated or garbled
        fs.mv(path, f"{path}.unreadable")
        print(
            f"train: Ray Train's checkpoint record {path} is unreadable; set aside, resuming from the checkpoints",
            flush=True,
        )


def off_the_main_thread(call: Callable[[], T]) -> T:
    """``call()`` in a thread of its own, waited for here: Ray Train V2's ``fit()`` replaces the main thread's SIGINT
    handler with one that aborts the run and exits 1, so the pipeline's (pipelines.interruption: checkpoint, then
    exit 130) would never run. A signal still reaches the main thread while it waits."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(call())
        except BaseException as error:  # handed to the waiting thread, which raises it
            failure.append(error)

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)  # ends with Ray at an interrupt
    thread.start()
    while thread.is_alive():
        thread.join(timeout=1.0)  # short waits: the main thread runs signal handlers between them
    if failure:
        raise failure[0]
    return outcome[0]


def named_failure(error: BaseException, job: TrainJob) -> Exception | None:
    """The failure a user can act on, found in the workers' errors: a full disk, a storage outage, or checkpoints
    that cannot be read (a corrupt committed file is left to the runner, which forgets it)."""
    full = storage_full(error)
    if full is not None:
        return StorageUnavailableError(
            f"training stopped: no room left on a disk it writes to ({full}), the run root {job.work_uri} or a "
            "worker's temporary folder. The last committed checkpoint is intact: free space (or enlarge the volume) "
            "and run the same command again; training resumes from it"
        )
    outage = find(error, StorageUnavailableError)
    if outage is not None:
        return StorageUnavailableError(str(outage))
    unreadable = find(error, CheckpointError)
    if unreadable is not None and find(error, IncompleteError) is None:
        return StageStopped(f"training stopped: {unreadable}")
    return None


def send_pending_metrics(job: TrainJob, client: MlflowClient, log: Callable[[str], None]) -> None:
    """Metrics a worker kept in storage during an MLflow outage: sent now (this fails if MLflow is still down)."""
    if not is_committed(job.pending_metrics_uri, job.storage_options):
        return
    kept = json.loads(
        read_committed(job.pending_metrics_uri, [PENDING_METRICS], job.storage_options)[0][PENDING_METRICS]
    )
    metrics = [Metric.from_dictionary(metric) for metric in kept]
    for start in range(0, len(metrics), 1000):
        client.log_batch(job.mlflow_run_id, metrics=metrics[start : start + 1000])
    fs, path = filesystem(job.pending_metrics_uri, job.storage_options)
    fs.rm(path, recursive=True)
    log(f"train: sent {len(metrics)} metrics kept during an MLflow outage")
