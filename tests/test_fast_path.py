"""The GPU fast path, checked where a CPU can check it (issue 21): the attention reaches a fused SDPA kernel, a bf16
step runs no matrix product or convolution in float32, and channels-last and compiled steps give the eager float32
step's loss and gradients up to rounding."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion
from ddpm_core.unet import SelfAttention, UNet, UNetConfig, unet_preset

FUSED_ATTENTION = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention", "_cudnn_attention")
MATRIX_OPS = (
    "aten.mm.",
    "aten.bmm.",
    "aten.addmm.",
    "aten.baddbmm.",
    "aten.convolution.",
    "aten.convolution_backward.",
)


class OperatorLog(TorchDispatchMode):
    """The aten operators run below autograd, each with the dtypes of its tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func), tuple(a.dtype for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Non-zero weights everywhere (the zero-initialised output layers would hide differences)."""
    torch.manual_seed(1)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    return model


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_attention_runs_on_a_fused_kernel_not_on_explicit_matmuls(memory_format, dtype):
    """SDPA's fused kernels need unit stride along the head dimension; given NCHW strides it falls back to its math
    path (an explicit bmm of [B, HW, C] x [B, C, HW], the H200 profile's 3 ms per step). Both layouts, forward and
    backward."""
    attention = randomised(SelfAttention(64, 8)).to(dtype)
    x = torch.randn(2, 64, 8, 8, dtype=dtype).to(memory_format=memory_format).requires_grad_()  # [B, C, H, W]
    log = OperatorLog()
    with log:
        attention(x).float().square().mean().backward()
    names = [name for name, _ in log.calls]
    assert any(fused in name for name in names for fused in FUSED_ATTENTION), names
    assert not any(name.startswith("aten.bmm.") for name in names), names


def test_a_bf16_training_step_runs_no_float32_matmul_or_convolution():
    """Under bf16 autocast every matrix product and convolution of the forward and backward pass takes bf16
    operands: none falls back to float32 GEMMs (the time embedding, the attention and the loss included)."""
    config = unet_preset("digits")
    model = randomised(UNet(config))
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    x0 = torch.rand(4, config.in_channels, config.image_size, config.image_size) * 2 - 1  # [B, C, H, W]
    t = torch.tensor([0, 10, 500, 999])
    log = OperatorLog()
    with log:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = diffusion.training_losses(model, x0, t, torch.randn_like(x0))["loss"].mean()
        loss.backward()
    matrix_calls = [(name, dtypes) for name, dtypes in log.calls if name.startswith(MATRIX_OPS)]
    assert len(matrix_calls) > 20
    in_float32 = [(name, dtypes) for name, dtypes in matrix_calls if torch.float32 in dtypes]
    assert not in_float32, in_float32


def loss_and_gradients(model: torch.nn.Module, memory_format: torch.memory_format) -> tuple[torch.Tensor, list]:
    """One training loss of Algorithm 1 at fixed timesteps and noise, and its gradients."""
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 8, 8, generator=generator) * 2 - 1  # [B, C, H, W]
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, 1000, (8,), generator=generator)
    loss = diffusion.training_losses(model, x0.to(memory_format=memory_format), t, noise)["loss"].mean()
    parameters = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, parameters)


@pytest.mark.parametrize("variant", ["channels_last", "channels_last+compile"])
def test_fast_path_steps_match_the_eager_float32_step(variant):
    """The trainer's switches change rounding only: loss and every gradient within float32 tolerance of the eager
    NCHW step (compiled: inductor's own GroupNorm, SiLU and attention kernels in NHWC)."""
    # compiled: one resolution level (residual blocks, attention, GroupNorm + SiLU, the time embedding), since compile
    # time grows with the graph; the digits preset's down- and upsampling are plain convolutions, checked eagerly
    config = unet_preset("digits")
    if "compile" in variant:
        config = UNetConfig(**{**config.to_dict(), "channel_mult": (1,), "attention_resolutions": (8,)})
    model = randomised(UNet(config))
    reference_loss, reference_gradients = loss_and_gradients(model, torch.contiguous_format)
    fast = model.to(memory_format=torch.channels_last)
    if "compile" in variant:
        fast = torch.compile(fast)
    loss, gradients = loss_and_gradients(fast, torch.channels_last)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-4, atol=1e-6)
    for gradient, reference in zip(gradients, reference_gradients, strict=True):
        torch.testing.assert_close(gradient, reference, rtol=1e-3, atol=1e-5)
