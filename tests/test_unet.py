"""U-Net: preset sizes, shapes, conditioning, the timestep embedding and attention."""

import math

import pytest
import torch

from ddpm_core.unet import SelfAttention, UNet, UNetConfig, timestep_embedding, unet_preset


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_cifar10_preset_has_the_papers_35_7m_parameters():
    assert abs(count(UNet(unet_preset("cifar10"))) - 35.7e6) <= 0.2e6


def test_256_preset_has_the_papers_114m_parameters():
    """Ho et al. 2020, App. B: "our LSUN and CelebA-HQ models have 114 million parameters" (counted without
    allocating the weights)."""
    with torch.device("meta"):
        assert abs(count(UNet(unet_preset("image256"))) - 114e6) <= 0.5e6


def test_64_preset_resolutions_and_size():
    """Four resolutions from 64x64 to 8x8, attention at 16x16, and 83.0M parameters (a regression guard: the paper
    has no 64x64 model to compare with)."""
    config = unet_preset("image64")
    assert [config.image_size // 2**level for level in range(len(config.channel_mult))] == [64, 32, 16, 8]
    with torch.device("meta"):
        assert abs(count(UNet(config)) - 82.96e6) <= 0.05e6


@pytest.mark.parametrize("preset", ["cifar10", "digits", "mnist", "image64"])
@pytest.mark.parametrize("learn_variance", [False, True])
def test_output_shape_and_learned_variance_channels(preset, learn_variance):
    config = unet_preset(preset)
    model = UNet(config, learn_variance=learn_variance).eval()
    x = torch.randn(2, config.in_channels, config.image_size, config.image_size)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]))
    assert out.shape == (2, config.in_channels * (2 if learn_variance else 1), config.image_size, config.image_size)


def test_zero_initialised_output_and_official_init():
    model = UNet(unet_preset("digits"))
    assert model.conv_out.weight.abs().sum() == 0  # init_scale=0 in the official code
    fan_avg = (model.conv_in.in_channels + model.conv_in.out_channels) * 9 / 2
    bound = math.sqrt(3.0 / fan_avg)  # Glorot uniform limit
    assert model.conv_in.weight.abs().max() <= bound
    assert model.conv_in.weight.abs().max() > 0.9 * bound


def test_timestep_embedding_matches_the_official_formula():
    t = torch.tensor([0, 1, 10, 999])
    embedding = timestep_embedding(t, 8)
    frequencies = [math.exp(-math.log(10000) * i / 3) for i in range(4)]
    for row, step in enumerate(t.tolist()):
        expected = [math.sin(step * f) for f in frequencies] + [math.cos(step * f) for f in frequencies]
        torch.testing.assert_close(embedding[row], torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_attention_equals_explicit_softmax_attention():
    torch.manual_seed(0)
    layer = SelfAttention(16, groups=4)
    torch.nn.init.normal_(layer.proj.weight)
    x = torch.randn(2, 16, 4, 4)
    h = layer.norm(x)
    q, k, v = layer.qkv(h).reshape(2, 3, 16, 16).unbind(1)  # each [B, C, HW]
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(16), dim=-1)  # [B, HW, HW]
    attended = torch.einsum("bij,bcj->bci", weights, v).reshape(2, 16, 4, 4)
    torch.testing.assert_close(layer(x), x + layer.proj(attended), rtol=1e-5, atol=1e-5)


def test_class_conditioning_uses_labels_and_a_null_class():
    model = UNet(unet_preset("digits", num_classes=10))
    assert model.class_embedding.num_embeddings == 11
    with pytest.raises(ValueError, match="class-conditional"):
        model(torch.randn(1, 1, 8, 8), torch.tensor([3]))
    with pytest.raises(ValueError, match="without num_classes"):
        UNet(unet_preset("digits"))(torch.randn(1, 1, 8, 8), torch.tensor([3]), class_labels=torch.tensor([1]))


def test_timestep_changes_the_output():
    torch.manual_seed(0)
    model = UNet(unet_preset("digits")).eval()
    for module in model.modules():  # zero-initialised residual branches hide the embedding at init
        if getattr(module, "zero_init", False):
            torch.nn.init.normal_(module.weight, std=0.1)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        assert (model(x, torch.tensor([1])) - model(x, torch.tensor([900]))).abs().max() > 1e-3


def test_bad_config_is_rejected_naming_the_field():
    with pytest.raises(ValueError, match="unet.image_size 30 must be divisible by 8"):
        UNetConfig(image_size=30)
    with pytest.raises(ValueError, match="attention_resolutions \\[7\\]"):
        UNetConfig(image_size=32, attention_resolutions=(7,))
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(base_channels=20)
    with pytest.raises(ValueError, match="unknown U-Net preset"):
        unet_preset("imagenet")
