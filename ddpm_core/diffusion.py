"""Gaussian diffusion: forward process, reverse-process parameterisations, losses and the likelihood bound.

Follows Ho, Jain & Abbeel 2020 ("DDPM") and Nichol & Dhariwal 2021 ("Improved DDPM"). Timesteps are 0-based
indices ``t in [0, T-1]``; index ``t`` is the paper's step ``t + 1``. The object holds no network: the model is
passed in, ``model(x_t, t, **model_kwargs) -> output`` with ``t`` the *original* timestep index (it differs from the
index into this object only for a respaced diffusion, see :meth:`GaussianDiffusion.respaced`).
All schedule coefficients are stored in float64 and cast to the dtype of the tensor they multiply.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ddpm_core.fields import FieldError, coerce_enum_fields
from ddpm_core.schedules import Schedule, make_betas
from ddpm_core.stable_targets import Reference, stable_targets

if TYPE_CHECKING:
    from ddpm_core.loss_weighting import LossWeighting

Model = Callable[..., torch.Tensor]


class Prediction(str, enum.Enum):
    """What the network outputs."""

    EPS = "eps"  # the noise epsilon (Ho et al. 2020, Eq. 11)
    X0 = "x0"  # the clean sample x_0
    V = "v"  # v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022)


class Variance(str, enum.Enum):
    """Reverse-process variance Sigma_t."""

    FIXED_SMALL = "fixed_small"  # beta~_t, the posterior variance (Ho et al. 2020, Sec. 3.2)
    FIXED_LARGE = "fixed_large"  # beta_t (the paper's CIFAR-10 run)
    LEARNED_RANGE = "learned_range"  # log-interpolation between the two (Nichol & Dhariwal 2021, Eq. 15)


class Loss(str, enum.Enum):
    """Training objective."""

    SIMPLE = "simple"  # L_simple (Ho et al. 2020, Eq. 14 / Algorithm 1)
    VLB = "vlb"  # the variational bound L_vlb (Ho et al. 2020, Eq. 5), estimated with one uniform t per example
    HYBRID = "hybrid"  # L_simple + lambda * L_vlb, mean stop-gradient in L_vlb (Nichol & Dhariwal 2021, Eq. 16)


@dataclass(frozen=True)
class DiffusionConfig:
    """Everything that defines a diffusion process and its parameterisation (serialised with every snapshot)."""

    schedule: Schedule = Schedule.LINEAR
    num_timesteps: int = 1000
    schedule_params: dict[str, float] = field(default_factory=dict)
    prediction: Prediction = Prediction.EPS
    variance: Variance = Variance.FIXED_LARGE
    loss: Loss = Loss.SIMPLE
    vlb_weight: float = 0.001  # lambda of the hybrid loss

    def __post_init__(self) -> None:
        coerce_enum_fields(
            self, "diffusion", {"schedule": Schedule, "prediction": Prediction, "variance": Variance, "loss": Loss}
        )
        if self.num_timesteps < 2:
            raise FieldError("diffusion", "num_timesteps", f" must be >= 2, got {self.num_timesteps}")
        if self.vlb_weight < 0:
            raise FieldError("diffusion", "vlb_weight", f" must be >= 0, got {self.vlb_weight}")
        if self.variance is Variance.LEARNED_RANGE and self.loss is Loss.SIMPLE:
            raise FieldError(
                "diffusion",
                "variance",
                "=learned_range needs loss=vlb or hybrid: L_simple gives the variance no gradient",
            )
        try:  # unknown or out-of-range schedule parameters fail with the config, not at the first training step
            make_betas(self.schedule, self.num_timesteps, **self.schedule_params)
        except ValueError as error:  # make_betas turns a builder's TypeError (an unknown parameter) into one
            raise FieldError("diffusion", "schedule_params", f": {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule.value,
            "num_timesteps": self.num_timesteps,
            "schedule_params": dict(self.schedule_params),
            "prediction": self.prediction.value,
            "variance": self.variance.value,
            "loss": self.loss.value,
            "vlb_weight": self.vlb_weight,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiffusionConfig:
        return cls(**data)


class MeanVariance(NamedTuple):
    """A Gaussian over x_{t-1} plus the predictions it was derived from; tensors are ``[B, C, H, W]``."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor
    pred_eps: torch.Tensor


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log-density (nats) of continuous data ``x`` under ``N(mean, exp(log_scale)^2)``: the decoder term
    ``-log p(x_0 | x_1)`` of a model of continuous data, such as an autoencoder's latents (Rombach et al. 2022), where
    Eq. 13's 8-bit bins do not apply. A density, so the bound it enters is in bits/dim of a continuous variable (a
    differential entropy's units: it may be negative, and it is not comparable with the 8-bit data's)."""
    return -0.5 * (math.log(2.0 * math.pi) + 2.0 * log_scale + (x - mean) ** 2 * torch.exp(-2.0 * log_scale))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability (nats) of 8-bit data ``x`` scaled to [-1, 1] under the discretised Gaussian
    decoder of Ho et al. 2020, Eq. 13: the Gaussian's mass on the pixel's bin ``[x - 1/255, x + 1/255]``, with the
    edge bins extended to -inf / +inf. Uses the exact normal CDF in float64 (the official code uses a tanh
    approximation), so the result is accurate far into the tails."""
    x64, mean64, log_scale64 = x.double(), mean.double(), log_scale.double()
    inv_std = torch.exp(-log_scale64)
    upper = inv_std * (x64 - mean64 + 1.0 / 255.0)
    lower = inv_std * (x64 - mean64 - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_survival_lower = torch.special.log_ndtr(-lower)
    # log(Phi(upper) - Phi(lower)) = log Phi(upper) + log1p(-exp(log Phi(lower) - log Phi(upper))), stable in both tails
    # through the symmetric form on the side where the bin lies in the upper tail.
    log_bin_lower_side = log_cdf_upper + torch.log1p(
        -torch.exp(torch.special.log_ndtr(lower) - log_cdf_upper).clamp(max=1 - 1e-16)
    )
    log_bin_upper_side = log_survival_lower + torch.log1p(
        -torch.exp(torch.special.log_ndtr(-upper) - log_survival_lower).clamp(max=1 - 1e-16)
    )
    log_bin = torch.where(lower > 0, log_bin_upper_side, log_bin_lower_side)
    log_prob = torch.where(x64 < -0.999, log_cdf_upper, torch.where(x64 > 0.999, log_survival_lower, log_bin))
    return log_prob.to(x.dtype)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: ``[B, ...] -> [B]``."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def _tiled(value: Any, count: int) -> Any:
    """A batch ``[B, ...]`` repeated ``count`` times along the batch, ``[count * B, ...]``; anything else as it is."""
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return value
    return value.repeat(count, *([1] * (value.ndim - 1)))


# The most images one network call of the full bound evaluates (several timesteps of a small batch per call).
BOUND_MAX_BATCH = 256


class GaussianDiffusion:
    """The forward process q and the reverse process p_theta for a fixed beta schedule (no trainable state)."""

    def __init__(
        self,
        betas: torch.Tensor,
        prediction: Prediction = Prediction.EPS,
        variance: Variance = Variance.FIXED_LARGE,
        loss: Loss = Loss.SIMPLE,
        vlb_weight: float = 0.001,
        timestep_map: Sequence[int] | None = None,
    ) -> None:
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.prediction, self.variance, self.loss = Prediction(prediction), Variance(variance), Loss(loss)
        self.vlb_weight = vlb_weight
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = torch.as_tensor(
            list(timestep_map) if timestep_map is not None else range(self.num_timesteps)
        )

        self.betas = betas  # [T]
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # abar_t
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0), Ho et al. 2020, Eq. 6-7.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)  # beta~_t
        # beta~ is 0 at t=0: clip its log to beta~_1 as the official code does. A one-step schedule (a sampler
        # respaced to a single step) has no beta~_1: its one step takes beta_0, the fixed_large choice there.
        self.first_variance = self.posterior_variance[1:2] if len(betas) > 1 else betas[:1]  # [1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([self.first_variance, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self._snr_tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # SNR [T] by device and dtype

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> GaussianDiffusion:
        betas = make_betas(config.schedule, config.num_timesteps, **config.schedule_params)
        return cls(betas, config.prediction, config.variance, config.loss, config.vlb_weight)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _gather(coefficients: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``coefficients[t]`` as ``[B, 1, ..., 1]`` in ``like``'s dtype and device."""
        values = coefficients.to(like.device)[t.to(like.device)].to(like.dtype)
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def snr(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """SNR(t) = abar_t / (1 - abar_t) (Kingma et al. 2021) at the indices ``t`` ``[B]``: ``[B]`` in ``like``'s
        dtype and device. The table is copied to a device once, so that indexing it there adds no host
        synchronisation."""
        key = (like.device, like.dtype)
        if key not in self._snr_tables:
            snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)  # [T] float64
            self._snr_tables[key] = snr.to(like.dtype).to(like.device)
        return self._snr_tables[key][t.to(like.device)]

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original-schedule timestep the network sees for index ``t`` (identity unless respaced)."""
        return self.timestep_map.to(t.device)[t]

    def respaced(self, timesteps: Sequence[int]) -> GaussianDiffusion:
        """The diffusion restricted to an increasing subsequence of timesteps (Nichol & Dhariwal 2021, Sec. 4;
        Song et al. 2021, Sec. 4.2): betas are recomputed so that abar at each kept step is unchanged."""
        kept = sorted({int(step) for step in timesteps})
        if not kept or kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ValueError(
                f"respaced timesteps must lie in [0, {self.num_timesteps - 1}], got {list(timesteps)[:5]}..."
            )
        kept_abar = self.alphas_cumprod[kept]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), kept_abar[:-1]])
        betas = 1.0 - kept_abar / previous
        original = self.timestep_map[kept].tolist()
        return GaussianDiffusion(betas, self.prediction, self.variance, self.loss, self.vlb_weight, original)

    # ------------------------------------------------------------------ forward process q
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)
        (Ho et al. 2020, Eq. 4)."""
        mean = self._gather(self.sqrt_alphas_cumprod, t, x0) * x0
        variance = self._gather(1.0 - self.alphas_cumprod, t, x0).expand_as(x0)
        log_variance = self._gather(torch.log(1.0 - self.alphas_cumprod), t, x0).expand_as(x0)
        return mean, variance, log_variance

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0): ``sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (Ho et al. 2020, Eq. 4).
        ``[B, C, H, W]``."""
        return (
            self._gather(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, Eq. 6-7)."""
        mean = (
            self._gather(self.posterior_mean_coef1, t, x_t) * x0 + self._gather(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self._gather(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = self._gather(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ parameterisations
    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert Eq. 4: ``x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
        return (
            self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Invert Eq. 4 for the noise: ``eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)``."""
        return (self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / self._gather(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`` (Salimans & Ho 2022, Sec. 4)."""
        return (
            self._gather(self.sqrt_alphas_cumprod, t, x0) * eps
            - self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v``."""
        return (
            self._gather(self.sqrt_alphas_cumprod, t, x_t) * x_t
            - self._gather(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v
        )

    def training_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The regression target of the configured parameterisation."""
        if self.prediction is Prediction.EPS:
            return noise
        if self.prediction is Prediction.X0:
            return x0
        return self.v_target(x0, t, noise)

    def split_output(self, output: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split the network output into (prediction ``[B,C,H,W]``, variance interpolation ``[B,C,H,W]`` or None)."""
        channels = x_t.shape[1]
        if self.variance is Variance.LEARNED_RANGE:
            if output.shape[1] != 2 * channels:
                raise ValueError(
                    f"learned_range variance needs {2 * channels} output channels, the model gave {output.shape[1]}"
                )
            return output[:, :channels], output[:, channels:]
        if output.shape[1] != channels:
            raise ValueError(f"the model gave {output.shape[1]} output channels, expected {channels}")
        return output, None

    def p_mean_variance(
        self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> MeanVariance:
        """p_theta(x_{t-1} | x_t) from a network output (Ho et al. 2020, Eq. 1 and Sec. 3.2): the mean is the
        posterior mean (Eq. 7) at the predicted x_0, which for eps-prediction equals Eq. 11. With ``clip_denoised``
        the predicted x_0 is clamped to [-1, 1] and the implied eps recomputed from it."""
        prediction, variance_values = self.split_output(output, x_t)
        if self.variance is Variance.FIXED_SMALL:
            log_variance = self._gather(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        elif self.variance is Variance.FIXED_LARGE:
            # beta_t, with beta~_1 at t=0 so that the decoder's variance is the posterior's (as in the official code).
            large = torch.log(torch.cat([self.first_variance, self.betas[1:]]))
            log_variance = self._gather(large, t, x_t).expand_as(x_t)
        else:
            assert variance_values is not None
            fraction = (variance_values + 1.0) / 2.0  # Nichol & Dhariwal 2021, Eq. 15
            min_log = self._gather(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._gather(torch.log(self.betas), t, x_t)
            log_variance = fraction * max_log + (1.0 - fraction) * min_log

        if self.prediction is Prediction.EPS:
            pred_x0 = self.x0_from_eps(x_t, t, prediction)
        elif self.prediction is Prediction.X0:
            pred_x0 = prediction
        else:
            pred_x0 = self.x0_from_v(x_t, t, prediction)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        if self.prediction is Prediction.EPS and not clip_denoised:
            pred_eps = prediction
        else:
            pred_eps = self.eps_from_x0(x_t, t, pred_x0)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return MeanVariance(mean, torch.exp(log_variance), log_variance, pred_x0, pred_eps)

    # ------------------------------------------------------------------ losses and the bound
    def vlb_terms_bits(
        self, output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, continuous: bool = False
    ) -> torch.Tensor:
        """L_{t-1} of Ho et al. 2020, Eq. 5, per example in bits/dim ``[B]``: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
        for t > 0, and the decoder NLL -log p(x_0|x_1) at t = 0: discretised to 8-bit bins (Eq. 13), or for
        ``continuous`` data (latents) the Gaussian's density (:func:`gaussian_log_likelihood`)."""
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        model = self.p_mean_variance(output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, model.mean, model.log_variance)) / math.log(2.0)
        likelihood = gaussian_log_likelihood if continuous else discretized_gaussian_log_likelihood
        decoder_nll = -mean_flat(likelihood(x0, model.mean, 0.5 * model.log_variance)) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def prior_bits(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) per example in bits/dim ``[B]`` (Ho et al. 2020, Eq. 5)."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x0.device)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(mean))) / math.log(2.0)

    def training_losses(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
        weighting: LossWeighting | None = None,
        reference: Reference | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-example training losses ``{"loss", "mse", "vb"}``, each ``[B]``.

        ``mse`` is L_simple (Eq. 14) for the configured target; ``vb`` is L_t in bits/dim; the VLB loss is the
        unbiased one-sample estimate ``T * L_t`` of sum_t L_t; the hybrid loss is ``mse + lambda * T * L_t`` with the
        mean detached inside the bound (Nichol & Dhariwal 2021, Sec. 3.1), so only the variance learns from it.
        ``weighting`` multiplies the ``mse`` inside ``loss`` (SIMPLE and HYBRID; VLB is unchanged) by
        :func:`ddpm_core.loss_weighting.loss_weights` at SNR(t); ``terms["mse"]`` stays unweighted. With a
        ``reference`` batch, ``mse`` regresses on the stable targets of ``x_t`` (Xu et al. 2023,
        :func:`ddpm_core.stable_targets.stable_targets`) instead of ``x0``'s own; the bound keeps ``x0``'s posterior.
        """
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        # Losses in at least float32, also when the network ran under bf16 autocast.
        output = output.to(torch.promote_types(x0.dtype, torch.float32))
        prediction, variance_values = self.split_output(output, x_t)
        regressed_x0, regressed_noise = self._regressed_on(x0, t, noise, x_t, reference, model_kwargs)
        target = self.training_target(regressed_x0, t, regressed_noise)
        mse = mean_flat((target - prediction) ** 2)  # [B]
        terms = {"mse": mse}
        weighted_mse = mse if weighting is None else mse * self._loss_weights(weighting, t, mse)  # [B]
        if self.loss is Loss.SIMPLE:
            terms["loss"] = weighted_mse
            return terms
        frozen = prediction.detach() if self.loss is Loss.HYBRID else prediction
        vb_output = frozen if variance_values is None else torch.cat([frozen, variance_values], dim=1)
        terms["vb"] = self.vlb_terms_bits(vb_output, x0, x_t, t)
        scaled_vb = self.num_timesteps * terms["vb"]
        terms["loss"] = scaled_vb if self.loss is Loss.VLB else weighted_mse + self.vlb_weight * scaled_vb
        return terms

    @torch.no_grad()
    def _regressed_on(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        x_t: torch.Tensor,
        reference: Reference | None,
        model_kwargs: dict[str, Any] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0, noise)`` of :meth:`training_target`: the drawn ones, or with a ``reference`` batch the stable
        ``x0_hat`` and ``eps_hat`` of ``x_t`` (each ``[B, C, H, W]``), a labelled model's within each trained class."""
        if reference is None:
            return x0, noise
        alpha_bar = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype)  # [B]
        allowed = reference.allowed((model_kwargs or {}).get("class_labels"))  # [B, R] or None
        with torch.autocast(x0.device.type, enabled=False):  # the weights' exponents in x0's precision, not bf16's
            x0_hat, eps_hat = stable_targets(x0, noise, x_t, alpha_bar, reference.images, allowed)
        return x0_hat, eps_hat

    def _loss_weights(self, weighting: LossWeighting, t: torch.Tensor, mse: torch.Tensor) -> torch.Tensor:
        """The weights ``[B]`` of the per-example ``mse`` ``[B]`` at the timesteps ``t`` ``[B]``."""
        from ddpm_core.loss_weighting import loss_weights  # imported here: that module imports Prediction from this

        return loss_weights(weighting, self.snr(t, mse), self.prediction)

    @torch.no_grad()
    def bits_per_dim(
        self,
        model: Model,
        x0: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        continuous: bool = False,
        max_batch: int = BOUND_MAX_BATCH,
    ) -> dict[str, torch.Tensor]:
        """The full variational bound in bits/dim (Ho et al. 2020, Eq. 5), every one of the T terms plus the prior:
        ``{"total": [B], "terms": [B, T], "prior": [B]}``. Each term draws its own x_t ~ q(x_t | x_0). ``continuous``:
        the data are continuous (latents), and the decoder term is a density (:meth:`vlb_terms_bits`).

        Several timesteps share one network call of at most ``max_batch`` images (at least one timestep per call):
        a small batch costs T calls of fixed overhead otherwise. The noise is drawn in the same order as with one
        timestep per call, so the bound does not depend on ``max_batch`` beyond float rounding."""
        batch = x0.shape[0]
        per_call = max(1, max_batch // batch)
        terms = torch.zeros(batch, self.num_timesteps, dtype=x0.dtype, device=x0.device)  # [B, T]
        for first in range(0, self.num_timesteps, per_call):
            steps = torch.arange(first, min(first + per_call, self.num_timesteps), device=x0.device)  # [S]
            terms[:, steps] = self._vlb_terms_at_steps(model, x0, steps, model_kwargs, generator, continuous)
        prior = self.prior_bits(x0)
        return {"total": terms.sum(dim=1) + prior, "terms": terms, "prior": prior}

    def _vlb_terms_at_steps(
        self,
        model: Model,
        x0: torch.Tensor,
        steps: torch.Tensor,
        model_kwargs: dict[str, Any] | None,
        generator: torch.Generator | None,
        continuous: bool,
    ) -> torch.Tensor:
        """``L_t`` ``[B, S]`` at each of the timesteps ``steps`` ``[S]`` in one network call of S x B images, each
        timestep with its own draw x_t ~ q(x_t | x_0), drawn timestep by timestep."""
        batch, count = x0.shape[0], len(steps)
        noise = torch.cat(  # [S * B, ...], timestep-major
            [torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device="cpu") for _ in range(count)]
        ).to(x0.device)
        t = steps.repeat_interleave(batch)  # [S * B]
        tiled = {key: _tiled(value, count) for key, value in (model_kwargs or {}).items()}
        terms = self._vlb_term_of(model, _tiled(x0, count), t, noise, tiled, continuous)  # [S * B]
        return terms.view(count, batch).T

    @torch.no_grad()
    def bits_per_dim_estimate(
        self,
        model: Model,
        x0: torch.Tensor,
        num_samples: int,
        model_kwargs: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        continuous: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Unbiased Monte Carlo estimate of :meth:`bits_per_dim` from ``num_samples`` uniform timesteps per example:
        ``L_T + T * mean_k L_{t_k}``. Returns ``{"total": [B], "stderr": [B]}``; ``stderr`` is the standard error of
        the per-example estimate (sample std of ``T * L_{t_k}`` over sqrt(K)), so a batch mean has standard error
        ``sqrt(sum stderr^2) / B``. ``continuous``: as in :meth:`bits_per_dim`."""
        samples = self._at_uniform_timesteps(  # [B, K]
            lambda t: self.num_timesteps * self._vlb_term_at(model, x0, t, model_kwargs, generator, continuous),
            x0,
            num_samples,
            generator,
        )
        total = self.prior_bits(x0) + samples.mean(dim=1)
        stderr = samples.std(dim=1, unbiased=True) / math.sqrt(num_samples)
        return {"total": total, "stderr": stderr}

    @torch.no_grad()
    def loss_estimate(
        self,
        model: Model,
        x0: torch.Tensor,
        num_samples: int,
        model_kwargs: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
        weighting: LossWeighting | None = None,
    ) -> dict[str, torch.Tensor]:
        """The training objective of each example of ``x0`` ``[B, ...]`` (:meth:`training_losses`' ``loss``: Eq. 14,
        weighted by ``weighting``) averaged over ``num_samples`` draws of a uniform timestep and its noise: held-out
        data's validation loss. Returns ``{"total": [B], "stderr": [B]}`` as :meth:`bits_per_dim_estimate` does."""

        def loss_at(t: torch.Tensor) -> torch.Tensor:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device="cpu").to(x0.device)
            return self.training_losses(model, x0, t, noise, model_kwargs, weighting)["loss"]  # [B]

        samples = self._at_uniform_timesteps(loss_at, x0, num_samples, generator)  # [B, K]
        return {"total": samples.mean(dim=1), "stderr": samples.std(dim=1, unbiased=True) / math.sqrt(num_samples)}

    def _at_uniform_timesteps(
        self,
        term: Callable[[torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        num_samples: int,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """``term(t)`` ``[B]`` at ``num_samples`` uniform timesteps ``t`` ``[B]`` per example, ``[B, K]``: the draws
        of a Monte Carlo estimate over timesteps, with at least two for its standard error."""
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 to estimate a standard error, got {num_samples}")
        batch = x0.shape[0]
        samples = torch.zeros(batch, num_samples, dtype=x0.dtype, device=x0.device)  # [B, K]
        for k in range(num_samples):
            t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device="cpu").to(x0.device)
            samples[:, k] = term(t)
        return samples

    def _vlb_term_at(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict[str, Any] | None,
        generator: torch.Generator | None,
        continuous: bool,
    ) -> torch.Tensor:
        """``L_t`` ``[B]`` of one draw ``x_t ~ q(x_t | x_0)``."""
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device="cpu").to(x0.device)
        return self._vlb_term_of(model, x0, t, noise, model_kwargs or {}, continuous)

    def _vlb_term_of(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        model_kwargs: dict[str, Any],
        continuous: bool,
    ) -> torch.Tensor:
        """``L_t`` ``[B]`` at ``x_t = q_sample(x0, t, noise)`` (Eq. 4)."""
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, self.model_timesteps(t), **model_kwargs)
        return self.vlb_terms_bits(output.to(x0.dtype), x0, x_t, t, continuous)
