"""Real services for end-to-end tests: an MLflow tracking server and a Ray head node, each in its own process
session so that stopping it stops everything it spawned (and nothing else on the machine)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
# what `ray job submit --working-dir` leaves out of the upload
JOB_EXCLUDES = {"excludes": [".venv", ".git", "runs", "outputs", "*.db"]}


def start_job(address: str, env: dict[str, str], overrides: list[str], log: Path) -> subprocess.Popen:
    """``ray job submit`` of ``python -m pipelines run --config configs/digits.yaml OVERRIDES`` to the cluster at
    ``address`` (its dashboard), the repository as working directory; the job's output streams into ``log``."""
    command = [
        *(str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO)),
        *("--runtime-env-json", json.dumps(JOB_EXCLUDES)),
        *("--", "python", "-m", "pipelines", "run", "--config", "configs/digits.yaml", *overrides),
    ]
    with open(log, "w") as output:
        return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)


def submit(address: str, env: dict[str, str], overrides: list[str], log: Path) -> subprocess.CompletedProcess:
    """:func:`start_job` and wait (at most 15 minutes); its output in ``stdout``."""
    process = start_job(address, env, overrides, log)
    try:
        process.wait(timeout=900)
    finally:
        process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, log.read_text(), "")


def _wait_http(url: str, process: subprocess.Popen, seconds: float, log: Path) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (e.g. 401 under token authentication): it is up
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up; log:\n{log.read_text()[-3000:] if log.exists() else ''}")


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def run_in_session(command: list[str], timeout: float, **options) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, timeout=timeout, **options)`` in a process session of
    its own, which is stopped whole (the pipeline's local Ray with it, not only the first process) when it runs past
    ``timeout`` or the test stops waiting for any other reason: nothing of it runs on into the next test."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **options
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:
        _stop(process)
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@contextlib.contextmanager
def mlflow_server(workdir: Path, artifacts_destination: str, env: dict[str, str], admin: tuple[str, str] | None = None):
    """``mlflow server`` with a SQLite backend and proxied artifacts at ``artifacts_destination``; yields its URL.
    With ``admin`` = (user, password) it runs MLflow's basic-auth app (as ``infra/k8s/mlflow.yaml`` does): only that
    user may read or write, every other request gets 401/403."""
    port = free_port()
    log = workdir / "mlflow-server.log"
    command = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination",
        artifacts_destination,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if admin is not None:
        config = workdir / "basic_auth.ini"
        config.write_text(
            f"[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = sqlite:///{workdir / 'basic_auth.db'}\n"
            f"admin_username = {admin[0]}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 60\n"
        )
        env = {
            **env,
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        }
        command += ["--app-name", "basic-auth"]
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=workdir
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", process, 90, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(process)


@dataclass(frozen=True)
class RayHead:
    dashboard: str  # http://127.0.0.1:PORT: the job submission address
    gcs: str  # 127.0.0.1:PORT: what a driver's RAY_ADDRESS names
    temp_dir: Path  # the session's folder, its logs included


def wait_accepts_jobs(dashboard: str, token: str, timeout: float = 120) -> None:
    """Waits until the head's job agent takes a job (a trivial one): the dashboard answers a submission with
    "No available agent to submit job, please try again later" until the agent has registered, and gives up on it
    after 10 s, which a loaded machine can exceed."""
    request = urllib.request.Request(
        f"{dashboard}/api/jobs/",
        data=json.dumps({"entrypoint": "true"}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(request, timeout=30):
                return
        except urllib.error.HTTPError as error:
            said = error.read().decode(errors="replace")
            if "No available agent" not in said or time.time() > deadline:
                raise RuntimeError(f"the cluster takes no job: {error.code} {said}") from error
        time.sleep(1)


@contextlib.contextmanager
def ray_head(workdir: Path, env: dict[str, str], num_cpus: int = 2):
    """``ray start --head --block`` with token authentication; yields (dashboard address, env for clients, the head:
    :class:`RayHead`)."""
    port, dashboard_port = free_port(), free_port()
    env = {
        **env,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    }
    log = workdir / "ray-head.log"
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # AF_UNIX socket paths must stay under 107 bytes
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--num-cpus={num_cpus}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        # the dashboard agent's HTTP port is 52365 unless named: beside another Ray on the host (a second test's, a
        # user's), the job agent would never register and no job would be taken (tests/cluster.py does the same)
        f"--dashboard-agent-listen-port={free_port()}",
        "--disable-usage-stats",
        "--object-store-memory=300000000",
        f"--temp-dir={temp_dir}",
    ]
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=workdir
        )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_http(f"{address}/api/version", process, 120, log)
        wait_accepts_jobs(address, env["RAY_AUTH_TOKEN"])
        yield address, env, RayHead(address, f"127.0.0.1:{port}", Path(temp_dir))
    finally:
        _stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


class FaultyS3Proxy:
    """An HTTP proxy in front of the moto S3 server that injects the faults of a real object store: every
    ``throttle_every``-th request is answered ``503 SlowDown`` (throttling), and during an outage every request has
    its connection dropped without an answer. ``injected`` counts the faults, so a test can prove they happened."""

    HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"})
    SLOW_DOWN = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
        b"<Message>Please reduce your request rate.</Message></Error>"
    )

    def __init__(self, upstream: str, throttle_every: int = 0) -> None:
        import http.server
        import threading
        import urllib.parse

        self.upstream = urllib.parse.urlsplit(upstream).netloc
        self.throttle_every, self.down, self.requests = throttle_every, False, 0
        self.injected = {"throttled": 0, "dropped": 0}
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._next_fault()
                if fault == "dropped":
                    self.close_connection = True  # the client sees the connection close with no answer
                    return
                if fault == "throttled":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(proxy.SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(proxy.SLOW_DOWN)
                    return
                connection = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in proxy.HOP_BY_HOP}
                    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                        headers["Content-Length"] = str(len(body))
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    payload = response.read()
                    self.send_response(response.status, response.reason)
                    for key, value in response.getheaders():
                        if key.lower() not in proxy.HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(payload))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                finally:
                    connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        import http.client

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _next_fault(self) -> str | None:
        with self._lock:
            self.requests += 1
            fault = (
                "dropped"
                if self.down
                else ("throttled" if self.throttle_every and self.requests % self.throttle_every == 0 else None)
            )
            if fault:
                self.injected[fault] += 1
            return fault

    def __enter__(self) -> FaultyS3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """``127.0.0.1:PORT`` of a TCP listener that accepts connections and never answers; closed on exit."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
        assert accepted, "nothing connected to the silent server"
    finally:
        listener.close()
        for connection in accepted:
            connection.close()
