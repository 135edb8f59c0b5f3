"""Noise (beta) schedules, computed in float64.

Every function returns ``betas`` of shape ``[T]`` (float64), with ``betas[i]`` the variance of forward step
``i + 1`` in the paper's 1-based notation
(Ho et al. 2020, Eq. 2: ``q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)``).
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable

import torch

MAX_BETA = 0.999


class Schedule(str, enum.Enum):
    """Named beta schedules."""

    LINEAR = "linear"  # Ho et al. 2020, Sec. 4: beta_1 = 1e-4 ... beta_T = 0.02 at T = 1000
    COSINE = "cosine"  # Nichol & Dhariwal 2021, Eq. 17
    QUADRATIC = "quadratic"  # linear in sqrt(beta) (Stable Diffusion's "scaled_linear")
    SIGMOID = "sigmoid"  # sigmoid-shaped betas (Xu et al. 2022, GeoDiff)


def _paper_range(num_timesteps: int, beta_start: float | None, beta_end: float | None) -> tuple[float, float]:
    """The paper's (1e-4, 0.02) at T=1000, rescaled by 1000/T so that other T keep the same total noise
    (improved-diffusion's ``get_named_beta_schedule``), capped at 0.999 (the cosine schedule's cap) so that very
    short chains (T <= 20) stay valid. Explicit values override it."""
    scale = 1000.0 / num_timesteps
    return (
        min(scale * 1e-4, MAX_BETA) if beta_start is None else beta_start,
        min(scale * 0.02, MAX_BETA) if beta_end is None else beta_end,
    )


def linear_betas(num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None) -> torch.Tensor:
    """Linearly increasing betas (Ho et al. 2020, Sec. 4). Returns ``[T]`` float64."""
    start, end = _paper_range(num_timesteps, beta_start, beta_end)
    return torch.linspace(start, end, num_timesteps, dtype=torch.float64)


def quadratic_betas(num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None) -> torch.Tensor:
    """Betas linear in sqrt(beta) between the same end points as :func:`linear_betas`. Returns ``[T]`` float64."""
    start, end = _paper_range(num_timesteps, beta_start, beta_end)
    return torch.linspace(math.sqrt(start), math.sqrt(end), num_timesteps, dtype=torch.float64) ** 2


def sigmoid_betas(num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None) -> torch.Tensor:
    """``sigmoid(linspace(-6, 6))`` rescaled to ``[beta_start, beta_end]``. Returns ``[T]`` float64."""
    start, end = _paper_range(num_timesteps, beta_start, beta_end)
    return torch.sigmoid(torch.linspace(-6.0, 6.0, num_timesteps, dtype=torch.float64)) * (end - start) + start


def cosine_betas(
    num_timesteps: int, offset: float = 0.008, max_beta: float = MAX_BETA, logsnr_shift: float = 0.0
) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, Eq. 17): ``alpha_bar(t) = cos((t/T + s) / (1 + s) * pi/2)^2``,
    ``beta_t = min(1 - alpha_bar(t) / alpha_bar(t-1), max_beta)``. ``logsnr_shift`` adds a constant to log SNR(t) =
    log(alpha_bar / (1 - alpha_bar)) at every t (Hoogeboom et al. 2023, Sec. 3.1, the shifted cosine schedule: positive
    is less noise at each t; they shift by 2 log(64 / d) for d x d images). Returns ``[T]`` float64."""

    def f(step: float) -> float:
        return math.cos((step / num_timesteps + offset) / (1 + offset) * math.pi / 2) ** 2

    def alpha_bar(step: float) -> float:  # up to the factor f(0), which the betas' ratios cancel when unshifted
        if logsnr_shift == 0.0:
            return f(step)
        unshifted = f(step) / f(0)
        if unshifted in (0.0, 1.0):
            return unshifted
        return 1.0 / (1.0 + (1.0 - unshifted) / unshifted * math.exp(-logsnr_shift))  # sigmoid(log SNR + shift)

    betas = [min(1.0 - alpha_bar(i + 1) / alpha_bar(i), max_beta) for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(schedule: Schedule | str, num_timesteps: int, **params: float) -> torch.Tensor:
    """Betas ``[T]`` (float64) of a named schedule; ``params`` are that schedule's keyword arguments. A copy of the
    schedule computed once per (schedule, T, params): the cosine family is T Python-float evaluations, and every
    diffusion a config builds (planning, checks, each stage) asks for its schedule again."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    if not all(isinstance(value, (int, float)) for value in params.values()):
        raise ValueError(f"schedule parameters must be numbers, got {params}")
    return _betas(Schedule(schedule), num_timesteps, tuple(sorted(params.items()))).clone()


@functools.cache
def _betas(schedule: Schedule, num_timesteps: int, params: tuple[tuple[str, float], ...]) -> torch.Tensor:
    builders: dict[Schedule, Callable[..., torch.Tensor]] = {
        Schedule.LINEAR: linear_betas,
        Schedule.COSINE: cosine_betas,
        Schedule.QUADRATIC: quadratic_betas,
        Schedule.SIGMOID: sigmoid_betas,
    }
    try:
        betas = builders[schedule](num_timesteps, **dict(params))
    except TypeError as error:
        raise ValueError(
            f"schedule {schedule.value!r} got unexpected parameters {[k for k, _ in params]}: {error}"
        ) from None
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError(f"schedule {schedule.value!r} with {dict(params)} gives betas outside (0, 1)")
    return betas
