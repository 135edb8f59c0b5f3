"""Post-hoc EMA (Karras et al. 2024, Sec. 3 and Appendix C): the sigma_rel <-> gamma map, the closed-form profile
inner products, reconstruction of an untracked EMA from snapshots, exact resume, and input validation."""

import io
import itertools
import math
import re

import pytest
import torch
from torch import nn

from ddpm_core.phema import (
    MAX_SIGMA_REL,
    PosthocSnapshot,
    PowerEMA,
    gamma_to_sigma_rel,
    power_beta,
    power_profile,
    profile_inner_product,
    reconstruct,
    sigma_rel_to_gamma,
    solve_weights,
)

STEPS, BATCH, SNAPSHOT_EVERY = 2000, 32, 100  # 40 snapshots (20 per tracked sigma_rel) over 64,000 images


def defining_sigma_rel_squared(gamma: float) -> float:
    """Eq. 123, written out independently of the module."""
    return (gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))


# --- 1. sigma_rel <-> gamma ------------------------------------------------------------------------------------


def test_sigma_rel_to_gamma_solves_the_defining_formula_both_ways():
    for sigma_rel, expected_gamma in [(0.05, 16.9722), (0.10, 6.9372)]:  # EDM2's two tracked profiles
        gamma = sigma_rel_to_gamma(sigma_rel)
        assert gamma == pytest.approx(expected_gamma, abs=1e-4)
        assert defining_sigma_rel_squared(gamma) == pytest.approx(sigma_rel**2, rel=1e-14)
    # Exact values: gamma 1 -> sigma_rel^2 = 2 / (9 * 4); gamma 2 -> 3 / (16 * 5); gamma 0 -> 1/12 (the maximum).
    for gamma, sigma_sq in [(0.0, 1 / 12), (1.0, 1 / 18), (2.0, 3 / 80)]:
        assert gamma_to_sigma_rel(gamma) == pytest.approx(math.sqrt(sigma_sq), rel=1e-15)
        assert sigma_rel_to_gamma(math.sqrt(sigma_sq)) == pytest.approx(gamma, abs=1e-12)
    assert sigma_rel_to_gamma(1 / math.sqrt(12)) == 0.0  # the boundary, 1 ulp above MAX_SIGMA_REL, is accepted


def test_sigma_rel_gamma_round_trip():
    sigma_rels = [1e-4, 0.003, 0.01, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25, 0.28, MAX_SIGMA_REL]
    for sigma_rel in sigma_rels:
        assert abs(gamma_to_sigma_rel(sigma_rel_to_gamma(sigma_rel)) - sigma_rel) <= 1e-12
    for gamma in [0.0, 0.3, 1.0, 6.94, 16.97, 100.0, 1e4]:
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-9, abs=1e-9)
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    assert all(a > b for a, b in itertools.pairwise(gammas))  # wider profile, smaller exponent


def test_sigma_rel_is_the_relative_std_of_the_profile():
    """The std of p_{gamma,t} / t measured by numerical integration equals sigma_rel (Eq. 123's meaning)."""
    t = 3.0
    tau = torch.linspace(0.0, t, 200_001, dtype=torch.float64)
    for sigma_rel in [0.05, 0.1, 0.2]:
        profile = power_profile(sigma_rel_to_gamma(sigma_rel), t, tau)
        assert torch.trapezoid(profile, tau).item() == pytest.approx(1.0, abs=1e-8)
        mean = torch.trapezoid(tau * profile, tau)
        std = torch.trapezoid((tau - mean) ** 2 * profile, tau).sqrt().item()
        assert std / t == pytest.approx(sigma_rel, rel=1e-6)


