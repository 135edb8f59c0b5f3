"""Latent files (pipelines.data.latents): a data split encoded by a pool of Ray Data actors into the posterior's mean
and log-variance, equal to the autoencoder's own encoding of each image; the scaling factor equal to a Monte-Carlo
estimate from posterior samples; and an encoding killed part-way resumed without re-encoding a committed file."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_core.autoencoder import AutoencoderConfig, KLAutoencoder
from ddpm_core.autoencoder_weights import LatentSpace, load_autoencoder, save_autoencoder
from ddpm_core.data import ImageDataset, random_posterior_batch, to_model_range
from ddpm_core.storage import MANIFEST, read_manifest
from pipelines.data.latent_files import file_uri, read_latent_file
from pipelines.data.latents import Encoding, encode_split
from pipelines.data.shards import read_split, split_identity, write_split
from tests.cluster import session_pids
from tests.services import run_in_session

REPO = Path(__file__).resolve().parents[1]


def split_to_encode(tmp_path: Path, images: int, per_file: int, blocks: tuple[int, ...]) -> Encoding:
    """A random autoencoder saved as a diffusers folder and a labelled split of random 32x32 RGB images."""
    torch.manual_seed(0)
    config = AutoencoderConfig(
        in_channels=3, out_channels=3, block_out_channels=blocks, layers_per_block=1, latent_channels=4
    )
    sha256 = save_autoencoder(KLAutoencoder(config).eval(), str(tmp_path / "vae"))
    rng = np.random.default_rng(0)
    pixels, labels = rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, images)
    dataset = ImageDataset(pixels, labels, fingerprint="random", source="random")
    write_split(str(tmp_path / "shards"), dataset, np.arange(images), {}, shard_images=per_file)
    encoding = Encoding(
        split_uri=str(tmp_path / "shards"),
        autoencoder_uri=str(tmp_path / "vae"),
        autoencoder_sha256=sha256,
        latents_root=str(tmp_path / "latents"),
        storage_options={},
        batch=7,  # not a divisor of the files' sizes: the result may not depend on it
        actors=2,
    )
    return encoding


def test_the_actors_store_each_images_posterior_and_the_scaling_factor_is_exact(local_ray, tmp_path):
    encoding = split_to_encode(tmp_path, images=60, per_file=10, blocks=(32, 64))
    split = encode_split(encoding, log=lambda _: None)
    assert (split.count, split.shape, split.encoded_now) == (60, (4, 16, 16), 6)

    model, identity = load_autoencoder(encoding.autoencoder_uri, encoding.autoencoder_sha256, log=lambda _: None)
    assert split.autoencoder_identity == identity
    images, labels = read_split(encoding.split_uri, {})
    files = [read_latent_file(split.uri, n, {}) for n in range(6)]
    means, logvars = np.concatenate([f["mean"] for f in files]), np.concatenate([f["logvar"] for f in files])
    with torch.inference_mode():
        posterior = model.encode(to_model_range(images))
    np.testing.assert_allclose(means, posterior.mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(logvars, posterior.logvar.numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.concatenate([f["labels"] for f in files]), labels)

    pids = {read_manifest(file_uri(split.uri, n))["metadata"]["encoded_by"]["pid"] for n in range(6)}
    # the pool's actors encoded them, not the driver; Ray Data hands each file to whichever actor is free, so one
    # actor that starts first may take all six (a CI run saw that), and the count is 1 or 2, never more
    assert os.getpid() not in pids and 1 <= len(pids) <= 2, pids

    generator = torch.Generator().manual_seed(1)  # 1/std of posterior samples, as LDM estimates it
    draws = torch.stack([posterior.sample(generator) for _ in range(200)])  # [200, 60, 4, 16, 16]
    assert split.scaling_factor == pytest.approx(1.0 / draws.double().std().item(), rel=2e-3)
    assert encode_split(encoding, log=lambda _: None).encoded_now == 0  # committed: reused


def test_another_split_of_the_same_images_gets_its_own_latents(local_ray, tmp_path):
    """The folder is keyed by the split's own identity, not the data set's: the same images split another way (as a
    changed data.holdout_fraction does) are encoded again, and the same split written again is the same split."""
    encoding = split_to_encode(tmp_path, images=20, per_file=10, blocks=(32, 32))
    first = encode_split(encoding, log=lambda _: None)
    images, labels = read_split(encoding.split_uri, {})
    dataset = ImageDataset(images, labels, fingerprint="random", source="random")
    write_split(str(tmp_path / "again"), dataset, np.arange(20), {}, shard_images=10)
    write_split(str(tmp_path / "smaller"), dataset, np.arange(15), {}, shard_images=10)
    again = encode_split(dataclasses.replace(encoding, split_uri=str(tmp_path / "again")), log=lambda _: None)
    smaller = encode_split(dataclasses.replace(encoding, split_uri=str(tmp_path / "smaller")), log=lambda _: None)
    assert (again.uri, again.encoded_now) == (first.uri, 0)
    assert smaller.uri != first.uri
    assert (smaller.count, smaller.encoded_now) == (15, 2)
    assert split_identity(str(tmp_path / "smaller"), {}) != split_identity(encoding.split_uri, {})


DRIVER = """
import dataclasses, json, sys
from pipelines.data.latents import Encoding, encode_split
from pipelines.execution import connect
connect()
split = encode_split(Encoding(**json.loads(sys.argv[1])), log=lambda _: None)
print(json.dumps(dataclasses.asdict(split)))
"""


def committed_files(folder: Path) -> dict[str, float]:
    """file-NNNNN -> its commit time, for every latent file committed under ``folder``."""
    return {
        path.parent.name: json.loads(path.read_text())["committed_at"] for path in folder.glob(f"*/file-*/{MANIFEST}")
    }


# two driver processes with local Ray, one SIGKILLed (41 s): make test-all. In CI: a second call reuses the committed
# folder (above), and the same commit protocol's resume on sample shards (tests/test_resume_and_corruption.py)
@pytest.mark.slow
def test_a_killed_encoding_resumes_without_encoding_a_committed_file_again(tmp_path):
    encoding = split_to_encode(tmp_path, images=16 * 24, per_file=24, blocks=(64, 128, 128))
    argument = json.dumps(encoding.__dict__)
    command = [sys.executable, "-c", DRIVER, argument]
    latents = tmp_path / "latents"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    first = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(committed_files(latents)) < 2 and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the driver, its local Ray and the encoders
    for pid in session_pids(first.pid):
        os.kill(pid, signal.SIGKILL)
    first.wait(timeout=30)
    before = committed_files(latents)
    assert 2 <= len(before) < 16, before  # killed part-way

    second = run_in_session(command, timeout=300, cwd=REPO, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    split = json.loads(second.stdout.strip().splitlines()[-1])
    assert split["encoded_now"] == 16 - len(before)
    after = committed_files(latents)
    assert len(after) == 16 and all(after[name] == when for name, when in before.items())


def test_a_training_draw_is_a_fresh_sample_of_the_chosen_posterior_with_its_label():
    mean = torch.tensor([0.0, 100.0, 200.0]).reshape(3, 1, 1, 1).expand(3, 2, 2, 2).contiguous()  # [3, 2, 2, 2]
    logvar = torch.log(torch.tensor([0.25, 1.0, 4.0])).reshape(3, 1, 1, 1).expand(3, 2, 2, 2).contiguous()
    labels = torch.tensor([7, 8, 9])
    z, drawn = random_posterior_batch(mean, logvar, 30_000, torch.Generator().manual_seed(0), labels)
    assert z.shape == (30_000, 2, 2, 2)
    chosen = (z[:, 0, 0, 0] / 100).round().long()  # the posteriors lie 100 apart: each draw shows its own
    assert drawn is not None and torch.equal(drawn, labels[chosen])
    for index in range(3):
        mine = z[chosen == index]  # [n_i, 2, 2, 2]
        assert len(mine) > 9_000  # drawn uniformly
        se = (4.0 ** (index - 1)) ** 0.5 / len(mine) ** 0.5
        assert abs(mine.mean().item() - 100 * index) < 5 * se  # the posterior's mean ...
        assert mine.var().item() == pytest.approx(4.0 ** (index - 1), rel=0.05)  # ... and its variance: fresh noise
        assert mine[:, 0, 0, 0].std() > 0 and not torch.equal(mine[:, 0, 0, 0], mine[:, 1, 1, 1])


def test_a_snapshots_latent_space_decodes_as_the_autoencoder_does(tmp_path):
    torch.manual_seed(0)
    config = AutoencoderConfig(in_channels=3, out_channels=3, block_out_channels=(32, 32), latent_channels=4)
    model = KLAutoencoder(config).eval()
    sha256 = save_autoencoder(model, str(tmp_path / "vae"))
    space = LatentSpace(str(tmp_path / "vae"), sha256, "identity", scaling_factor=0.4, shift_factor=0.1)
    z = torch.randn(2, 4, 8, 8)
    decoded = space.decoder(log=lambda _: None)(space.latents(z))  # [2, 3, 16, 16]
    with torch.no_grad():
        expected = model.decode(z).clamp(-1, 1)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "module", ["pipelines.data.latent_files", "pipelines.training.ema_choice", "pipelines.generation.guides"]
)
def test_a_task_that_only_reads_imports_neither_ray_data_nor_ray_train(module):
    """The post-hoc EMA choice and the autoguidance guide run as Ray tasks, each in a fresh worker process that
    imports its module: reading latent files and post-hoc snapshots must not pull in Ray Data or Ray Train (about a
    second of imports per task on 2 CPUs)."""
    program = f"import sys, {module}; print(sorted(m for m in ('ray.data', 'ray.train') if m in sys.modules))"
    found = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0 and found.stdout.strip() == "[]", found.stdout + found.stderr[-2000:]
