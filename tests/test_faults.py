"""Fault injection on real components: a Ray Train worker SIGKILLed mid-training (the group restarts from the latest
checkpoint), the job driver SIGKILLed during training and again during sampling (each re-run resumes from what was
committed; the final images equal an uninterrupted sampling's), the MLflow server stopped for a while during training
(training goes on, metrics are buffered and land when it is back), and a diverging run (stopped once, not retried)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tests import run_files
from tests.conftest import free_port
from tests.services import BIN, _stop, _wait_http

REPO = Path(__file__).resolve().parents[1]
TOTAL, CHECKPOINT_EVERY = 8192, 1024
SAMPLES, SHARD = 200, 25  # 8 shards: a killed driver's 2 actors may still finish the shards they hold


def ray_workers(name: str) -> list[psutil.Process]:
    """Live Ray worker processes whose title starts with ``ray::<name>``."""
    workers = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if (process.info["cmdline"] or [""])[0].startswith(f"ray::{name}"):
                workers.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return workers


def progress_in(log_path: Path, total: int = TOTAL) -> int:
    return max([0, *(int(n) for n in re.findall(rf"train: (\d+)/{total} images", log_path.read_text()))])


def pipeline_env() -> dict[str, str]:
    """This environment without RAY_ADDRESS: the pipeline starts its own local Ray."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def start_run(args: list[str], log_path: Path) -> subprocess.Popen:
    """The pipeline command ``args`` in its own process group (so it can be killed with the local Ray it starts),
    its output in ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            args, cwd=REPO, env=pipeline_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for(condition, process: subprocess.Popen, log_path: Path, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.2)


# three whole runs (171 s undisturbed): make test-all. In CI: a lost worker's group restart in test_multinode's node
# loss, a killed driver's resume in test_resume_and_corruption, committed sample shards skipped there and in the Ctrl-C
# test
@pytest.mark.slow
def test_killed_worker_then_killed_driver_resume_from_checkpoints(tmp_path):
    """Phase 1: SIGKILL one Ray Train worker past the third checkpoint; Ray Train restarts the group from the latest
    checkpoint and the loss continues. Then SIGKILL the driver (and the local Ray it started). Phase 2: the same
    command resumes training from the last committed checkpoint and finishes the pipeline."""
    args = [
        sys.executable,
        "-m",
        "pipelines",
        "run",
        "run_id=faults",
        f"train.total_images={TOTAL}",
        f"train.checkpoint_every_images={CHECKPOINT_EVERY}",
        "train.log_every_images=512",
        "train.grid_every_images=0",
        "train.max_failures=2",
        "train.warmup_images=512",
        f"sample.num_samples={SAMPLES}",
        f"sample.batch_size={SHARD}",
        "sample.num_steps=50",
        "evaluate.classifier_epochs=1",
        "train.ema_choice_images=64",  # the post-hoc EMA choice on a small budget
        "train.ema_choice_timesteps=4",
        "evaluate.untrained_baseline=false",
        "evaluate.nll=false",
        "register.enabled=false",
        f"storage.root={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "mlflow.experiment=faults",
    ]
    env, first_log = pipeline_env(), tmp_path / "first.log"
    first = start_run(args, first_log)
    try:
        # Past the third checkpoint: the loss is well below its start.
        wait_for(lambda: progress_in(first_log) >= 3 * CHECKPOINT_EVERY + 512, first, first_log)
        workers = ray_workers("RayTrainWorker")
        assert len(workers) == 2, "expected the two Ray Train workers of this run"
        workers[-1].send_signal(signal.SIGKILL)
        killed_at = progress_in(first_log)
        wait_for(lambda: "resumed from checkpoint at " in first_log.read_text(), first, first_log)
        restarted_at = int(first_log.read_text().split("resumed from checkpoint at ")[1].split()[0])
        # Training goes on after the restart.
        wait_for(lambda: progress_in(first_log) >= killed_at + 1024, first, first_log)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # now the driver, with the local Ray instance it started
        first.wait(timeout=30)
    # At most one interval (and a log step) repeated.
    assert killed_at - CHECKPOINT_EVERY - 512 <= restarted_at <= killed_at
    run_root = tmp_path / "runs/faults"
    assert run_files.manifest(run_root, "prepare")["status"] == "complete"
    assert not run_files.completed(run_root, "train")  # the killed stage is not marked complete

    # Phase 2: resume training; SIGKILL the driver again as soon as the first sample shard is committed.
    second_log = tmp_path / "second.log"
    second = start_run(args, second_log)
    try:
        wait_for(
            lambda: bool(list(tmp_path.glob("runs/faults/sample/*/shards/shard-*/manifest.json"))), second, second_log
        )
    finally:
        os.killpg(second.pid, signal.SIGKILL)
        second.wait(timeout=30)
    # Ray's worker processes are not in the driver's process group: they go when the raylet does.
    deadline = time.time() + 60
    while ray_workers("SampleWorker") and time.time() < deadline:
        time.sleep(0.2)
    assert not ray_workers("SampleWorker"), "sampling actors outlived their driver"
    output = second_log.read_text()
    assert "[prepare] up to date" in output
    resumed_at = int(output.split("resumed from checkpoint at ")[1].split()[0])
    assert restarted_at < resumed_at < TOTAL
    committed_before = len(list(tmp_path.glob("runs/faults/sample/*/shards/shard-*/manifest.json")))
    assert 1 <= committed_before < SAMPLES // SHARD and not run_files.completed(run_root, "sample")

    # Phase 3: the re-run skips training and the committed shards, samples the rest, and finishes.
    third = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-4000:] + third.stderr[-4000:]
    assert "[train] up to date" in third.stdout
    assert f"sample: {committed_before} of {SAMPLES // SHARD} shards already committed, skipping them" in third.stdout
    assert_samples_equal_an_uninterrupted_sampling(run_root)

    # benchmarks/fid_vs_steps.py, run on this finished run with its own sampler, reproduces the run's logged FID.
    out = tmp_path / "fid_vs_steps.json"
    subprocess.run(
        [
            sys.executable,
            "benchmarks/fid_vs_steps.py",
            "--run-root",
            str(run_root),
            "--samplers",
            "ddim:50",
            "ddim:10",
            "heun:3:karras",
            "--out",
            str(out),
            "--plot",
            str(tmp_path / "fid.png"),
        ],
        cwd=REPO,
        check=True,
        timeout=300,
        env={**env, "OMP_NUM_THREADS": "1"},  # one thread, like a sampling actor: the same images
    )
    benchmark = json.loads(out.read_text())
    rows = [(row["method"], row["steps"], row["spacing"], row["nfe"]) for row in benchmark["rows"]]
    assert rows == [("ddim", 50, "linspace", 50), ("ddim", 10, "linspace", 10), ("heun", 3, "karras", 5)]
    assert benchmark["rows"][0]["fid"] == pytest.approx(benchmark["run_fid"], rel=1e-4)
    assert (
        benchmark["rows"][1]["fid"] != pytest.approx(benchmark["run_fid"], rel=1e-2)
        and (tmp_path / "fid.png").stat().st_size > 10_000
    )
    manifest = run_files.manifest(run_root, "train")
    assert manifest["status"] == "complete" and manifest["outputs"]["images_seen"] == TOTAL

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # The second train run's loss history continues from its checkpoint: no point before it.
    steps = [m.step for m in client.get_metric_history(manifest["mlflow_run_id"], "loss")]
    assert steps and min(steps) > resumed_at and max(steps) == TOTAL
    # In the first train run, the loss after the worker-group restart continues at its level before the kill,
    # far below the untrained level (optimizer, EMA and data-order state restored).
    experiment = client.get_experiment_by_name("faults").experiment_id
    killed_run = next(
        r
        for r in client.search_runs([experiment], "tags.`ddpm.stage` = 'train'")
        if r.info.run_id != manifest["mlflow_run_id"]
    )
    history = sorted(client.get_metric_history(killed_run.info.run_id, "loss"), key=lambda m: m.timestamp)
    first_loss = history[0].value
    before_kill = [m.value for m in history if m.step <= killed_at][-1]
    after_restart = [
        m.value for m in history if m.timestamp > max(h.timestamp for h in history if h.step == killed_at)
    ][:2]
    assert after_restart and max(after_restart) < 0.6 * first_loss and max(after_restart) < 1.5 * before_kill, (
        first_loss,
        before_kill,
        after_restart,
    )


def assert_samples_equal_an_uninterrupted_sampling(run_root: Path) -> None:
    """Every sample index 0..N-1 exactly once across the committed shards, and each shard bit-identical to sampling
    its indices in one go here, from the same snapshot and seed, with the same thread count as a sampling actor."""
    import io

    import numpy as np
    import torch

    from ddpm_core.checkpoint import load_snapshot
    from ddpm_core.data import to_uint8
    from ddpm_core.diffusion import GaussianDiffusion
    from ddpm_core.samplers import PerIndexNoise, SamplerConfig, sample
    from ddpm_core.storage import read_committed

    outputs = run_files.outputs(run_root, "sample")
    snapshot = load_snapshot(run_files.outputs(run_root, "train")["snapshot_uri"], {})
    model, diffusion = snapshot.build_model(), GaussianDiffusion.from_config(snapshot.diffusion)
    shape = (snapshot.unet.in_channels, snapshot.unet.image_size, snapshot.unet.image_size)
    indices = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a sampling actor has one CPU
    try:
        for uri in outputs["shard_uris"]:
            files, metadata = read_committed(uri)
            images = np.load(io.BytesIO(files["images.npy"]))
            expected = sample(
                model,
                diffusion,
                shape,
                PerIndexNoise(outputs["seed"], range(metadata["start"], metadata["stop"]), "cpu"),
                SamplerConfig(**outputs["sampler"]),
            ).samples
            assert np.array_equal(images, to_uint8(expected)), f"{uri} differs from an uninterrupted sampling"
            indices += range(metadata["start"], metadata["stop"])
    finally:
        torch.set_num_threads(threads)
    assert sorted(indices) == list(range(SAMPLES))


def start_mlflow(workdir: Path, port: int) -> subprocess.Popen:
    command = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination",
        str(workdir / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(workdir / "mlflow-server.log", "a") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir
        )
    _wait_http(f"http://127.0.0.1:{port}/health", process, 90, workdir / "mlflow-server.log")
    return process


def _progress_during_outage(log: str, total: int) -> list[int]:
    """The training progress (images) printed after the trainer first found MLflow unreachable and before it found
    it reachable again: the trainer prints both notices and its progress lines from one process, in order."""
    start = log.find("MLflow unreachable")
    if start < 0:
        return []
    end = log.find("reachable again", start)
    return [int(n) for n in re.findall(rf"train: (\d+)/{total} images", log[start : end if end >= 0 else len(log)])]


# a whole run with a server outage in it (113 s undisturbed): make test-all. In CI: an unreachable tracking server is
# named within its deadline (test_reliability_inputs)
@pytest.mark.slow
def test_training_survives_an_mlflow_outage(tmp_path):
    """The tracking server crashes (SIGKILL) early in training and stays down until the trainer has noticed and
    trained on past at least one more log step; it then comes back on the same address and database. The run must
    finish, every logged step must land, and the log must show training progress between the trainer's
    "unreachable" and "reachable again" notices. Nothing waits on a fixed delay, so the test holds on any speed."""
    total, every = 12288, 512
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "pipelines",
        "run",
        "run_id=outage",
        f"train.total_images={total}",
        "train.checkpoint_every_images=4096",
        f"train.log_every_images={every}",
        "train.grid_every_images=0",
        "sample.num_samples=50",
        "sample.batch_size=50",
        "sample.num_steps=5",
        "evaluate.classifier_epochs=1",
        "train.ema_choice_images=64",  # the post-hoc EMA choice on a small budget
        "train.ema_choice_timesteps=4",
        "evaluate.untrained_baseline=false",
        "evaluate.nll=false",
        "register.enabled=false",
        f"storage.root={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=http://127.0.0.1:{port}",
        "mlflow.experiment=outage",
    ]
    log_path = tmp_path / "run.log"
    server = start_mlflow(tmp_path, port)
    run = start_run(args, log_path)
    progress = lambda: max([0, *(int(n) for n in re.findall(rf"train: (\d+)/{total} images", log_path.read_text()))])
    try:
        deadline = time.time() + 300
        while progress() < 2 * every:
            assert run.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(server.pid, signal.SIGKILL)  # the tracking server crashes mid-training ...
        server.wait(timeout=10)
        assert progress() < total, "training ended before the outage began: raise total_images"
        deadline = time.time() + 300
        while len(set(_progress_during_outage(log_path.read_text(), total))) < 2:
            assert run.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        server = start_mlflow(tmp_path, port)  # ... and comes back on the same address and database
        assert run.wait(timeout=600) == 0, log_path.read_text()[-5000:]

        output = log_path.read_text()
        assert "reachable again" in output, output[-3000:]
        during = _progress_during_outage(output, total)
        assert len(set(during)) >= 2 and during == sorted(during), f"training went on while MLflow was down: {during}"
        client = MlflowClient(f"http://127.0.0.1:{port}")
        manifest = run_files.manifest(tmp_path / "runs/outage", "train")
        assert client.get_run(manifest["mlflow_run_id"]).info.status == "FINISHED"
        steps = sorted({m.step for m in client.get_metric_history(manifest["mlflow_run_id"], "loss")})
        assert steps == list(range(every, total + 1, every)), "every logged step landed, none lost to the outage"
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        _stop(server)


def test_a_diverging_run_stops_once_with_advice_and_no_retries(tmp_path):
    """A learning rate of 1e30 makes the loss non-finite within a few steps. With retries configured
    (``train.max_failures=2``), the stage must still stop at once: one worker-group start, exit code 4, a message
    naming the settings to change, the stage not marked complete and its MLflow runs FAILED."""
    args = [
        sys.executable,
        "-m",
        "pipelines",
        "run",
        "run_id=diverge",
        "train.lr=1e30",
        "train.warmup_images=0",
        "train.total_images=8192",
        "train.checkpoint_every_images=1024",
        "train.log_every_images=512",
        "train.grid_every_images=0",
        "train.max_failures=2",
        f"storage.root={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "mlflow.experiment=diverge",
    ]
    run = subprocess.run(args, cwd=REPO, env=pipeline_env(), capture_output=True, text=True, timeout=600)
    output = run.stdout + run.stderr
    assert run.returncode == 4, output[-4000:]
    assert "error: training diverged: the loss became non-finite by 512 images" in run.stderr
    assert "lower train.lr (now 1e+30)" in run.stderr and "train.grad_clip" in run.stderr
    assert run.stdout.count("train: worker group of 2 started") == 1, "Ray Train must not retry a diverged run"
    assert "train: worker group of 2 started at 0 images, fp32, DDP with gradient_as_bucket_view=True" in run.stdout
    assert "Traceback" not in run.stderr
    assert not run_files.completed(tmp_path / "runs/diverge", "train")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("diverge").experiment_id])
    assert {r.data.tags["ddpm.stage"]: r.info.status for r in runs} == {
        "pipeline": "FAILED",
        "prepare": "FINISHED",
        "train": "FAILED",
        "train samples": "FAILED",  # the grids' run ends with its stage's
    }
