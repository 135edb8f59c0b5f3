"""A multi-node Ray cluster on one host for tests: a head and worker nodes, each ``ray start --block`` in its own
process session, so a test can kill (SIGKILL) or preempt (SIGTERM) one node and leave the rest running.

Each node gets a custom resource and a label named after it (``{"w1": 1}``, ``cluster-node=w1``) so that work can be
pinned to it: ``.options(resources={"w1": 0.01})``, ``label_selector={"cluster-node": "w1"}``, or Train's
``ScalingConfig(resources_per_worker={"CPU": 0.5, "w1": 0.01})``. Findings behind the flags:
/work/shared/notes/MULTINODE.md."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port
from tests.services import wait_accepts_jobs

BIN = Path(sys.executable).parent
LABEL = "cluster-node"
STARTUP_TIMED_OUT = "The current node timed out during startup"  # ray start gave up waiting for registration
# GCS settings (the head's environment) under which a SIGKILLed node is reported DEAD after ~1 s (measured 0.8-1.0 s)
# instead of ~15 s with Ray's defaults (measured 14.6 s).
FAST_HEALTH_CHECKS = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "2",
}


@dataclass
class NodeSpec:
    """A worker node to start. ``num_cpus`` is logical (Ray does not check it against the host's cores) and must be
    whole: a node's resource totals must be integers (``RAY_OVERRIDE_RESOURCES='{"CPU": 0.5}'`` makes the raylet
    refuse to start: "Resource quantities must all be whole numbers"). Fractions belong in the demands
    (``resources_per_worker={"CPU": 0.5}``)."""

    num_cpus: int = 1
    name: str | None = None  # default: w1, w2, ...
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class ClusterNode:
    name: str  # also the name of its custom resource (1 unit) and the value of its ``cluster-node`` label
    head: bool
    process: subprocess.Popen
    log: Path
    node_id: str = ""  # Ray's hex node id, known once the node registered

    @property
    def pgid(self) -> int:
        """Process group (and session) id of ``ray start``: every Ray process of this node lives in it."""
        return self.process.pid


@dataclass
class RayCluster:
    dashboard: str  # http://127.0.0.1:PORT: the job submission address, the state API
    gcs: str  # 127.0.0.1:PORT: what a driver's RAY_ADDRESS names
    env: dict[str, str]  # environment for clients (drivers, ray CLI, job submission): token auth, RAY_ADDRESS
    temp_dir: Path  # the head's --temp-dir; worker nodes on this host log into the same session folder
    workdir: Path
    nodes: list[ClusterNode]
    _node_env: dict[str, str] = field(repr=False, default_factory=dict)
    _counter: int = 0

    @property
    def head(self) -> ClusterNode:
        return self.nodes[0]

    @property
    def workers(self) -> list[ClusterNode]:
        return [node for node in self.nodes if not node.head]

    def node(self, name_or_id: str) -> ClusterNode:
        """The node of that name ("head", "w1", ...) or hex node id."""
        for node in self.nodes:
            if name_or_id in (node.name, node.node_id):
                return node
        raise KeyError(name_or_id)

    # --- state -------------------------------------------------------------------------------------------------
    def list_nodes(self) -> list[dict]:
        """The state API's nodes (alive and dead): dicts with node_id, state ("ALIVE"/"DEAD"), labels,
        resources_total, state_message, start_time_ms, end_time_ms."""
        request = urllib.request.Request(
            f"{self.dashboard}/api/v0/nodes?limit=1000&detail=true",
            headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)["data"]["result"]["result"]

    def states(self) -> dict[str, str]:
        """{node name: "ALIVE"/"DEAD"} for the nodes this cluster started (latest registration of each name)."""
        found: dict[str, tuple[int, str]] = {}
        for info in self.list_nodes():
            name = info.get("labels", {}).get(LABEL)
            if name is not None and info.get("start_time_ms", 0) >= found.get(name, (-1, ""))[0]:
                found[name] = (info.get("start_time_ms", 0), info["state"])
        return {name: state for name, (_, state) in found.items()}

    def wait_alive(self, nodes: Sequence[ClusterNode] | None = None, timeout: float = 90) -> None:
        """Waits until every node in ``nodes`` (default: every node whose ``ray start`` still runs) is ALIVE and
        records its node id."""
        nodes = [node for node in self.nodes if node.process.poll() is None] if nodes is None else list(nodes)
        deadline = time.time() + timeout
        while True:
            try:
                infos = self.list_nodes()
            except (OSError, KeyError, ValueError):
                infos = []
            by_name = {
                info["labels"].get(LABEL): info
                for info in sorted(infos, key=lambda info: info.get("start_time_ms", 0))
                if info["state"] == "ALIVE"
            }
            for node in nodes:
                if node.name in by_name:
                    node.node_id = by_name[node.name]["node_id"]
            missing = [node for node in nodes if node.name not in by_name]
            if not missing:
                return
            for node in missing:
                if node.process.poll() is not None:
                    raise RuntimeError(f"ray node {node.name} exited {node.process.returncode}:\n{_tail(node.log)}")
            if time.time() > deadline:
                raise TimeoutError(f"nodes {[node.name for node in missing]} not alive after {timeout} s")
            time.sleep(0.5)

    def wait_dead(self, node: ClusterNode, timeout: float = 60) -> float:
        """Waits until the GCS reports ``node`` DEAD; returns the seconds waited."""
        start = time.time()
        while True:
            states = {info["node_id"]: info["state"] for info in self.list_nodes()}
            if states.get(node.node_id) == "DEAD":
                return time.time() - start
            if time.time() - start > timeout:
                raise TimeoutError(f"node {node.name} still {states.get(node.node_id)} after {timeout} s")
            time.sleep(0.25)

    # --- faults ------------------------------------------------------------------------------------------------
    def kill(self, node: ClusterNode) -> None:
        """SIGKILL to every process of the node (a lost machine): no process of it gets to clean up."""
        _signal_session(node.pgid, signal.SIGKILL)
        node.process.wait(timeout=10)

    def terminate(self, node: ClusterNode, whole_group: bool = False) -> None:
        """SIGTERM, returning at once. By default to ``ray start`` alone, as Kubernetes does to a pod's PID 1: the node
        then drains itself (GCS DrainNode, reason PREEMPTION, deadline now + RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S,
        30 s) and shuts down when idle or at the deadline; Train V2's PreemptionWatcher sees the drain. With
        ``whole_group`` every process of the node gets it at once (a VM's shutdown): the node is gone within ~0.1 s
        and Train sees plain worker deaths."""
        if whole_group:
            _signal_session(node.pgid, signal.SIGTERM)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pgid, signal.SIGTERM)

    def drain(self, node: ClusterNode, deadline_s: int | None = None, reason: str = "DRAIN_NODE_REASON_PREEMPTION"):
        """``ray drain-node`` (hidden CLI, what autoscaler v2 calls on preemption): marks the node draining in the GCS;
        it kills nothing."""
        command = [str(BIN / "ray"), "drain-node", "--address", self.gcs, "--node-id", node.node_id]
        command += ["--reason", reason, "--reason-message", "test"]
        if deadline_s is not None:
            command += ["--deadline-remaining-seconds", str(deadline_s)]
        subprocess.run(command, env=self.env, check=True, capture_output=True, timeout=60)

    def add_node(self, spec: NodeSpec | None = None, wait: bool = True, timeout: float = 90) -> ClusterNode:
        """Starts a worker node (e.g. the replacement of a killed one) and, with ``wait``, waits until it is alive.
        Start nodes one at a time (``wait=True``): see ``ray_cluster``."""
        spec = spec or NodeSpec()
        node = self._start_worker(spec)
        return self._alive_or_started_again(node, spec, timeout) if wait else node

    def _alive_or_started_again(self, node: ClusterNode, spec: NodeSpec, timeout: float) -> ClusterNode:
        """``node`` once alive. ``ray start`` gives a raylet a fixed 30 s to register with the GCS (not configurable
        in Ray 2.60), which a loaded 2-core host can miss ("timed out during startup", seen once in a clean-clone CI
        run); such a node is stopped and started once more under its name. Any other failure is raised."""
        try:
            self.wait_alive([node], timeout=timeout)
            return node
        except RuntimeError:
            if STARTUP_TIMED_OUT not in _tail(node.log):
                raise
        _stop(node)
        self.nodes.remove(node)
        again = self._start_worker(dataclasses.replace(spec, name=node.name))
        self.wait_alive([again], timeout=timeout)
        return again

    # --- internals ---------------------------------------------------------------------------------------------
    def _start_worker(self, spec: NodeSpec) -> ClusterNode:
        self._counter += 1
        name = spec.name or f"w{self._counter}"
        if any(node.name == name for node in self.nodes):
            name = f"{name}-{self._counter}"
        command = [
            "start",
            f"--address={self.gcs}",
            *_node_flags(name, spec.num_cpus, spec.resources, spec.labels),
            # Worker nodes on one host: the defaults are random ports except the dashboard agent's HTTP port
            # (52365 on every node: the second agent logs "address already in use" and runs without its HTTP
            # server). Explicit free ports keep every node whole.
            f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            "--include-log-monitor=False",  # the head's monitor already tails the shared session folder
        ]
        node = _popen(name, False, command, self._node_env, self.workdir)
        self.nodes.append(node)
        return node


def _node_flags(name: str, num_cpus: int, resources: dict[str, float], labels: dict[str, str]) -> list[str]:
    flags = [
        "--block",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
        "--object-store-memory=100000000",
        f"--resources={json.dumps({name: 1, **resources})}",
        f"--labels={','.join(f'{k}={v}' for k, v in {LABEL: name, **labels}.items())}",
    ]
    if not float(num_cpus).is_integer():
        raise ValueError(f"node {name}: num_cpus={num_cpus}: a Ray node's resource totals must be whole numbers")
    return [*flags, f"--num-cpus={int(num_cpus)}"]


def _popen(name: str, head: bool, args: list[str], env: dict[str, str], workdir: Path) -> ClusterNode:
    log = workdir / f"ray-{name}.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [str(BIN / "ray"), *args], stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return ClusterNode(name=name, head=head, process=process, log=log)


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``. A SIGKILLed node's processes stay zombies for a moment:
    their parent ``ray start`` died with them and init reaps them later."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) != sid:
                    continue
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                pids.append(int(entry))
    return pids


def _signal_session(sid: int, sig: int) -> None:
    """Signals every process of session ``sid``: its process group and any process that left the group but not the
    session (none seen in Ray 2.60; cheap insurance)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sid, sig)
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.exists() else ""


