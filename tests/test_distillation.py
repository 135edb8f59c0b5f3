"""Progressive distillation's targets and loss (ddpm_core.distillation; Salimans & Ho 2022, Algorithm 2) and
consistency distillation's (Song et al. 2023, Algorithm 2) against closed forms on Gaussian data, whose exact
denoiser makes every DDIM step an affine map (tests/oracles.py)."""

import math
import re

import pytest
import torch

from ddpm_core.checkpoint import load_snapshot, save_snapshot
from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion, Prediction
from ddpm_core.distillation import (
    BOUNDARY_WIDTH,
    CLEAN,
    ConsistencyFunction,
    Reparameterized,
    StudentGrid,
    abar_at,
    consistency_distillation_loss,
    consistency_grid,
    consistency_loss,
    consistency_scalings,
    consistency_target,
    consistency_x0,
    ddim_to,
    distillation_loss,
    distillation_target,
    progressive_loss,
    student_grid,
    student_sampler,
    ve_sigma,
)
from ddpm_core.samplers import Method, spaced_timesteps
from ddpm_core.unet import UNet, UNetConfig
from pipelines.config import ConfigError, registered_model_name
from pipelines.config_file import load_config
from pipelines.training.objective import Progressive
from tests.oracles import gaussian_oracle

MEAN, STD, T = 0.3, 0.6, 1000


def diffusion_for(prediction: Prediction) -> GaussianDiffusion:
    return GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=T, prediction=prediction))


def ddim_coefficient(abar_from: float, abar_to: float) -> float:
    """The exact denoiser's DDIM step maps ``x - sqrt(abar_from) m`` to ``c (x - sqrt(abar_from) m)`` about the
    moved mean ``sqrt(abar_to) m``, with ``c = (sqrt(abar_to abar_from) s^2 + sqrt((1 - abar_to)(1 - abar_from)))
    / (abar_from s^2 + 1 - abar_from)`` (Eq. 12 with E[x_0 | x_t] substituted; derived by hand)."""
    variance = abar_from * STD**2 + 1 - abar_from
    return (math.sqrt(abar_to * abar_from) * STD**2 + math.sqrt((1 - abar_to) * (1 - abar_from))) / variance


def test_the_student_grid_pairs_the_teachers_evenly_spaced_steps():
    four, one = student_grid(1000, 4), student_grid(1000, 1)
    assert [part.tolist() for part in four] == [[999, 749, 499, 249], [874, 624, 374, 124], [749, 499, 249, CLEAN]]
    assert [part.tolist() for part in one] == [[999], [499], [CLEAN]]
    with pytest.raises(ValueError, match="student_steps must lie in"):
        student_grid(10, 6)


@pytest.mark.parametrize("prediction", list(Prediction))
def test_the_target_is_the_closed_form_of_two_exact_ddim_steps_and_one_step_lands_there(prediction):
    """For every student step of a 4-step grid: the target equals the hand-derived affine map of x_t (two exact-
    denoiser DDIM steps composed, then Algorithm 2's inversion), a single DDIM step with it reaches the teacher's
    two-step point, and a student predicting it in any parameterisation has zero loss."""
    diffusion, grid = diffusion_for(prediction), student_grid(T, 4)
    teacher = gaussian_oracle(diffusion, MEAN, STD, prediction)
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 1, 3, 3, generator=generator, dtype=torch.float64) * 1.3  # row i: student step i
    target = distillation_target(diffusion, teacher, x_t, grid)
    abar = torch.cat([diffusion.alphas_cumprod, torch.ones(1, dtype=torch.float64)])
    for row, (start, mid, end) in enumerate(zip(*grid, strict=True)):
        a_t, a_m, a_s = (float(abar[int(index)]) for index in (start, mid, end))
        centred = x_t[row] - math.sqrt(a_t) * MEAN
        x_s = math.sqrt(a_s) * MEAN + ddim_coefficient(a_t, a_m) * ddim_coefficient(a_m, a_s) * centred
        ratio = math.sqrt((1 - a_s) / (1 - a_t))
        expected = (x_s - ratio * x_t[row]) / (math.sqrt(a_s) - ratio * math.sqrt(a_t))
        torch.testing.assert_close(target[row], expected, rtol=1e-10, atol=1e-12)
        one_step = ddim_to(
            x_t[row : row + 1],
            target[row : row + 1],
            torch.tensor(a_t, dtype=torch.float64),
            torch.tensor(a_s, dtype=torch.float64),
        )
        torch.testing.assert_close(one_step[0], x_s, rtol=1e-10, atol=1e-12)

    t = grid.starts
    x0_student = target  # the student's output in its own parameterisation, from the target x_0
    eps = diffusion.eps_from_x0(x_t, t, x0_student)
    output = {Prediction.EPS: eps, Prediction.X0: x0_student, Prediction.V: diffusion.v_target(x0_student, t, eps)}
    loss = distillation_loss(diffusion, output[prediction], x_t, t, target)
    assert loss.shape == (4,) and loss.abs().max().item() < 1e-20


