"""Advice that workers give when a resource runs out or a setting is known to be slow: it names the settings to
change, so a user never has to read a traceback to find them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ddpm_core.precision import NATIVE_BF16_CPU_FLAGS, Precision, cpu_has_native_bf16


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
