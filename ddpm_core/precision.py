"""Precisions by name, as configs, the sampling protocol and the benchmarks give them, and the autocast dtype of
each."""

from __future__ import annotations

import enum
from pathlib import Path

import torch

from ddpm_core.fields import allowed_values


class Precision(str, enum.Enum):
    """How the network's arithmetic runs (weights, the loss, the optimizer and the sampler's own arithmetic stay
    float32 under every one)."""

    FP32 = "fp32"  # no autocast: float32 throughout
    BF16 = "bf16"  # the network under bf16 autocast

    @classmethod
    def chosen(cls, use_gpu: bool, bf16_on_gpu: bool, bf16_on_cpu: bool) -> Precision:
        """The precision that ``bf16_on_gpu`` / ``bf16_on_cpu`` switches choose on the device kind given."""
        return cls.BF16 if (bf16_on_gpu if use_gpu else bf16_on_cpu) else cls.FP32


AUTOCAST_DTYPES: dict[Precision, torch.dtype | None] = {Precision.FP32: None, Precision.BF16: torch.bfloat16}


def autocast_dtype(precision: Precision | str) -> torch.dtype | None:
    """The dtype to autocast the network to for ``precision`` (``None``: none); an unknown name raises ValueError."""
    try:
        return AUTOCAST_DTYPES[Precision(precision)]
    except ValueError:
        raise ValueError(f"precision {precision!r} is not one of {allowed_values(Precision)}") from None


NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 instruction sets with bf16 arithmetic


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The instruction-set flags of Linux's ``/proc/cpuinfo`` (or of the ``cpuinfo`` text given); empty where there
    are none to read (another OS, another architecture)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    return {
        flag
        for line in cpuinfo.splitlines()
        if line.split(":", 1)[0].strip() == "flags"
        for flag in line.split(":", 1)[1].split()
    }


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes in bf16 natively (AVX512_BF16 or AMX-BF16), from :func:`cpu_flags`; ``None`` where
    that cannot be told. Without such units bf16 convolutions fall back to kernels many times slower than float32
    (docs/benchmarks.md)."""
    flags = cpu_flags(cpuinfo)
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS) if flags else None
