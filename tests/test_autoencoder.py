"""The latent-diffusion autoencoder (ddpm_core.autoencoder) against diffusers' AutoencoderKL, an independent
implementation: a folder written by diffusers loads here and decodes the same, and ours opens in diffusers.

Also: the KL against torch.distributions' closed form, the latent shape, the loss's terms, and the loader's refusals
(wrong hash, unsupported architecture, weights that do not match their config)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL

from ddpm_core.autoencoder import (
    AutoencoderConfig,
    DiagonalGaussian,
    KLAutoencoder,
    autoencoder_loss,
    autoencoder_train_step,
    latent_scaling_factor,
)
from ddpm_core.autoencoder_weights import WEIGHTS_FILE, load_autoencoder, save_autoencoder
from ddpm_core.fields import FieldError
from ddpm_core.training import OptimConfig, make_optimizer
from ddpm_core.weights import WeightsError, file_sha256

SMALL = {
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.5,
}


def diffusers_folder(tmp_path, seed: int = 0, **overrides):
    """A small randomly initialised AutoencoderKL saved by diffusers itself, and the model."""
    torch.manual_seed(seed)
    fields = {**SMALL, **overrides}
    levels = len(fields["block_out_channels"])
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels, **fields
    ).eval()
    folder = tmp_path / "vae"
    vae.save_pretrained(folder, safe_serialization=True)
    return folder, vae


def test_a_diffusers_folder_on_s3_loads_and_decodes_a_known_latent_as_diffusers_does(tmp_path, s3_bucket):
    import s3fs

    folder, vae = diffusers_folder(tmp_path)
    bucket, options = s3_bucket
    s3fs.S3FileSystem(**options).put(str(folder), f"s3://{bucket}/vae", recursive=True)
    digest = file_sha256(folder / WEIGHTS_FILE)
    ours, identity = load_autoencoder(
        f"s3://{bucket}/vae", digest[:12], options, cache_dir=tmp_path / "cache", log=lambda _: None
    )
    assert ours.config.downsampling_factor == 4 and ours.config.scaling_factor == 0.5
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # a known latent
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        theirs_image = vae.decode(z).sample
        theirs_posterior = vae.encode(x).latent_dist
        ours_image = ours.decode(z)
        ours_posterior = ours.encode(x)
    assert ours_image.shape == (3, 1, 32, 32)
    torch.testing.assert_close(ours_image, theirs_image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_posterior.mean, theirs_posterior.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_posterior.logvar, theirs_posterior.logvar, rtol=1e-5, atol=1e-5)
    assert len(identity) == 64
    # the identity follows the config as well as the weights: another scaling factor is another autoencoder
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.25}))
    _, other = load_autoencoder(f"file://{folder}", digest, cache_dir=tmp_path / "cache", log=lambda _: None)
    assert other != identity


def test_ours_saved_opens_in_diffusers_with_the_same_function(tmp_path):
    torch.manual_seed(3)
    ours = KLAutoencoder(AutoencoderConfig(**SMALL, mid_block_add_attention=False)).eval()
    digest = save_autoencoder(ours, str(tmp_path / "ours"))
    assert digest == file_sha256(tmp_path / "ours" / WEIGHTS_FILE)
    theirs = AutoencoderKL.from_pretrained(tmp_path / "ours").eval()
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        expected = theirs.decode(theirs.encode(x).latent_dist.mean).sample
        torch.testing.assert_close(ours.decode(ours.encode(x).mean), expected)


def test_the_loader_refuses_a_wrong_hash_an_unsupported_block_and_mismatched_weights(tmp_path):
    folder, _ = diffusers_folder(tmp_path)
    uri, quiet = f"file://{folder}", {"cache_dir": tmp_path / "cache", "log": lambda _: None}
    with pytest.raises(WeightsError, match="different or corrupted"):
        load_autoencoder(uri, "0" * 64, **quiet)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "down_block_types": ["AttnDownEncoderBlock2D"] * 3}))
    with pytest.raises(WeightsError, match="down_block_types: only DownEncoderBlock2D"):
        load_autoencoder(uri, file_sha256(folder / WEIGHTS_FILE), **quiet)
    (folder / "config.json").write_text(json.dumps({**config, "latent_channels": 8}))
    with pytest.raises(WeightsError, match="does not match its config.json"):
        load_autoencoder(uri, file_sha256(folder / WEIGHTS_FILE), **quiet)
    with pytest.raises(WeightsError, match="config.json' does not exist"):
        load_autoencoder(f"file://{tmp_path}/nowhere", "0" * 64, **quiet)


def test_kl_is_the_closed_form_of_torch_distributions():
    generator = torch.Generator().manual_seed(5)
    mean, logvar = torch.randn(2, 4, 3, 2, 2, generator=generator)
    posterior = DiagonalGaussian(mean, logvar)
    q = torch.distributions.Normal(posterior.mean, torch.exp(0.5 * posterior.logvar))
    p = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(dim=1)
    torch.testing.assert_close(posterior.kl(), expected)
    assert torch.all(DiagonalGaussian(torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)).kl() == 0)


def test_loss_terms_and_latent_shape():
    config = AutoencoderConfig(**SMALL)
    assert config.latent_shape(1, 32) == (4, 8, 8)
    with pytest.raises(FieldError, match="not divisible by the downsampling factor 4"):
        config.latent_shape(1, 30)
    with pytest.raises(FieldError, match="autoencoder.block_out_channels: \\[48\\] are not multiples"):
        AutoencoderConfig(block_out_channels=(32, 48))
    x = torch.zeros(2, 1, 4, 4)
    posterior = DiagonalGaussian(torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1))  # KL = 0.5 nats each
    terms = autoencoder_loss(x, torch.full_like(x, 0.25), posterior, kl_weight=2.0)
    torch.testing.assert_close(terms["l1"], torch.full((2,), 0.25))
    torch.testing.assert_close(terms["kl"], torch.full((2,), 0.5))
    torch.testing.assert_close(terms["loss"], torch.tensor((16 * 0.25 + 2.0 * 0.5) / 16))


def test_training_steps_reconstruct_a_batch_better_and_the_scaling_factor_is_one_over_the_latent_std():
    torch.manual_seed(6)
    model = KLAutoencoder(AutoencoderConfig(**{**SMALL, "block_out_channels": (32, 32)}))
    optim = OptimConfig(lr=1e-3, warmup_images=0, ema_decay=0.0)
    optimizer = make_optimizer(model, optim)
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 - 1
    generator = torch.Generator().manual_seed(8)
    first = autoencoder_train_step(model, optimizer, x, optim, 0, 1e-6, generator)
    for step in range(1, 60):
        last = autoencoder_train_step(model, optimizer, x, optim, 8 * step, 1e-6, generator)
    assert float(last["l1"].mean()) < 0.5 * float(first["l1"].mean())
    assert first["grad_norm"] > 0 and set(first) == {"loss", "l1", "kl", "grad_norm"}
    with torch.no_grad():
        means = model.encode(x).mean  # [8, 4, 4, 4]
    factor = latent_scaling_factor(means)
    assert factor == pytest.approx(1 / float(means.double().std()))
    scaled = AutoencoderConfig(**{**SMALL, "scaling_factor": factor, "shift_factor": 0.1})
    model.config = scaled
    torch.testing.assert_close(model.from_latent(model.to_latent(means)), means)
    assert float(model.to_latent(means).std()) == pytest.approx(1.0, rel=0.05)
