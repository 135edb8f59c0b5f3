"""The distill stage through the whole pipeline (configs/digits-distill.yaml, shrunk): real ``python -m pipelines
run`` processes, each with its own local Ray and a local MLflow store. The uninterrupted run's student is sampled with
its own few-step DDIM, scored beside its teacher at each NFE, registered under a name of its NFE and served by its
pyfunc at its steps; a run killed in the second round resumes there (the first round's student reused) to the very
same student weights (issue 33's acceptance: "a killed distillation resumes to the same student snapshot hash")."""

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.run_files import outputs
from tests.services import run_in_session
from tests.test_resume_and_corruption import kill_ray_processes, sha256, wait_for

REPO = Path(__file__).resolve().parents[1]
ROUND, ROUND_EVERY = 1536, 512
TEACHER = 1024  # the teacher's training images: no test here reads its quality
TINY = [
    f"train.total_images={TEACHER}",
    f"train.checkpoint_every_images={TEACHER}",
    "train.log_every_images=1024",
    "train.grid_every_images=null",
    "train.warmup_images=512",
    "train.ema_profiles=[]",
    "train.ema_snapshot_every_images=0",
    "train.ema_sigma_rel=null",
    "distill.teacher_steps=8",  # rounds of 4 and 2 steps
    "distill.steps=2",
    f"distill.images_per_round={ROUND}",
    f"distill.checkpoint_every_images={ROUND_EVERY}",
    "distill.log_every_images=128",
    "sample.num_samples=40",
    "sample.batch_size=40",  # one shard a set: the sample stage's and evaluate's six each start one actor, not two
    "sample.num_steps=5",  # the teacher's own sampler: DDIM-5
    "evaluate.classifier_epochs=1",
    "evaluate.untrained_baseline=false",
    "evaluate.rescore_champion=false",  # the killed run's register compares with the recorded FID instead
    "evaluate.inception_score=false",
    "evaluate.precision_recall=false",
]
ENV = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}


def command(root: Path, run_id: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipelines",
        "run",
        "--config",
        str(REPO / "configs" / "digits-distill.yaml"),
        f"run_id={run_id}",
        *TINY,
        f"storage.root={root / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
    ]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """One uninterrupted run, the reference of the tests below."""
    root = tmp_path_factory.mktemp("distill")
    result = run_in_session(command(root, "straight"), timeout=900, cwd=root, env=ENV)
    (root / "straight.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return root


def test_the_student_is_sampled_at_its_steps_scored_beside_its_teacher_and_registered_by_its_nfe(straight):
    run_root = straight / "runs/straight"
    distilled = outputs(run_root, "distill")
    assert [r["steps"] for r in distilled["rounds"]] == [4, 2] and distilled["images_seen"] == 2 * ROUND
    assert distilled["rounds"][1]["teacher_snapshot_uri"] == distilled["rounds"][0]["snapshot_uri"]
    assert distilled["teacher_snapshot_uri"] == outputs(run_root, "train")["snapshot_uri"]
    assert distilled["config"]["diffusion"]["prediction"] == "v"
    metadata = json.loads((Path(distilled["snapshot_uri"]) / "config.json").read_text())["metadata"]
    assert metadata["distilled"]["steps"] == 2 and metadata["images_seen"] == ROUND

    sampled = outputs(run_root, "sample")
    assert sampled["snapshot_uri"] == distilled["snapshot_uri"]
    sampler = sampled["sampler"]
    assert (sampler["method"], sampler["num_steps"], sampler["spacing"], sampler["eta"]) == ("ddim", 2, "trailing", 0)

    scored = outputs(run_root, "evaluate")
    curve = {(p["model"], p["sampler"], p["nfe"]): p for p in scored["nfe_curve"]}
    assert set(curve) == {
        ("student", "ddim (trailing)", 2),
        ("student", "ddim (trailing)", 4),
        *{("teacher", f"{method} (trailing)", nfe) for method in ("ddim", "dpm_solver++_2m") for nfe in (2, 4)},
        ("teacher", "ddim (linspace)", 5),  # sample.method and num_steps: the teacher's own sampler
    }, sorted(curve)
    assert all(math.isfinite(p["fid"]) and p["fid"] > 0 and p["fid_stderr"] > 0 for p in curve.values())
    assert curve[("student", "ddim (trailing)", 2)]["fid"] == scored["scores"]["fid"]
    assert curve[("student", "ddim (trailing)", 4)]["snapshot_uri"] == distilled["rounds"][0]["snapshot_uri"]
    assert scored["scores"]["nll_bpd"] is None and scored["score_protocol"]["nfe"] == 2

    client = MlflowClient(f"sqlite:///{straight / 'mlflow.db'}")
    run = client.get_run(scored["scores_run_id"])
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"fid_vs_nfe.png", "fid_vs_nfe_table.json", "fid_vs_nfe.json"} <= artifacts, artifacts
    version = client.get_model_version("ddpm-digits-v-2step", "1")
    assert (version.tags["nfe"], version.tags["method"]) == ("2", "progressive")
    assert version.tags["teacher_snapshot"] == distilled["teacher_snapshot_uri"]
    assert version.tags["teacher_version"].startswith("none")  # this run registered no teacher
    assert version.tags["snapshot_uri"] == distilled["snapshot_uri"]
    assert "2-step student" in version.description and client.get_registered_model("ddpm-digits-v-2step")

    mlflow.set_tracking_uri(f"sqlite:///{straight / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/ddpm-digits-v-2step/1")
    defaults = {param.name: param.default for param in model.metadata.get_params_schema().params}
    assert (defaults["method"], defaults["num_steps"], defaults["spacing"]) == ("ddim", 2, "trailing")
    images = model.predict(pd.DataFrame({"index": range(4)}))
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8 and images.std() > 0


