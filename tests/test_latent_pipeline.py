"""A latent model through the whole pipeline (issue 34): ``python -m pipelines run`` on the digits with
``autoencoder.weights_uri`` naming a diffusers-format autoencoder folder. Prepare encodes the training split, training
draws from its posteriors, the sample stage's images are the snapshot's latents decoded, and the registered pyfunc
carries the decoder. Also what a latent model refuses, before Ray starts."""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from ddpm_core.autoencoder import AutoencoderConfig, KLAutoencoder
from ddpm_core.autoencoder_weights import load_autoencoder, save_autoencoder
from ddpm_core.checkpoint import load_snapshot
from ddpm_core.data import to_model_range, to_uint8
from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.features import ClassifierExtractor, load_classifier
from ddpm_core.metrics import FeatureStatistics, frechet_distance_from_stats
from ddpm_core.samplers import PerIndexNoise, SamplerConfig, sample
from pipelines.__main__ import main
from pipelines.config_file import load_config
from pipelines.data.latent_files import read_latents
from pipelines.data.shards import read_split
from pipelines.generation.figures import interpolation_figure
from tests import run_files

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "run_id=latent",
    "train.total_images=2048",
    "train.warmup_images=256",
    "train.checkpoint_every_images=1024",
    "train.grid_every_images=null",  # no sample grids over training: no test here reads them
    "train.log_every_images=512",
    "train.ema_snapshot_every_images=512",
    "train.ema_sigma_rel=[0.05, 0.10]",  # two candidates, ranked on the hold-out latents' bound
    "train.ema_choice=bits_per_dim",  # configs/digits.yaml ranks on the loss
    "train.ema_choice_images=64",
    "train.ema_choice_timesteps=8",
    "sample.num_samples=40",
    "sample.batch_size=40",  # one shard: one sampling actor to start, and one feature actor
    "sample.num_steps=20",
    "evaluate.classifier_epochs=1",
    "evaluate.nll=false",  # the bound of a latent model is not pixel bits/dim
    "evaluate.untrained_baseline=false",
    "evaluate.inception_score=false",
    "evaluate.precision_recall=false",
    "evaluate.kid=false",
    "model.overrides={image_size: 4, in_channels: 3}",  # the latents: 8x8 digits, f = 2, 3 channels
    "sample.clip_denoised=false",  # latents are not bounded by [-1, 1]
]


def autoencoder_folder(folder: Path) -> str:
    """A randomly initialised f = 2 autoencoder of 1-channel images into 3-channel latents, in diffusers' format;
    returns its weights' SHA-256."""
    torch.manual_seed(0)
    config = AutoencoderConfig(
        in_channels=1, out_channels=1, block_out_channels=(32, 32), layers_per_block=1, latent_channels=3
    )
    return save_autoencoder(KLAutoencoder(config).eval(), str(folder))


