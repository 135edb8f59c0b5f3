"""Loss weighting (ddpm_core.loss_weighting): the same x_0-space weighting for every prediction, the weights of the
linear schedule by hand, NONE leaves L_simple as it was, gradients, and the checks of bad values."""

import math

import pytest
import torch

from ddpm_core.diffusion import GaussianDiffusion, Loss, Prediction, Variance
from ddpm_core.fields import FieldError
from ddpm_core.loss_weighting import LossWeighting, Weighting, loss_weights
from ddpm_core.schedules import make_betas
from ddpm_core.training import accumulate_gradients

T = 1000
# Both sides of SNR = 5 and of SNR = 1 on the linear schedule: SNR(100) ~ 8.5, SNR(150) ~ 3.7, SNR(300) ~ 0.65.
STEPS = [0, 1, 10, 100, 150, 300, 500, 999]


def diffusion_for(prediction: Prediction, loss: Loss = Loss.SIMPLE, variance: Variance = Variance.FIXED_LARGE):
    return GaussianDiffusion(make_betas("linear", T), prediction, variance, loss)


def snr_by_hand(step: int) -> float:
    """SNR(t) = abar_t / (1 - abar_t) of the linear schedule (beta 1e-4 ... 0.02), from the betas in plain floats."""
    abar = math.prod(1.0 - (1e-4 + (0.02 - 1e-4) * s / (T - 1)) for s in range(step + 1))
    return abar / (1.0 - abar)


def outputs_of_one_x0_estimate(diffusion: GaussianDiffusion, x0_hat: torch.Tensor):
    """A network whose output, in ``diffusion``'s parameterisation, is the one x_0 estimate ``x0_hat`` ``[B,C,H,W]``."""

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps_hat = diffusion.eps_from_x0(x_t, t, x0_hat)
        if diffusion.prediction is Prediction.EPS:
            return eps_hat
        if diffusion.prediction is Prediction.X0:
            return x0_hat
        return diffusion.v_target(x0_hat, t, eps_hat)

    return model