def test_the_loss_weights_the_x0_error_by_truncated_snr():
    diffusion, grid = diffusion_for(Prediction.X0), student_grid(T, 4)
    x_t = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target, error = torch.zeros_like(x_t), torch.full_like(x_t, 0.1)
    loss = distillation_loss(diffusion, target + error, x_t, grid.starts, target)
    snr = diffusion.alphas_cumprod[grid.starts] / (1 - diffusion.alphas_cumprod[grid.starts])
    torch.testing.assert_close(loss, snr.clamp(min=1.0) * 0.01, rtol=1e-12, atol=0)
    assert snr[0] < 1 < snr[-1]  # both sides of the truncation are exercised


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_a_student_that_meets_its_targets_samples_what_the_teacher_samples_in_twice_the_steps(steps):
    """The defining property of a round: N student DDIM steps, each predicting its target, end on the teacher's
    2N-step DDIM sample from the same noise (the same teacher grid), to float64 rounding."""
    diffusion = diffusion_for(Prediction.EPS)
    teacher, grid = gaussian_oracle(diffusion, MEAN, STD, Prediction.EPS), student_grid(T, steps)
    noise = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x_teacher = noise
    for start, mid, end in zip(*grid, strict=True):
        for here, there in ((start, mid), (mid, end)):
            index = torch.full((6,), int(here))
            x0 = diffusion.p_mean_variance(teacher(x_teacher, index), x_teacher, index).pred_x0
            x_teacher = ddim_to(
                x_teacher, x0, abar_at(diffusion, index, noise), abar_at(diffusion, there.expand(6), noise)
            )
    x_student = noise
    for start, mid, end in zip(*grid, strict=True):
        rows = StudentGrid(start.expand(6), mid.expand(6), end.expand(6))
        target = distillation_target(diffusion, teacher, x_student, rows)
        x_student = ddim_to(
            x_student, target, abar_at(diffusion, rows.starts, noise), abar_at(diffusion, rows.ends, noise)
        )
    torch.testing.assert_close(x_student, x_teacher, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 4])
