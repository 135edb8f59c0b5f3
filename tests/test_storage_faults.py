"""S3 faults on the commit protocol, through a fault-injecting proxy in front of the moto server, with the storage
options the pipeline ships (``StorageSection.options``): throttling and a brief outage are ridden out with
backoff; a permanent outage fails with a clear error, and what was committed before stays readable."""

import threading
import time

import pytest

from ddpm_core.storage import StorageUnavailableError, commit, is_committed, read_committed
from pipelines.config import StorageSection
from tests.services import FaultyS3Proxy

FILES = {"weights.bin": bytes(range(256)) * 40_000, "state.json": b'{"step": 7}'}  # ~10 MB and a small file


def shipped_options(bucket: str, endpoint: str) -> dict:
    return StorageSection(root=f"s3://{bucket}/runs", endpoint_url=endpoint, region="us-east-1").options()


def test_throttling_is_retried_with_backoff(s3_bucket, s3_endpoint):
    bucket, _ = s3_bucket
    with FaultyS3Proxy(s3_endpoint, throttle_every=3) as proxy:
        options = shipped_options(bucket, proxy.url)
        for i in range(3):
            commit(f"s3://{bucket}/runs/ckpt-{i}", FILES, {"i": i}, options)
            files, metadata = read_committed(f"s3://{bucket}/runs/ckpt-{i}", None, options)
            assert files == FILES and metadata == {"i": i}
    assert proxy.injected["throttled"] >= 10, proxy.injected


def test_a_brief_outage_is_ridden_out(s3_bucket, s3_endpoint):
    bucket, _ = s3_bucket
    with FaultyS3Proxy(s3_endpoint) as proxy:
        options = shipped_options(bucket, proxy.url)
        proxy.down = True  # every request's connection dropped unanswered ...
        threading.Timer(3.0, lambda: setattr(proxy, "down", False)).start()  # ... for 3 s
        started = time.time()
        commit(f"s3://{bucket}/runs/ckpt", FILES, {"step": 7}, options)
        assert time.time() - started >= 3.0
        assert read_committed(f"s3://{bucket}/runs/ckpt", None, options)[0] == FILES
    assert proxy.injected["dropped"] >= 2, proxy.injected


def test_a_permanent_outage_fails_clearly_and_keeps_the_last_good_state(s3_bucket, s3_endpoint):
    bucket, _ = s3_bucket
    with FaultyS3Proxy(s3_endpoint) as proxy:
        options = shipped_options(bucket, proxy.url)
        commit(f"s3://{bucket}/runs/checkpoint_000001", FILES, {"step": 1}, options)
        proxy.down = True
        started = time.time()
        with pytest.raises(
            StorageUnavailableError,
            match=r"s3://.*/runs/checkpoint_000002: commit failed after the storage "
            r"client's retries .*Work committed before is intact",
        ):
            commit(f"s3://{bucket}/runs/checkpoint_000002", FILES, {"step": 2}, options)
        assert time.time() - started < 120, "a permanent outage must fail, not hang"
        proxy.down = False
        assert read_committed(f"s3://{bucket}/runs/checkpoint_000001", None, options)[0] == FILES
        assert not is_committed(f"s3://{bucket}/runs/checkpoint_000002", options)
    assert proxy.injected["dropped"] >= 5, proxy.injected
