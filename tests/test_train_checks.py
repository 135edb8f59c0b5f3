"""How often Ray Train's controller checks on its workers (pipelines.execution.TRAIN_CHECKS): every fit of the job
gets the pipeline's interval, from the driver (whose environment the controller of a driver's fit is given) and from
the job's runtime environment (a Tune trial calls fit in its own actor), unless the user set one."""

import os
import subprocess
import sys
from pathlib import Path

from pipelines.execution import TRAIN_CHECKS, train_checks

REPO = Path(__file__).resolve().parents[1]
NAME = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def test_a_users_interval_is_kept():
    assert train_checks({}) == TRAIN_CHECKS == {NAME: "0.5"}
    assert train_checks({NAME: "3"}) == {NAME: "3"}


def test_the_driver_and_every_worker_of_the_job_have_the_interval():
    script = (
        "import os, ray\n"
        "from pipelines.execution import connect\n"
        "connect()\n"
        "@ray.remote\n"
        f"def seen():\n    return os.environ.get({NAME!r})\n"
        f"print('driver:', os.environ.get({NAME!r}), 'worker:', ray.get(seen.remote()))\n"
    )
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", NAME)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "driver: 0.5 worker: 0.5" in result.stdout, result.stdout[-3000:]