def test_a_minibatch_loss_is_zero_only_for_the_student_that_does_the_teachers_two_steps_in_one(steps):
    """Algorithm 2 on a minibatch of Gaussian images: the student that predicts, at each step's start, the x_0 of the
    exact teacher's two-step map scores zero at every step drawn; the teacher itself as the student (a round not yet
    trained) scores above zero, and the loss reaches the student's parameters."""
    diffusion = diffusion_for(Prediction.X0)
    teacher, grid = gaussian_oracle(diffusion, MEAN, STD, Prediction.X0), student_grid(T, steps)

    def distilled(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        row = (grid.starts[None, :] == t[:, None]).long().argmax(dim=1)  # [B] the student step starting at t
        return distillation_target(diffusion, teacher, x, StudentGrid(*(part[row] for part in grid)))

    x0 = MEAN + STD * torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = progressive_loss(diffusion, distilled, teacher, x0, steps, torch.Generator().manual_seed(4))
    assert exact.shape == (64,) and exact.abs().max() < 1e-20
    scale = torch.ones((), dtype=torch.float64, requires_grad=True)  # a one-parameter student: the teacher, scaled

    def undistilled(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scale * teacher(x, t)

    loss = progressive_loss(diffusion, undistilled, teacher, x0, steps, torch.Generator().manual_seed(4))
    assert loss.mean() > 1e-4
    loss.mean().backward()
    assert scale.grad is not None and scale.grad.abs() > 0


def test_the_consistency_boundary_holds_for_any_network_output():
    """f(x, t_min) = x (Song et al. 2023, Eq. 5): at timestep 0 the student's x_0 estimate is the VE state
    x / sqrt(abar_0) whatever the network's estimate; past the boundary the skip weight falls to 0 and f becomes the
    network's own estimate (c_out -> 1), already at the first point of a 32-step grid."""
    diffusion = diffusion_for(Prediction.EPS)
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    estimate = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    at_zero = consistency_x0(diffusion, estimate, x, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(at_zero, x / diffusion.alphas_cumprod[0].sqrt(), rtol=1e-12, atol=0)
    first = int(consistency_grid(T, 32)[1])
    sigmas = ve_sigma(diffusion.alphas_cumprod[[0, 1, first, 999]])
    c_skip, c_out = consistency_scalings(sigmas, sigmas[0])
    assert c_skip[0] == 1 and c_out[0] == 0 and 0.1 < c_skip[1] < 0.9  # a smooth boundary, one timestep wide
    assert c_skip[2] < 0.01 and c_out[2] > 0.99 and c_skip[3] < 1e-8
    at_width = consistency_scalings(torch.tensor(0.3 + BOUNDARY_WIDTH), torch.tensor(0.3))  # offset = w: by hand
    torch.testing.assert_close(at_width, (torch.tensor(0.5), torch.tensor(0.5**0.5)))


def test_the_consistency_grid_holds_the_students_sampling_points():
    """The boundary, then the trailing grid: a student sampled with DDIM at any divisor of N steps on the trailing
    spacing starts from points it was trained at."""
    assert consistency_grid(1000, 4).tolist() == [0, 249, 499, 749, 999]
    grid = set(consistency_grid(T, 32).tolist())
    for steps in (1, 2, 4, 8, 16, 32):
        assert set(spaced_timesteps(T, steps, student_sampler(steps).timestep_spacing)) <= grid
    for steps in (1, 2, 3, 5):  # up to T / 2 the points are distinct and after the boundary
        grid = consistency_grid(10, steps)
        assert grid[0] == 0 and bool((grid[1:] > grid[:-1]).all())
    with pytest.raises(ValueError, match="grid_steps must lie in"):
        consistency_grid(10, 6)


@pytest.mark.parametrize("prediction", list(Prediction))
def test_a_consistency_student_answers_in_its_networks_parameterisation(prediction):
    """``ConsistencyFunction`` called like the network returns the output whose x_0 estimate (the diffusion's own
    reading) is f; at the boundary that is the VE state, whatever the network."""
    diffusion = diffusion_for(prediction)
    torch.manual_seed(0)
    network = torch.nn.Conv2d(1, 1, 3, padding=1).double()
    student = ConsistencyFunction(lambda x_, t_: network(x_), diffusion)
    x, t = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 300, 700, 999])
    answer = student(x, t)
    f = student.x0(x, t)
    torch.testing.assert_close(diffusion.p_mean_variance(answer, x, t).pred_x0, f, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(f[0], x[0] / diffusion.alphas_cumprod[0].sqrt(), rtol=1e-12, atol=0)


def exact_consistency_function(diffusion: GaussianDiffusion, grid: list[int]) -> torch.nn.Module:
    """On Gaussian data the fixed point of consistency distillation with a DDIM teacher, f*(x, t_n) = the DDIM steps
    from t_n down to timestep 0 (as the VE state there), is affine in x with the product of the steps' coefficients
    (derived by hand): returned as an x0-predicting "network" whose estimate the skip scalings turn into f*."""
    abar = [float(diffusion.alphas_cumprod[index]) for index in grid]

    def fixed_point(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows = []
        for x_row, t_row in zip(x, t.tolist(), strict=True):
            n = grid.index(t_row)
            coefficient = math.prod(ddim_coefficient(abar[k], abar[k - 1]) for k in range(n, 0, -1))
            state = math.sqrt(abar[0]) * MEAN + coefficient * (x_row - math.sqrt(abar[n]) * MEAN)  # at timestep 0
            rows.append(state / math.sqrt(abar[0]))
        return torch.stack(rows)

    class Network(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            sigma = ve_sigma(abar_at(diffusion, t, x))
            c_skip, c_out = consistency_scalings(sigma, ve_sigma(abar_at(diffusion, torch.zeros_like(t), x)))
            estimate = (fixed_point(x, t) - c_skip * x / abar_at(diffusion, t, x).sqrt()) / c_out
            return torch.where(t.reshape(-1, 1, 1, 1) == 0, torch.zeros_like(x), estimate)  # f is x there anyway

    return Network()


def test_the_consistency_target_of_the_exact_fixed_point_is_the_fixed_point_itself():
    """The exact consistency function of the DDIM teacher's trajectories (Gaussian data): its target one teacher step
    earlier equals its own value at every interval, so as student and target network it has zero loss
    (:func:`consistency_distillation_loss` on a minibatch, Song et al. 2023, Algorithm 2); a student 1% off does
    not, and the loss reaches its parameter."""
    diffusion = diffusion_for(Prediction.X0)
    teacher = gaussian_oracle(diffusion, MEAN, STD, Prediction.X0)
    grid = consistency_grid(T, 8)
    exact = ConsistencyFunction(exact_consistency_function(diffusion, grid.tolist()), diffusion)
    x = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t, t_next = grid[:-1], grid[1:]  # every interval, one row each
    target = consistency_target(diffusion, teacher, exact.x0, x, t_next, t)
    assert consistency_loss(exact.x0(x, t_next), target).max().item() < 1e-24

    x0 = MEAN + STD * torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    loss = consistency_distillation_loss(diffusion, exact, exact, teacher, x0, grid, torch.Generator().manual_seed(7))
    assert loss.shape == (64,) and loss.max().item() < 1e-24
    scale = torch.ones((), dtype=torch.float64, requires_grad=True)
    network = exact.network
    off = ConsistencyFunction(lambda x_, t_: network(x_, t_) * (1 + 0.01 * scale), diffusion)
    loss = consistency_distillation_loss(diffusion, off, exact, teacher, x0, grid, torch.Generator().manual_seed(7))
    assert loss.mean() > 1e-8
    loss.mean().backward()
    assert scale.grad is not None and scale.grad.abs() > 0


def test_a_consistency_snapshot_is_sampled_through_its_skip_scalings(tmp_path):
    """A student's snapshot marked ``distilled.method: consistency`` builds as its consistency function (what samplers,
    the served model and evaluate call); its network, and any other snapshot, builds as the bare U-Net."""
    unet = UNetConfig(
        image_size=8,
        in_channels=1,
        base_channels=8,
        channel_mult=(1,),
        num_res_blocks=1,
        attention_resolutions=(),
        norm_groups=4,
    )
    config = DiffusionConfig(num_timesteps=T, prediction=Prediction.V)
    network = UNet(unet)
    for method, wrapped in (("consistency", True), ("progressive", False)):
        uri = str(tmp_path / method)
        save_snapshot(uri, network, unet, config, {"distilled": {"method": method, "steps": 1, "teacher": "t"}})
        snapshot = load_snapshot(uri)
        assert isinstance(snapshot.build_model(), ConsistencyFunction) is wrapped
        assert isinstance(snapshot.build_network(), UNet)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0, 999])
    with torch.no_grad():
        student = load_snapshot(str(tmp_path / "consistency")).build_model()
        f = student.x0(x, t)  # type: ignore[operator]
    torch.testing.assert_close(f[0], x[0] / GaussianDiffusion.from_config(config).alphas_cumprod[0].float().sqrt())


# ------------------------------------------------------------------------------- the distill stage's building blocks
@pytest.mark.parametrize("steps", [1, 2, 4, 16, 500])
def test_a_student_samples_on_the_grid_it_was_distilled_on(steps):
    """The sample stage draws a student with ``student_sampler`` (DDIM, trailing spacing): its timesteps are exactly
    the starts of the student's distillation grid."""
    sampler = student_sampler(steps)
    drawn = spaced_timesteps(T, steps, sampler.timestep_spacing)
    assert sorted(drawn, reverse=True) == student_grid(T, steps).starts.tolist()
    assert sampler.method is Method.DDIM and sampler.eta == 0.0


@pytest.mark.parametrize("target", [Prediction.X0, Prediction.V])
def test_a_teacher_answers_in_the_students_parameterisation(target):
    """``Reparameterized``: an eps network's x_0 and eps estimates, returned as the student predicts (v = sqrt(abar)
    eps - sqrt(1 - abar) x_0, Salimans & Ho 2022, Sec. 4), so the two share every distillation target."""
    source = diffusion_for(Prediction.EPS)
    torch.manual_seed(0)
    network = torch.nn.Conv2d(1, 1, 3, padding=1).double()
    x, t = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 10, 300, 700, 999])
    eps = network(x)
    x0 = source.p_mean_variance(eps, x, t).pred_x0
    expected = x0 if target is Prediction.X0 else source.v_target(x0, t, eps)
    answered = Reparameterized(lambda x_, t_: network(x_), source, target)(x, t)  # type: ignore[arg-type]
    torch.testing.assert_close(answered, expected, rtol=0, atol=1e-12)
    assert diffusion_for(target).p_mean_variance(answered, x, t).pred_x0.allclose(x0, atol=1e-10)


