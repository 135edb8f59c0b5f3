"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models",
Algorithm 2) on the discrete schedule of :class:`ddpm_core.diffusion.GaussianDiffusion`.

A student of N deterministic (DDIM, eta = 0) steps learns to do in one step what its teacher does in two: from
``x_t`` the teacher takes DDIM steps ``t -> m -> s`` (Song et al. 2021, Eq. 12), and the student's target is the
``x~`` whose single DDIM step ``t -> s`` lands exactly where the teacher's two did (Algorithm 2,
``x~ = (z'' - (sigma''/sigma) z_t) / (alpha'' - (sigma''/sigma) alpha_t)`` with ``alpha = sqrt(abar)``,
``sigma = sqrt(1 - abar)``). The loss is the x_0-space error weighted by ``max(SNR(t), 1)``, the paper's "truncated
SNR" weighting (Sec. 4). Each round halves N, the student of one round becoming the teacher of the next.

Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2) is the second method: a student
``f(x_t, t)`` with the skip scalings of Eq. 5 (the boundary condition ``f(x, t_min) = x`` holds by construction) is
regressed onto its EMA target network's output one teacher DDIM step earlier.

The student's grid has N steps ending at the clean image: step i starts at timestep ``starts[i]``, passes the
teacher's midpoint ``mids[i]`` and ends at ``ends[i]`` (-1: the clean image, where ``abar = 1``). The 2N points of
the teacher's grid are evenly spaced, the first at T - 1 (trailing spacing: the noisiest step starts from pure
noise's level).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import torch
from torch.profiler import record_function

from ddpm_core.diffusion import GaussianDiffusion, Prediction
from ddpm_core.samplers import Method, Model, SamplerConfig, Spacing
from ddpm_core.training import StepResult

CLEAN = -1  # the grid index of the clean image (abar = 1)


class StudentGrid(NamedTuple):
    """Per student step ``[N]``, from the noisiest: its start, the teacher's midpoint, its end (CLEAN at the last)."""

    starts: torch.Tensor  # [N] int64
    mids: torch.Tensor  # [N] int64
    ends: torch.Tensor  # [N] int64


def student_grid(num_timesteps: int, student_steps: int) -> StudentGrid:
    """The student's N steps on a T-step schedule: the teacher's 2N timesteps ``round((k + 1) T / 2N) - 1``,
    k = 2N-1 .. 0, taken in pairs."""
    if not 1 <= student_steps <= num_timesteps // 2:
        raise ValueError(
            f"student_steps must lie in [1, {num_timesteps // 2}] for T = {num_timesteps}, got {student_steps}"
        )
    count = 2 * student_steps
    teacher = [round((k + 1) * num_timesteps / count) - 1 for k in reversed(range(count))]  # noisiest first
    grid = [*teacher, CLEAN]
    starts, mids, ends = grid[0:-1:2], grid[1::2], grid[2::2]
    return StudentGrid(torch.tensor(starts), torch.tensor(mids), torch.tensor(ends))


def student_sampler(student_steps: int) -> SamplerConfig:
    """How a student is sampled: deterministic DDIM (eta = 0) at its steps, on the trailing grid, whose timesteps are
    :func:`student_grid`'s starts (``round((i + 1) T / N) - 1``): the grid it was distilled on."""
    return SamplerConfig(method=Method.DDIM, num_steps=student_steps, spacing=Spacing.TRAILING)


