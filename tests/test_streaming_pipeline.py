"""The whole DAG with a training split larger than the workers' memory budget: the run root is a moto S3 bucket,
training streams the split's shards through Ray Data, one Ray Train worker is SIGKILLed mid-training, and the
restarted group continues each worker's order at its checkpoint's step with ``images_seen`` exact."""

import json
import os
import signal
import sys

import s3fs
from mlflow.tracking import MlflowClient

from tests.test_faults import progress_in, ray_workers, start_run, wait_for

TOTAL, CHECKPOINT_EVERY, BATCH = 4096, 1024, 128


def test_streamed_training_from_s3_resumes_exactly_after_a_killed_worker(tmp_path, s3_bucket, s3_endpoint):
    bucket, options = s3_bucket
    args = [
        sys.executable,
        "-m",
        "pipelines",
        "run",
        "run_id=stream",
        "data.memory_budget_mb=0.1",  # a resident slice of the digits split takes 0.3 MiB per worker
        "data.shard_mb=0.002",  # 32 images per file: 51 files
        "data.decode_cpus=0.5",
        "train.cpus_per_worker=0.5",
        f"train.total_images={TOTAL}",
        f"train.batch_size={BATCH}",
        f"train.checkpoint_every_images={CHECKPOINT_EVERY}",
        "train.log_every_images=512",
        "train.grid_every_images=null",
        "train.max_failures=2",
        "train.warmup_images=512",
        "sample.num_samples=100",
        "sample.batch_size=50",
        "sample.num_steps=20",
        "evaluate.classifier_epochs=1",
        "train.ema_choice_images=64",  # the post-hoc EMA choice on a small budget
        "train.ema_choice_timesteps=4",
        "evaluate.untrained_baseline=false",
        "evaluate.nll=false",
        "evaluate.precision_recall=false",
        "evaluate.kid=false",
        "register.enabled=false",
        f"storage.root=s3://{bucket}/runs",
        f"storage.endpoint_url={s3_endpoint}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "mlflow.experiment=stream",
    ]
    log_path = tmp_path / "run.log"
    run = start_run(args, log_path)
    try:
        wait_for(lambda: progress_in(log_path, TOTAL) >= 2 * CHECKPOINT_EVERY + 512, run, log_path)
        workers = ray_workers("RayTrainWorker")
        assert len(workers) == 2, "expected the two Ray Train workers of this run"
        workers[-1].send_signal(signal.SIGKILL)
        assert run.wait(timeout=600) == 0, log_path.read_text()[-4000:]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    text = log_path.read_text()
    assert "train: stream data loader (data.loader=auto chose stream: 0.3 MiB per worker" in text
    resumed_at = int(text.split("resumed from checkpoint at ")[1].split()[0])
    assert CHECKPOINT_EVERY <= resumed_at < TOTAL and resumed_at % CHECKPOINT_EVERY == 0
    # Each share continues its order at (steps done) x (images per share), not at its start.
    steps_done, steps_left = resumed_at // BATCH, (TOTAL - resumed_at) // BATCH
    assert f"from image {steps_done * BATCH // 2} of each share's order ({steps_left} steps left)" in text

    fs = s3fs.S3FileSystem(**options)
    # run.json names each stage's current result folder in the bucket: {stage}/{fingerprint[:16]}
    head = json.loads(fs.cat_file(f"{bucket}/runs/stream/run.json"))["stages"]
    result = {stage: f"{bucket}/runs/stream/{stage}/{fingerprint[:16]}" for stage, fingerprint in head.items()}
    stage = json.loads(fs.cat_file(f"{result['train']}/stage.json"))
    assert stage["status"] == "complete" and stage["outputs"]["images_seen"] == TOTAL  # exact through the restart
    assert len([name for name in fs.ls(f"{result['prepare']}/shards") if name.endswith(".npz")]) == 51
    assert json.loads(fs.cat_file(f"{result['evaluate']}/stage.json"))["status"] == "complete"

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("stream").experiment_id
    train_run = next(run for run in client.search_runs([experiment]) if run.data.tags.get("ddpm.stage") == "train")
    waits = client.get_metric_history(train_run.info.run_id, "data_wait_fraction")
    assert waits and all(0.0 <= wait.value <= 1.0 for wait in waits)
    assert max(m.step for m in client.get_metric_history(train_run.info.run_id, "loss")) == TOTAL