def test_a_round_anneals_its_learning_rate_linearly_to_zero():
    """Salimans & Ho 2022, App. E: the round's learning rate starts at its peak and falls linearly to 0."""
    objective = Progressive(diffusion_for(Prediction.V), torch.nn.Identity(), 8e-4, 1000, 4)
    assert [objective.learning_rate(seen) for seen in (0, 250, 500, 1000, 1200)] == pytest.approx(
        [8e-4, 6e-4, 4e-4, 0.0, 0.0]
    )


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["distill.teacher_steps=12"], "distill.teacher_steps 12 must be distill.steps 4 times a power of two"),
        (["distill.teacher_steps=4"], "distill.teacher_steps 4 must be distill.steps 4 times a power of two"),
        (["distill.prediction=eps"], "distill.prediction eps"),
        (["distill.method=rectified_flow"], "distill.method 'rectified_flow' is not one of"),
        (
            ["distill.method=consistency", "distill.steps=3"],
            "distill.teacher_steps 32 must be a multiple of distill.steps 3 for consistency distillation",
        ),
        (["distill.method=consistency", "distill.target_ema=1"], "distill.target_ema must lie in [0, 1), got 1"),
        (["distill.method=consistency", "distill.teacher_steps=512"], "distill.teacher_steps 512 exceeds 500"),
        (["distill.teacher_steps=2048"], "distill.teacher_steps 2048 exceeds diffusion.num_timesteps 1000"),
        (["distill.batch_size=127"], "distill.batch_size 127 must be a multiple of train.num_workers 2"),
    ],
)
def test_distill_settings_that_cannot_run_fail_before_anything_runs(overrides, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config("configs/digits-distill.yaml", overrides)


def test_the_default_rounds_fit_the_teachers_training_budget():
    """configs/digits-distill.yaml: rounds of 16, 8 and 4 steps within the teacher's 100,000 training images (issue
    33's budget), and the student is registered under a name of its own NFE."""
    config = load_config("configs/digits-distill.yaml")
    assert config.distill.rounds == (16, 8, 4)
    assert len(config.distill.rounds) * config.distill.images_per_round <= config.train.total_images
    assert registered_model_name(config) == "ddpm-digits-v-4step"
    assert registered_model_name(load_config("configs/digits.yaml")) == "ddpm-digits"
