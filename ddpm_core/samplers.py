"""Samplers: ancestral DDPM sampling (Ho et al. 2020, Algorithm 2), DDIM (Song et al. 2021, Eq. 12), and the
second-order ODE solvers DPM-Solver++(2M) and Heun (:mod:`ddpm_core.solvers`).

All run on a (possibly respaced) :class:`GaussianDiffusion`, take the network as an argument and own no weights.
Randomness comes from a :class:`NoiseSource`; the default, :class:`PerIndexNoise`, gives every sample index its
own generator seeded by ``(seed, index)``, so image ``i`` is the same whatever the batch size or worker count.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

from ddpm_core.diffusion import GaussianDiffusion, Model
from ddpm_core.fields import FieldError, coerce_enum_fields
from ddpm_core.solvers import Denoiser, dpm_solver_pp_2m, heun


class Method(str, enum.Enum):
    ANCESTRAL = "ancestral"  # Ho et al. 2020, Algorithm 2: one network evaluation per step
    DDIM = "ddim"  # Song et al. 2021, Eq. 12 (eta = 0: the probability-flow ODE, first order): one per step
    DPM_SOLVER_PP_2M = "dpm_solver++_2m"  # Lu et al. 2022b, Algorithm 2 (second order, multistep): one per step
    HEUN = "heun"  # Karras et al. 2022, Algorithm 1 (second order): two per step, one at the last

    def network_evaluations(self, steps: int) -> int:
        """NFE of a sample visiting ``steps`` timesteps with one network (:func:`evaluations_per_image` counts a
        guided one's)."""
        return len(self.evaluated_timesteps(range(steps)))

    def evaluated_timesteps(self, visited: Sequence[int]) -> list[int]:
        """The timesteps the network is called at, one entry per call, given the increasing ``visited`` ones: each
        visited one, and for Heun also each step's correction at the next (lower) one."""
        if self is Method.HEUN:
            return list(visited) + list(visited[:-1])
        return list(visited)

    @property
    def default_spacing(self) -> Spacing:
        """The spacing a method gets when none is named: the one measured best for it (docs/benchmarks.md, "Fewer
        network evaluations"). The ODE solvers take ``trailing``: DPM-Solver++(2M) at 20 NFE beats DDIM-50 with it on
        four seeds and loses with ``log_snr``, and Heun's FID at 19 NFE is 0.556 with it against 0.704 with
        ``karras``. DDIM and the ancestral sampler keep ``linspace``, the reference every earlier number used."""
        return Spacing.TRAILING if self in (Method.DPM_SOLVER_PP_2M, Method.HEUN) else Spacing.LINSPACE


class Spacing(str, enum.Enum):
    """Which timesteps a sampler with fewer steps than T visits."""

    LINSPACE = "linspace"  # evenly from T-1 down to 0, both ends included (improved-diffusion)
    LEADING = "leading"  # 0, T//n, 2T//n, ... (the DDIM code's and diffusers' default; never visits T-1)
    TRAILING = "trailing"  # T-1, T-1-T//n, ... (Lin et al. 2024, Table 2)
    LOG_SNR = "log_snr"  # uniform in lambda = log(alpha / sigma) from T-1 to 0 (Lu et al. 2022a, Sec. 3.3)
    KARRAS = "karras"  # EDM's sigma_i^(1/rho) uniform, rho = 7, from T-1 to 0 (Karras et al. 2022, Eq. 5)

    @property
    def needs_schedule(self) -> bool:
        """Whether the spacing depends on the noise schedule (not only on T and the number of steps)."""
        return self in (Spacing.LOG_SNR, Spacing.KARRAS)


KARRAS_RHO = 7.0


@dataclass(frozen=True)
class SamplerConfig:
    """How to draw samples."""

    method: Method = Method.ANCESTRAL
    num_steps: int | None = None  # None: every one of the T steps
    eta: float = 0.0  # DDIM stochasticity: 0 deterministic, 1 the ancestral variance beta~ (Song et al. 2021, Eq. 16)
    spacing: Spacing | None = None  # None: the method's own (Method.default_spacing)
    clip_denoised: bool = True  # clamp the predicted x_0 to [-1, 1] at every step

    def __post_init__(self) -> None:
        coerce_enum_fields(self, "sampler", {"method": Method})
        if self.spacing is not None:
            coerce_enum_fields(self, "sampler", {"spacing": Spacing})
        if self.num_steps is not None and self.num_steps < 1:
            raise FieldError("sampler", "num_steps", f" must be >= 1, got {self.num_steps}")
        if not 0.0 <= self.eta <= 1.0:
            raise FieldError("sampler", "eta", f" must lie in [0, 1], got {self.eta}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method.value,
            "num_steps": self.num_steps,
            "eta": self.eta,
            "spacing": self.timestep_spacing.value,
            "clip_denoised": self.clip_denoised,
        }

    @property
    def timestep_spacing(self) -> Spacing:
        """The spacing the sampler uses: the one named, or the method's own."""
        return self.method.default_spacing if self.spacing is None else self.spacing


def spaced_timesteps(
    num_timesteps: int,
    num_steps: int,
    spacing: Spacing = Spacing.LINSPACE,
    alphas_cumprod: torch.Tensor | None = None,
) -> list[int]:
    """The increasing list of ``num_steps`` timestep indices that a shortened sampler visits. ``log_snr`` and
    ``karras`` place the steps by noise level and need the schedule's ``alphas_cumprod`` ``[T]``: each target level
    is taken by the timestep nearest to it (in log-SNR), so the network only sees timesteps it was trained on."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must lie in [1, {num_timesteps}], got {num_steps}")
    spacing = Spacing(spacing)
    if spacing is Spacing.LINSPACE:
        steps = np.linspace(0, num_timesteps - 1, num_steps).round().astype(int)
    elif spacing is Spacing.LEADING:
        steps = np.arange(num_steps) * (num_timesteps // num_steps)
    elif spacing is Spacing.TRAILING:
        steps = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)).astype(int)[::-1] - 1
    else:
        if alphas_cumprod is None:
            raise ValueError(f"{spacing.value} spacing needs the noise schedule (alphas_cumprod)")
        steps = nearest_timesteps(alphas_cumprod, noise_level_targets(alphas_cumprod, num_steps, spacing))
    visited = sorted({int(step) for step in steps})
    if len(visited) != num_steps or visited[-1] >= num_timesteps:
        raise ValueError(
            f"{spacing.value} spacing of {num_timesteps} steps into {num_steps} gives duplicate steps; use fewer "
            "steps or another spacing"
        )
    return visited


def noise_level_targets(alphas_cumprod: torch.Tensor, num_steps: int, spacing: Spacing) -> np.ndarray:
    """``num_steps`` target half-log-SNRs lambda = log(alpha / sigma) between those of timesteps T-1 and 0."""
    abar = alphas_cumprod.double().numpy()
    noisiest, cleanest = float(abar[-1]), float(abar[0])
    if spacing is Spacing.LOG_SNR:
        lambda_min, lambda_max = (0.5 * math.log(a / (1 - a)) for a in (noisiest, cleanest))
        return np.linspace(lambda_min, lambda_max, num_steps)
    # Karras: sigma = sqrt((1 - abar) / abar) (EDM's noise level), sigma^(1/rho) uniform from sigma_max to sigma_min
    sigma_max, sigma_min = (math.sqrt((1 - a) / a) for a in (noisiest, cleanest))
    ramp = np.linspace(sigma_max ** (1 / KARRAS_RHO), sigma_min ** (1 / KARRAS_RHO), num_steps)
    return -np.log(ramp**KARRAS_RHO)  # lambda = -log(sigma)


def nearest_timesteps(alphas_cumprod: torch.Tensor, targets: np.ndarray) -> np.ndarray:
    """For each target lambda (from the noisiest), the timestep whose lambda is nearest; where targets crowd onto one
    timestep (lambda changes fast near the ends of the schedule), they move to the neighbouring timesteps, so that the
    steps stay distinct and within 0..T-1."""
    abar = alphas_cumprod.double().numpy()
    lambdas = 0.5 * np.log(abar / (1 - abar))  # [T], decreasing in t
    nearest = np.abs(lambdas[None, :] - targets[::-1, None]).argmin(axis=1)  # [n], from the cleanest target
    order, last = np.arange(len(nearest)), len(lambdas) - len(nearest)
    upward = np.minimum(np.maximum.accumulate(nearest - order), last)  # t_j - j: non-decreasing, at most T - n
    return np.minimum.accumulate(upward[::-1])[::-1] + order  # strictly increasing, in [0, T - 1]


class NoiseSource(Protocol):
    """Draws standard normal noise ``[B, *shape]`` for a batch, once for x_T and once per stochastic step."""

    def __call__(self, shape: Sequence[int]) -> torch.Tensor: ...


class PerIndexNoise:
    """One CPU generator per sample index, seeded by ``numpy.random.SeedSequence([seed, index])``: the noise of
    sample ``i`` depends on ``(seed, i)`` alone, not on batch composition, device or worker count."""

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generators = []
        for index in indices:
            state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0]
            self.generators.append(torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF))

    def __call__(self, shape: Sequence[int]) -> torch.Tensor:
        noise = torch.stack([torch.randn(tuple(shape), generator=generator) for generator in self.generators])
        return noise.to(self.device)


class GeneratorNoise:
    """All noise from one generator: fast for large Monte Carlo batches, but image i depends on the batch."""

    def __init__(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.batch_size, self.generator, self.device, self.dtype = batch_size, generator, torch.device(device), dtype

    def __call__(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.randn((self.batch_size, *shape), generator=self.generator, dtype=self.dtype).to(self.device)


class StepOutput(NamedTuple):
    x_prev: torch.Tensor  # [B, C, H, W] the sample at the previous (less noisy) step
    pred_x0: torch.Tensor  # [B, C, H, W] the network's estimate of x_0 at this step


def ancestral_step(
    diffusion: GaussianDiffusion,
    output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor | None,
    clip_denoised: bool,
) -> StepOutput:
    """One step of Algorithm 2 (Ho et al. 2020): ``x_{t-1} = mu_theta(x_t, t) + sigma_t z``, no noise at t = 0."""
    moments = diffusion.p_mean_variance(output, x_t, t, clip_denoised)
    if noise is None:
        return StepOutput(moments.mean, moments.pred_x0)
    nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    return StepOutput(moments.mean + nonzero * torch.exp(0.5 * moments.log_variance) * noise, moments.pred_x0)


def ddim_sigma(diffusion: GaussianDiffusion, t: torch.Tensor, eta: float, like: torch.Tensor) -> torch.Tensor:
    """``sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)``
    (Song et al. 2021, Eq. 16)."""
    abar = diffusion._gather(diffusion.alphas_cumprod, t, like)
    abar_prev = diffusion._gather(diffusion.alphas_cumprod_prev, t, like)
    return eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)


def ddim_step(
    diffusion: GaussianDiffusion,
    output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor | None,
    eta: float,
    clip_denoised: bool,
) -> StepOutput:
    """One DDIM step (Song et al. 2021, Eq. 12):
    ``x_{t-1} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z``."""
    moments = diffusion.p_mean_variance(output, x_t, t, clip_denoised)
    abar_prev = diffusion._gather(diffusion.alphas_cumprod_prev, t, x_t)
    sigma = ddim_sigma(diffusion, t, eta, x_t)
    x_prev = abar_prev.sqrt() * moments.pred_x0 + torch.sqrt(1 - abar_prev - sigma**2) * moments.pred_eps
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return StepOutput(x_prev, moments.pred_x0)


@dataclass
class SampleResult:
    samples: torch.Tensor  # [B, C, H, W] in the model's range ([-1, 1] for images)
    timesteps: list[int]  # original-schedule timesteps visited, from noisiest to cleanest
    pred_x0: torch.Tensor | None  # [S, B, C, H, W] x_0 predictions at the recorded steps (progressive decoding)
    recorded_steps: list[int]  # the original timesteps at which pred_x0 was recorded
    network_evaluations: int = 0  # NFE: calls of the model for this batch


ProgressCallback = Callable[[int, int], None]  # (steps done, total steps)
ODE_SOLVERS = {Method.DPM_SOLVER_PP_2M: dpm_solver_pp_2m, Method.HEUN: heun}


def visited_timesteps(diffusion: GaussianDiffusion, config: SamplerConfig) -> list[int]:
    """The increasing original-schedule timesteps a sampler of ``config`` visits on ``diffusion``: all T, or the
    ``num_steps`` of its spacing (:func:`spaced_timesteps`)."""
    steps = config.num_steps or diffusion.num_timesteps
    if steps == diffusion.num_timesteps:
        return list(range(diffusion.num_timesteps))
    return spaced_timesteps(diffusion.num_timesteps, steps, config.timestep_spacing, diffusion.alphas_cumprod)


@torch.no_grad()
def sample(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    noise: NoiseSource,
    config: SamplerConfig = SamplerConfig(),
    model_kwargs: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    record_x0_every: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> SampleResult:
    """Draw a batch from p_theta: x_T ~ N(0, I) from ``noise``, then the configured method's steps down to t = 0.

    ``shape`` is one sample's ``(C, H, W)``; the batch size is the noise source's. ``record_x0_every=k`` keeps the
    predicted x_0 every k steps and at the last step (Ho et al. 2020, Sec. 4.3, progressive decoding).
    """
    config = SamplerConfig(**config.to_dict())
    steps = config.num_steps or diffusion.num_timesteps
    visited = visited_timesteps(diffusion, config)
    x = noise(shape).to(dtype)
    if config.method in ODE_SOLVERS:
        return solve_ode(model, diffusion, x, visited, config, model_kwargs, progress, record_x0_every)
    spaced = diffusion if steps == diffusion.num_timesteps else diffusion.respaced(visited)
    device = x.device
    recorded, recorded_steps = [], []
    for done, index in enumerate(reversed(range(spaced.num_timesteps))):
        t = torch.full((x.shape[0],), index, dtype=torch.long, device=device)
        output = model(x, spaced.model_timesteps(t), **(model_kwargs or {})).to(dtype)
        if config.method is Method.ANCESTRAL:
            step_noise = noise(shape).to(dtype) if index > 0 else None
            x, pred_x0 = ancestral_step(spaced, output, x, t, step_noise, config.clip_denoised)
        else:
            step_noise = noise(shape).to(dtype) if index > 0 and config.eta > 0 else None
            x, pred_x0 = ddim_step(spaced, output, x, t, step_noise, config.eta, config.clip_denoised)
        if record_x0_every and (done % record_x0_every == 0 or index == 0):
            recorded.append(pred_x0.cpu())
            recorded_steps.append(int(spaced.timestep_map[index]))
        if progress is not None:
            progress(done + 1, spaced.num_timesteps)
    return SampleResult(
        samples=x,
        timesteps=[int(step) for step in reversed(spaced.timestep_map.tolist())],
        pred_x0=torch.stack(recorded) if recorded else None,
        recorded_steps=recorded_steps,
        network_evaluations=spaced.num_timesteps,
    )


def solve_ode(
    model: Model,
    diffusion: GaussianDiffusion,
    x: torch.Tensor,
    visited: list[int],
    config: SamplerConfig,
    model_kwargs: dict[str, Any] | None,
    progress: ProgressCallback | None,
    record_x0_every: int | None,
) -> SampleResult:
    """Run a second-order ODE solver (:mod:`ddpm_core.solvers`) from ``x`` ``[B, C, H, W]`` over the ``visited``
    timesteps, recording x_0 predictions and reporting progress as the other samplers do."""
    denoise = Denoiser(model, diffusion, dict(model_kwargs or {}), config.clip_denoised, x.dtype)
    timesteps = list(reversed(visited))
    recorded: list[torch.Tensor] = []
    recorded_steps: list[int] = []

    def on_step(timestep: int, done: int, x0: torch.Tensor) -> None:
        if record_x0_every and ((done - 1) % record_x0_every == 0 or done == len(timesteps)):
            recorded.append(x0.cpu())
            recorded_steps.append(timestep)
        if progress is not None:
            progress(done, len(timesteps))

    samples = ODE_SOLVERS[config.method](denoise, x, timesteps, on_step)
    return SampleResult(
        samples, timesteps, torch.stack(recorded) if recorded else None, recorded_steps, denoise.evaluations
    )


def fast_sampling_network(
    model: torch.nn.Module, autocast_dtype: torch.dtype | None = None, compile: bool = False, cuda_graphs: bool = False
) -> Model:
    """The network as the samplers call it on the fast path; the sampler's own arithmetic stays in float32.

    ``autocast_dtype`` (bf16 on GPUs) runs the U-Net under autocast and hands its output back as float32.
    ``compile`` wraps it in ``torch.compile`` with inductor's freezing: during sampling the weights are constants, so
    they are folded and pre-packed for the convolution kernels (needs ``model.eval()``, as sampling does; one
    compilation per batch shape, ``dynamic=False``). Both change rounding only: samples stay close to, not equal to,
    the eager float32 ones.

    ``cuda_graphs`` (with ``compile``) has inductor capture the compiled network in CUDA graphs, replayed at every
    step of the fixed-shape sampling loop: one launch per step instead of one per kernel. Inductor skips it for CPU
    tensors. A replay overwrites the previous output, so the output handed back is always a copy."""
    if autocast_dtype is None and not compile:
        return model
    options: dict[str, str | int | bool | Callable[..., Any]] = {"freezing": True, "triton.cudagraphs": cuda_graphs}
    network = torch.compile(model, dynamic=False, options=options) if compile else model

    def run(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # [B, C, H, W], [B] -> [B, C_out, H, W]
        if autocast_dtype is None:
            out = network(x, t, **kwargs)  # [B, C_out, H, W]
        else:
            with torch.autocast(x.device.type, dtype=autocast_dtype):
                out = network(x, t, **kwargs)
        if cuda_graphs and out.dtype == torch.float32:
            return out.clone()  # the next replay writes into this buffer
        return out.float()

    return run


def classifier_free_guidance(model: Model, guidance_scale: float, null_class: int, channels: int) -> Model:
    """Wrap a class-conditional model for classifier-free guidance (Ho & Salimans 2022, Eq. 6):
    ``pred = (1 + w) pred(x, y) - w pred(x, null)`` on the first ``channels`` output channels (the mean
    parameterisation); learned-variance channels are taken from the conditional prediction.

    The convention is the paper's: ``w = guidance_scale = 0`` is the conditional model without guidance (one forward
    pass of the batch); diffusers' ``guidance_scale`` is this ``w + 1``. For ``w > 0`` the conditional and null halves
    run as one batch of ``2B``: one network call per step, not two."""
    if guidance_scale == 0:
        return lambda x, t, class_labels: model(x, t, class_labels=class_labels)

    def guided(x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        both = model(  # [2B, C_out, H, W]: conditional half, then null half
            torch.cat([x, x]),
            torch.cat([t, t]),
            class_labels=torch.cat([class_labels, torch.full_like(class_labels, null_class)]),
        )
        conditional, unconditional = both.chunk(2)  # [B, C_out, H, W] each
        mean = conditional[:, :channels] + guidance_scale * (conditional[:, :channels] - unconditional[:, :channels])
        return torch.cat([mean, conditional[:, channels:]], dim=1)

    return guided


def limited_classifier_free_guidance(
    model: Model,
    guidance_scale: float,
    null_class: int,
    channels: int,
    alphas_cumprod: torch.Tensor,
    interval: tuple[float, float] | None,
) -> Model:
    """:func:`classifier_free_guidance` at ``w = guidance_scale`` where the step's noise level lies in ``interval``
    (:func:`guidance_interval`; None: every step), the conditional model unguided (w = 0, one pass of ``B`` images)
    elsewhere. ``alphas_cumprod``: the schedule's ``[T]``."""
    guided = classifier_free_guidance(model, guidance_scale, null_class, channels)
    plain = classifier_free_guidance(model, 0.0, null_class, channels)
    return guidance_interval(guided, plain, alphas_cumprod, interval)


