"""Post-hoc EMA with power-function averaging profiles (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", Sec. 3 and Appendix C).

A *power-function EMA* with exponent ``gamma`` averages the training trajectory ``theta(tau)`` with the profile

    p_{gamma,t}(tau) = (gamma + 1) * tau**gamma / t**(gamma + 1)      for 0 <= tau <= t, else 0      (Eq. 121)

so its width grows in proportion to the training length ``t``. The width is quoted as ``sigma_rel``, the standard
deviation of the profile divided by ``t`` (Eq. 123). During training, :class:`PowerEMA` tracks a few such averages
(by default ``sigma_rel`` 0.05 and 0.10) and :meth:`PowerEMA.snapshot` stores them from time to time. After
training, :func:`reconstruct` combines the stored snapshots linearly so that their combined profile is the
least-squares approximation of the profile of any other ``sigma_rel`` at any earlier time (Appendix C.3,
Algorithm 3). Time ``t`` is measured in training images seen, as EDM2 does.

Discretisation: with the decay of :func:`power_beta`, the weight an update-based EMA gives to the weights after
update ``i`` (images seen ``i * batch``) at update ``n`` is ``(i**(gamma+1) - (i-1)**(gamma+1)) / n**(gamma+1)``,
which is exactly the integral of ``p_{gamma, n*batch}`` over ``((i-1)*batch, i*batch]``. The tracked averages are
therefore the continuous profiles applied to the piecewise-constant trajectory, and the closed-form inner products
of :func:`profile_inner_product` hold for them without a discretisation error.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: The largest relative standard deviation of a power-function profile with ``gamma >= 0`` (``gamma = 0``, the
#: uniform average over ``[0, t]``: sqrt(1/12)). On ``gamma >= 0`` the map gamma -> sigma_rel is strictly
#: decreasing, so the valid range of ``sigma_rel`` is ``(0, MAX_SIGMA_REL]``.
MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)

#: Relative cut-off of the singular values of the Gram matrix in :func:`solve_weights` (see there).
RCOND = 1e-13


def _check_sigma_rel(sigma_rel: float, name: str = "sigma_rel") -> float:
    """Return ``sigma_rel`` as a float, or raise ValueError unless ``0 < sigma_rel <= MAX_SIGMA_REL``."""
    value = float(sigma_rel)
    if not 0.0 < value <= MAX_SIGMA_REL * (1.0 + 1e-12):  # slack: 1 / math.sqrt(12) is 1 ulp above the constant
        raise ValueError(f"{name} must lie in (0, {MAX_SIGMA_REL:.6f}] (gamma >= 0), got {sigma_rel!r}")
    return value


def _check_gamma(gamma: float, name: str = "gamma") -> float:
    """Return ``gamma`` as a float, or raise ValueError unless it is finite and ``>= 0``."""
    value = float(gamma)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {gamma!r}")
    return value


def _check_count(value: int, name: str, minimum: int) -> int:
    """Return ``value`` as an int (Python or NumPy/Torch integer), or raise ValueError unless ``>= minimum``."""
    try:
        count = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if count < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return count


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power-function profile of exponent ``gamma`` (Eq. 123).

    ``sigma_rel**2 = (gamma + 1) / ((gamma + 2)**2 * (gamma + 3))``; strictly decreasing on ``gamma >= 0``.
    """
    g = _check_gamma(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent ``gamma >= 0`` whose power-function profile has relative std ``sigma_rel`` (Eq. 126, Algorithm 2).

    Eq. 123 rearranged with ``s = sigma_rel**-2`` is the cubic
    ``q(g) = g**3 + 7 g**2 + (16 - s) g + (12 - s) = 0``, of which ``gamma`` is the largest real root. ``q`` is
    convex for ``g > -7/3`` and increasing beyond its largest root, so Newton's method started above the root
    decreases monotonically onto it. ``g0 = 1 / sigma_rel`` is above it: ``sigma_rel(g) < 1 / g`` for ``g > 0``.
    The iteration stops when an iterate no longer decreases (the root to machine precision).
    """
    sigma = _check_sigma_rel(sigma_rel)
    s = sigma**-2
    g = 1.0 / sigma
    for _ in range(200):
        q = ((g + 7.0) * g + (16.0 - s)) * g + (12.0 - s)
        dq = (3.0 * g + 14.0) * g + (16.0 - s)
        if dq <= 0.0:  # only at the double root of the boundary sigma_rel = MAX_SIGMA_REL
            break
        step = q / dq
        if not step > 0.0:
            break
        g -= step
    return max(g, 0.0)  # rounding can leave -1e-16 at sigma_rel = MAX_SIGMA_REL, where gamma = 0


def power_beta(gamma: float, images_next: int, batch: int) -> float:
    """Decay of a power-function EMA update that brings the images seen to ``images_next`` (Eq. 127).

    ``beta = (1 - batch / images_next) ** (gamma + 1)``; the update is ``ema = beta * ema + (1 - beta) * theta``.
    The first update (``images_next == batch``) has ``beta = 0``: the average starts from the trained weights.
    """
    g = _check_gamma(gamma)
    step = _check_count(batch, "batch", 1)
    total = _check_count(images_next, "images_next (>= batch)", step)
    return (1.0 - step / total) ** (g + 1.0)


def profile_inner_product(gamma_a: float, t_a: float, gamma_b: float, t_b: float) -> float:
    """Closed-form ``<p_{gamma_a,t_a}, p_{gamma_b,t_b}>`` = integral of the product of two profiles (Eq. 151).

    For ``t_a <= t_b`` the product is nonzero on ``[0, t_a]`` only and integrates to
    ``(gamma_a+1)(gamma_b+1) / (gamma_a+gamma_b+1) * (t_a/t_b)**gamma_b / t_b``; the other case is symmetric.
    """
    ga, gb = _check_gamma(gamma_a, "gamma_a"), _check_gamma(gamma_b, "gamma_b")
    if not (t_a > 0 and t_b > 0 and math.isfinite(t_a) and math.isfinite(t_b)):
        raise ValueError(f"profile times must be finite and > 0, got t_a={t_a!r}, t_b={t_b!r}")
    gammas = torch.tensor([ga, gb], dtype=torch.float64)  # [2]
    times = torch.tensor([float(t_a), float(t_b)], dtype=torch.float64)  # [2]
    return float(_inner_products(gammas[0], times[0], gammas[1], times[1]))


def _inner_products(gamma_a: torch.Tensor, t_a: torch.Tensor, gamma_b: torch.Tensor, t_b: torch.Tensor) -> torch.Tensor:
    """Eq. 151 for broadcastable float64 tensors of exponents and times (any shape; result has the broadcast shape).

    Written with ``r = min(t) / max(t) <= 1`` so that neither branch can overflow: ``r**g_later / t_later``, where
    ``g_later`` is the exponent of the profile that ends later.
    """
    t_lo, t_hi = torch.minimum(t_a, t_b), torch.maximum(t_a, t_b)
    g_later = torch.where(t_a <= t_b, gamma_b, gamma_a)
    scale = (gamma_a + 1.0) * (gamma_b + 1.0) / (gamma_a + gamma_b + 1.0)
    return scale * (t_lo / t_hi) ** g_later / t_hi


def power_profile(gamma: float, t: float, tau: torch.Tensor) -> torch.Tensor:
    """The profile ``p_{gamma,t}(tau)`` of Eq. 121 at the times ``tau`` (same shape as ``tau``; 0 outside [0, t])."""
    g = _check_gamma(gamma)
    inside = (tau >= 0) & (tau <= t)
    values = (g + 1.0) * (tau.clamp(0.0, t) / t) ** g / t
    return torch.where(inside, values, torch.zeros_like(values))


def solve_weights(snapshots: Sequence[tuple[float, int]], target_gamma: float, target_images: int) -> torch.Tensor:
    """Coefficients [N] (float64) of the snapshots whose combined profile best fits the target (Algorithm 3).

    ``snapshots`` are ``(gamma_i, images_seen_i)``; the fit minimises the L2 distance over the whole time axis
    ``|| sum_i w_i p_{gamma_i,t_i} - p_{target_gamma,target_images} ||`` (snapshots later than the target count
    with their whole profile, which reaches past the target), whose normal
    equations are ``A w = b`` with the Gram matrix ``A_ij = <p_i, p_j>`` [N, N] and ``b_i = <p_i, p_target>`` [N]
    (Eq. 151). Times are divided by ``target_images`` first (the inner products scale as ``1/t``, the weights not).

    The solve: ``A`` is symmetric positive semi-definite and ill-conditioned (neighbouring snapshots have nearly
    the same profile: 2 x 20 snapshots over a run give a condition number ~1e4, 2 x 100 ~1e7), and a repeated or
    coincident snapshot makes it singular, where an LU solve (EDM2 uses ``np.linalg.solve``) fails or returns
    huge cancelling weights that amplify the float32 rounding of the stored tensors. We use
    ``torch.linalg.lstsq`` with the SVD driver ``gelsd`` and ``rcond=RCOND``: the minimum-norm least-squares
    solution with singular values below ``RCOND * max`` dropped. For well-conditioned sets it equals the plain
    solve; for singular ones it stays bounded (duplicates share their weight equally).
    As EDM2 does, the weights are then rescaled to sum to one, so a constant parameter is reproduced exactly.
    """
    if len(snapshots) == 0:
        raise ValueError("no snapshots to reconstruct from (got an empty list)")
    g_out = _check_gamma(target_gamma, "target_gamma")
    gammas = [_check_gamma(gamma, "snapshot gamma") for gamma, _ in snapshots]
    times = [_check_count(images, "snapshot images_seen", 1) for _, images in snapshots]
    target = _check_count(target_images, "target_images", 1)
    if target > max(times):
        raise ValueError(f"target_images {target_images!r} is later than the latest snapshot ({max(times)} images)")
    g_in = torch.tensor(gammas, dtype=torch.float64)  # [N]
    t_in = torch.tensor(times, dtype=torch.float64) / float(target)  # [N]
    gram = _inner_products(g_in[:, None], t_in[:, None], g_in[None, :], t_in[None, :])  # [N, N]
    one = torch.ones(1, dtype=torch.float64)
    rhs = _inner_products(g_in[:, None], t_in[:, None], g_out * one[None, :], one[None, :])  # [N, 1]
    weights = torch.linalg.lstsq(gram, rhs, rcond=RCOND, driver="gelsd").solution[:, 0]  # [N]
    total = weights.sum()
    if not total.abs() > 1e-6:
        raise ValueError(f"the snapshots cannot represent the target profile (weights sum to {float(total):.3g})")
    return weights / total


@dataclass(frozen=True)
class PosthocSnapshot:
    """One stored power-function EMA: its width, the images seen when stored, and its weights.

    ``state_dict`` holds CPU tensors: floating ones as float32, others (integer buffers) as they were.
    ``buffer_names`` are the keys of buffers, which the EMA copies from the model instead of averaging;
    :func:`reconstruct` takes them from the latest snapshot instead of combining them.
    """

    sigma_rel: float
    gamma: float
    images_seen: int
    state_dict: dict[str, torch.Tensor]
    buffer_names: frozenset[str] = field(default_factory=frozenset)


def _buffer_names(module: nn.Module) -> frozenset[str]:
    """State-dict keys of the module's buffers (persistent ones: the others are not in the state dict)."""
    keys = set(module.state_dict().keys())
    return frozenset(name for name, _ in module.named_buffers() if name in keys)


class PowerEMA:
    """Tracks one power-function EMA of a module per ``sigma_rel`` during training (Sec. 3.1, Eq. 127).

    Call :meth:`update` after every optimizer step with the images seen after that step; parameters are averaged
    with :func:`power_beta`, buffers (e.g. normalisation statistics) are copied.
    """

    def __init__(self, model: nn.Module, sigma_rels: Iterable[float] = (0.05, 0.10)) -> None:
        self.sigma_rels = tuple(_check_sigma_rel(s) for s in sigma_rels)
        if not self.sigma_rels:
            raise ValueError("PowerEMA needs at least one sigma_rel, got none")
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.images_seen = 0
        self.emas = [copy.deepcopy(model).eval().requires_grad_(False) for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, model: nn.Module, images_next: int, batch: int) -> None:
        """Average in ``model`` after a step of ``batch`` images that brings the count to ``images_next``."""
        count = _check_count(images_next, f"images_next (> the {self.images_seen} images seen)", self.images_seen + 1)
        weights = [1.0 - power_beta(gamma, count, batch) for gamma in self.gammas]  # validated before any change
        params = [p.detach() for p in model.parameters()]
        buffers = list(model.buffers())
        for weight, ema in zip(weights, self.emas, strict=True):
            shadow: list[torch.Tensor] = list(ema.parameters())
            sources = [p.to(s.dtype) for p, s in zip(params, shadow, strict=True)]
            torch._foreach_lerp_(shadow, sources, weight)
            for shadow_buffer, buffer in zip(ema.buffers(), buffers, strict=True):
                shadow_buffer.copy_(buffer)
        self.images_seen = count

    def profiles(self) -> list[tuple[float, nn.Module]]:
        """The tracked averages as ``(sigma_rel, module)`` pairs (the live modules, not copies)."""
        return list(zip(self.sigma_rels, self.emas, strict=True))

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: widths, images seen and each average's state dict."""
        return {
            "sigma_rels": list(self.sigma_rels),
            "images_seen": self.images_seen,
            "emas": [ema.state_dict() for ema in self.emas],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the widths must be the ones this object was built with."""
        sigma_rels = tuple(float(s) for s in state["sigma_rels"])
        if sigma_rels != self.sigma_rels:
            raise ValueError(f"state has sigma_rels {sigma_rels}, this PowerEMA tracks {self.sigma_rels}")
        if len(state["emas"]) != len(self.emas):
            raise ValueError(f"state has {len(state['emas'])} averages for {len(self.emas)} sigma_rels")
        for ema, ema_state in zip(self.emas, state["emas"], strict=True):
            ema.load_state_dict(ema_state)
        self.images_seen = int(state["images_seen"])

    def snapshot(self, images_seen: int | None = None) -> list[PosthocSnapshot]:
        """Copies of the current averages for :func:`reconstruct` (floating tensors as float32, on the CPU).

        ``images_seen`` defaults to the count of the last update; when given it must equal it (a check that the
        caller's count and the averages agree).
        """
        if images_seen is not None and images_seen != self.images_seen:
            raise ValueError(f"images_seen {images_seen!r} differs from the last update's count {self.images_seen}")
        if self.images_seen <= 0:
            raise ValueError(f"cannot snapshot before the first update (images seen {self.images_seen})")
        return [
            PosthocSnapshot(
                sigma_rel=sigma_rel,
                gamma=gamma,
                images_seen=self.images_seen,
                state_dict={key: _to_cpu_copy(value) for key, value in ema.state_dict().items()},
                buffer_names=_buffer_names(ema),
            )
            for sigma_rel, gamma, ema in zip(self.sigma_rels, self.gammas, self.emas, strict=True)
        ]


def _to_cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy (never a view of the live tensor), floating point as float32."""
    dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to(device="cpu", dtype=dtype, copy=True)


def _images_of(snap: PosthocSnapshot) -> int:
    """Sort key: the images seen when the snapshot was stored."""
    return snap.images_seen


def reconstruct(
    snapshots: Sequence[PosthocSnapshot], target_sigma_rel: float, target_images: int | None = None
) -> dict[str, torch.Tensor]:
    """State dict of the power-function EMA of width ``target_sigma_rel`` at ``target_images`` (Appendix C.3).

    The floating parameters are ``sum_i w_i * snapshot_i`` with the weights of :func:`solve_weights`, accumulated
    in float64 and cast back to each stored tensor's dtype. Buffers and non-floating tensors are not averaged in
    training, so they come from the latest snapshot at or before ``target_images`` (the earliest if none is).
    ``target_images`` defaults to the latest snapshot's images seen.
    """
    if len(snapshots) == 0:
        raise ValueError("no snapshots to reconstruct from (got an empty list)")
    target_gamma = sigma_rel_to_gamma(_check_sigma_rel(target_sigma_rel, "target_sigma_rel"))
    latest = max(snapshots, key=_images_of)
    images = latest.images_seen if target_images is None else target_images
    weights = solve_weights([(snap.gamma, snap.images_seen) for snap in snapshots], target_gamma, images)  # [N]
    keys = latest.state_dict.keys()
    for snap in snapshots:
        if snap.state_dict.keys() != keys:
            raise ValueError(f"snapshot at {snap.images_seen} images has different keys than the others")
    earlier = [snap for snap in snapshots if snap.images_seen <= images]
    copied_from = max(earlier, key=_images_of) if earlier else min(snapshots, key=_images_of)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        reference = copied_from.state_dict[key]
        if key in copied_from.buffer_names or not reference.is_floating_point():
            out[key] = reference.clone()
            continue
        total = torch.zeros(reference.shape, dtype=torch.float64)  # same shape as the stored tensor
        for weight, snap in zip(weights.tolist(), snapshots, strict=True):
            total.add_(snap.state_dict[key].to(torch.float64), alpha=weight)
        out[key] = total.to(reference.dtype)
    return out
