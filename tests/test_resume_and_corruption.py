"""Faults a run meets after it has started, on real runs of the pipeline (each a ``python -m pipelines run``
process with its own local Ray): a driver killed mid-training resumes to the very weights an uninterrupted run
reaches, even when its latest checkpoint was corrupted meanwhile (it falls back to the one before); a corrupt sample
shard or snapshot is found where it is read, forgotten with what was computed from it, and recomputed by the next
plain run; a re-run with changed inputs that fails leaves no result of the new inputs and keeps the earlier config's;
a full disk is a named storage failure, and the run resumes once there is room."""

import contextlib
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ddpm_core.samplers import SamplerConfig
from tests.run_files import completed, result_dir
from tests.run_files import outputs as stage_outputs
from tests.services import run_in_session

REPO = Path(__file__).resolve().parents[1]
TOTAL, EVERY, BATCH = 6144, 2048, 128
TINY = [
    f"train.total_images={TOTAL}",
    f"train.checkpoint_every_images={EVERY}",
    "train.log_every_images=256",
    "train.grid_every_images=0",
    "train.warmup_images=512",
    "sample.num_samples=20",
    "sample.batch_size=10",
    "sample.num_steps=5",
    "evaluate.classifier_epochs=1",
    "train.ema_choice_images=64",  # the post-hoc EMA choice on a small budget
    "train.ema_choice_timesteps=4",
    "evaluate.untrained_baseline=false",
    "evaluate.nll=false",
    "evaluate.inception_score=false",
    "evaluate.precision_recall=false",
    "register.enabled=false",
]
ENV = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}


def command(root: Path, run_id: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipelines",
        "run",
        f"run_id={run_id}",
        *TINY,
        f"storage.root={root / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        "mlflow.experiment=resume",
        *extra,
    ]


def run(root: Path, run_id: str, *extra: str) -> subprocess.CompletedProcess:
    return run_in_session(command(root, run_id, *extra), timeout=600, cwd=REPO, env=ENV)


def outputs(run_root: Path, stage: str) -> dict:
    return stage_outputs(run_root, stage)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One uninterrupted run, the reference of the tests below."""
    root = tmp_path_factory.mktemp("resume")
    result = run(root, "straight")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return root


def test_fid_vs_steps_reproduces_the_runs_logged_fid_and_scores_other_samplers(finished):
    """benchmarks/fid_vs_steps.py on the finished run: the row of the run's own sampler is the run's logged FID, and
    another sampler's is not."""
    run_root, out = finished / "runs/straight", finished / "fid_vs_steps.json"
    logged = stage_outputs(run_root, "evaluate")["protocol"]["sampler"]
    sampler = SamplerConfig(**logged).to_dict()  # the method's own spacing where the run named none
    own = f"{sampler['method']}:{sampler['num_steps']}:{sampler['spacing']}"
    command = [sys.executable, "benchmarks/fid_vs_steps.py", "--run-root", str(run_root), "--out", str(out)]
    samplers = ["--samplers", own, "ddim:10", "heun:3:karras", "--plot", str(finished / "fid.png")]
    # one thread, like a sampling actor: the same images
    subprocess.run([*command, *samplers], cwd=REPO, env={**ENV, "OMP_NUM_THREADS": "1"}, check=True, timeout=300)
    benchmark = json.loads(out.read_text())
    rows = [(row["method"], row["steps"], row["spacing"], row["nfe"]) for row in benchmark["rows"]]
    assert rows[1:] == [("ddim", 10, "linspace", 10), ("heun", 3, "karras", 5)], rows
    assert benchmark["run_sampler"] == sampler and rows[0][:3] == (sampler["method"], 5, sampler["spacing"])
    assert benchmark["rows"][0]["fid"] == pytest.approx(benchmark["run_fid"], rel=1e-4)
    assert benchmark["rows"][1]["fid"] != pytest.approx(benchmark["run_fid"], rel=1e-2)
    assert (finished / "fid.png").stat().st_size > 10_000


