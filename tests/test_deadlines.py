"""Every remote read and write has a deadline, and the user sees what is waited on (docs/reliability.md): the options
every fsspec URL is opened with carry its protocol's connect/read deadlines whatever the caller passed, the first
contact with a host that accepts connections and never answers (a local TCP listener) is announced attempt by
attempt and fails within a bounded total naming the config key and the host, and ``storage.endpoint_url`` applies to
data on S3 (a moto server) when the run root is local."""

import io
import time

import aiohttp
import boto3
import numpy as np
import pytest
import ray

from ddpm_core import storage
from ddpm_core.storage import CONNECT_TIMEOUT_S, FIRST_CONTACT, READ_TIMEOUT_S, Contact, filesystem
from pipelines.__main__ import main
from pipelines.config import StorageSection
from pipelines.config_file import load_config
from pipelines.contracts import PrepareOutputs
from pipelines.dag import run_pipeline
from pipelines.preflight import STORAGE_DEADLINE_S
from tests.run_files import completed
from tests.services import silent_server

# 8.5 s in all: what the first-contact tests show (each attempt announced, a bounded total, the key and host named)
# does not need the default's 26 s, whose bound test_every_s3_and_http_url_gets_deadlines_whatever_the_caller_passed
# checks against the storage deadline
SHORT = Contact(attempts=3, attempt_s=2.5, pause_s=0.5)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str, float]:
    started = time.time()
    code = main(["run", *args])
    captured = capsys.readouterr()
    return code, captured.err, captured.out, time.time() - started


@pytest.fixture
def local(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    return [f"storage.root={tmp_path / 'runs'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]


def test_every_s3_and_http_url_gets_deadlines_whatever_the_caller_passed():
    s3_root = StorageSection(root="s3://bucket/runs", endpoint_url="http://127.0.0.1:9", region="us-east-1").options()
    local_root = StorageSection(root="runs", endpoint_url="http://127.0.0.1:9").options()
    given_s3: list[dict] = [{}, {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}, s3_root, local_root]
    for options in given_s3:
        fs, _ = filesystem("s3://bucket/data", options)
        assert fs.config_kwargs["connect_timeout"] == CONNECT_TIMEOUT_S, options
        assert fs.config_kwargs["read_timeout"] == READ_TIMEOUT_S, options
        assert fs.config_kwargs["retries"]["max_attempts"] >= 1, options
    # storage.endpoint_url applies to every s3:// URL, whatever the root
    for options in (s3_root, local_root):
        assert filesystem("s3://other-bucket/x", options)[0].client_kwargs["endpoint_url"] == "http://127.0.0.1:9"
    # a caller's own deadline is kept, the others filled in
    fs, _ = filesystem("s3://bucket/data", {"config_kwargs": {"read_timeout": 60}})
    assert fs.config_kwargs["read_timeout"] == 60 and fs.config_kwargs["connect_timeout"] == CONNECT_TIMEOUT_S
    for uri in ("http://127.0.0.1:9/data.npz", "https://example.invalid/data.npz"):
        for options in ({}, s3_root, local_root, {"client_kwargs": {"headers": {"X-A": "b"}}}):
            fs, _ = filesystem(uri, options)
            timeout = fs.client_kwargs["timeout"]
            assert isinstance(timeout, aiohttp.ClientTimeout), options
            assert (timeout.sock_connect, timeout.sock_read) == (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
            assert timeout.total is not None  # a bounded total per request
            assert "endpoint_url" not in fs.client_kwargs  # the S3 entry stays with S3
    fs, _ = filesystem("http://127.0.0.1:9/x", {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=7)}})
    assert fs.client_kwargs["timeout"].total == 7
    assert type(filesystem("/tmp/x", s3_root)[0]).__name__ == "LocalFileSystem"
    # the first contact, when a host never answers, ends inside the preflight's storage deadline
    assert FIRST_CONTACT.total_s < STORAGE_DEADLINE_S


def test_http_data_that_never_answers_is_named_within_the_deadline(local, capsys, monkeypatch):
    monkeypatch.setattr(storage, "FIRST_CONTACT", SHORT)
    with silent_server() as host:
        uri = f"http://{host}/data.npz"
        code, err, out, seconds = run_cli([*local, f"data.uri={uri}"], capsys)
    assert code == 2, err
    assert f"data.uri '{uri}': {host} does not answer" in err and "Traceback" not in err, err
    assert f"waiting for {host} (attempt 1 of 3" in out and f"waiting for {host} (attempt 3 of 3" in out, out
    assert seconds < SHORT.total_s + 15, seconds  # 308 s of silence before
    assert not ray.is_initialized()


def test_s3_data_at_an_endpoint_that_never_answers_is_named_with_a_local_root(local, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(storage, "FIRST_CONTACT", SHORT)
    with silent_server() as host:
        args = [*local, "data.uri=s3://bucket/data.npz", f"storage.endpoint_url=http://{host}"]
        code, err, out, seconds = run_cli(args, capsys)
    assert code == 2, err
    assert f"data.uri 's3://bucket/data.npz': {host} does not answer" in err, err
    assert "storage.endpoint_url" in err and "Traceback" not in err, err
    assert f"waiting for {host} (attempt 2 of 3" in out, out
    assert seconds < SHORT.total_s + 15, seconds  # 441 s of silence before
    assert not completed(tmp_path / "runs" / "quickstart", "prepare")


def test_init_from_at_an_endpoint_that_never_answers_is_named(local, capsys, monkeypatch):
    monkeypatch.setattr(storage, "FIRST_CONTACT", SHORT)
    with silent_server() as host:
        args = [*local, "train.init_from=s3://bucket/snapshot", f"storage.endpoint_url=http://{host}"]
        code, err, out, _ = run_cli(args, capsys)
    assert code == 2 and f"train.init_from 's3://bucket/snapshot': {host} does not answer" in err, err
    assert f"waiting for {host} (attempt" in out, out


def test_the_storage_endpoint_applies_to_s3_data_with_a_local_root(tmp_path, s3_endpoint, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # only the config names the endpoint
    bucket = f"data-{time.time_ns()}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buffer, images=rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), labels=np.arange(40) % 10)
    client.put_object(Bucket=bucket, Key="digits/data.npz", Body=buffer.getvalue())
    config = load_config(
        None,
        [
            f"storage.root={tmp_path / 'runs'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"data.uri=s3://{bucket}/digits/data.npz",
            f"storage.endpoint_url={s3_endpoint}",
            "storage.region=us-east-1",
        ],
    )
    results = run_pipeline(config, log=print, until="prepare")
    prepared = results.outputs(PrepareOutputs)
    assert prepared is not None and prepared.num_train + prepared.num_holdout == 40
    assert prepared.source_uri == f"s3://{bucket}/digits/data.npz"
    assert completed(tmp_path / "runs" / "quickstart", "prepare")
    assert not ray.is_initialized()