# a second distillation run, killed and resumed (135 s): make test-all, so that CI fits its hour. In CI: a run killed
# or stopped in training resumes to the uninterrupted weights (tests/test_resume_and_corruption.py), and a distill
# round's step is the same on one worker or two (tests/test_elastic_math.py)
@pytest.mark.slow
def test_a_killed_distillation_resumes_in_its_round_to_the_uninterrupted_student(straight):
    root, log_path = straight, straight / "killed.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command(root, "killed"), cwd=root, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    second_round = lambda text: text.split("distill: round 2, ", 1)[1] if "distill: round 2, " in text else ""
    progress = lambda text: max([0, *map(int, re.findall(rf"train: (\d+)/{ROUND} images", second_round(text)))])
    try:  # rank 0 prints progress only after a checkpoint's report returned: past ROUND_EVERY one is committed
        wait_for(process, log_path, lambda text: progress(text) > ROUND_EVERY)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray instance it started
        kill_ray_processes()  # and its workers: the whole machine crashed
        process.wait(timeout=30)
    assert progress(log_path.read_text()) < ROUND, "killed after the round ended: lengthen it"

    resumed = run_in_session(command(root, "killed"), timeout=900, cwd=root, env=ENV)
    said = resumed.stdout + resumed.stderr
    (root / "resumed.log").write_text(said)
    assert resumed.returncode == 0, said[-4000:]
    assert "round 1 (4 steps) is committed, reused" in said and "resumed from checkpoint at" in said, said[-4000:]
    again, reference = outputs(root / "runs/killed", "distill"), outputs(root / "runs/straight", "distill")
    for ours, theirs in zip(again["rounds"], reference["rounds"], strict=True):
        mine, uninterrupted = (Path(r["snapshot_uri"]) / "model.safetensors" for r in (ours, theirs))
        assert sha256(mine) == sha256(uninterrupted), f"the {ours['steps']}-step students differ"


