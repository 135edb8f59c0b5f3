"""Precisions by name, as configs, the sampling protocol and the benchmarks give them, and the autocast dtype of each."""

from __future__ import annotations

import torch

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,  # no autocast: float32 throughout
    "bf16": torch.bfloat16,  # the network under bf16 autocast (weights and the sampler's arithmetic stay float32)
}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype to autocast the network to for ``precision`` (``None``: none); an unknown name raises ValueError."""
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(AUTOCAST_DTYPES)}")
    return AUTOCAST_DTYPES[precision]
