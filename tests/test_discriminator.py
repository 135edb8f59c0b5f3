"""The adversarial term of the autoencoder (ddpm_core.discriminator): the patch discriminator's patches are pix2pix's
70x70 at 256x256, the hinge loss and the adaptive weight match their closed forms (Esser et al. 2021, Eq. 7), and in
the training step the discriminator changes nothing before its warm-up ends and learns to tell real images from
reconstructions after it."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ddpm_core.autoencoder import AutoencoderConfig, KLAutoencoder, autoencoder_train_step
from ddpm_core.discriminator import (
    DELTA,
    MAX_WEIGHT,
    Adversary,
    DiscriminatorConfig,
    PatchDiscriminator,
    adaptive_weight,
    discriminator_step,
    hinge_discriminator_loss,
    make_discriminator_optimizer,
)
from ddpm_core.fields import FieldError
from ddpm_core.training import OptimConfig, make_optimizer

SMALL = AutoencoderConfig(
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
)


def test_the_three_layer_discriminator_sees_pix2pix_70x70_patches_of_a_256_image():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(3, DiscriminatorConfig(start_images=0))
    x = torch.randn(1, 3, 256, 256, requires_grad=True)
    logits = discriminator(x)
    assert logits.shape == (1, 1, 30, 30)  # pix2pix's 30x30 patch logits at 256x256
    # the convolutions' receptive field (GroupNorm's statistics span the whole image, as BatchNorm's do in training)
    convolutions = torch.nn.Sequential(
        *(torch.nn.Identity() if isinstance(m, torch.nn.GroupNorm) else m for m in discriminator.net)
    )
    convolutions(x)[0, 0, 15, 15].backward()
    rows, cols = (x.grad[0].abs().sum(dim=0) > 0).nonzero(as_tuple=True)  # the pixels one logit depends on
    assert int(rows.max() - rows.min()) + 1 == 70 and int(cols.max() - cols.min()) + 1 == 70


def test_the_hinge_loss_is_its_closed_form():
    real, fake = torch.tensor([[2.0, 0.5], [-1.0, 1.0]]), torch.tensor([[-2.0, 0.0], [0.5, -0.5]])
    expected = 0.5 * ((0 + 0.5 + 2.0 + 0) / 4 + (0 + 1.0 + 1.5 + 0.5) / 4)
    assert float(hinge_discriminator_loss(real, fake)) == pytest.approx(expected)


def test_the_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    last = torch.randn(3, 4, requires_grad=True)
    n = last.numel()
    weight = adaptive_weight(2.5 * last.sum(), -0.5 * last.sum(), last)  # gradients 2.5 and -0.5 everywhere
    assert float(weight) == pytest.approx(2.5 * math.sqrt(n) / (0.5 * math.sqrt(n) + DELTA))
    assert not weight.requires_grad
    # an adversarial loss with no gradient there: the ratio is clamped
    assert float(adaptive_weight(2.5 * last.sum(), 0.0 * last.sum(), last)) == MAX_WEIGHT


@pytest.mark.parametrize("field", [{"weight": 0.0}, {"layers": 0}, {"width": 60}, {"start_images": -1}])
def test_a_discriminator_config_out_of_range_is_refused(field):
    with pytest.raises(FieldError):
        DiscriminatorConfig(**{"start_images": 0, **field})


def adversary(start_images: int, seed: int = 1) -> Adversary:
    torch.manual_seed(seed)
    config = DiscriminatorConfig(start_images=start_images, layers=1)
    module = PatchDiscriminator(1, config)
    return Adversary(module, module, make_discriminator_optimizer(module, 1e-3), config)


def step_pair(images_seen: int, start_images: int) -> tuple[dict, dict, KLAutoencoder, KLAutoencoder, Adversary]:
    """One step from the same autoencoder with and without an adversary: (terms with, terms without, the models)."""
    torch.manual_seed(0)
    model = KLAutoencoder(SMALL)
    plain = copy.deepcopy(model)
    optim = OptimConfig(lr=1e-3, warmup_images=0, ema_decay=0.0)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1  # [4, 1, 8, 8]
    judge = adversary(start_images)
    with_terms = autoencoder_train_step(
        model, make_optimizer(model, optim), x, optim, images_seen, 1e-6, torch.Generator().manual_seed(3), None, judge
    )
    without = autoencoder_train_step(
        plain, make_optimizer(plain, optim), x, optim, images_seen, 1e-6, torch.Generator().manual_seed(3)
    )
    return with_terms, without, model, plain, judge


def test_before_its_warm_up_ends_the_discriminator_changes_nothing():
    with_terms, without, model, plain, judge = step_pair(images_seen=96, start_images=128)
    assert set(with_terms) == set(without) == {"loss", "l1", "kl", "grad_norm"}
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    untouched = adversary(128)  # the same seed: the weights it started from
    for a, b in zip(judge.module.parameters(), untouched.module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_after_its_warm_up_the_adversarial_term_enters_and_the_discriminator_steps():
    with_terms, without, model, plain, judge = step_pair(images_seen=128, start_images=128)
    assert {"adversarial", "adaptive_weight", "discriminator", "logits_real", "logits_fake"} <= set(with_terms)
    assert float(with_terms["adaptive_weight"]) > 0
    adversarial = float(with_terms["adaptive_weight"] * with_terms["adversarial"])
    assert float(with_terms["loss"]) == pytest.approx(float(without["loss"]) + adversarial, rel=1e-5)
    assert float(with_terms["l1"].mean()) == pytest.approx(float(without["l1"].mean()), rel=1e-6)  # same forward
    moved = [not torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters(), strict=True)]
    assert any(moved)  # the adversarial gradient changed the autoencoder's update
    untouched = adversary(128)
    assert any(
        not torch.equal(a, b) for a, b in zip(judge.module.parameters(), untouched.module.parameters(), strict=True)
    )
    assert all(p.requires_grad for p in judge.module.parameters())  # frozen for the autoencoder's term only


def test_the_discriminator_learns_to_tell_real_images_from_blurred_ones():
    judge = adversary(0, seed=4)
    real = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1  # [16, 1, 8, 8]
    blurred = torch.nn.functional.avg_pool2d(real, 3, stride=1, padding=1, count_include_pad=False)
    first = discriminator_step(judge, real, blurred, grad_clip=1.0)
    for _ in range(60):
        last = discriminator_step(judge, real, blurred, grad_clip=1.0)
    assert float(last["discriminator"]) < 0.5 * float(first["discriminator"])
    assert float(last["logits_real"]) > 0 > float(last["logits_fake"])
