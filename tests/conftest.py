"""Shared fixtures: a real S3 endpoint (moto server in its own process on 127.0.0.1), as s3fs's own tests do, and a
local Ray instance for a module's tests."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import pytest
import ray

from pipelines.execution import train_checks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance of 2 CPUs for one test module (never two at once: each module shuts its own down), with
    the Ray Train checks a job's own connect() sets (pipelines.execution.TRAIN_CHECKS) while it runs."""
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    checks = train_checks(os.environ)
    with pytest.MonkeyPatch.context() as patch:  # the environment as it was once the module is done
        for name, value in checks.items():
            patch.setenv(name, value)
        env_vars = {"PYTHONPATH": os.getcwd(), **checks}
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, runtime_env={"env_vars": env_vars})
        yield
        ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)  # the session's logs and sockets


@pytest.fixture(scope="session")
def s3_endpoint():
    """URL of a moto S3 server process; stopped at the end of the session, pass or fail."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
                break
            except OSError as error:
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto server did not start on {url}") from error
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket; returns (bucket name, fsspec storage_options for s3fs)."""
    import boto3
    import s3fs

    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
    }
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    return bucket, options


@pytest.fixture(autouse=True)
def _no_real_aws(monkeypatch):
    """Tests never reach a real AWS account, whatever the machine's environment."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