def test_the_distillation_benchmark_distills_round_by_round_and_scores_students_beside_the_teacher(finished):
    """benchmarks/progressive_distillation.py on the finished run, tiny: two rounds (2 steps, then 1), each student
    scored at its own NFE on every seed, the teacher at DDIM-50 and at each student's NFE with two solvers."""
    out = finished / "distillation.json"
    command = [sys.executable, "benchmarks/progressive_distillation.py", "--run-root", str(finished / "runs/straight")]
    sizes = ["--first-student", "2", "--last-student", "1", "--images-per-round", "100", "--batch-size", "50"]
    scoring = ["--seeds", "1", "2", "--samples", "20", "--sample-batch", "10", "--out", str(out)]
    subprocess.run([*command, *sizes, *scoring], cwd=REPO, env=ENV, check=True, timeout=300)
    result = json.loads(out.read_text())
    students = result["students"]
    assert [(row["nfe"], row["images_total"]) for row in students] == [(2, 100), (1, 200)]
    assert [(row["nfe"], row["label"].split()[1]) for row in result["teacher"]] == [
        (50, "ddim-50"),
        (2, "ddim-2"),
        (2, "dpm_solver++_2m-2"),
        (1, "ddim-1"),
        (1, "dpm_solver++_2m-1"),
    ]
    for row in [*students, *result["teacher"]]:
        assert len(row["fids"]) == 2 and all(math.isfinite(fid) and fid > 0 for fid in row["fids"]), row
    assert all(len(row["losses"]) == 2 and math.isfinite(row["losses"][0]) for row in students)  # one per step here
    assert result["floor"] > 0 and (result["teacher_prediction"], result["student_prediction"]) == ("eps", "eps")

    # A v-prediction student of the eps teacher: the teacher's answers converted to v, the students scored as v.
    subprocess.run(
        [*command, *sizes, *scoring, "--student-prediction", "v", "--skip-teacher"],
        cwd=REPO,
        env=ENV,
        check=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    assert result["student_prediction"] == "v" and result["teacher"] == [] and len(result["students"]) == 2
    assert all(math.isfinite(fid) for row in result["students"] for fid in row["fids"])


# a killed and a resumed run (70 s): make test-all, so that CI fits its hour. In CI: SIGTERM in training resumes to
# the uninterrupted weights (below), and a corrupt or uncommitted checkpoint is refused (tests/test_checkpoint.py)
@pytest.mark.slow
def test_a_killed_run_resumes_to_the_uninterrupted_weights_past_a_corrupt_checkpoint_and_record(finished):
    root = finished
    log_path = root / "killed.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command(root, "killed"), cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    progress = lambda: max([0, *(int(n) for n in re.findall(rf"train: (\d+)/{TOTAL} images", log_path.read_text()))])
    try:
        deadline = time.time() + 300
        # Rank 0 prints progress only after a checkpoint's report returned: past 2 x EVERY both are committed.
        while progress() <= 2 * EVERY:
            assert process.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray instance it started
        kill_ray_processes()  # and its workers, which run in sessions of their own: the whole machine crashed
        process.wait(timeout=30)
    assert progress() < TOTAL, "killed after training ended: lengthen the run"
    checkpoints = sorted(
        path.parent for path in (root / "runs/killed/train").glob("*/ray/trainer/checkpoint_*/manifest.json")
    )
    assert len(checkpoints) == 2, checkpoints
    flip_a_byte(checkpoints[-1] / "training_state.pt")  # the latest is corrupt: the run must fall back to the other
    record = checkpoints[0].parent / "checkpoint_manager_snapshot.json"  # Ray Train's, rewritten in place
    record.write_bytes(record.read_bytes()[:0])  # truncated, as a full disk leaves it: Ray Train would not start
    earlier_step = json.loads((checkpoints[0] / "manifest.json").read_text())["metadata"]["step"]

    resumed = run(root, "killed")
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    said = resumed.stdout + resumed.stderr
    (root / "resumed.log").write_text(said)  # the whole output, for a failure's reader
    assert "the latest checkpoint cannot be read" in said and "resuming from the one before it" in said
    assert "checkpoint record" in said and "is unreadable; set aside" in said
    assert f"resumed from checkpoint at {earlier_step * BATCH} images" in said
    straight = Path(outputs(root / "runs/straight", "train")["snapshot_uri"]) / "model.safetensors"
    killed = Path(outputs(root / "runs/killed", "train")["snapshot_uri"]) / "model.safetensors"
    assert sha256(killed) == sha256(straight), "a resumed run draws what an uninterrupted one draws"


def kill_ray_processes(timeout: float = 60) -> None:
    """SIGKILLs every Ray process (GCS, raylet, workers) on this machine and waits until they are gone: a killed
    run's workers and controller, left alone, would go on for a moment (training, writing checkpoints and Ray Train's
    record) until they notice that the GCS is gone."""
    deadline = time.time() + timeout
    while running := ray_processes():
        for pid in running:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        assert time.time() < deadline, running
        time.sleep(0.2)


def ray_processes() -> list[int]:
    """The process ids of the Ray processes on this machine (zombies left out)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            pid = int(cmdline.parent.name)
            if ("gcs_server" in text or "raylet" in text or text.startswith("ray::")) and alive({pid}):
                found.append(pid)
    return found


def start(root: Path, run_id: str, log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(
            command(root, run_id), cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for(process: subprocess.Popen, log_path: Path, ready) -> None:
    deadline = time.time() + 300
    while not ready(log_path.read_text()):
        assert process.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.05)


def descendants(pid: int) -> set[int]:
    """The processes under ``pid`` (its local Ray instance: GCS, raylet, workers), from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists() and "(Z)" not in status_of(pid)}


