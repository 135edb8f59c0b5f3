"""Stable targets for the denoising loss (Xu, Tong & Jaakkola 2023, "Stable Target Field for Reduced Variance Score
Estimation in Diffusion Models", Sec. 3).

Algorithm 1 of Ho et al. (2020) regresses the network on the noise ``eps`` that made ``x_t`` from one image ``x_0``.
Its minimiser is the posterior mean ``E[x_0 | x_t]``, but at the intermediate noise levels, where ``x_t`` could have
come from images of several modes (several digits), the one-image target scatters widely around it and the network
learns the split between the modes from noisy gradients. The stable target replaces ``x_0`` by the posterior mean
under a reference batch of R data images ``{x_0^j}`` that includes ``x_0`` itself, self-normalised importance
weights by the forward kernel:

    x0_hat(x_t) = sum_j w_j x_0^j,   w_j ∝ q(x_t | x_0^j) = N(x_t; sqrt(abar_t) x_0^j, (1 - abar_t) I)

and ``eps`` by the noise that makes ``x_t`` from it. At low noise ``w`` is one on ``x_0`` (the target is the usual
one); at high noise it spreads over the batch. A self-normalised estimate, it trades a bias that vanishes as R grows
for a much lower variance (Xu et al. 2023, Sec. 3); the loss's minimiser over the data is unchanged in that limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def posterior_mean(
    x_t: torch.Tensor, alpha_bar: torch.Tensor, reference: torch.Tensor, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """``E[x_0 | x_t]`` ``[B, ...]`` under the empirical distribution of ``reference`` ``[R, ...]``: the weighted mean
    of its images, weights ``w_ij ∝ exp(-|x_t^i - sqrt(abar_i) x_0^j|^2 / (2 (1 - abar_i)))`` (the forward kernel,
    Ho et al. 2020, Eq. 4). ``x_t`` ``[B, ...]``, ``alpha_bar`` ``[B]`` (each row's abar_t); ``allowed`` ``[B, R]``:
    which reference images each row may average (None: all)."""
    flat_t, flat_r = x_t.flatten(1), reference.flatten(1)  # [B, D], [R, D]
    root = alpha_bar.sqrt()[:, None]  # [B, 1]
    # log q(x_t | x_0^j) up to a term constant in j: the expanded square, without |x_t|^2 (no cancellation at low noise)
    logits = (root * (flat_t @ flat_r.T) - 0.5 * alpha_bar[:, None] * (flat_r**2).sum(1)) / (1 - alpha_bar)[:, None]
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(logits, dim=1)  # [B, R]
    return (weights @ flat_r).view_as(x_t)


def stable_targets(
    x0: torch.Tensor,
    noise: torch.Tensor,
    x_t: torch.Tensor,
    alpha_bar: torch.Tensor,
    reference: torch.Tensor,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stable ``(x0_hat, eps_hat)`` ``[B, ...]`` of ``x_t = sqrt(abar) x0 + sqrt(1 - abar) noise``: the posterior
    mean of :func:`posterior_mean` and the noise that makes ``x_t`` from it, written as ``noise`` plus its change so
    that it is exactly ``noise`` where ``x0_hat`` is ``x0`` (no round-off at low noise)."""
    x0_hat = posterior_mean(x_t, alpha_bar, reference, allowed)
    scale = (alpha_bar / (1 - alpha_bar)).sqrt().view(-1, *([1] * (x0.dim() - 1)))  # [B, 1, ...]
    return x0_hat, noise + scale * (x0 - x0_hat)


@dataclass(frozen=True)
class Reference:
    """A reference batch: ``images`` ``[R, ...]`` (a micro-batch's own images among them) and, for a class-conditional
    model, their ``labels`` ``[R]`` as trained (``null_class`` where the label was dropped)."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    null_class: int | None = None

    def allowed(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """Which reference images ``[B, R]`` the posterior of each trained label ``[B]`` averages: those of its class,
        all for the null class (the unconditional model), all for an unconditional model (None)."""
        if labels is None or self.labels is None:
            return None
        same = self.labels[None, :] == labels[:, None]  # [B, R]
        return same if self.null_class is None else same | labels.eq(self.null_class)[:, None]


class ReferenceBank:
    """The last ``size`` images one share of the global batch drew, its current micro-batch last: each step's reference
    batch (Xu et al. 2023 draw one from the data set; the images drawn just before are such a draw, at no extra read).
    Its contents are part of the training state, so that a resumed run continues exactly."""

    def __init__(self, size: int, null_class: int | None = None) -> None:
        if size < 1:
            raise ValueError(f"a reference batch needs at least one image, got size {size}")
        self.size, self.null_class = size, null_class
        self.images: torch.Tensor | None = None  # [<= size, ...]
        self.labels: torch.Tensor | None = None  # [<= size]

    def push(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Reference:
        """Add a micro-batch ``images`` ``[b, ...]`` (and its trained labels ``[b]``) and return the reference batch it
        is trained against: the bank's last ``size`` images, the micro-batch's all among them."""
        if images.shape[0] > self.size:
            raise ValueError(f"a micro-batch of {images.shape[0]} images does not fit a reference batch of {self.size}")
        frozen = images.detach()
        self.images = frozen if self.images is None else torch.cat([self.images, frozen])[-self.size :]
        if labels is not None:
            self.labels = labels if self.labels is None else torch.cat([self.labels, labels])[-self.size :]
        return Reference(self.images, self.labels, self.null_class)

    def state(self) -> list[torch.Tensor]:
        """What a checkpoint stores: the images, and the labels when kept (empty before the first push)."""
        return [tensor.cpu() for tensor in (self.images, self.labels) if tensor is not None]

    def restore(self, saved: list[torch.Tensor], device: torch.device) -> None:
        """Continue from :meth:`state`'s ``saved``."""
        self.images = saved[0].to(device) if saved else None
        self.labels = saved[1].to(device) if len(saved) > 1 else None
