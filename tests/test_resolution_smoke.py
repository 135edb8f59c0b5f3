"""The paper's 256x256 model (preset image256, 113.7M parameters) through the whole DAG on generated images, with
configs/celebahq256.yaml shrunk to one step, four samples of two DDIM steps and the classifier extractor: a real
``python -m pipelines run`` on local Ray and a local MLflow store. Slow (minutes of CPU for a 114M-parameter U-Net at
256x256); run with ``make test-all``."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import run_files

REPO = Path(__file__).resolve().parents[1]
SHRUNK = [
    "data.holdout_fraction=0.1",
    "train.num_workers=1",
    "train.use_gpu=false",
    "train.batch_size=2",
    "train.total_images=2",
    "train.checkpoint_every_images=2",
    "train.log_every_images=2",
    "train.grid_every_images=null",
    "train.warmup_images=0",
    "sample.num_samples=4",
    "sample.batch_size=2",
    "sample.num_workers=1",
    "sample.method=ddim",
    "sample.num_steps=2",
    "evaluate.extractor=classifier",
    "evaluate.classifier_epochs=1",
    "evaluate.untrained_baseline=false",
    "evaluate.precision_recall=false",
    "evaluate.kid=false",
    "evaluate.fid_groups=2",
    "cluster.autoscaling=false",
]


def generated_folder(root: Path, per_class: int = 20) -> Path:
    """Two classes of 256x256 RGB images: horizontal and vertical colour ramps with noise."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 256)
    for name, image in (("horizontal", np.tile(ramp, (256, 1))), ("vertical", np.tile(ramp[:, None], (1, 256)))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = image[..., None] * rng.uniform(0.5, 1.0, 3) + rng.normal(0, 10, (256, 256, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def run_pipeline(config: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """``python -m pipelines run`` of ``configs/<config>`` shrunk, on the generated images, in ``tmp_path``."""
    data = generated_folder(tmp_path / "images")
    args = [
        sys.executable,
        "-m",
        "pipelines",
        "run",
        "--config",
        str(REPO / "configs" / config),
        *SHRUNK,
        *overrides,
        f"data.uri={data}",
        f"storage.root={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    (tmp_path / "job.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def sampled_images(run: Path) -> np.ndarray:
    sample = run_files.outputs(run, "sample")
    return np.concatenate([np.load(Path(uri) / "images.npy") for uri in sample["shard_uris"]])


@pytest.mark.slow
def test_the_256_preset_runs_through_the_whole_dag(tmp_path):
    result = run_pipeline("celebahq256.yaml", tmp_path)
    run = tmp_path / "runs" / "celebahq256-ddpm"
    prepare = run_files.outputs(run, "prepare")
    assert prepare["num_train"] + prepare["num_holdout"] == 40 and prepare["class_names"] == ["horizontal", "vertical"]
    images = sampled_images(run)
    assert images.shape == (4, 256, 256, 3) and images.dtype == np.uint8
    evaluation = run_files.outputs(run, "evaluate")["scores"]
    assert np.isfinite(evaluation["fid"]) and evaluation["fid_stderr"] is not None
    assert "models:/ddpm-celebahq256/1" in result.stdout


def stable_diffusion_shaped_vae(folder: Path) -> str:
    """A randomly initialised AutoencoderKL of Stable Diffusion's VAE architecture (f = 8, 4 latent channels, 83.7M
    parameters), saved by diffusers; the first 16 hex digits of its weights' SHA-256."""
    import torch
    from diffusers import AutoencoderKL

    from ddpm_core.autoencoder_weights import WEIGHTS_FILE
    from ddpm_core.weights import file_sha256

    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=256,
        scaling_factor=0.18215,
    ).save_pretrained(folder, safe_serialization=True)
    return file_sha256(folder / WEIGHTS_FILE)[:16]


@pytest.mark.slow
def test_the_256_latent_preset_runs_through_the_whole_dag(tmp_path):
    """configs/celebahq256-latent.yaml: the cifar10 U-Net on the 4x32x32 latents of an f = 8 autoencoder, decoded to
    256x256 samples."""
    digest = stable_diffusion_shaped_vae(tmp_path / "vae")
    result = run_pipeline(
        "celebahq256-latent.yaml",
        tmp_path,
        f"autoencoder.weights_uri={tmp_path / 'vae'}",
        f"autoencoder.weights_sha256={digest}",
        "autoencoder.encode_actors=1",
        "autoencoder.encode_batch=8",
    )
    run = tmp_path / "runs" / "celebahq256-latent"
    latent = run_files.outputs(run, "autoencoder")["latent"]
    assert latent["space"]["scaling_factor"] == 0.18215 and latent["shape"] == [4, 32, 32]
    images = sampled_images(run)
    assert images.shape == (4, 256, 256, 3) and images.dtype == np.uint8
    evaluation = run_files.outputs(run, "evaluate")["scores"]
    assert np.isfinite(evaluation["fid"]) and evaluation["rfid"] is not None
    assert "models:/ddpm-celebahq256-latent/1" in result.stdout