def status_of(pid: int) -> str:
    with contextlib.suppress(OSError):
        return next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
    return ""


def mlflow_statuses(root: Path, run_id: str) -> dict[str, list[str]]:
    """Each MLflow run of the pipeline run ``run_id`` by name, with its statuses (oldest first)."""
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("resume")
    runs = client.search_runs([experiment.experiment_id], f"tags.`ddpm.run_id` = '{run_id}'", order_by=["start_time"])
    statuses: dict[str, list[str]] = {}
    for run in runs:
        statuses.setdefault(run.info.run_name, []).append(run.info.status)
    return statuses


def test_a_run_stopped_by_signals_resumes_to_the_uninterrupted_weights(finished):
    """One run id stopped three times, then finished: a second Ctrl-C in training does not wait for the checkpoint;
    SIGTERM in training checkpoints the next step and exits 143; the run resumed from there trains to the uninterrupted
    run's weights, and Ctrl-C while it samples stops at once; the same command then finishes the same parent run."""
    second_ctrl_c_in_training(finished)
    stopped = sigterm_in_training(finished)
    ctrl_c_in_sampling(finished, stopped)
    done = run(finished, "signals")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert mlflow_statuses(finished, "signals")["signals"] == ["FINISHED"]  # the same parent run, finished now


def second_ctrl_c_in_training(root: Path) -> None:
    log_path = root / "sigint.log"
    process = start(root, "signals", log_path)
    wait_for(process, log_path, lambda text: re.search(rf"train: \d+/{TOTAL} images", text))
    process.send_signal(signal.SIGINT)
    wait_for(process, log_path, lambda text: "stopping (SIGINT)" in text)
    process.send_signal(signal.SIGINT)  # (signals that arrive together are one signal to Python)
    assert process.wait(timeout=20) == 130, log_path.read_text()[-4000:]
    said = log_path.read_text()
    assert "stopped by SIGINT: exit 130" in said and "Traceback" not in said, said[-4000:]
    statuses = mlflow_statuses(root, "signals")
    assert statuses["signals"] == ["KILLED"] and statuses["signals/train"] == ["KILLED"], statuses


def sigterm_in_training(root: Path) -> int:
    """SIGTERM between two scheduled checkpoints, to the run started again after the second Ctrl-C; returns the
    images at which it stopped."""
    log_path = root / "sigterm.log"
    process = start(root, "signals", log_path)
    progress = lambda text: max([0, *(int(n) for n in re.findall(rf"train: (\d+)/{TOTAL} images", text))])
    wait_for(process, log_path, lambda text: progress(text) > EVERY)  # between two scheduled checkpoints
    started = descendants(process.pid)
    assert started, "the driver's local Ray instance"
    signalled = time.time()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 143, log_path.read_text()[-4000:]
    took, said = time.time() - signalled, log_path.read_text()
    assert took < 30 and "stopping (SIGTERM): checkpointing at the next step, then exiting" in said
    assert "Traceback" not in said, said[-4000:]
    stopped = int(re.search(r"stopped on request at (\d+) images", said).group(1))
    assert stopped < TOTAL and f"train: stopped at {stopped} images; the checkpoint there is recorded" in said
    deadline = time.time() + 30
    while alive(started) and time.time() < deadline:
        time.sleep(0.5)
    assert not alive(started), f"processes the run started are left: {alive(started)}"
    statuses = mlflow_statuses(root, "signals")
    assert statuses["signals"] == ["KILLED"] and statuses["signals/train"] == ["KILLED", "KILLED"], statuses
    assert statuses["signals/prepare"] == ["FINISHED"], statuses
    return stopped


def ctrl_c_in_sampling(root: Path, stopped: int) -> None:
    """The run resumed from the SIGTERM's checkpoint trains to the end, reaching the uninterrupted run's EMA weights,
    and is stopped while it samples."""
    log_path = root / "resumed.log"
    process = start(root, "signals", log_path)
    wait_for(process, log_path, lambda text: "[sample] running" in text)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 130, log_path.read_text()[-4000:]
    said = log_path.read_text()
    assert f"resumed from checkpoint at {stopped} images" in said
    assert "stopping (SIGINT): committed work is kept; run the same command to resume" in said
    assert "Traceback" not in said, said[-4000:]
    statuses = mlflow_statuses(root, "signals")
    assert statuses["signals/train"] == ["KILLED", "KILLED", "FINISHED"], statuses
    assert statuses["signals/sample"] == ["KILLED"] and statuses["signals"] == ["KILLED"], statuses
    assert completed(root / "runs/signals", "train")
    straight = Path(outputs(root / "runs/straight", "train")["snapshot_uri"]) / "model.safetensors"
    again = Path(outputs(root / "runs/signals", "train")["snapshot_uri"]) / "model.safetensors"
    assert sha256(again) == sha256(straight), "the resumed run reaches the uninterrupted run's EMA weights"