# --- 3. closed-form inner products -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gamma_a", "t_a", "gamma_b", "t_b"),
    [
        (6.94, 1.0, 16.97, 1.0),
        (16.97, 0.4, 6.94, 1.3),
        (6.94, 2.5, 16.97, 0.7),
        (0.0, 1.0, 3.0, 0.5),
        (2.0, 5.0, 2.0, 5.0),
    ],
)
def test_inner_product_matches_numerical_integration(gamma_a, t_a, gamma_b, t_b):
    # The product vanishes beyond min(t_a, t_b); on [0, min] it is smooth, so a fine trapezoid rule is accurate.
    tau = torch.linspace(0.0, min(t_a, t_b), 400_001, dtype=torch.float64)
    numeric = torch.trapezoid(power_profile(gamma_a, t_a, tau) * power_profile(gamma_b, t_b, tau), tau).item()
    closed = profile_inner_product(gamma_a, t_a, gamma_b, t_b)
    assert closed == pytest.approx(numeric, rel=1e-7)
    assert profile_inner_product(gamma_b, t_b, gamma_a, t_a) == pytest.approx(closed, rel=1e-15)


def test_power_beta_gives_the_discrete_power_profile():
    """Updates with power_beta weight the model after update k by the integral of p over ((k-1)B, kB]."""
    gamma, n = 3.5, 40
    weights = torch.zeros(n, dtype=torch.float64)  # [n] weight of each update's model in the final average
    for k in range(1, n + 1):
        beta = power_beta(gamma, k * BATCH, BATCH)
        weights *= beta
        weights[k - 1] = 1 - beta
    k = torch.arange(1, n + 1, dtype=torch.float64)
    expected = (k / n) ** (gamma + 1) - ((k - 1) / n) ** (gamma + 1)
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=1e-15)
    assert power_beta(gamma, 1000, 10) == pytest.approx(0.99 ** (gamma + 1), rel=1e-15)


# --- 2. reconstruction against a directly tracked EMA ----------------------------------------------------------


def trajectory(steps: int) -> torch.Tensor:
    """[steps, 36] float64 weights of a Linear(8, 4) (32 weights + 4 biases) after each update: offset, quadratic
    drift and three sinusoids (periods 1/3, 1/11 and 1/37 of the run) with random amplitudes and phases."""
    gen = torch.Generator().manual_seed(0)
    offset, drift = torch.randn(36, generator=gen, dtype=torch.float64), torch.randn(36, generator=gen).double()
    amps, phases = torch.randn(3, 36, generator=gen).double(), 2 * math.pi * torch.rand(3, 36, generator=gen).double()
    u = torch.arange(1, steps + 1, dtype=torch.float64)[:, None, None] / steps  # [steps, 1, 1]
    freqs = torch.tensor([3.0, 11.0, 37.0], dtype=torch.float64)[:, None]  # [3, 1]
    waves = (amps * torch.sin(2 * math.pi * freqs * u + phases)).sum(1)  # [steps, 36]
    return offset + drift * u[:, 0] ** 2 + waves


def load_flat(model: nn.Linear, flat: torch.Tensor) -> None:
    with torch.no_grad():
        model.weight.copy_(flat[:32].view(4, 8))
        model.bias.copy_(flat[32:])


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state["weight"].flatten(), state["bias"]]).double()


def discrete_profile(gamma: float, n: int, steps: int) -> torch.Tensor:
    """[steps] weight of each update's model in a power EMA read after update n (0 after n)."""
    k = torch.arange(1, steps + 1, dtype=torch.float64)
    weights = (k / n) ** (gamma + 1) - ((k - 1) / n) ** (gamma + 1)
    return torch.where(k <= n, weights, torch.zeros_like(weights))


@pytest.fixture(scope="module")
def tracked_run():
    """A run of STEPS updates tracking (0.05, 0.10) with snapshots, and directly tracked 0.07 read at two times."""
    thetas = trajectory(STEPS)
    model = nn.Linear(8, 4)
    tracked, direct = PowerEMA(model), PowerEMA(model, sigma_rels=(0.07,))
    snapshots: list[PosthocSnapshot] = []
    direct_at: dict[int, torch.Tensor] = {}
    for step in range(1, STEPS + 1):
        load_flat(model, thetas[step - 1])
        tracked.update(model, step * BATCH, BATCH)
        direct.update(model, step * BATCH, BATCH)
        if step % SNAPSHOT_EVERY == 0:
            snapshots += tracked.snapshot(step * BATCH)
        if step in (1300, STEPS):
            direct_at[step] = flat(direct.emas[0].state_dict())
    return thetas, snapshots, direct_at


