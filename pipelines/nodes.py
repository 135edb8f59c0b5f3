"""What a cluster of several nodes asks of a config, checked when the job joins it and before any stage runs: every
path a worker reads or writes for another process is one every node reaches (storage.root, the data, the weights
to start from, the MLflow store), and a placement that needs a node per worker has them."""

from __future__ import annotations

import functools
import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import ray

from ddpm_core.storage import is_remote
from pipelines.config import ConfigError, PipelineConfig, Placement, PrepareOn
from pipelines.execution import ClusterTooSmallError, Execution, connect, ray_address
from pipelines.typed import marked_keys

LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
SHARED = "storage.shared_filesystem: true"


@dataclass(frozen=True)
class ClusterShape:
    """The alive nodes of the cluster the job joined, and on how many machines they run."""

    nodes: int
    hosts: int  # distinct node IP addresses: several nodes of one machine share one
    resources: tuple[dict[str, float], ...]  # each alive node's total resources

    @property
    def several_nodes(self) -> bool:
        return self.nodes > 1


def cluster_shape() -> ClusterShape:
    """The shape of the cluster this driver is connected to (``ray.init`` done)."""
    alive = [node for node in ray.nodes() if node["Alive"]]
    hosts = {node["NodeManagerAddress"] for node in alive}
    return ClusterShape(len(alive), len(hosts), tuple(dict(node["Resources"]) for node in alive))


def node_local(uri: str) -> bool:
    """Whether ``uri`` names something only this machine (or process) can read: a path, ``file://``, ``memory://``.
    Bundled data (``builtin:``) and network URLs reach every node."""
    return not uri.startswith("builtin:") and not is_remote(uri)


def sqlite_store(tracking_uri: str) -> bool:
    return urllib.parse.urlsplit(tracking_uri).scheme in ("sqlite", "file", "")


def check_reach(config: PipelineConfig, shape: ClusterShape, autoscaling: bool) -> None:
    """On a cluster of several nodes (or one that adds them), refuse what another node cannot reach: a local
    ``storage.root`` (unless declared a shared mount), local data read by Ray Data tasks, a local ``train.init_from``
    or Inception weights file, a SQLite/file MLflow store (workers log to it; SQLite is unsafe over network mounts),
    and, when the nodes run on several machines, a loopback S3 or MLflow address."""
    if not (shape.several_nodes or autoscaling):
        return
    problems = [*unreachable_paths(config), *unreachable_tracking(config)]
    if shape.hosts > 1:
        problems += loopback_addresses(config)
    if problems:
        where = f"{shape.nodes} nodes" + (f" on {shape.hosts} machines" if shape.hosts > 1 else "")
        raise ConfigError(
            f"this Ray cluster has {where}{' and adds more' if autoscaling else ''}; workers run on other nodes than "
            "this driver, so every path they use must reach every node:\n  " + "\n  ".join(problems)
        )


def unreachable_paths(config: PipelineConfig) -> list[str]:
    """Local paths among the config's fields marked ``metadata=WORKER_PATH`` (what workers open; found by the
    mark, not by a list kept here): none on a declared shared mount, but a ``memory://`` root, which lives in one
    process. ``data.uri`` only when Ray Data may read it (``data.prepare_on`` other than driver)."""
    root = config.storage.root
    if root.startswith("memory:"):
        return [f"storage.root {root!r} lives in this process only: use an object store (s3://...)"]
    if config.storage.shared_filesystem:
        return []
    plain = config.to_dict()
    found: list[str] = []
    for key in sorted(marked_keys(PipelineConfig, "worker_path")):
        value = functools.reduce(lambda section, name: section.get(name) or {}, key.split("."), plain)
        if isinstance(value, str) and value and node_local(value) and not read_on_the_driver(key, config):
            found.append(f"{key} {value!r} is a local path: {FIXES.get(key, FIX)}")
    return found


def read_on_the_driver(key: str, config: PipelineConfig) -> bool:
    """``data.uri`` with ``data.prepare_on=driver``: the driver reads it and writes the splits to storage.root."""
    return key == "data.uri" and config.data.prepare_on is PrepareOn.DRIVER


FIX = f"put it on an object store (s3://...), or, if it is on a mount every node shares (NFS), declare {SHARED}"
FIXES = {
    "storage.root": f"use an s3:// (or other object store) URI, or, if it is a mount every node shares (NFS), say so "
    f"with {SHARED}",
    "data.uri": "Ray Data tasks on other nodes may read it (data.prepare_on is not driver): set "
    "data.prepare_on=driver (the driver reads it and writes the splits to storage.root), put the data on an object "
    f"store, or declare {SHARED}",
}


def unreachable_tracking(config: PipelineConfig) -> list[str]:
    uri = config.mlflow.resolved_tracking_uri()
    if not sqlite_store(uri):
        return []
    return [
        f"mlflow.tracking_uri (or MLFLOW_TRACKING_URI) {uri!r} is a local store, which training workers on other "
        "nodes log to: run an MLflow tracking server (`mlflow server`) and name its http(s):// address"
    ]


def loopback_addresses(config: PipelineConfig) -> list[str]:
    """S3 endpoint and tracking addresses that name another machine on each node."""
    endpoint = config.storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    found = []
    for key, address in (
        ("storage.endpoint_url (or AWS_ENDPOINT_URL)", endpoint),
        ("mlflow.tracking_uri (or MLFLOW_TRACKING_URI)", config.mlflow.resolved_tracking_uri()),
    ):
        host = urllib.parse.urlsplit(address or "").hostname
        if host in LOOPBACK:
            found.append(f"{key} names {host}, which is another machine on every node: use an address all nodes reach")
    return found


def check_strict_spread(
    placement: Placement, bundle: dict[str, float], count: int, execution: Execution, log: Callable[[str], None]
) -> None:
    """``train.placement=STRICT_SPREAD`` puts each of ``count`` workers on a node of its own: that many alive nodes
    must each hold one worker's ``bundle`` (Ray would otherwise wait for them forever)."""
    if placement is not Placement.STRICT_SPREAD:
        return
    shape = cluster_shape()
    able = sum(all(node.get(name, 0.0) >= amount for name, amount in bundle.items()) for node in shape.resources)
    if able >= count:
        return
    needs = ", ".join(f"{amount:g} {name}" for name, amount in bundle.items())
    numbers = f"{count} training workers with train.placement=STRICT_SPREAD need {count} nodes of {needs} each"
    if execution.autoscaling:
        log(f"{numbers}; {able} now: waiting for the autoscaler to add nodes (cluster.autoscaling=true)")
        return
    raise ClusterTooSmallError(
        f"{numbers}; this cluster has {able}: lower train.num_workers, use train.placement=SPREAD or PACK, or add nodes"
    )


def join_cluster(config: PipelineConfig) -> None:
    """A job told to join a cluster (RAY_ADDRESS; ``ray job submit`` sets it) joins it before any stage runs, and
    the config is checked against the cluster's nodes there (:func:`check_reach`); a job on its own local instance
    (one node) starts Ray only when a stage needs it."""
    if ray_address(os.environ) == "local":
        return
    connect()
    check_reach(config, cluster_shape(), config.cluster.autoscaling)