def test_a_corrupt_sample_shard_is_forgotten_and_recomputed(finished):
    run_root = finished / "runs/straight"
    shard = Path(outputs(run_root, "sample")["shard_uris"][1]) / "images.npy"
    original = sha256(shard)
    flip_a_byte(shard)
    # ... and the evaluate stage's manifest truncated: that stage runs again (reading the shard), nothing before it
    manifest = result_dir(run_root, "evaluate") / "stage.json"
    manifest.write_text(manifest.read_text()[:100])
    failed = run(finished, "straight")
    assert failed.returncode == 5, failed.stdout[-4000:] + failed.stderr[-4000:]
    assert "[evaluate] its stage.json cannot be used" in failed.stdout and "[sample] up to date" in failed.stdout
    assert f"{shard}: size or SHA-256 does not match the manifest" in failed.stderr
    assert "the sample stage and those after it are marked not done" in failed.stderr
    assert "run the same command again" in failed.stderr and "Traceback" not in failed.stderr
    assert not completed(run_root, "sample") and not completed(run_root, "evaluate")
    assert completed(run_root, "train")

    again = run(finished, "straight")
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "[train] up to date" in again.stdout and "sample: 1 of 2 shards already committed" in again.stdout
    assert sha256(shard) == original, "the recomputed shard equals the one that was corrupted"
    assert json.loads(manifest.read_text())["status"] == "complete"

    # A stage re-executed with changed inputs fails: no result of the new inputs reads as complete, for it or for the
    # stages after it; the results of the config before are kept under their own fingerprints ...
    kept = {stage: completed(run_root, stage) for stage in ("sample", "evaluate")}
    changed = ("--allow-changes", "--from", "sample", "sample.batch_size=1", "sample.num_workers=64")
    failed = run(finished, "straight", *changed)
    assert failed.returncode == 2 and "20 sampling actors need more than this cluster has" in failed.stderr
    assert {stage: completed(run_root, stage) for stage in kept} == kept and all(kept.values())
    # ... and going back to that config reuses them: nothing is computed again.
    back = run(finished, "straight", "--allow-changes")
    assert back.returncode == 0, back.stdout[-4000:] + back.stderr[-4000:]
    assert "[sample] up to date" in back.stdout and "[evaluate] up to date" in back.stdout
    assert "] running (result" not in back.stdout, back.stdout[-4000:]


# two more runs (55 s undisturbed): make test-all. In CI: a corrupt sample shard (above) and a corrupt checkpoint
# (tests/test_checkpoint.py) go through the same size and SHA-256 check of committed files
@pytest.mark.slow
def test_a_corrupt_snapshot_is_forgotten_and_rewritten_from_the_last_checkpoint(finished):
    run_root = finished / "runs/straight"
    snapshot = Path(outputs(run_root, "train")["snapshot_uri"]) / "model.safetensors"
    original = sha256(snapshot)
    flip_a_byte(snapshot)
    failed = run(finished, "straight", "--from", "sample")
    assert failed.returncode == 5, failed.stdout[-4000:] + failed.stderr[-4000:]
    assert "model.safetensors: size or SHA-256 does not match" in failed.stderr
    assert "the train stage and those after it are marked not done" in failed.stderr
    assert not completed(run_root, "train")

    again = run(finished, "straight")
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert f"resumed from checkpoint at {TOTAL} images" in again.stdout  # no step trained again
    assert sha256(snapshot) == original


def test_a_full_disk_is_a_named_storage_failure_and_the_run_resumes_when_there_is_room(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (the full disk) needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    try:
        args = [*command(tmp_path, "full", "train.max_failures=0"), f"storage.root={disk}"]
        full = run_in_session(args, timeout=600, cwd=REPO, env=ENV)
        assert full.returncode == 5, full.stdout[-4000:] + full.stderr[-4000:]
        said = "error: training stopped: no room left on a disk it writes to (No space left on device)"
        assert any(line.startswith(said) for line in full.stderr.splitlines()), full.stderr[-3000:]
        # Ray forwards the workers' own tracebacks (prefixed with the worker); the driver prints none of its own.
        assert not any(line.startswith("Traceback") for line in full.stderr.splitlines()), full.stderr[-3000:]
        assert not list(disk.rglob("*.partial")), "no temporary lease files stay behind"
        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)  # room again
        again = run_in_session(args, timeout=600, cwd=REPO, env=ENV)
        assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
        assert "[prepare] up to date" in again.stdout and "resumed from checkpoint at" in again.stdout
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