def _stop(node: ClusterNode, timeout: float = 10) -> None:
    """SIGKILLs every process of the node and waits (``timeout`` at most) until none is left alive: a killed process
    lives on until the kernel has delivered the signal, and the CI run of 2026-12-07 found one still alive just after
    the cluster's block ended. Leftovers are signalled again on each look."""
    _signal_session(node.pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        node.process.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while session_pids(node.pgid) and time.monotonic() < deadline:
        _signal_session(node.pgid, signal.SIGKILL)
        time.sleep(0.05)


@contextlib.contextmanager
def ray_cluster(
    workdir: Path,
    env: dict[str, str],
    nodes: Sequence[NodeSpec | int] = (1, 1),
    head_cpus: int = 1,
    head_env: dict[str, str] | None = None,
    timeout: float = 120,
) -> Iterator[RayCluster]:
    """A head (``head_cpus`` logical CPUs, resource/label ``head``) and one worker node per entry of ``nodes`` (a
    :class:`NodeSpec` or a CPU count), all on 127.0.0.1 with token authentication (as ``services.ray_head``); yields
    a :class:`RayCluster` once every node is ALIVE and the head takes jobs. ``head_env`` is added to the head's
    environment only: the GCS reads its ``RAY_health_check_*`` settings there. Every node is SIGKILLed on exit and
    the temp dir removed."""
    workdir = Path(workdir)
    port, dashboard_port = free_port(), free_port()
    node_env = {
        **env,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    }
    node_env.pop("RAY_ADDRESS", None)  # it would override --address
    temp_dir = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # AF_UNIX socket paths must stay under 107 bytes
    cluster = RayCluster(
        dashboard=f"http://127.0.0.1:{dashboard_port}",
        gcs=f"127.0.0.1:{port}",
        env={**node_env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
        temp_dir=temp_dir,
        workdir=workdir,
        nodes=[],
        _node_env=node_env,
    )
    try:
        head_args = [
            "start",
            "--head",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}",  # beside another Ray on the host: see _start_worker
            f"--temp-dir={temp_dir}",
            *_node_flags("head", head_cpus, {}, {}),
        ]
        head = _popen("head", True, head_args, {**node_env, **(head_env or {})}, workdir)
        cluster.nodes.append(head)
        cluster.wait_alive([head], timeout=timeout)
        for spec in nodes:
            # One at a time: a node picks its socket names (sockets/raylet.N, plasma_store.N in the shared session
            # folder) by probing which exist, so two nodes starting at once pick the same and one raylet aborts with
            # "bind: Address already in use" (its ray start then fails after 30 s: "timed out during startup").
            cluster.add_node(spec if isinstance(spec, NodeSpec) else NodeSpec(num_cpus=spec), timeout=timeout)
        wait_accepts_jobs(cluster.dashboard, cluster.env["RAY_AUTH_TOKEN"], timeout)
        yield cluster
    finally:
        for node in reversed(cluster.nodes):
            _stop(node)
        if not os.environ.get("RAY_CLUSTER_KEEP_TEMP"):  # set it to read the nodes' logs after a failure
            shutil.rmtree(temp_dir, ignore_errors=True)
