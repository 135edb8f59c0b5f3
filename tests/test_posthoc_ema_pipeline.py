"""Post-hoc EMA in the pipeline (Karras et al. 2024, Sec. 3; the math is tested in tests/test_phema.py): a real run
with ``train.ema_profiles`` commits one snapshot folder per interval passed and at the end, and the EMA
reconstructed at a tracked width is that profile's last snapshot; a run resumed from a checkpoint continues the
profiles bit for bit through the worker's own restore path, and keeps the snapshot folders already committed; bad
settings are refused before anything runs, with exit code 2 and the key named."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray.train
import torch
from mlflow.tracking import MlflowClient

from ddpm_core.checkpoint import Snapshot, load_snapshot, load_training_state, save_training_state
from ddpm_core.data import random_batch, to_model_range
from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion, Prediction, Variance
from ddpm_core.loss_weighting import LossWeighting, Weighting
from ddpm_core.training import OptimConfig
from pipelines.__main__ import main
from pipelines.config import EmaChoice, TrainSection
from pipelines.contracts import PrepareOutputs, TrainedWith, TrainOutputs
from pipelines.data.shards import read_first_images
from pipelines.execution import Device
from pipelines.training import state as state_module
from pipelines.training.ema_choice import EmaSweep, best_of, chosen_width, score_candidates
from pipelines.training.hooks import checkpoint_name, commit_profiles
from pipelines.training.job import TrainJob
from pipelines.training.posthoc import posthoc_snapshot, read_snapshots
from pipelines.training.state import TrainState, Worker, gather_random_states, start_state
from pipelines.training.step import step
from pipelines.typed import from_plain
from tests.run_files import outputs, result_dir
from tests.test_bad_inputs import TINY
from tests.test_sampling import TINY as TINY_UNET

REPO = Path(__file__).resolve().parents[1]
ENV = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
PROFILES = (0.05, 0.10)
CANDIDATES = (0.03, 0.1, 0.2)  # the EMAs the run chooses among after training, on held-out bits/dim
TOTAL, EVERY = 1536, 500  # batch 128: the intervals are passed at 512, 1024 and 1536 images (the end)
CHOICE_IMAGES, CHOICE_TIMESTEPS = 40, 8  # what each candidate is scored on: fewer images than the hold-out split's
RUN = (  # tests/test_bad_inputs.py's smallest run of every stage, longer, with post-hoc EMA (later overrides win)
    *TINY,
    f"train.total_images={TOTAL}",
    "train.checkpoint_every_images=768",
    "train.log_every_images=768",
    "train.grid_every_images=null",
    f"train.ema_profiles=[{PROFILES[0]}, {PROFILES[1]}]",
    f"train.ema_snapshot_every_images={EVERY}",
    f"train.ema_sigma_rel=[{', '.join(map(str, CANDIDATES))}]",
    f"train.ema_choice_images={CHOICE_IMAGES}",
    f"train.ema_choice_timesteps={CHOICE_TIMESTEPS}",
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """The root of a finished run with post-hoc EMA profiles."""
    root = tmp_path_factory.mktemp("posthoc")
    location = [f"storage.root={root / 'runs'}", f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}"]
    command = [sys.executable, "-m", "pipelines", "run", "run_id=posthoc", *RUN, *location]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return root / "runs" / "posthoc"


def test_a_run_with_profiles_commits_their_snapshots_and_reconstructs_a_tracked_width(finished):
    run_root = finished
    train = from_plain(TrainOutputs, outputs(run_root, "train"))
    assert train.posthoc_uri == str(result_dir(run_root, "train") / "posthoc") and train.images_seen == TOTAL
    folders = sorted(path.parent.name for path in Path(train.posthoc_uri).glob("*/manifest.json"))
    assert folders == [f"{images:015d}" for images in (512, 1024, 1536)]
    snapshots = read_snapshots(train.posthoc_uri, {})
    assert [(snap.images_seen, snap.sigma_rel) for snap in snapshots] == [
        (images, width) for images in (512, 1024, 1536) for width in PROFILES
    ]
    tracked = snapshots[-1].state_dict  # sigma_rel 0.10 at the end, as rank 0 tracked it
    reconstructed = posthoc_snapshot(train, PROFILES[1], {})
    assert reconstructed.keys() == tracked.keys()
    for key, value in tracked.items():
        torch.testing.assert_close(reconstructed[key], value, rtol=1e-5, atol=1e-6, msg=key)
        assert reconstructed[key].dtype == value.dtype == torch.float32
    final = json.loads((Path(train.checkpoint_path or "") / "manifest.json").read_text())["metadata"]
    saved = load_training_state(train.checkpoint_path or "")["posthoc"]  # the checkpoint's profiles, at the end
    assert final["step"] == TOTAL // 128 and saved["images_seen"] == TOTAL
    assert all(torch.equal(saved["emas"][1][key], value) for key, value in tracked.items())


def test_the_run_samples_the_candidate_ema_of_the_lowest_held_out_bits_per_dim(finished):
    """``train.ema_sigma_rel`` candidates: each reconstructed and scored on the hold-out split (a score recomputed
    here from the reconstruction and the NLL bound's estimate), the lowest one's weights are the snapshot the run
    samples, and the sweep is in the train run as a table, a plot and a tag."""
    train = from_plain(TrainOutputs, outputs(finished, "train"))
    prepare = from_plain(PrepareOutputs, outputs(finished, "prepare"))
    scores = {candidate.sigma_rel: candidate.score for candidate in train.ema_sweep}
    assert list(scores) == list(CANDIDATES) and len(set(scores.values())) == len(CANDIDATES)
    assert train.ema_sigma_rel == min(scores, key=scores.__getitem__)
    for candidate in train.ema_sweep:  # the paired differences the sweep's plot shows
        assert candidate.minus_chosen == pytest.approx(candidate.score - scores[train.ema_sigma_rel], abs=1e-5)
        assert (candidate.minus_chosen_stderr == 0) == (candidate.sigma_rel == train.ema_sigma_rel)
    assert train.snapshot_uri == str(result_dir(finished, "train") / "chosen_snapshot")
    sampled = load_snapshot(train.snapshot_uri)
    assert sampled.metadata["ema_sigma_rel"] == train.ema_sigma_rel
    chosen = posthoc_snapshot(train, train.ema_sigma_rel, {})
    assert all(torch.equal(sampled.state_dict[key], value) for key, value in chosen.items())

    widest = posthoc_snapshot(train, CANDIDATES[-1], {})
    network = Snapshot(sampled.unet, sampled.diffusion, widest, {}).build_model()
    images = to_model_range(read_first_images(prepare.holdout_uri, CHOICE_IMAGES, {}))  # [n, C, H, W]
    diffusion = GaussianDiffusion.from_config(sampled.diffusion)
    generator = torch.Generator().manual_seed(0)
    estimate = diffusion.bits_per_dim_estimate(network, images, CHOICE_TIMESTEPS, generator=generator)
    assert train.ema_sweep[-1].images == len(images) == CHOICE_IMAGES < prepare.num_holdout
    assert train.ema_sweep[-1].score == pytest.approx(estimate["total"].mean().item(), rel=1e-5)

    client = MlflowClient(f"sqlite:///{finished.parents[1] / 'mlflow.db'}")
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    (run,) = client.search_runs(experiments, "tags.`ddpm.stage` = 'train'")
    assert run.data.tags["ema.chosen_sigma_rel"] == f"{train.ema_sigma_rel:g}"
    logged = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"ema_sweep.png", "ema_sweep_table.json"} <= logged
    (scored,) = client.search_runs(experiments, "tags.`ddpm.stage` = 'evaluate'")  # the scores name their weights
    assert (
        scored.data.tags["model.ema"]
        == f"power-function EMA, sigma_rel {train.ema_sigma_rel:g} (chosen of 3 on held-out bits/dim)"
    )


def test_the_sweep_benchmark_scores_reconstructions_under_the_runs_protocol(finished, tmp_path):
    """benchmarks/posthoc_ema.py on the finished run: one row per width, and the run's own snapshot, scored under the
    run's sampler, seed and N, reproduces the run's logged FID."""
    out, picture = tmp_path / "posthoc_ema.json", tmp_path / "posthoc_ema.png"
    command = [sys.executable, "benchmarks/posthoc_ema.py", "--run-root", str(finished), "--sigma-rels", "0.03", "0.1"]
    env = {**ENV, "OMP_NUM_THREADS": "1"}  # one thread, like a sampling actor: the same images
    subprocess.run([*command, "--out", str(out), "--plot", str(picture)], cwd=REPO, check=True, timeout=300, env=env)
    result = json.loads(out.read_text())
    assert [row["sigma_rel"] for row in result["rows"]] == [0.03, 0.1] and result["ema_profiles"] == list(PROFILES)
    assert result["baseline"]["fid"] == pytest.approx(result["run_fid"], rel=1e-4)
    assert result["best_sigma_rel"] in (0.03, 0.1) and picture.stat().st_size > 10_000


def test_scored_by_the_training_objective_the_candidates_rank_by_their_held_out_weighted_loss(finished, tmp_path):
    """``train.ema_choice=loss``: each candidate's score is the training objective on the hold-out images, here
    min-SNR-5 (Hang et al. 2023), recomputed from its definition on the same draws of t and noise,
    ``min(SNR(t), 5) / SNR(t) * mean |eps - eps_theta(x_t, t)|^2`` (Eq. 14 with ``x_t`` of Eq. 4); the lowest
    candidate's EMA is the snapshot committed."""
    train = from_plain(TrainOutputs, outputs(finished, "train"))
    prepare = from_plain(PrepareOutputs, outputs(finished, "prepare"))
    weighting, chosen_uri = LossWeighting(Weighting.MIN_SNR, 5.0), str(tmp_path / "chosen")
    sweep = EmaSweep(
        train.snapshot_uri, train.posthoc_uri or "", train.images_seen, CANDIDATES, EmaChoice.LOSS, weighting, 0.0,
        prepare.holdout_uri, None, CHOICE_IMAGES, CHOICE_TIMESTEPS, chosen_uri, {},
    )  # fmt: skip
    scored = score_candidates(sweep)
    scores = {candidate.sigma_rel: candidate.score for candidate in scored}
    assert {candidate.unit for candidate in scored} == {"min_snr-weighted loss"} and len(set(scores.values())) == 3
    lowest = min(scores, key=scores.__getitem__)
    assert load_snapshot(chosen_uri).metadata["ema_sigma_rel"] == lowest
    assert [candidate.sigma_rel for candidate in scored if candidate.chosen] == [lowest]
    described = dataclasses.replace(train, ema_sweep=scored).ema_described()  # the summary's "Sampled:" line
    assert described.endswith("(chosen of 3 on held-out min_snr-weighted loss)"), described

    # a tolerance wider than every gap takes the longest width, and the summary says how it was chosen
    loose = score_candidates(dataclasses.replace(sweep, tolerance=1e9))
    assert load_snapshot(chosen_uri).metadata["ema_sigma_rel"] == CANDIDATES[-1] != lowest
    assert best_of(loose).sigma_rel == CANDIDATES[-1] and best_of(loose).minus_chosen_stderr == 0
    said = dataclasses.replace(train, ema_sweep=loose, ema_sigma_rel=CANDIDATES[-1]).ema_described()
    assert said.endswith(f"within train.ema_choice_tolerance paired standard errors of the lowest held-out "
                         f"min_snr-weighted loss, {lowest:g}'s)"), said  # fmt: skip

    snapshot = load_snapshot(train.snapshot_uri)
    assert snapshot.diffusion.prediction is Prediction.EPS and snapshot.diffusion.variance is not Variance.LEARNED_RANGE
    network = Snapshot(snapshot.unet, snapshot.diffusion, posthoc_snapshot(train, CANDIDATES[-1], {}), {}).build_model()
    x0 = to_model_range(read_first_images(prepare.holdout_uri, CHOICE_IMAGES, {}))  # [n, C, H, W]
    diffusion, generator = GaussianDiffusion.from_config(snapshot.diffusion), torch.Generator().manual_seed(0)
    draws = []
    for _ in range(CHOICE_TIMESTEPS):
        t = torch.randint(0, diffusion.num_timesteps, (len(x0),), generator=generator)  # [n]
        noise = torch.randn(x0.shape, generator=generator)  # [n, C, H, W]
        alpha_bar = diffusion.alphas_cumprod[t].float().view(-1, 1, 1, 1)  # [n, 1, 1, 1]
        x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
        with torch.no_grad():
            error = (noise - network(x_t, diffusion.model_timesteps(t))).pow(2).mean(dim=(1, 2, 3))  # [n]
        snr = (alpha_bar / (1 - alpha_bar)).flatten()  # [n]
        draws.append(snr.clamp(max=5.0) / snr * error)
    assert scores[CANDIDATES[-1]] == pytest.approx(torch.stack(draws).mean().item(), rel=1e-4)


def test_the_one_standard_error_rule_takes_the_longest_width_the_paired_scores_cannot_tell_from_the_lowest():
    """``train.ema_choice_tolerance``: per-example scores on shared draws. 0.10 exceeds the lowest (0.07) by less than
    one paired standard error (mean 0.025, standard error 0.048), 0.13 by 0.5 on every example (standard error 0),
    and 0.05, though as close, is shorter than the lowest: tolerance 1 takes 0.10, tolerance 0 the lowest."""
    lowest = torch.tensor([1.0, 2.0, 3.0, 4.0])  # [n]
    totals = {
        0.05: lowest + torch.tensor([0.1, 0.0, 0.1, -0.1]),
        0.07: lowest,
        0.10: lowest + torch.tensor([0.1, 0.0, 0.1, -0.1]),
        0.13: lowest + 0.5,
    }
    assert chosen_width(totals, 1.0) == 0.10
    assert chosen_width(totals, 0.0) == 0.07
    assert chosen_width(totals, 0.51) == 0.07 and chosen_width(totals, 0.53) == 0.10  # the gap: 0.522 standard errors
    assert chosen_width({0.07: lowest, 0.13: lowest + 0.5}, 1e9) == 0.07  # a gap with no spread is never within


def test_the_quality_per_compute_benchmark_reproduces_the_runs_fid_and_floor(finished, tmp_path):
    """benchmarks/quality_per_compute.py: the run's snapshot under its own sampler, seed and N scores the run's FID,
    class coverage TVD and class shares, its floor is the run's, and a post-hoc width is another row; the interval
    over seeds brackets the mean.
    Autoguidance by the same width at half the run: weight 1 is the model alone, weight 2 another sample set, and a
    guide of another width (``@0.1``) yet another; guided only at noise levels in (1, 1000] (``:1,1000``), the
    sampler's first step of two (t = 999, sigma 157; t = 0 is at sigma 0.01) calls the guide, its last does not."""
    sampled, evaluated = outputs(finished, "sample"), outputs(finished, "evaluate")
    sampler = f"{sampled['sampler']['method']}:{sampled['sampler']['num_steps']}"
    out, seeds = tmp_path / "quality.json", [str(sampled["seed"]), "7"]
    half = outputs(finished, "train")["images_seen"] // 2
    variants = [f"run={finished}:{sampler}", f"posthoc={finished}:{sampler}:0.2"]
    variants += [f"w1={finished}:{sampler}:0.2:{half}x1", f"w2={finished}:{sampler}:0.2:{half}x2"]
    variants += [f"narrow={finished}:{sampler}:0.2:{half}x2@0.1", f"limited={finished}:{sampler}:0.2:{half}x2:1,1000"]
    command = [sys.executable, "benchmarks/quality_per_compute.py", "--variant", *variants, "--seeds", *seeds]
    command += ["--samples", str(sampled["num_samples"]), "--out", str(out)]
    subprocess.run(command, cwd=REPO, check=True, timeout=300, env={**ENV, "OMP_NUM_THREADS": "1"})
    run, posthoc, weight_one, weight_two, narrow, limited = json.loads(out.read_text())["rows"]
    assert run["fids"][0] == pytest.approx(evaluated["scores"]["fid"], rel=1e-4)
    assert run["floor"] == pytest.approx(evaluated["scores"]["fid_floor"], rel=1e-9)
    one_image = 1 / sampled["num_samples"]  # a boundary image may fall to either side in another batch
    assert run["class_tvds"][0] == pytest.approx(evaluated["coverage"]["tvd"], abs=one_image + 1e-9)
    assert len(run["class_tvds"]) == 2 and run["class_tvd_mean"] == pytest.approx(sum(run["class_tvds"]) / 2)
    assert run["class_shares"][0] == pytest.approx(evaluated["coverage"]["sample_share"], abs=one_image + 1e-9)
    assert sum(run["class_shares"][1]) == pytest.approx(1) and len(run["class_balanced_fids"]) == 2
    assert all(math.isfinite(fid) and fid >= 0 for fid in run["class_balanced_fids"])
    assert run["fid_ci_low"] < run["fid_mean"] < run["fid_ci_high"] and run["fids"][0] != run["fids"][1]
    assert posthoc["ema"] == "post-hoc sigma_rel 0.2" and posthoc["fids"] != run["fids"]
    assert weight_one["fids"] == posthoc["fids"] and weight_one["nfe"] == posthoc["nfe"]
    assert weight_two["fids"] != posthoc["fids"] and weight_two["nfe"] == 2 * posthoc["nfe"]
    assert weight_two["autoguidance"] == {"guide_images": half, "weight": 2.0, "guide_sigma_rel": 0.2, "interval": None}
    assert narrow["autoguidance"]["guide_sigma_rel"] == 0.1 and narrow["fids"] != weight_two["fids"]
    assert sampled["sampler"]["num_steps"] == 2 and limited["autoguidance"]["interval"] == [1.0, 1000.0]
    assert limited["nfe"] == posthoc["nfe"] + 1 and limited["fids"] != posthoc["fids"]


BATCH, STEPS, RESUME_AT = 8, 12, 5  # the checkpoint after step 5; snapshots every 20 images (every 2.5 steps)


@pytest.fixture
def one_thread():
    """One intra-op thread, as a Ray worker of 1 CPU has (two threads on a busy 2-core host cost seconds a step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_job(work: Path, stf_reference: int = 0) -> TrainJob:
    optim = OptimConfig(lr=1e-3, warmup_images=0, ema_decay=0.9)
    train = TrainSection(
        num_workers=1,
        batch_size=BATCH,
        total_images=BATCH * STEPS,
        ema_profiles=PROFILES,
        ema_snapshot_every_images=20,
        stf_reference=stf_reference,
        optim=optim,
    )
    return TrainJob(TINY_UNET, DiffusionConfig(num_timesteps=100), train, Device.CPU, "", None, str(work), {}, "", "")


def train_steps(job: TrainJob, worker: Worker, state: TrainState, until: int, checkpoint_at: int | None) -> None:
    """The loop's steps on fixed data (a step, the post-hoc snapshots when due, a checkpoint as rank 0 reports it)."""
    data = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1  # [64, 1, 8, 8] in [-1, 1]
    diffusion = GaussianDiffusion.from_config(job.diffusion)
    while state.step < until:
        batches = [(random_batch(data, BATCH, share.generator, True)[0], None) for share in state.shares]
        step(state, diffusion, batches, job.train, None)
        state.advance(BATCH)
        commit_profiles(job, state, state.step == STEPS)
        if state.step == checkpoint_at:
            folder = f"{job.trainer_uri}/trainer/{checkpoint_name(state.step)}"
            save_training_state(folder, state.to_checkpoint(job, gather_random_states(worker, state.shares)))


@pytest.mark.parametrize("stf_reference", [0, 3 * BATCH], ids=["algorithm-1", "stable-targets"])
def test_a_resumed_run_continues_the_profiles_bit_for_bit_and_keeps_committed_snapshots(
    tmp_path, monkeypatch, one_thread, stf_reference
):
    """The worker's own start (``state.start_state``: the newest committed checkpoint, its profiles) with Ray Train's
    session replaced by a single process: an uninterrupted run, checkpointed after step 5, and a run resumed there
    in the same folder (as after a crash past the later snapshots) reach the same profiles and weights. On stable
    targets the checkpoint holds the share's reference bank (three steps' images): a resume without it differs."""
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)  # none registered: the committed one is found
    monkeypatch.setattr(state_module, "prepare_for_ray_train", lambda model, options: model)
    job, worker = tiny_job(tmp_path, stf_reference), Worker(0, 1, torch.device("cpu"), None, 1, (0,))
    straight = start_state(job, worker)
    train_steps(job, worker, straight, STEPS, RESUME_AT)
    manifests = {path: path.stat().st_mtime_ns for path in (tmp_path / "posthoc").glob("*/manifest.json")}
    assert sorted(path.parent.name for path in manifests) == [f"{n:015d}" for n in (24, 40, 64, 80, 96)]

    if stf_reference:
        forgetful = start_state(job, worker)
        assert forgetful.shares[0].bank is not None and forgetful.shares[0].bank.images is not None
        forgetful.shares[0].bank.images = forgetful.shares[0].bank.images[-BATCH:]  # as if it kept one step's images
        train_steps(job, worker, forgetful, RESUME_AT + 1, None)
    resumed = start_state(job, worker)
    assert resumed.profiles is not None and resumed.profiles.images_seen == RESUME_AT * BATCH == resumed.images_seen
    train_steps(job, worker, resumed, RESUME_AT + 1, None)
    if stf_reference:
        same = [
            torch.equal(a, b) for a, b in zip(forgetful.model.parameters(), resumed.model.parameters(), strict=True)
        ]
        assert not all(same), "the step after the resume regresses on targets of the bank's earlier images"
    train_steps(job, worker, resumed, STEPS, None)
    assert straight.profiles is not None and resumed.profiles.images_seen == straight.profiles.images_seen
    for mine, theirs in zip(resumed.profiles.emas, straight.profiles.emas, strict=True):
        assert all(
            torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values(), strict=True)
        )
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), straight.model.parameters(), strict=True))
    assert {path: path.stat().st_mtime_ns for path in manifests} == manifests, "committed snapshots were rewritten"

    trained_with = TrainedWith(job.diffusion, job.train.optim, job.unet, "tiny")
    train = TrainOutputs("", "", BATCH * STEPS, Device.CPU, None, None, trained_with, posthoc_uri=job.posthoc_uri)
    reconstructed = posthoc_snapshot(train, PROFILES[0], {})
    for key, value in straight.profiles.emas[0].state_dict().items():
        torch.testing.assert_close(reconstructed[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_other_ranks_keep_no_profiles_and_a_run_without_them_checkpoints_none(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(state_module, "prepare_for_ray_train", lambda model, options: model)
    job = tiny_job(tmp_path)
    other = start_state(job, Worker(1, 2, torch.device("cpu"), None, 2, (1,)))
    assert other.profiles is None
    plain = dataclasses.replace(job, train=dataclasses.replace(job.train, ema_profiles=(), ema_snapshot_every_images=0))
    alone = start_state(plain, Worker(0, 1, torch.device("cpu"), None, 1, (0,)))
    assert alone.profiles is None and "posthoc" not in alone.to_checkpoint(plain, [])


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["train.ema_profiles=[0.05, 0.1]"], "train.ema_snapshot_every_images must be > 0"),
        (["train.ema_profiles=[0.05, 0.5]", "train.ema_snapshot_every_images=1000"], "train.ema_profiles: each"),
        (["train.ema_profiles=[0.0]", "train.ema_snapshot_every_images=1000"], "train.ema_profiles: each"),
        (["train.ema_profiles=[0.1, 0.1]", "train.ema_snapshot_every_images=1000"], "train.ema_profiles: each"),
        (["train.ema_snapshot_every_images=1000"], "train.ema_snapshot_every_images 1000 stores nothing"),
        (["train.ema_profiles=[0.1]", "train.ema_snapshot_every_images=1", "train.total_images=10000000"], "1,000"),
    ],
)
def test_bad_post_hoc_ema_settings_exit_2_naming_the_key(overrides, named, tmp_path, capsys):
    location = [f"storage.root={tmp_path / 'runs'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(["run", *overrides, *location]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
