"""Advice given when a resource runs out, a setting is known to be slow or the data does not fit the model: it names
the settings to change, so a user never has to read a traceback to find them."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from ddpm_core.fields import FieldError
from ddpm_core.precision import NATIVE_BF16_CPU_FLAGS, Precision, cpu_has_native_bf16
from ddpm_core.unet import PRESETS, UNetConfig


@contextlib.contextmanager
def out_of_memory_advice(where: str, advice: str) -> Iterator[None]:
    """Re-raise an allocation failure (CUDA's ``OutOfMemoryError``, or the CPU allocator's) as a ``MemoryError``
    saying where it happened and which settings to change."""
    try:
        yield
    except RuntimeError as error:
        if not isinstance(error, torch.OutOfMemoryError) and "can't allocate memory" not in str(error):
            raise
        raise MemoryError(
            f"out of memory in {where}: {advice}. Allocator: {str(error).splitlines()[0][:300]}"
        ) from error


def slow_precision_advice(
    precision: Precision | str, device_type: str, setting: str, cpuinfo: str | None = None
) -> str | None:
    """A warning when bf16 was asked for on a CPU known to lack bf16 units (``ddpm_core.precision.cpu_has_native_bf16``
    of this machine, or of the ``cpuinfo`` text given), naming the setting that asked for it; else ``None``."""
    if Precision(precision) is not Precision.BF16 or device_type != "cpu" or cpu_has_native_bf16(cpuinfo) is not False:
        return None
    return (
        f"warning: {setting}=true on a CPU without bf16 units (no {' or '.join(NATIVE_BF16_CPU_FLAGS)} flag): bf16 "
        f"convolutions fall back to kernels many times slower than float32 (docs/benchmarks.md); set {setting}=false"
    )


def model_fit_advice(image_shape: tuple[int, int, int], preset: str, unet: UNetConfig) -> str:
    """What makes images ``[H, W, C]`` and the U-Net ``unet`` (``preset`` with ``model.overrides`` applied) fit, for
    the mismatch there is: a size by a preset, ``model.overrides.image_size`` or ``data.image_size``; a channel count
    by a preset, ``model.overrides.in_channels`` or converting the images (``data.image_size`` resizes, it does not
    change channels)."""
    height, width, channels = image_shape
    size_differs = (height, width) != (unet.image_size, unet.image_size)
    channels_differ = channels != unet.in_channels
    fitting = [name for name, p in PRESETS.items() if (p.image_size, p.image_size, p.in_channels) == image_shape]
    fixes: list[str] = []
    if preset in fitting:  # the overrides made it not fit
        fixes.append(f"leave out model.overrides (model.preset {preset!r} as it is fits these images)")
    if [name for name in fitting if name != preset]:
        fixes.append(f"model.preset {' or '.join(repr(n) for n in fitting if n != preset)} fits these images")
    overrides: dict[str, Any] = {}
    if size_differs and height == width:
        overrides["image_size"] = height
    if channels_differ:
        overrides["in_channels"] = channels
    if overrides and (height == width or not size_differs):
        shown = " and ".join(f"model.overrides.{key}: {value}" for key, value in overrides.items())
        try:
            dataclasses.replace(unet, **overrides)
            fixes.append(f"set {shown}")
        except FieldError as error:
            fixes.append(f"set {shown} and change the layout to fit ({error.under('model.overrides')})")
    on_the_data: list[str] = []
    if size_differs:
        size = unet.image_size
        on_the_data.append(f"resize the images to {size}x{size} with data.image_size: {size}")
    if channels_differ:
        kind = "grayscale" if unet.in_channels == 1 else "RGB" if unet.in_channels == 3 else "images"
        on_the_data.append(
            f"convert the images to {unet.in_channels}-channel {kind} before the pipeline reads them "
            "(data.image_size resizes images; it does not change their channels)"
        )
    fixes.append(" and ".join(on_the_data))
    return "; or ".join(fixes)