def abar_at(diffusion: GaussianDiffusion, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``abar`` at grid indices ``[B]`` (CLEAN: 1), as ``[B, 1, ..., 1]`` in ``like``'s dtype and device."""
    table = torch.cat([diffusion.alphas_cumprod, torch.ones(1, dtype=torch.float64)])  # [T + 1]: index -1 is 1
    return diffusion._gather(table, index, like)


def ddim_to(x_t: torch.Tensor, x0_hat: torch.Tensor, abar_t: torch.Tensor, abar_s: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step from noise level ``abar_t`` to ``abar_s`` given the x_0 estimate (Song et al.
    2021, Eq. 12 with sigma = 0): ``sqrt(abar_s) x0_hat + sqrt(1 - abar_s) eps_hat``,
    ``eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)``. ``[B, C, H, W]``."""
    eps_hat = (x_t - abar_t.sqrt() * x0_hat) / (1 - abar_t).sqrt()
    return abar_s.sqrt() * x0_hat + (1 - abar_s).sqrt() * eps_hat


def single_step_x0(x_t: torch.Tensor, x_s: torch.Tensor, abar_t: torch.Tensor, abar_s: torch.Tensor) -> torch.Tensor:
    """The x_0 estimate whose DDIM step from ``x_t`` lands on ``x_s`` (Salimans & Ho 2022, Algorithm 2):
    ``(x_s - r x_t) / (sqrt(abar_s) - r sqrt(abar_t))`` with ``r = sqrt((1 - abar_s) / (1 - abar_t))``; at the clean
    end (``abar_s = 1``) it is ``x_s`` itself. ``[B, C, H, W]``."""
    ratio = ((1 - abar_s) / (1 - abar_t)).sqrt()
    return (x_s - ratio * x_t) / (abar_s.sqrt() - ratio * abar_t.sqrt())


def teacher_x0(
    diffusion: GaussianDiffusion, teacher: Model, x: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any]
) -> torch.Tensor:
    """The teacher's x_0 estimate at timestep indices ``t`` ``[B]`` (unclipped), from its configured prediction."""
    return diffusion.p_mean_variance(teacher(x, diffusion.model_timesteps(t), **kwargs), x, t).pred_x0


@torch.no_grad()
def distillation_target(
    diffusion: GaussianDiffusion,
    teacher: Model,
    x_t: torch.Tensor,
    steps: StudentGrid,
    kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """The student's x_0 target for the states ``x_t`` ``[B, C, H, W]`` at ``steps.starts`` (each row its own
    step, ``[B]`` each): the teacher's two DDIM steps start -> mid -> end, then :func:`single_step_x0`."""
    kwargs = kwargs or {}
    abar_t, abar_m, abar_s = (abar_at(diffusion, index, x_t) for index in steps)
    x_m = ddim_to(x_t, teacher_x0(diffusion, teacher, x_t, steps.starts, kwargs), abar_t, abar_m)
    x0_m = teacher_x0(diffusion, teacher, x_m, steps.mids, kwargs)
    return single_step_x0(x_t, ddim_to(x_m, x0_m, abar_m, abar_s), abar_t, abar_s)


def distillation_loss(
    diffusion: GaussianDiffusion, student_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Per-example loss ``[B]``: ``max(SNR(t), 1) * mean ||x~ - x0_hat||^2`` with the student's x_0 estimate from its
    configured prediction (Salimans & Ho 2022, Sec. 4, "truncated SNR" weighting)."""
    x0_hat = diffusion.p_mean_variance(student_output, x_t, t).pred_x0
    weight = diffusion.snr(t, x_t).clamp(min=1.0)  # [B]
    return weight * (target - x0_hat).pow(2).flatten(1).mean(1)


def progressive_loss(
    diffusion: GaussianDiffusion,
    student: Model,
    teacher: Model,
    x0: torch.Tensor,
    student_steps: int,
    generator: torch.Generator | None = None,
    kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Algorithm 2's loss on clean images ``x0`` ``[B, C, H, W]`` (Salimans & Ho 2022): each image at a uniform step
    of the ``student_steps``-step grid, noised to that step's start (Ho et al. 2020, Eq. 4), its target from the
    teacher's two DDIM steps (:func:`distillation_target`), and the student's truncated-SNR-weighted x_0 error
    (:func:`distillation_loss`). Per example, ``[B]``; the step indices and the noise come from ``generator``."""
    kwargs = kwargs or {}
    grid = student_grid(diffusion.num_timesteps, student_steps)
    draw_on = generator.device if generator is not None else x0.device  # a CUDA generator: no host round trip
    index = torch.randint(0, student_steps, (x0.shape[0],), generator=generator, device=draw_on)  # [B] a step each
    steps = StudentGrid(*(part.to(draw_on)[index].to(x0.device) for part in grid))
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=draw_on).to(x0.device)
    x_t = diffusion.q_sample(x0, steps.starts, noise)  # [B, C, H, W]
    target = distillation_target(diffusion, teacher, x_t, steps, kwargs)
    output = student(x_t, diffusion.model_timesteps(steps.starts), **kwargs)
    return distillation_loss(diffusion, output, x_t, steps.starts, target)


def accumulate_loss(
    per_example: Callable[[], torch.Tensor],
    like: torch.Tensor,
    autocast_dtype: torch.dtype | None,
    scale: float,
    region: Callable[[str], AbstractContextManager[Any]] = record_function,
) -> StepResult:
    """A distillation loss on one micro-batch: ``per_example()`` ``[b]`` (e.g. :func:`progressive_loss`) under
    autocast, its mean's gradient times ``scale`` (the micro-batch's share of the global batch) added to the student's
    ``.grad``, as :func:`ddpm_core.training.accumulate_gradients` does for Algorithm 1 of Ho et al. (2020); no
    per-quartile statistics (the result's counts are zero). ``like``: the micro-batch, for its device."""
    device_type = like.device.type
    with region("forward"), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = per_example().mean()
    with region("backward"):
        (loss if scale == 1.0 else loss * scale).backward()
    zeros = torch.zeros(4, dtype=torch.float64, device=like.device)  # [4]
    return StepResult(loss.detach(), torch.zeros((), device=like.device), zeros, zeros.clone())


def in_parameterisation(
    diffusion: GaussianDiffusion,
    prediction: Prediction,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The network output of ``prediction`` whose x_0 estimate at ``(x_t, t)`` is ``x0``: ``x0`` itself, ``eps`` (by
    default the implied ``(x_t - sqrt(abar) x0) / sqrt(1 - abar)``, Ho et al. 2020, Eq. 4), or ``v = sqrt(abar) eps -
    sqrt(1 - abar) x0`` (Salimans & Ho 2022, Sec. 4). ``[B, C, H, W]``."""
    if prediction is Prediction.X0:
        return x0
    eps = diffusion.eps_from_x0(x_t, t, x0) if eps is None else eps
    return eps if prediction is Prediction.EPS else diffusion.v_target(x0, t, eps)


class Reparameterized(torch.nn.Module):
    """A network trained to predict in ``source``'s parameterisation, answering in ``target``'s: its x_0 and eps
    estimates (``p_mean_variance``, unclipped), then ``x_0``, ``eps`` or ``v = sqrt(abar) eps - sqrt(1 - abar) x_0``
    (Salimans & Ho 2022, Sec. 4). So an eps teacher can teach a v student; the timesteps it is called with are the
    schedule's indices (``source`` is not respaced). ``[B, C, H, W]`` in and out."""

    def __init__(self, network: torch.nn.Module, source: GaussianDiffusion, target: Prediction) -> None:
        super().__init__()
        self.network, self.source, self.target = network, source, target

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        moments = self.source.p_mean_variance(self.network(x, t, **kwargs), x, t)
        return in_parameterisation(self.source, self.target, moments.pred_x0, x, t, moments.pred_eps)


# ------------------------------------------------------------------------------------------ consistency distillation
BOUNDARY_WIDTH = 0.005  # w: the skip scaling's width in VE sigma, a fraction of the linear schedule's first 30 steps


def ve_sigma(abar: torch.Tensor) -> torch.Tensor:
    """The variance-exploding noise level of a VP state: ``x_t / sqrt(abar) = x_0 + sigma eps`` with
    ``sigma = sqrt((1 - abar) / abar)`` (Song et al. 2021, "Score-Based Generative Modeling", Sec. 3.4)."""
    return ((1 - abar) / abar).sqrt()


def consistency_scalings(
    sigma: torch.Tensor, sigma_min: torch.Tensor, width: float = BOUNDARY_WIDTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` of a consistency model ``f(x, sigma) = c_skip x + c_out x0_hat(x, sigma)``:
    ``c_skip = w^2 / ((sigma - sigma_min)^2 + w^2)``, ``c_out = (sigma - sigma_min) / sqrt((sigma - sigma_min)^2 +
    w^2)``. This is Song et al. (2023)'s Eq. 5 boundary form (``c_skip(sigma_min) = 1``, ``c_out(sigma_min) = 0``, so
    ``f(x, sigma_min) = x`` for any network) with the network's x_0 estimate in place of EDM's unit-variance output F,
    hence ``c_out -> 1`` rather than ``sigma_data``, as Latent Consistency Models do (Luo et al. 2023, Sec. 4.2). A
    width far below the grid's first step makes f the network's own x_0 estimate past the boundary, so a student
    initialised from its teacher starts as the teacher's x_0 estimate."""
    offset = sigma - sigma_min
    return width**2 / (offset**2 + width**2), offset / (offset**2 + width**2).sqrt()


def consistency_x0(
    diffusion: GaussianDiffusion, x0_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """The consistency function ``f(x_t, t)`` ``[B, C, H, W]`` at timestep indices ``t`` ``[B]`` of ``diffusion``'s
    own schedule, from the network's x_0 estimate ``x0_hat``: :func:`consistency_scalings` applied to the VE state
    ``x_t / sqrt(abar_t)``, timestep 0 being the boundary (there f is that state, whatever the network)."""
    abar = abar_at(diffusion, t, x_t)
    sigma = ve_sigma(abar)
    sigma_min = ve_sigma(abar_at(diffusion, torch.zeros_like(t), x_t))
    c_skip, c_out = consistency_scalings(sigma, sigma_min)
    return c_skip * x_t / abar.sqrt() + c_out * x0_hat


class ConsistencyFunction(torch.nn.Module):
    """A network read as a consistency model (Song et al. 2023, Eq. 5): its x_0 estimate in ``diffusion``'s
    prediction, through :func:`consistency_x0`. Called like the network, it answers in that prediction (the output
    whose x_0 estimate is f), so samplers, the NLL bound and the served model read a consistency student as any
    network of its diffusion; :meth:`x0` is f itself. ``diffusion`` is the network's, not respaced: it is called with
    the schedule's own timesteps. ``[B, C, H, W]`` in and out (learned-variance channels passed through)."""

    def __init__(self, network: Model, diffusion: GaussianDiffusion) -> None:
        super().__init__()
        self.network, self.diffusion = network, diffusion

    def x0(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.skipped(self.network(x, t, **kwargs), x, t)

    def skipped(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f from the network's ``output`` at ``(x, t)``: its x_0 estimate through :func:`consistency_x0`."""
        return consistency_x0(self.diffusion, self.diffusion.p_mean_variance(output, x, t).pred_x0, x, t)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        output = self.network(x, t, **kwargs)
        _, variance = self.diffusion.split_output(output, x)
        answer = in_parameterisation(self.diffusion, self.diffusion.prediction, self.skipped(output, x, t), x, t)
        return answer if variance is None else torch.cat([answer, variance], dim=1)


def consistency_grid(num_timesteps: int, grid_steps: int) -> torch.Tensor:
    """The N + 1 timesteps ``[N + 1]`` of consistency distillation, increasing: the boundary (timestep 0), then the
    N trailing ones ``round(k T / N) - 1``, k = 1..N, so that a student sampled with DDIM at any divisor of N steps
    on the trailing grid starts from points it was trained at."""
    if not 1 <= grid_steps <= num_timesteps // 2:
        raise ValueError(f"grid_steps must lie in [1, {num_timesteps // 2}] for T = {num_timesteps}, got {grid_steps}")
    return torch.tensor([0, *(round(k * num_timesteps / grid_steps) - 1 for k in range(1, grid_steps + 1))])


@torch.no_grad()
def consistency_target(
    diffusion: GaussianDiffusion,
    teacher: Model,
    target_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_next: torch.Tensor,
    t_next: torch.Tensor,
    t: torch.Tensor,
    kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Consistency distillation's target for states ``x_next`` at the later timesteps ``t_next`` ``[B]`` (Song et
    al. 2023, Algorithm 2): one teacher DDIM step to ``t`` (the ODE solver Phi), then the target network's (the EMA
    student's) x_0 estimate there, ``target_x0(x, t)``. The student's ``consistency_x0`` at ``(x_next, t_next)`` is
    regressed onto it (:func:`consistency_loss`)."""
    kwargs = kwargs or {}
    x0_teacher = teacher_x0(diffusion, teacher, x_next, t_next, kwargs)
    x_t = ddim_to(x_next, x0_teacher, abar_at(diffusion, t_next, x_next), abar_at(diffusion, t, x_next))
    return target_x0(x_t, t)


def consistency_loss(student_x0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example squared L2 distance ``[B]`` (Song et al. 2023, Eq. 7 with d = L2 and lambda = 1)."""
    return (student_x0 - target).pow(2).flatten(1).mean(1)


def consistency_distillation_loss(
    diffusion: GaussianDiffusion,
    student: ConsistencyFunction,
    target: ConsistencyFunction,
    teacher: Model,
    x0: torch.Tensor,
    grid: torch.Tensor,
    generator: torch.Generator | None = None,
    kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Algorithm 2 of Song et al. (2023) on clean images ``x0`` ``[B, C, H, W]``: each image at a uniform interval
    n of ``grid`` (:func:`consistency_grid`), noised to ``t_{n+1}`` (Ho et al. 2020, Eq. 4); the student's f there
    against the target network's f at the teacher's DDIM step to ``t_n`` (:func:`consistency_target`), without
    gradient through the target. Per example, ``[B]``; the intervals and the noise come from ``generator``."""
    kwargs = kwargs or {}
    draw_on = generator.device if generator is not None else x0.device
    n = torch.randint(0, len(grid) - 1, (x0.shape[0],), generator=generator, device=draw_on)  # [B] an interval each
    t, t_next = grid.to(draw_on)[n].to(x0.device), grid.to(draw_on)[n + 1].to(x0.device)  # [B] each
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=draw_on).to(x0.device)
    x_next = diffusion.q_sample(x0, t_next, noise)  # [B, C, H, W]
    aim = consistency_target(diffusion, teacher, lambda x, at: target.x0(x, at, **kwargs), x_next, t_next, t, kwargs)
    return consistency_loss(student.x0(x_next, t_next, **kwargs), aim)
