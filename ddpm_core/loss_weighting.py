"""Per-timestep weighting of the denoising loss, as a weight on the x_0-space error.

With SNR(t) = abar_t / (1 - abar_t) (Kingma et al. 2021, "Variational Diffusion Models") and the network's x_0
estimate x0_hat, the errors of the three parameterisations at the same x_t are proportional:

    ||eps - eps_hat||^2 = SNR(t) ||x_0 - x0_hat||^2        (x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps)
    ||v - v_hat||^2     = (SNR(t) + 1) ||x_0 - x0_hat||^2  (v = sqrt(abar) eps - sqrt(1 - abar) x_0)

so an x_0-space weight w(t) is the weight w(t) / SNR(t) on the eps-space MSE, w(t) on the x_0-space MSE and
w(t) / (SNR(t) + 1) on the v-space MSE. Each :class:`Weighting` names its w(t).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch

from ddpm_core.diffusion import Prediction
from ddpm_core.fields import check_ranges, coerce_enum_fields


class Weighting(str, enum.Enum):
    """The x_0-space weight w(t) of the denoising loss."""

    NONE = "none"  # no reweighting: L_simple of the configured prediction (Ho et al. 2020, Eq. 14)
    MIN_SNR = "min_snr"  # w = min(SNR(t), gamma) (Hang et al. 2023, "Min-SNR Weighting Strategy")
    TRUNCATED_SNR = "truncated_snr"  # w = max(SNR(t), 1) (Salimans & Ho 2022, "Progressive Distillation", Sec. 4)


@dataclass(frozen=True)
class LossWeighting:
    """Which weighting of the denoising loss, and its clipping threshold gamma (used by MIN_SNR only)."""

    kind: Weighting = Weighting.NONE
    gamma: float = 5.0  # Hang et al. 2023's default

    def __post_init__(self) -> None:
        coerce_enum_fields(self, "loss_weighting", {"kind": Weighting})
        check_ranges("loss_weighting", {"gamma": (0 < self.gamma < float("inf"), self.gamma)})

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "gamma": self.gamma}


def loss_weights(weighting: LossWeighting, snr: torch.Tensor, prediction: Prediction) -> torch.Tensor:
    """Per-example weights ``[B]`` (``snr``'s dtype and device) of the per-example MSE in ``prediction``'s space,
    from ``snr`` ``[B]`` = SNR(t) > 0, such that the weighted loss is the x_0-space loss w(t) ||x_0 - x0_hat||^2
    of ``weighting`` (see the module docstring):

    - NONE: ones, whatever the prediction (the loss stays L_simple, Ho et al. 2020, Eq. 14);
    - MIN_SNR, w = min(SNR, gamma): min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0,
      min(SNR, gamma) / (SNR + 1) for v (Hang et al. 2023);
    - TRUNCATED_SNR, w = max(SNR, 1): max(SNR, 1) / SNR for eps, max(SNR, 1) for x0, max(SNR, 1) / (SNR + 1) for v
      (Salimans & Ho 2022, Sec. 4, the loss max(||x_0 - x0_hat||^2, ||eps - eps_hat||^2)). For eps the weight grows
      as 1 / SNR at high noise.
    """
    if weighting.kind is Weighting.NONE:
        return torch.ones_like(snr)
    x0_weight = snr.clamp(max=weighting.gamma) if weighting.kind is Weighting.MIN_SNR else snr.clamp(min=1.0)  # [B]
    prediction = Prediction(prediction)
    if prediction is Prediction.EPS:
        return x0_weight / snr
    if prediction is Prediction.X0:
        return x0_weight
    return x0_weight / (snr + 1.0)
