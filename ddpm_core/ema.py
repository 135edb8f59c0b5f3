"""Exponential moving average of model weights: a fixed decay (Ho et al. 2020, Appendix B: 0.9999), or the
power-function EMA of a relative width ``sigma_rel`` (Karras et al. 2024, Eq. 127), whose decay grows with training."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ddpm_core.phema import power_beta, sigma_rel_to_gamma


class EMA:
    """Keeps ``shadow = decay * shadow + (1 - decay) * weights`` after every optimizer step.

    With ``warmup`` the decay used at update n is ``min(decay, (1 + n) / (10 + n))`` (TensorFlow's
    ``ExponentialMovingAverage(num_updates=...)``), so early averages are not dominated by the random init. With
    ``sigma_rel`` the decay and ``warmup`` are ignored: update n (from 0) uses ``(1 - 1 / (n + 1)) ** (gamma + 1)``
    (Karras et al. 2024, Eq. 127 at a constant batch), the power-function EMA whose averaging profile has relative
    width ``sigma_rel`` at every point of training (Eq. 123-126). Buffers (e.g. normalisation statistics) are
    copied, not averaged.
    """

    def __init__(
        self, model: nn.Module, decay: float = 0.9999, warmup: bool = True, sigma_rel: float | None = None
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must lie in [0, 1), got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.sigma_rel = sigma_rel
        self.gamma = None if sigma_rel is None else sigma_rel_to_gamma(sigma_rel)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay of the next update."""
        if self.gamma is not None:
            return power_beta(self.gamma, self.num_updates + 1, 1)
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
            "sigma_rel": self.sigma_rel,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a power-function EMA resumes only as one of the same width."""
        if state.get("sigma_rel") != self.sigma_rel:
            raise ValueError(f"the state is an EMA of sigma_rel {state.get('sigma_rel')}, this one of {self.sigma_rel}")
        self.model.load_state_dict(state["model"])
        self.decay, self.warmup, self.num_updates = (
            float(state["decay"]),
            bool(state["warmup"]),
            int(state["num_updates"]),
        )
