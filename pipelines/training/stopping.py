"""A stop the driver asks for (a signal: pipelines.interruption), seen by the training workers at a step boundary.

The driver commits a marker at ``TrainJob.stop_uri`` (storage is the one channel every worker shares, on any number
of nodes); rank 0 looks for it in a background thread, and at every step boundary the ranks agree with one
all-reduce of a flag, so that all of them checkpoint the same step and leave together.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.distributed as dist

from ddpm_core.storage import commit, filesystem, is_committed
from pipelines.training.job import TrainJob
from pipelines.training.state import Worker

POLL_S = 0.2  # how often rank 0 looks for the marker (a local stat, or one S3 HEAD request)
REQUESTED = "requested.txt"


def request_stop(job: TrainJob, why: str) -> None:
    """The driver's side: ask ``job``'s workers to checkpoint at their next step and leave."""
    commit(job.stop_uri, {REQUESTED: why.encode()}, {}, job.storage_options)


def clear_stop(job: TrainJob) -> None:
    """Remove a marker an earlier, stopped attempt left, before the workers start."""
    fs, path = filesystem(job.stop_uri, job.storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


class StopWatch:
    """Whether the worker group was asked to stop, agreed by every rank (:meth:`agreed`, one call per step on every
    rank, in step)."""

    def __init__(self, job: TrainJob, worker: Worker) -> None:
        self.seen = threading.Event()
        self.multi = worker.world_size > 1 and dist.is_initialized()
        # A flag on the CPU: with NCCL, a flag of its own through a gloo group, so that no step waits for the GPU.
        self.group: Any = dist.new_group(backend="gloo") if self.multi and dist.get_backend() != "gloo" else None
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

    def agreed(self) -> bool:
        """True on every rank when any rank saw the marker (the same answer everywhere, at the same step)."""
        if not self.multi:
            return self.seen.is_set()
        flag = torch.tensor([1.0 if self.seen.is_set() else 0.0])  # [1] on the CPU
        dist.all_reduce(flag, group=self.group)
        return bool(flag.item() > 0)