def autoguidance(model: Model, guide: Model, weight: float, channels: int) -> Model:
    """Guide a model by a weaker version of itself (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version
    of Itself", Eq. 1): ``pred = guide + weight * (model - guide)`` on the first ``channels`` output channels, the
    learned-variance channels taken from ``model``. The weights sum to one, so the combination of eps, x_0 or v
    predictions is the paper's combination of denoisers. ``weight`` 1 is ``model`` alone (one call per step); the
    paper's guide is a smaller or shorter-trained model of the same data, e.g. an earlier EMA of the same run."""
    if weight == 1:
        return model

    def guided(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # [B, C, H, W], [B] -> [B, C_out, ...]
        good, bad = model(x, t, **kwargs), guide(x, t, **kwargs)  # [B, C_out, H, W] each
        mean = bad[:, :channels] + weight * (good[:, :channels] - bad[:, :channels])
        return torch.cat([mean, good[:, channels:]], dim=1)

    return guided


def noise_levels(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """EDM's noise level of each DDPM timestep, ``sigma_t = sqrt((1 - abar_t) / abar_t)`` ``[T]``: x_t / sqrt(abar_t)
    is x_0 plus Gaussian noise of standard deviation sigma_t (Karras et al. 2022, Eq. 1 with s(t) = sqrt(abar_t)),
    so it names a point of the chain independently of the schedule and the number of steps."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def in_interval(alphas_cumprod: torch.Tensor, interval: tuple[float, float]) -> torch.Tensor:
    """Whether each timestep's noise level (:func:`noise_levels`) lies in ``(low, high]`` ``[T]`` bool."""
    sigma = noise_levels(alphas_cumprod)  # [T]
    return (sigma > interval[0]) & (sigma <= interval[1])


def guidance_interval(
    guided: Model, plain: Model, alphas_cumprod: torch.Tensor, interval: tuple[float, float] | None
) -> Model:
    """Guidance in a limited interval of noise levels (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited
    Interval Improves Sample and Distribution Quality in Diffusion Models", Sec. 3): ``guided`` at the timesteps whose
    noise level sigma_t (:func:`noise_levels` of ``alphas_cumprod`` ``[T]``) lies in ``(low, high]``, ``plain`` (the
    model unguided) elsewhere; ``interval`` None: ``guided`` at every step. Guidance at high noise decides which mode
    a sample goes to and drops modes; at low noise it does little. The timesteps are the original schedule's, as
    samplers pass them. The same for either guidance: autoguidance (:func:`autoguidance`) or classifier-free
    (:func:`classifier_free_guidance`, the paper's own case)."""
    if interval is None:
        return guided
    inside_at = in_interval(alphas_cumprod, interval)  # [T] bool

    def limited(
        x: torch.Tensor, t: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:  # [B, C, H, W], [B] -> [B, C_out, ...]
        inside = inside_at.to(t.device)[t]  # [B]
        if bool(inside.all()):
            return guided(x, t, **kwargs)
        if not bool(inside.any()):
            return plain(x, t, **kwargs)
        return torch.where(inside[:, None, None, None], guided(x, t, **kwargs), plain(x, t, **kwargs))

    return limited


def evaluations_per_image(
    diffusion: GaussianDiffusion,
    config: SamplerConfig,
    guided: bool = False,
    interval: tuple[float, float] | None = None,
) -> int:
    """The network calls (NFE) a sampler of ``config`` makes per image on ``diffusion``: one per evaluated timestep
    (:meth:`Method.evaluated_timesteps`), and with ``guided`` (autoguidance: a model and its guide, two networks) two
    at the timesteps whose noise level lies in ``interval`` (:func:`in_interval`; None: at every one)."""
    evaluated = config.method.evaluated_timesteps(visited_timesteps(diffusion, config))
    if not guided:
        return len(evaluated)
    if interval is None:
        return 2 * len(evaluated)
    return len(evaluated) + int(in_interval(diffusion.alphas_cumprod, interval)[evaluated].sum())


def null_conditioned(model: Model, null_class: int) -> Model:
    """A class-conditional model called with the null class for every image: the unconditional model that label
    dropout trains alongside the conditional one (Ho & Salimans 2022, Sec. 3.2). What a score that takes no labels
    (the NLL bound, a proxy FID) measures of a conditional model."""

    def unconditional(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W], [B] -> [B, C_out, H, W]
        return model(x, t, class_labels=torch.full((x.shape[0],), null_class, dtype=torch.long, device=x.device))

    return unconditional


def balanced_classes(indices: Sequence[int], classes: Sequence[int]) -> torch.Tensor:
    """The class of each sample index: ``classes[i mod len(classes)]`` ``[n]`` int64. It depends on the index alone, so
    a sample set's labels do not depend on how its indices are split over workers, and any ``len(classes)``
    consecutive indices draw every class once (balanced)."""
    table = torch.as_tensor(list(classes), dtype=torch.long)  # [K]
    return table[torch.as_tensor(list(indices), dtype=torch.long) % len(table)]
