"""A pipeline whose driver is killed during training resumes from the last checkpoint when run again."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


def test_killed_run_resumes_training_from_its_last_checkpoint(tmp_path):
    args = [sys.executable, "-m", "pipelines", "run", "run_id=resume", "train.total_images=6144",
            "train.checkpoint_every_images=1024", "train.log_every_images=1024", "train.grid_every_images=0",
            "sample.num_samples=50", "sample.batch_size=50", "sample.num_steps=5", "evaluate.classifier_epochs=1",
            "evaluate.untrained_baseline=false", "evaluate.nll=false", "register.enabled=false", f"storage.root={tmp_path / 'runs'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "mlflow.experiment=resume"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list((tmp_path / "runs").glob("resume/train/*/ray/trainer/checkpoint_*/manifest.json")):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray instance it started
        first.wait(timeout=30)
    assert json.loads((tmp_path / "runs/resume/prepare/stage.json").read_text())["status"] == "complete"
    assert not (tmp_path / "runs/resume/train/stage.json").exists()  # the killed stage is not marked complete

    second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    output = second.stdout + second.stderr
    assert "[prepare] up to date" in output
    resumed_at = int(output.split("resumed from checkpoint at ")[1].split()[0])
    assert 1024 <= resumed_at < 6144
    manifest = json.loads((tmp_path / "runs/resume/train/stage.json").read_text())
    assert manifest["outputs"]["images_seen"] == 6144
    # The second train run's loss history continues from the checkpoint: it has no point before it.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(manifest["mlflow_run_id"], "loss")]
    assert steps and min(steps) > resumed_at and max(steps) == 6144