@pytest.mark.parametrize("target_step", [STEPS, 1300])
def test_reconstruction_matches_a_directly_tracked_ema(tracked_run, target_step):
    """reconstruct(0.07) from the 0.05/0.10 snapshots equals the 0.07 EMA tracked during the run.

    Tolerance, derived: the reconstruction is sum_k omega_k theta_k with omega = sum_i w_i d_i (the discrete
    profiles, see test_power_beta_gives_the_discrete_power_profile) and the direct EMA is sum_k d_k theta_k. As
    both weight vectors sum to one, for any constant c,
    ||reconstruction - direct|| <= ||omega - d||_2 * sqrt(sum_k ||theta_k - c||^2)   (Cauchy-Schwarz),
    plus float32 rounding of the tracked averages (~1e-7 relative per update; 1e-5 of ||direct|| allowed). That
    bound is loose (it assumes the trajectory aligned with the profile error); the measured errors are 3% of it.
    Measured with snapshots every 100 updates (40 snapshots): error / ||direct|| = 1.3e-4 at the end of the run
    and 5.4e-4 at update 1300 (where the later snapshots' profiles reach past the target), which is 1.3e-3 and
    4.0e-3 of the distance from the direct EMA to the nearest stored profile. The asserts allow ~2.5x of that.
    """
    thetas, snapshots, direct_at = tracked_run
    images = target_step * BATCH
    usable = [s for s in snapshots if s.images_seen <= images] if target_step == STEPS else snapshots
    rebuilt = flat(reconstruct(usable, 0.07, None if target_step == STEPS else images))
    direct = direct_at[target_step]
    error = (rebuilt - direct).norm().item()

    weights = solve_weights([(s.gamma, s.images_seen) for s in usable], sigma_rel_to_gamma(0.07), images)
    profiles = [discrete_profile(s.gamma, s.images_seen // BATCH, STEPS) for s in usable]  # N x [STEPS]
    omega = sum(w * p for w, p in zip(weights, profiles, strict=True))
    d = discrete_profile(sigma_rel_to_gamma(0.07), target_step, STEPS)
    spread = (thetas - thetas.mean(0)).norm().item()  # sqrt(sum_k ||theta_k - c||^2), c the mean
    bound = (omega - d).norm().item() * spread + 1e-5 * direct.norm().item()
    assert error <= bound
    # The independent discrete prediction agrees with the reconstruction up to float32 rounding.
    torch.testing.assert_close(rebuilt, omega @ thetas, rtol=0, atol=1e-5)
    # Far closer than the nearest stored profile, and a small fraction of the weights' size.
    stored = [flat(s.state_dict) for s in snapshots if s.images_seen == images]
    assert len(stored) == 2
    nearest = min((x - direct).norm().item() for x in stored)
    assert error < (3e-3 if target_step == STEPS else 1e-2) * nearest
    assert error < (3e-4 if target_step == STEPS else 1.5e-3) * direct.norm().item()


def test_reconstructing_a_stored_profile_returns_it(tracked_run):
    _, snapshots, _ = tracked_run
    last = snapshots[-1]  # sigma_rel 0.10 at the end of the run
    assert (last.sigma_rel, last.images_seen) == (0.10, STEPS * BATCH)
    weights = solve_weights([(s.gamma, s.images_seen) for s in snapshots], last.gamma, last.images_seen)
    assert weights.dtype == torch.float64 and weights.shape == (len(snapshots),)
    one_hot = torch.zeros(len(snapshots), dtype=torch.float64)
    one_hot[-1] = 1.0
    torch.testing.assert_close(weights, one_hot, rtol=0, atol=1e-8)
    rebuilt = reconstruct(snapshots, 0.10)
    for key, value in last.state_dict.items():
        assert rebuilt[key].dtype == torch.float32
        torch.testing.assert_close(rebuilt[key], value, rtol=0, atol=1e-6)


def test_duplicate_snapshots_are_handled_by_the_least_squares_solve():
    """A repeated snapshot makes the Gram matrix exactly singular; the weights still reproduce the target."""
    g05, g10 = sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)
    pairs = [(g05, 500), (g10, 500), (g05, 1000), (g10, 1000), (g10, 1000)]
    weights = solve_weights(pairs, g10, 1000)
    assert weights[:3].abs().max().item() < 1e-8
    assert weights[3].item() == pytest.approx(weights[4].item(), rel=1e-6)  # minimum norm: split evenly
    assert weights.sum().item() == pytest.approx(1.0, rel=1e-12)


def test_a_constant_parameter_is_reproduced_exactly():
    """The weights sum to one (EDM2's rescaling), so a parameter that never changed comes back unchanged, even
    from 4 coarse snapshots whose plain least-squares weights sum to 0.72 for this wide target."""
    constant = {"w": torch.tensor([3.0, -7.5, 1e3])}
    snapshots = [
        PosthocSnapshot(sigma_rel, sigma_rel_to_gamma(sigma_rel), images, constant)
        for images in (4000, 10000)
        for sigma_rel in (0.05, 0.10)
    ]
    rebuilt = reconstruct(snapshots, 0.2)  # at 10,000 images
    torch.testing.assert_close(rebuilt["w"], constant["w"], rtol=1e-6, atol=0)


def move_buffers(model: nn.Module, amount: float) -> None:
    """Stand-in for a train-mode forward: move the BatchNorm statistics (a real forward is needlessly slow on a
    busy 2-core machine, where the CPU kernel's thread pool waits)."""
    with torch.no_grad():
        for buffer in model.buffers():
            buffer.add_(1 if not buffer.is_floating_point() else amount)


def test_buffers_come_from_the_latest_snapshot_and_snapshots_are_copies():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = PowerEMA(model)
    snapshots: list[PosthocSnapshot] = []
    for step in range(1, 4):
        move_buffers(model, float(step))
        ema.update(model, step * 8, 8)
        snapshots += ema.snapshot()
    frozen = snapshots[-1].state_dict["1.running_mean"].clone()
    ema.update(model, 4 * 8, 8)
    with torch.no_grad():
        ema.emas[1][1].running_mean.add_(1.0)
    assert torch.equal(snapshots[-1].state_dict["1.running_mean"], frozen)  # not a view of the live average
    assert snapshots[-1].buffer_names == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    rebuilt = reconstruct(snapshots, 0.07, 2 * 8)
    assert torch.equal(rebuilt["1.running_mean"], snapshots[2].state_dict["1.running_mean"])  # step 2's buffers
    assert rebuilt["1.num_batches_tracked"].dtype == torch.int64 and rebuilt["1.num_batches_tracked"].item() == 2
    assert snapshots[0].state_dict["0.weight"].dtype == torch.float32 and snapshots[0].images_seen == 8


# --- 4. exact resume -------------------------------------------------------------------------------------------


def advance(model: nn.Module, step: int) -> None:
    """A deterministic step: random increments seeded by the step number, and new BatchNorm statistics."""
    gen = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    move_buffers(model, math.sin(step))


def test_resume_from_state_dict_is_bit_for_bit():
    make = lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    torch.manual_seed(0)
    model = make()
    reference, stop, steps = PowerEMA(model, sigma_rels=(0.05, 0.1, 0.2)), 23, 61
    torch.manual_seed(0)
    interrupted_model = make()
    interrupted = PowerEMA(interrupted_model, sigma_rels=(0.05, 0.1, 0.2))
    for step in range(1, steps + 1):
        advance(model, step)
        reference.update(model, step * 16, 16)
        if step <= stop:
            advance(interrupted_model, step)
            interrupted.update(interrupted_model, step * 16, 16)

    buffer = io.BytesIO()
    torch.save({"ema": interrupted.state_dict(), "model": interrupted_model.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    torch.manual_seed(1)  # a fresh process: different initial weights everywhere
    resumed_model = make()
    resumed_model.load_state_dict(saved["model"])
    resumed = PowerEMA(make(), sigma_rels=(0.05, 0.1, 0.2))
    assert not torch.equal(resumed.emas[0][0].weight, interrupted.emas[0][0].weight)
    resumed.load_state_dict(saved["ema"])
    assert resumed.images_seen == stop * 16
    for step in range(stop + 1, steps + 1):
        advance(resumed_model, step)
        resumed.update(resumed_model, step * 16, 16)

    assert resumed.images_seen == reference.images_seen == steps * 16
    for (sigma_a, ema_a), (sigma_b, ema_b) in zip(resumed.profiles(), reference.profiles(), strict=True):
        assert sigma_a == sigma_b
        for (key, a), b in zip(ema_a.state_dict().items(), ema_b.state_dict().values(), strict=True):
            assert torch.equal(a, b), key


# --- 5. bad inputs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_rel", [0.0, -0.05, 0.3, 1.0, float("nan"), float("inf")])
def test_bad_sigma_rel_is_rejected(sigma_rel):
    with pytest.raises(ValueError, match=re.escape(repr(sigma_rel))):
        sigma_rel_to_gamma(sigma_rel)
    with pytest.raises(ValueError, match=re.escape(repr(sigma_rel))):
        PowerEMA(nn.Linear(1, 1), sigma_rels=(0.05, sigma_rel))


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="got -1.0"):
        gamma_to_sigma_rel(-1.0)
    with pytest.raises(ValueError, match="batch must be an integer >= 1, got 0"):
        power_beta(5.0, 100, 0)
    with pytest.raises(ValueError, match=r"images_next \(>= batch\) must be an integer >= 32, got 16"):
        power_beta(5.0, 16, 32)
    with pytest.raises(ValueError, match="empty"):
        solve_weights([], 5.0, 100)
    with pytest.raises(ValueError, match="empty"):
        reconstruct([], 0.07)
    with pytest.raises(ValueError, match=r"target_images 300 is later than the latest snapshot \(200 images\)"):
        solve_weights([(5.0, 100), (7.0, 200)], 6.0, 300)
    with pytest.raises(ValueError, match="batch must be an integer >= 1, got 2.5"):
        power_beta(5.0, 100, 2.5)
    with pytest.raises(ValueError, match="target_images must be an integer >= 1, got 0"):
        solve_weights([(5.0, 100)], 6.0, 0)
    with pytest.raises(ValueError, match="got -3"):
        solve_weights([(-3, 100)], 6.0, 100)
    with pytest.raises(ValueError, match="target_sigma_rel .* got 0.5"):
        reconstruct([PosthocSnapshot(0.05, sigma_rel_to_gamma(0.05), 100, {})], 0.5)
    ema = PowerEMA(nn.Linear(1, 1))
    with pytest.raises(ValueError, match="before the first update"):
        ema.snapshot()
    ema.update(nn.Linear(1, 1), 64, 64)
    with pytest.raises(ValueError, match=r"images_next \(> the 64 images seen\) must be an integer >= 65, got 64"):
        ema.update(nn.Linear(1, 1), 64, 64)
    with pytest.raises(ValueError, match="images_seen 128 differs"):
        ema.snapshot(128)
    with pytest.raises(ValueError, match=re.escape("(0.05, 0.2)")):
        PowerEMA(nn.Linear(1, 1), sigma_rels=(0.05, 0.2)).load_state_dict(ema.state_dict())