def test_the_distill_benchmark_gathers_each_seeds_curve_and_the_costs(straight):
    """benchmarks/distill_stage.py on the finished run (seed 1: every stage is up to date and reused): the evaluate
    stage's curve, the student / teacher ratio it reports, and the costs of distillation and training."""
    out = straight / "distill_stage.json"
    places = [f"storage.root={straight / 'runs'}", f"mlflow.tracking_uri=sqlite:///{straight / 'mlflow.db'}"]
    command = [sys.executable, "benchmarks/distill_stage.py", "--seeds", "1", "--out", str(out)]
    subprocess.run([*command, "run_id=straight", *TINY, *places], cwd=REPO, env=ENV, check=True, timeout=300)
    result = json.loads(out.read_text())
    scored = outputs(straight / "runs/straight", "evaluate")
    student, teacher = "student, ddim (trailing), 2 NFE", "teacher, ddim (linspace), 5 NFE"
    assert result["rows"][student]["fids"] == [scored["scores"]["fid"]] and len(result["rows"]) == 7
    ratio = result["student_over_teacher"]
    assert (ratio["student"], ratio["teacher"]) == (student, teacher)
    assert ratio["per_seed"] == [result["rows"][student]["fids"][0] / result["rows"][teacher]["fids"][0]]
    costs = result["costs"]
    assert (costs["distill_images"], costs["teacher_images"]) == (2 * ROUND, TEACHER)
    assert costs["distill_stage_seconds"] > costs["distill_loop_seconds"] > 0 and costs["teacher_loop_seconds"] > 0


# another distill round, sampling, evaluate and register (69 s): make test-all. In CI: the consistency loss, target and
# grid against closed forms, a consistency snapshot sampled through its skip scalings (tests/test_distillation.py), a
# round's step on one worker equal to two workers' (tests/test_elastic_math.py), and the distill stage end to end above
@pytest.mark.slow
def test_a_consistency_student_of_the_same_teacher_is_drawn_in_one_step_through_its_skip_scalings(straight):
    """``distill.method=consistency`` on the same run (prepare and train reused; last in this module, since it moves
    the run's head): one round against the teacher's 8-step DDIM trajectories, whose student samples, scores and
    serves in one network evaluation through its consistency function, and is registered as a 1-step student."""
    from ddpm_core.checkpoint import load_snapshot
    from ddpm_core.distillation import ConsistencyFunction

    consistency = ["distill.method=consistency", "distill.steps=1", "distill.target_ema=0.9"]
    changed = [*command(straight, "straight"), *consistency, "--allow-changes"]
    result = run_in_session(changed, timeout=900, cwd=straight, env=ENV)
    said = result.stdout + result.stderr
    (straight / "consistency.log").write_text(said)
    assert result.returncode == 0, said[-4000:]
    assert "[train] up to date" in said and "one round along the teacher's 8-step DDIM trajectories" in said
    run_root = straight / "runs/straight"
    distilled = outputs(run_root, "distill")
    assert distilled["method"] == "consistency" and [r["steps"] for r in distilled["rounds"]] == [1]
    assert distilled["images_seen"] == ROUND and distilled["config"]["train"]["ema_decay"] == 0.9
    student = load_snapshot(distilled["snapshot_uri"])
    assert student.metadata["distilled"]["method"] == "consistency"
    assert isinstance(student.build_model(), ConsistencyFunction)
    teacher = Path(distilled["teacher_snapshot_uri"]) / "model.safetensors"
    assert sha256(Path(distilled["snapshot_uri"]) / "model.safetensors") != sha256(teacher)

    sampler = outputs(run_root, "sample")["sampler"]
    assert (sampler["method"], sampler["num_steps"], sampler["spacing"]) == ("ddim", 1, "trailing")
    scored = outputs(run_root, "evaluate")
    curve = {(p["model"], p["sampler"], p["nfe"]): p["fid"] for p in scored["nfe_curve"]}
    assert set(curve) == {
        ("student", "ddim (trailing)", 1),
        ("teacher", "ddim (trailing)", 1),
        ("teacher", "dpm_solver++_2m (trailing)", 1),
        ("teacher", "ddim (linspace)", 5),
    }, sorted(curve)
    assert all(math.isfinite(fid) and fid > 0 for fid in curve.values())

    client = MlflowClient(f"sqlite:///{straight / 'mlflow.db'}")
    version = client.get_model_version("ddpm-digits-v-1step", "1")
    assert (version.tags["nfe"], version.tags["method"]) == ("1", "consistency")
    mlflow.set_tracking_uri(f"sqlite:///{straight / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/ddpm-digits-v-1step/1")
    images = model.predict(pd.DataFrame({"index": range(4)}))
    assert images.shape == (4, 8, 8, 1) and images.std() > 0
