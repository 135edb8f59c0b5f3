"""What asks the training workers to act at a step boundary, besides their schedule: a stop the driver asks for (a
signal: pipelines.interruption), and a node of the group about to be preempted.

The driver commits a marker at ``TrainJob.stop_uri`` (storage is the one channel every worker shares, on any number
of nodes); rank 0 looks for it in a background thread, and at every step boundary the ranks agree with one
all-reduce of two flags, so that all of them act at the same step. The second flag says that it is time to ask Ray
Train whether a node of the group is being drained (a spot reclaim or a Kubernetes eviction: SIGTERM to the node's
``ray start``, which gives its workers a deadline, 30 s by default): every rank asks at the same step, as
``ray.train.get_preemption_info`` is collective. On a notice the group checkpoints at once, trains on, and
checkpoints once more :data:`LAST_CALL_S` before the deadline; when the node goes, Ray Train restarts the group from
that last checkpoint, so a preemption costs at most the steps of those last seconds, where a node lost without
notice costs everything since the last scheduled checkpoint.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from ray.train import PreemptionInfo

from ddpm_core.storage import commit, filesystem, is_committed
from pipelines.training.job import TrainJob
from pipelines.training.state import Worker

POLL_S = 0.2  # how often rank 0 looks for the marker (a local stat, or one S3 HEAD request)
PREEMPTION_POLL_S = 2.0  # how often the group asks Ray Train for a preemption notice (a broadcast among the workers)
LAST_CALL_S = 10.0  # before a preemption deadline: time enough to write a checkpoint to an object store
REQUESTED = "requested.txt"


def request_stop(job: TrainJob, why: str) -> None:
    """The driver's side: ask ``job``'s workers to checkpoint at their next step and leave."""
    commit(job.stop_uri, {REQUESTED: why.encode()}, {}, job.storage_options)


def ask_to_stop(job: TrainJob) -> None:
    """A signal's safe point: the workers checkpoint at their next step and leave (asked from a thread of its own, as
    this runs in a signal handler)."""
    threading.Thread(target=request_stop, args=(job, "a signal to the driver"), daemon=True).start()


def clear_stop(job: TrainJob) -> None:
    """Remove a marker an earlier, stopped attempt left, before the workers start."""
    fs, path = filesystem(job.stop_uri, job.storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@dataclass(frozen=True)
class Agreed:
    """What every rank decided at one step boundary (the same on all)."""

    stop: bool  # the driver asked the run to stop: checkpoint this step and leave
    look_for_preemption: bool  # ask Ray Train now whether a node of the group is being preempted
    last_call: bool  # a noticed preemption is due within LAST_CALL_S: checkpoint this step


class StopWatch:
    """Whether the worker group was asked to stop or should look for a preemption notice, agreed by every rank
    (:meth:`agreed`, one call per step on every rank, in step)."""

    def __init__(self, job: TrainJob, worker: Worker) -> None:
        self.seen = threading.Event()
        self.rank = worker.rank
        self.multi = worker.world_size > 1 and dist.is_initialized()
        # Flags on the CPU: with NCCL, through a gloo group of their own, so that no step waits for the GPU.
        self.group: Any = dist.new_group(backend="gloo") if self.multi and dist.get_backend() != "gloo" else None
        self.looked_at, self.noticed = time.monotonic(), False
        self.deadline: float | None = None  # of a noticed preemption (UNIX seconds), until its last call was agreed
        if worker.rank == 0:
            threading.Thread(target=self.watch, args=(job,), daemon=True, name="stop-watch").start()

    def watch(self, job: TrainJob) -> None:
        """Rank 0's thread: look for the marker every :data:`POLL_S` until it is there."""
        failing = False
        while not self.seen.wait(POLL_S):
            try:
                if is_committed(job.stop_uri, job.storage_options):
                    self.seen.set()
                failing = False
            except Exception as error:  # storage slow or away for a moment: look again; training goes on
                if not failing:
                    print(f"train: cannot look for a stop request now ({type(error).__name__})", flush=True)
                failing = True

    def agreed(self) -> Agreed:
        """The stop (any rank saw the marker), whether to look for a preemption notice (rank 0's clock says it is
        time, once per :data:`PREEMPTION_POLL_S`, until a notice came) and whether a noticed preemption's last call
        has come (rank 0's clock): the same answers on every rank."""
        due = self.rank == 0 and not self.noticed and time.monotonic() - self.looked_at >= PREEMPTION_POLL_S
        last_call = self.rank == 0 and self.deadline is not None and self.deadline - time.time() <= LAST_CALL_S
        flags = torch.tensor([float(self.seen.is_set()), float(due), float(last_call)])  # [3] on the CPU
        if self.multi:
            dist.all_reduce(flags, group=self.group)
        agreed = Agreed(*(bool(flag > 0) for flag in flags))
        if agreed.last_call:
            self.deadline = None  # one last call per notice
        return agreed

    def preemption_notice(self) -> PreemptionInfo | None:
        """Ray Train's notice that a node of the group is about to go (every rank calls this at the same step, when
        :meth:`agreed` says so); a notice is taken once per worker group, and its deadline kept for the last call."""
        self.looked_at = time.monotonic()
        notice = ray.train.get_preemption_info()
        if notice is not None:
            self.noticed = True
            self.deadline = notice.deadline_ms / 1000 if notice.deadline_ms else None
        return notice