# Two trials on the latents, ranked on the hold-out latents' bound; the proxy FID decodes their samples.
TUNE = [
    "tune.enabled=true",
    "tune.search_alg=grid",
    "tune.space={train.lr: {grid: [1.0e-5, 2.0e-3]}}",
    "tune.num_samples=1",
    "tune.trial_images=1024",
    "tune.report_every_images=512",
    "tune.grace_period_images=1024",
    "tune.proxy_fid_samples=50",
    "tune.proxy_fid_steps=5",
    "tune.warm_start=true",
    "tune.workers_per_trial=1",  # two trials of one worker each: fewer processes to start on two cores
    "tune.cpus_per_worker=0.25",
    "tune.max_concurrent_trials=2",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("latent")
    sha256 = autoencoder_folder(root / "vae")
    weights = [f"autoencoder.weights_uri={root / 'vae'}", f"autoencoder.weights_sha256={sha256[:12]}"]
    return run_files.finished_run(root, "digits.yaml", [*TINY, *weights])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The pipeline with ``autoencoder.train``: the autoencoder stage trains an f = 2 autoencoder on two Ray Train
    workers (DDP), with LDM's patch discriminator from half way; the tune stage's trials train on its latents, and
    the latent model, class-conditional, is trained on them from the best trial."""
    root = tmp_path_factory.mktemp("trained")
    training = [
        "autoencoder.train=true",
        "autoencoder.block_out_channels=[32, 32]",
        "autoencoder.latent_channels=3",
        "autoencoder.images=2048",
        "autoencoder.checkpoint_every_images=1024",
        "autoencoder.num_workers=2",
        "autoencoder.discriminator_start_images=1024",  # the patch discriminator for the second half, under DDP
        "autoencoder.discriminator_layers=1",
        "register.enabled=false",
        "model.conditional=true",  # the digits' labels ride in the latent files to training and sampling
        "train.class_dropout=0.1",
        *TUNE,
    ]
    return run_files.finished_run(root, "digits.yaml", [*TINY, *training])


def outputs(root: Path, stage: str) -> dict:
    return run_files.outputs(root / "runs" / "latent", stage)


def test_the_autoencoder_stage_encodes_the_training_split_and_records_the_latent_space(finished):
    latent = outputs(finished, "autoencoder")["latent"]
    assert latent["shape"] == [3, 4, 4] and latent["image_shape"] == [8, 8, 1]
    assert latent["count"] == outputs(finished, "prepare")["num_train"]
    posteriors = read_latents(latent["uri"], {})
    assert posteriors["mean"].shape == (latent["count"], 3, 4, 4) and len(posteriors["labels"]) == latent["count"]
    draws = posteriors["mean"] + np.exp(0.5 * posteriors["logvar"]) * np.random.default_rng(0).standard_normal(
        posteriors["mean"].shape
    )
    assert latent["space"]["scaling_factor"] == pytest.approx(1 / draws.std(), rel=0.01)  # not configured: 1/std

    client = MlflowClient(f"sqlite:///{finished / 'mlflow.db'}")
    stage_run = client.get_run(run_files.manifest(finished / "runs" / "latent", "autoencoder")["mlflow_run_id"])
    assert stage_run.data.params["latent.shape"] == "3x4x4"
    assert stage_run.data.params["autoencoder.identity"] == latent["space"]["autoencoder_identity"]
    assert stage_run.data.metrics["latent_scaling_factor"] == pytest.approx(latent["space"]["scaling_factor"])


def snapshot_images(snapshot_uri: str, sampler: SamplerConfig, seed: int, indices: range) -> np.ndarray:
    """Images ``indices`` of ``seed`` sampled from the snapshot and decoded, here, from its recorded latent space."""
    snapshot = load_snapshot(snapshot_uri)
    diffusion = GaussianDiffusion.from_config(snapshot.diffusion)
    shape = (snapshot.unet.in_channels, snapshot.unet.image_size, snapshot.unet.image_size)
    model = snapshot.sampling_model()  # with the quickstart's autoguidance: guided by the guide stored beside it
    latents = sample(model, diffusion, shape, PerIndexNoise(seed, indices), sampler).samples
    assert latents.shape == (len(indices), 3, 4, 4)
    return to_uint8(snapshot.image_decoder()(latents))


def test_the_sample_stage_decodes_the_snapshots_latents(finished):
    sampled, latent = outputs(finished, "sample"), outputs(finished, "autoencoder")["latent"]
    snapshot = load_snapshot(sampled["snapshot_uri"])
    assert snapshot.metadata["latent"] == latent["space"]  # the snapshot knows its decoder
    first = np.load(Path(sampled["shard_uris"][0]) / "images.npy")
    assert first.shape == (40, 8, 8, 1) and first.dtype == np.uint8
    sampler = SamplerConfig(**sampled["sampler"])
    np.testing.assert_array_equal(
        first[:3], snapshot_images(sampled["snapshot_uri"], sampler, sampled["seed"], range(3))
    )


def test_the_registered_model_carries_its_decoder(finished):
    sampled = outputs(finished, "sample")
    sampler = SamplerConfig(method="ddim", num_steps=10, spacing="trailing", clip_denoised=False)
    expected = snapshot_images(sampled["snapshot_uri"], sampler, 5, range(3))
    mlflow.set_tracking_uri(f"sqlite:///{finished / 'mlflow.db'}")
    (finished / "vae").rename(finished / "vae-away")  # the registered model needs nothing outside itself
    try:
        model = mlflow.pyfunc.load_model("models:/ddpm-digits@champion")
        params = {"seed": 5, "method": "ddim", "num_steps": 10, "spacing": "trailing"}
        images = model.predict(pd.DataFrame({"index": range(3)}), params=params)
    finally:
        (finished / "vae-away").rename(finished / "vae")
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, expected)


def test_evaluate_scores_the_autoencoders_reconstructions_as_the_floor(finished):
    """rFID and the autoencoder's excess, recomputed here from the hold-out split, the autoencoder folder and the
    prepare stage's classifier, with no pipeline code between them."""
    prepared, scores = outputs(finished, "prepare"), outputs(finished, "evaluate")["scores"]
    space = outputs(finished, "autoencoder")["latent"]["space"]
    originals, _ = read_split(prepared["holdout_uri"], {})  # [n, 8, 8, 1] uint8
    model, _ = load_autoencoder(str(finished / "vae"), space["autoencoder_sha256"])
    with torch.no_grad():
        x = to_model_range(originals)  # [n, 1, 8, 8]
        reconstructed = to_uint8(model.decode(model.encode(x).mean).clamp(-1, 1))  # [n, 8, 8, 1]
    shard = run_files.result_dir(finished / "runs" / "latent", "autoencoder") / "reconstructions" / "shard-00000"
    np.testing.assert_array_equal(np.load(shard / "images.npy")[:50], reconstructed[:50])

    extractor = ClassifierExtractor(load_classifier(prepared["extractor_uri"])[0])
    held, rebuilt = (FeatureStatistics.from_features(extractor(images)[0]) for images in (originals, reconstructed))
    reference = FeatureStatistics.from_features(extractor(read_split(prepared["shards_uri"], {})[0])[0])
    assert scores["rfid"] == pytest.approx(frechet_distance_from_stats(rebuilt, held), rel=1e-4, abs=1e-6)
    excess = frechet_distance_from_stats(rebuilt, reference) - frechet_distance_from_stats(held, reference)
    assert scores["fid_reconstructed_minus_holdout"] == pytest.approx(excess, rel=1e-4, abs=1e-6)
    # a random autoencoder's reconstructions are far from the digits, and the paired interval says so
    assert scores["fid_reconstructed_minus_holdout"] > 3 * scores["fid_reconstructed_minus_holdout_stderr"] > 0

    client = MlflowClient(f"sqlite:///{finished / 'mlflow.db'}")
    metrics = client.get_run(outputs(finished, "evaluate")["scores_run_id"]).data.metrics
    assert metrics["rfid"] == pytest.approx(scores["rfid"]) and "rfid_stderr" in metrics


def test_the_autoencoder_stage_trains_one_with_ray_train_and_the_latent_model_uses_it(trained):
    stage = outputs(trained, "autoencoder")
    space = stage["latent"]["space"]
    assert stage["trained"] and stage["images_seen"] == 2048
    folder = run_files.result_dir(trained / "runs" / "latent", "autoencoder") / "autoencoder"
    assert space["autoencoder_uri"] == str(folder) and (folder / "config.json").is_file()  # a diffusers folder
    model, identity = load_autoencoder(str(folder), space["autoencoder_sha256"])
    assert identity == space["autoencoder_identity"] and model.config.latent_channels == 3

    client = MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    run_id = run_files.manifest(trained / "runs" / "latent", "autoencoder")["mlflow_run_id"]
    stage_run = client.get_run(run_id)
    assert stage_run.data.metrics["autoencoder_workers"] == 2  # the world size Ray Train reported
    l1 = [m.value for m in client.get_metric_history(run_id, "autoencoder_l1")]
    assert len(l1) >= 2 and l1[-1] < 0.7 * l1[0]  # it learned to reconstruct
    hinge = client.get_metric_history(run_id, "discriminator_hinge_loss")
    assert hinge and min(m.step for m in hinge) > 1024 // 32  # logged once the discriminator joined, not before
    assert "reconstructions.png" in {a.path for a in client.list_artifacts(run_id)}
    # the stage's rFID (the domain classifier's features) is the evaluate stage's, on the same reconstructions
    assert stage["rfid"] == pytest.approx(outputs(trained, "evaluate")["scores"]["rfid"], rel=1e-6)
    assert load_snapshot(outputs(trained, "sample")["snapshot_uri"]).metadata["latent"] == space


def test_a_class_conditional_latent_model_samples_and_scores_its_classes(trained):
    """The labels stored beside the latents train a conditional model; the sample stage asks each class in turn,
    decodes, and evaluate scores the classes (its accuracy at this budget is not tested, only that it is scored)."""
    sample = outputs(trained, "sample")
    assert outputs(trained, "train")["num_classes"] == 10 and sample["conditioning"]["classes"] == list(range(10))
    snapshot = load_snapshot(sample["snapshot_uri"])
    assert snapshot.unet.num_classes == 10 and snapshot.latent_space is not None
    for uri in sample["shard_uris"]:
        images, labels = np.load(Path(uri) / "images.npy"), np.load(Path(uri) / "labels.npy")
        assert images.shape[1:] == (8, 8, 1) and len(labels) == len(images)  # decoded images, one label each
    assert 0.0 <= outputs(trained, "evaluate")["scores"]["conditional_accuracy"] <= 1.0


def test_the_post_hoc_ema_of_a_latent_model_is_chosen_on_its_hold_out_latents(finished):
    """Both candidates scored on the same hold-out latents (a bound in latent bits/dim, of a continuous variable), and
    the chosen one's EMA (configs/digits.yaml's one-standard-error rule: the longer one, unless the shorter scores
    lower by more than a paired standard error) is the snapshot the sample stage drew from."""
    stage = outputs(finished, "autoencoder")
    holdout = stage["holdout_latent"]
    assert holdout["count"] == outputs(finished, "prepare")["num_holdout"]
    assert holdout["space"] == stage["latent"]["space"] and holdout["uri"] != stage["latent"]["uri"]
    sweep = outputs(finished, "train")["ema_sweep"]
    assert [c["sigma_rel"] for c in sweep] == [0.05, 0.10]
    assert {c["unit"] for c in sweep} == {"latent bits/dim"} and {c["images"] for c in sweep} == {64}
    (best,) = [c for c in sweep if c["chosen"]]
    lowest = min(sweep, key=lambda c: c["score"])  # the chosen one, or shorter and within a standard error of it
    assert best is lowest or (
        lowest["sigma_rel"] < best["sigma_rel"] and -lowest["minus_chosen"] <= lowest["minus_chosen_stderr"]
    )
    snapshot = load_snapshot(outputs(finished, "sample")["snapshot_uri"])
    assert snapshot.metadata["ema_sigma_rel"] == best["sigma_rel"]
    assert snapshot.metadata["ema"] == "post-hoc, chosen on held-out latent bits/dim"


def test_the_interpolation_figure_mixes_the_held_out_latents_and_decodes_them(finished, capsys):
    """Fig. 9 of a latent model: the sources are held-out images, the mixtures their latents' (as the autoencoder
    stage encoded them) drawn and decoded; at t = 0 and w = 0 the reverse process only denoises the first latent, so
    the tile is that latent decoded. The command writes the PNG."""
    sha256 = hashlib.sha256((finished / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    weights = [f"autoencoder.weights_uri={finished / 'vae'}", f"autoencoder.weights_sha256={sha256[:12]}"]
    config = load_config(REPO / "configs" / "digits.yaml", [*TINY, *weights, f"storage.root={finished / 'runs'}"])
    # the second row's t is low (a 41-step reverse process): only its sources are compared below
    figure = interpolation_figure(config, (0, 1), [0, 40], 3, seed=0)  # [2 rows * (3 + 2), 8, 8, 1]
    holdout, _ = read_split(outputs(finished, "prepare")["holdout_uri"], {})
    assert figure.shape == (10, 8, 8, 1)
    np.testing.assert_array_equal(figure[[0, 4, 5, 9]], holdout[[0, 1, 0, 1]])  # the sources at each row's ends
    latent = outputs(finished, "autoencoder")["holdout_latent"]
    mean = torch.as_tensor(read_latents(latent["uri"], {})["mean"][:1])  # [1, 3, 4, 4]
    snapshot = load_snapshot(outputs(finished, "sample")["snapshot_uri"])
    decoded = to_uint8(snapshot.image_decoder()(snapshot.latent_space.latents(mean)))  # [1, 8, 8, 1]
    assert np.abs(figure[1].astype(int) - decoded[0].astype(int)).max() <= 8
    assert not np.array_equal(figure[1], figure[3])  # w = 0 and w = 1 draw different images

    out = finished / "interpolation.png"
    args = ["interpolate", "latent", "--config", str(REPO / "configs" / "digits.yaml"), "--out", str(out)]
    assert (
        main([*args, "--timesteps", "0", "40", "--columns", "3", *TINY, *weights, f"storage.root={finished / 'runs'}"])
        == 0
    )
    assert out.is_file()


def test_the_tune_stage_ranks_trials_of_a_latent_model_on_its_hold_out_latents(trained):
    tune = outputs(trained, "tune")
    finished_trials = [t for t in tune["trial_results"] if t["images_seen"] == 1024]
    assert tune["trials"] == 2 and finished_trials
    assert tune["best_metric"]["bpd"] == min(t["bpd"] for t in finished_trials)
    assert tune["best_params"]["train.lr"] == 2.0e-3  # 1e-5 learns next to nothing in 1,024 latents
    assert all(t["fid"] is not None and np.isfinite(t["fid"]) for t in finished_trials)  # decoded samples scored
    assert outputs(trained, "train")["config"]["train"]["lr"] == 2.0e-3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["evaluate.nll=true"], "evaluate.nll with autoencoder.weights_uri"),
        (["train.horizontal_flip=true"], "train.horizontal_flip with autoencoder.weights_uri"),
        (["sample.clip_denoised=true"], "sample.clip_denoised with autoencoder.weights_uri"),
        (["autoencoder.weights_sha256=null"], "autoencoder.weights_uri needs autoencoder.weights_sha256"),
        (["model.overrides={image_size: 8, in_channels: 1}"], "set model.overrides.image_size=4"),
        (["autoencoder.weights_sha256=0123456789ab"], "SHA-256"),
        (["autoencoder.train=true"], "autoencoder.train with autoencoder.weights_uri"),
        (
            ["autoencoder.weights_uri=null", "autoencoder.train=true", "autoencoder.block_out_channels=[32, 32, 32]"],
            "the autoencoder of autoencoder.train turns the 8x8x1 images into 2x2 latents",
        ),
        (
            ["autoencoder.weights_uri=null", "autoencoder.train=true", "autoencoder.block_out_channels=[48, 64]"],
            "autoencoder.block_out_channels: [48] are not multiples of norm_num_groups=32",
        ),
        (["autoencoder.discriminator_start_images=0"], "autoencoder.discriminator_start_images trains a discrim"),
        (
            ["autoencoder.weights_uri=null", "autoencoder.train=true", "autoencoder.discriminator_start_images=40000"],
            "autoencoder.discriminator_start_images=40000 is not below autoencoder.images=40000",
        ),
        (
            ["autoencoder.weights_uri=null", "autoencoder.train=true", "autoencoder.discriminator_start_images=0"],
            "autoencoder.discriminator_layers=3 needs images of at least 24 pixels a side",
        ),
        (["autoencoder.discriminator_weight=0"], "autoencoder.discriminator_weight must be > 0"),
    ],
)
def test_what_a_latent_model_refuses_before_ray_starts(tmp_path, capsys, overrides, message):
    sha256 = autoencoder_folder(tmp_path / "vae")
    args = [
        "run",
        "--config",
        str(REPO / "configs" / "digits.yaml"),
        *TINY,
        f"autoencoder.weights_uri={tmp_path / 'vae'}",
        f"autoencoder.weights_sha256={sha256}",
        f"storage.root={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        *overrides,
    ]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not ray.is_initialized()
