"""Credentials are never written, printed or passed where Ray logs them (issue 29, group 1): a password in a URI's
user info is redacted wherever the URI is printed, stored or logged; credentials in the driver's environment reach
Ray workers through a setup hook, never through a runtime environment's env_vars (which Ray writes to its logs); a
tracking server that refuses the credentials is said to. The end-to-end scan over every file a run writes is in
tests/test_pipeline_e2e.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, PipelineConfig
from pipelines.config_file import load_config, save_resolved
from pipelines.execution import FORWARDED_ENV, SECRET_ENV, runtime_env
from pipelines.plan import config_changes
from pipelines.redaction import redact
from pipelines.tracking import config_digest, flatten
from pipelines.typed import from_plain
from tests.services import mlflow_server, ray_head

REPO = Path(__file__).resolve().parents[1]
SECRET = "fake-secret-uri-3d9f1c"
# ``python -m pipelines`` with the tracking server's deadline at 3 s instead of 20: what a failed contact prints is
# under test here, not how long it waits (tests/test_reliability_inputs.py times that)
SHORT_TRACKING_DEADLINE = (
    "import pipelines.preflight as preflight; preflight.MLFLOW_DEADLINE_S = 3.0; "
    "from pipelines.__main__ import exit_with, main; exit_with(main())"
)


@pytest.mark.parametrize(
    "uri, shown",
    [
        (f"http://alice:{SECRET}@mlflow:5000", "http://alice:***@mlflow:5000"),
        (f"https://:{SECRET}@host/path?q=1", "https://:***@host/path?q=1"),
        (f"s3://KEY:{SECRET}@bucket/runs", "s3://KEY:***@bucket/runs"),
        ("http://alice@host:5000", "http://alice@host:5000"),  # no password: nothing to hide
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ],
)
def test_a_password_in_a_uri_is_redacted(uri, shown):
    assert redact(uri) == shown
    assert redact(f"error: MLflow at {uri!r} does not answer") == f"error: MLflow at {shown!r} does not answer"


def test_the_saved_config_and_the_mlflow_params_hold_no_password(tmp_path):
    config = load_config(None, [f"mlflow.tracking_uri=http://alice:{SECRET}@127.0.0.1:5000"])
    saved = save_resolved(config)
    assert SECRET not in saved and "http://alice:***@127.0.0.1:5000" in saved
    assert not any(SECRET in value for value in flatten(config.to_dict()).values())
    # The run's saved copy compares equal to the config it came from: re-running is not a change of config.
    read_back = from_plain(PipelineConfig, yaml.safe_load(saved), error=ConfigError)
    assert config_changes(read_back, config) == [] and config_digest(read_back) == config_digest(config)


def test_credentials_never_travel_in_a_runtime_environment(monkeypatch):
    for name in SECRET_ENV:
        monkeypatch.setenv(name, SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    forwarded = runtime_env()["env_vars"]
    assert forwarded == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    assert not set(FORWARDED_ENV) & set(SECRET_ENV)


def test_workers_get_the_drivers_credentials_and_ray_writes_them_nowhere(tmp_path):
    """A Ray head started without credentials (as a cluster whose nodes have none) and a driver that has them: a
    task of the driver's job sees them (only the setup hook can have brought them), and no file under Ray's session
    folder holds them, its logs included (runtime_env_agent.log writes every runtime environment)."""
    script = (
        "import os, ray\n"
        "from pipelines.execution import connect, runtime_env\n"
        "connect()\n"
        "@ray.remote\n"
        "def seen():\n"
        "    return os.environ.get('MLFLOW_TRACKING_PASSWORD')\n"
        "print('seen:', ray.get(seen.options(runtime_env=runtime_env()).remote()))\n"
    )
    clean = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", *SECRET_ENV)}
    with ray_head(tmp_path, clean, num_cpus=1) as (_, ray_env, head):
        driver = {**ray_env, "RAY_ADDRESS": head.gcs, "MLFLOW_TRACKING_PASSWORD": SECRET, "PYTHONPATH": str(REPO)}
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=REPO, env=driver, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"seen: {SECRET}" in result.stdout
        files = [path for path in head.temp_dir.rglob("*") if path.is_file() and not path.is_socket()]
        leaks = [str(path) for path in files if SECRET.encode() in path.read_bytes()]
        assert len(files) > 10 and not leaks, leaks


def test_a_server_that_refuses_the_credentials_is_said_to(tmp_path):
    """A basic-auth tracking server and a wrong password: the run stops before any stage, naming the cause."""
    clean = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", *SECRET_ENV)}
    with mlflow_server(tmp_path, str(tmp_path / "artifacts"), clean, admin=("admin", "right-password-81f")) as uri:
        env = {**clean, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": SECRET}
        result = subprocess.run(
            [sys.executable, "-m", "pipelines", "run", f"mlflow.tracking_uri={uri}", f"storage.root={tmp_path / 'r'}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "authentication failed" in result.stderr and SECRET not in result.stdout + result.stderr


def test_a_uri_with_a_password_is_never_printed(tmp_path):
    """A tracking server that does not answer: the failure names it with its password redacted."""
    uri, runs = f"http://alice:{SECRET}@127.0.0.1:9", tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "-c", SHORT_TRACKING_DEADLINE, "run", f"mlflow.tracking_uri={uri}", f"storage.root={runs}"],
        cwd=REPO,
        env={key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "http://alice:***@127.0.0.1:9" in result.stderr
    assert SECRET not in result.stdout + result.stderr
    written = [p for p in runs.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not written, written
