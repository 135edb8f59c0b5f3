"""Exponential moving average of model weights (Ho et al. 2020, Appendix B: decay 0.9999)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """Keeps ``shadow = decay * shadow + (1 - decay) * weights`` after every optimizer step.

    With ``warmup`` the decay used at update n is ``min(decay, (1 + n) / (10 + n))`` (TensorFlow's
    ``ExponentialMovingAverage(num_updates=...)``), so early averages are not dominated by the random init.
    Buffers (e.g. normalisation statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must lie in [0, 1), got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        shadow: list[torch.Tensor] = list(self.model.parameters())
        torch._foreach_lerp_(
            shadow, [p.detach().to(s.dtype) for p, s in zip(model.parameters(), shadow, strict=True)], 1.0 - decay
        )
        for shadow_buffer, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            shadow_buffer.copy_(buffer)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.decay, self.warmup, self.num_updates = (
            float(state["decay"]),
            bool(state["warmup"]),
            int(state["num_updates"]),
        )
