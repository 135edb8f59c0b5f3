"""Real services for end-to-end tests: an MLflow tracking server and a Ray head node, each in its own process
session so that stopping it stops everything it spawned (and nothing else on the machine)."""

from __future__ import annotations

import contextlib
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
from pathlib import Path

from tests.conftest import free_port

BIN = Path(sys.executable).parent


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


@contextlib.contextmanager
def mlflow_server(workdir: Path, artifacts_destination: str, env: dict[str, str]):
    """``mlflow server`` with a SQLite backend and proxied artifacts at ``artifacts_destination``; yields its URL."""
    port = free_port()
    log = workdir / "mlflow-server.log"
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
               "--artifacts-destination", artifacts_destination, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=workdir)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", process, 90, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(process)


@contextlib.contextmanager
def ray_head(workdir: Path, env: dict[str, str], num_cpus: int = 2):
    """``ray start --head --block`` with token authentication; yields (dashboard address, env for clients)."""
    port, dashboard_port = free_port(), free_port()
    env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}
    log = workdir / "ray-head.log"
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # AF_UNIX socket paths must stay under 107 bytes
    command = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--disable-usage-stats",
               "--object-store-memory=300000000", f"--temp-dir={temp_dir}"]
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=workdir)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_http(f"{address}/api/version", process, 120, log)
        yield address, env
    finally:
        _stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)
