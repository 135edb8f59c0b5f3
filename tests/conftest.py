"""Shared fixtures: a real S3 endpoint (moto server in its own process on 127.0.0.1), as s3fs's own tests do, a
local Ray instance for a module's tests, and one small pipeline run that three modules inspect."""

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


@pytest.fixture(scope="session")
def guided_run(tmp_path_factory):
    """One small run of every stage but tune, register included (tests/test_autoguidance_pipeline.py's ``GUIDED``:
    post-hoc EMA profiles, a choice among EMA widths, autoguided sampling; with sample grids at the start and the end
    of training, KID and precision/recall), started as ``run --from evaluate`` of a run id that has nothing yet while
    a second local Ray instance runs on the host, as a second pipeline's does.

    tests/test_autoguidance_pipeline.py (the guide, its samples and its registered model), tests/test_bad_inputs.py
    (the ``--from`` message, another Ray on the host, the figure commands) and tests/test_mlflow_ui.py (the MLflow UI
    of the run's store) assert on this same kind of finished run: one pipeline run for the three instead of one
    each. Returns ``tests.test_bad_inputs.TinyRun``; the run's root is ``.root / "quickstart"``."""
    from tests.test_autoguidance_pipeline import GUIDED
    from tests.test_bad_inputs import TinyRun, another_local_ray, clean_env
    from tests.test_posthoc_ema_pipeline import TOTAL

    workdir = tmp_path_factory.mktemp("guided")
    overrides = [f"storage.root={workdir / 'runs'}", f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}"]
    # for tests/test_mlflow_ui.py: a sample grids run (grids at 0 and at the end), the KID and precision columns
    ui = [f"train.grid_every_images={TOTAL}", "evaluate.kid=true", "evaluate.precision_recall=true"]
    env = clean_env()
    with another_local_ray(env) as (_, process):
        started = time.time()
        command = [sys.executable, "-m", "pipelines", "run", "--from", "evaluate", *GUIDED, "register.enabled=true"]
        result = subprocess.run(
            [*command, *ui, *overrides],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        seconds, alive = time.time() - started, process.poll() is None
    (workdir / "run.log").write_text(result.stdout + result.stderr)  # the whole output, for a failure's reader
    return TinyRun(workdir / "runs", overrides, result, seconds, alive)


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
