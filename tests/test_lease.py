"""The run-root lease: exclusive among racing runs (local disk and S3 on a moto server), renewed while held,
expiring when its holder dies, fenced when a holder outlives its expiry."""

import socket
import subprocess
import sys
import threading
import time

import pytest

from pipelines.lease import LeaseHeldError, acquire, latest_generation


def race(uri: str, storage_options: dict, contenders: int) -> tuple[list, list]:
    won, lost, barrier = [], [], threading.Barrier(contenders)

    def contend():
        barrier.wait()
        try:
            won.append(acquire(uri, storage_options, ttl_s=60, log=lambda _: None))
        except LeaseHeldError as error:
            lost.append(error)

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return won, lost


def test_exactly_one_of_racing_runs_wins_on_local_disk(tmp_path):
    won, lost = race(str(tmp_path / "run"), {}, 8)
    assert len(won) == 1 and len(lost) == 7
    assert won[0].owner in str(lost[0]) and "Another run of this run_id is in progress" in str(lost[0])
    won[0].release()
    again = acquire(str(tmp_path / "run"), {}, ttl_s=60, log=lambda _: None)
    assert again.generation == 2  # a released lease is taken at the next generation
    again.release()


def test_exactly_one_of_racing_runs_wins_on_s3(s3_bucket):
    bucket, options = s3_bucket
    won, lost = race(f"s3://{bucket}/runs/nightly", options, 6)
    assert len(won) == 1 and len(lost) == 5
    assert latest_generation(f"s3://{bucket}/runs/nightly", options)[0] == 1


def test_an_expired_lease_is_taken_over_and_its_holder_fenced(tmp_path):
    uri = str(tmp_path / "run")
    stale = acquire(uri, {}, ttl_s=0.3, log=lambda _: None)
    with pytest.raises(LeaseHeldError):
        acquire(uri, {}, ttl_s=60)
    time.sleep(0.5)  # the holder stopped renewing (crashed, or paused)
    messages = []
    successor = acquire(uri, {}, ttl_s=60, log=messages.append)
    assert successor.generation == 2 and "expired" in messages[0]
    assert stale.renew() is False and stale.lost  # the old holder learns it lost the lease
    successor.release()


def test_a_renewed_lease_stays_held(tmp_path):
    uri = str(tmp_path / "run")
    with acquire(uri, {}, ttl_s=1.0, log=lambda _: None).keep_alive(interval_s=0.2):
        time.sleep(1.5)  # longer than the TTL: only the heartbeat keeps it
        with pytest.raises(LeaseHeldError):
            acquire(uri, {}, ttl_s=60)
    acquire(uri, {}, ttl_s=60, log=lambda _: None).release()  # released on exit


def test_the_lease_of_a_dead_process_on_this_host_is_taken_at_once(tmp_path):
    uri = str(tmp_path / "run")
    holder = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys; from pipelines.lease import acquire; "
            f"lease = acquire({uri!r}, {{}}, ttl_s=600); print(lease.owner); sys.stdout.flush(); os._exit(0)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    owner = holder.stdout.strip().splitlines()[-1]
    assert owner.startswith(socket.gethostname() + ":")
    messages = []
    successor = acquire(uri, {}, ttl_s=60, log=messages.append)  # 600 s TTL, yet its process is gone
    assert successor.generation == 2 and owner in messages[0]
    successor.release()