class TimeConv(torch.nn.Module):
    """A 1x1 convolution scaled by a function of t: ``model(x_t [B,C,H,W], t [B]) -> [B, out, H, W]``."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, out_channels, 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(x_t) * torch.tanh(t.float() / T + 0.1)[:, None, None, None]


@pytest.mark.parametrize("kind", [Weighting.MIN_SNR, Weighting.TRUNCATED_SNR])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_prediction_gives_the_same_x0_space_loss(kind, seed):
    """The weighted loss of one x_0 estimate is w(t) ||x_0 - x0_hat||^2 whether the network outputs eps, x_0 or v."""
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(len(STEPS), 3, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1
    x0_hat = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = torch.tensor(STEPS)
    weighting = LossWeighting(kind, gamma=5.0)
    snr = torch.tensor([snr_by_hand(step) for step in STEPS], dtype=torch.float64)  # [B]
    x0_weight = snr.clamp(max=5.0) if kind is Weighting.MIN_SNR else snr.clamp(min=1.0)
    expected = x0_weight * ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3))  # [B]
    for prediction in Prediction:
        diffusion = diffusion_for(prediction)
        model = outputs_of_one_x0_estimate(diffusion, x0_hat)
        loss = diffusion.training_losses(model, x0, t, noise, weighting=weighting)["loss"]
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10, msg=f"{prediction.value}")


@pytest.mark.parametrize(
    ("kind", "prediction", "expected"),
    [
        (Weighting.MIN_SNR, Prediction.EPS, lambda snr: min(snr, 5.0) / snr),
        (Weighting.MIN_SNR, Prediction.X0, lambda snr: min(snr, 5.0)),
        (Weighting.MIN_SNR, Prediction.V, lambda snr: min(snr, 5.0) / (snr + 1)),
        (Weighting.TRUNCATED_SNR, Prediction.EPS, lambda snr: max(snr, 1.0) / snr),
        (Weighting.TRUNCATED_SNR, Prediction.X0, lambda snr: max(snr, 1.0)),
        (Weighting.TRUNCATED_SNR, Prediction.V, lambda snr: max(snr, 1.0) / (snr + 1)),
    ],
)
def test_weights_of_the_linear_schedule_by_hand(kind, prediction, expected):
    """At known t: min-SNR for eps is min(SNR, 5) / SNR, i.e. 5 / 9999 at t = 0 and 1 once SNR < 5."""
    diffusion = diffusion_for(prediction)
    t = torch.tensor(STEPS)
    snr = diffusion.snr(t, torch.zeros((), dtype=torch.float64))  # [B]
    by_hand = torch.tensor([expected(snr_by_hand(step)) for step in STEPS], dtype=torch.float64)
    torch.testing.assert_close(snr, torch.tensor([snr_by_hand(step) for step in STEPS], dtype=torch.float64))
    torch.testing.assert_close(loss_weights(LossWeighting(kind), snr, prediction), by_hand, rtol=1e-12, atol=0)
    if kind is Weighting.MIN_SNR and prediction is Prediction.EPS:
        assert by_hand[0].item() == pytest.approx(5.0 / 9999.0) and by_hand[STEPS.index(150) :].eq(1.0).all()


@pytest.mark.parametrize(
    ("loss", "variance"),
    [(Loss.SIMPLE, Variance.FIXED_LARGE), (Loss.HYBRID, Variance.LEARNED_RANGE), (Loss.VLB, Variance.LEARNED_RANGE)],
)
@pytest.mark.parametrize("prediction", list(Prediction))
def test_none_leaves_the_losses_bit_for_bit(loss, variance, prediction):
    diffusion = diffusion_for(prediction, loss, variance)
    torch.manual_seed(0)
    model = TimeConv(3, 6 if variance is Variance.LEARNED_RANGE else 3)
    x0, noise, t = torch.rand(5, 3, 4, 4) * 2 - 1, torch.randn(5, 3, 4, 4), torch.tensor([0, 3, 250, 600, 999])
    plain = diffusion.training_losses(model, x0, t, noise)
    for none in (LossWeighting(), LossWeighting("none", gamma=0.5)):
        weighted = diffusion.training_losses(model, x0, t, noise, weighting=none)
        assert plain.keys() == weighted.keys()
        for key in plain:
            assert torch.equal(plain[key], weighted[key]), key


@pytest.mark.parametrize(
    ("loss", "variance"), [(Loss.SIMPLE, Variance.FIXED_LARGE), (Loss.HYBRID, Variance.LEARNED_RANGE)]
)
def test_weighted_gradient_equals_the_manually_weighted_one(loss, variance):
    """accumulate_gradients with a weighting: the gradient of mean(w * mse) (+ the unchanged VLB part); mse stays
    unweighted in the terms. The step's draws of t and eps are repeated from the same seed."""
    diffusion = diffusion_for(Prediction.EPS, loss, variance)
    weighting = LossWeighting("min_snr", gamma=2.0)
    torch.manual_seed(0)
    net = TimeConv(1, 2 if variance is Variance.LEARNED_RANGE else 1)
    x0 = torch.rand(16, 1, 4, 4) * 2 - 1

    result = accumulate_gradients(
        net, diffusion, x0, None, torch.Generator().manual_seed(7), None, 1.0, weighting=weighting
    )
    weighted_grads = [p.grad.clone() for p in net.parameters()]

    net.zero_grad()
    generator = torch.Generator().manual_seed(7)
    t = torch.randint(0, T, (16,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    terms = diffusion.training_losses(net, x0, t, noise)
    snr = torch.tensor([snr_by_hand(step) for step in t.tolist()], dtype=torch.float32)  # [B]
    by_hand = terms["mse"] * (snr.clamp(max=2.0) / snr)
    if loss is Loss.HYBRID:
        by_hand = by_hand + diffusion.vlb_weight * T * terms["vb"]
    by_hand.mean().backward(retain_graph=True)
    torch.testing.assert_close(result.loss, by_hand.mean().detach())
    for weighted, manual in zip(weighted_grads, (p.grad for p in net.parameters()), strict=True):
        torch.testing.assert_close(weighted, manual)
    assert not torch.allclose(weighted_grads[0], torch.autograd.grad(terms["loss"].mean(), net.conv.weight)[0])


def test_weighting_values_and_their_errors():
    assert LossWeighting("truncated_snr", 2).kind is Weighting.TRUNCATED_SNR
    weighting = LossWeighting(Weighting.MIN_SNR, gamma=3.0)
    assert weighting.to_dict() == {"kind": "min_snr", "gamma": 3.0}
    assert LossWeighting(**weighting.to_dict()) == weighting
    with pytest.raises(FieldError, match=r"loss_weighting\.kind: 'p2' is not one of none, min_snr, truncated_snr"):
        LossWeighting("p2")
    for gamma in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(FieldError, match=r"loss_weighting\.gamma is out of range"):
            LossWeighting(Weighting.MIN_SNR, gamma=gamma)
