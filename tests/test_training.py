"""EMA, learning-rate warm-up, per-quartile losses, the loss weighting of the pipeline's step, and a short real
training run on the bundled digits."""

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

from ddpm_core.demo import train_and_sample
from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion
from ddpm_core.ema import EMA
from ddpm_core.phema import PowerEMA, sigma_rel_to_gamma
from ddpm_core.samplers import SamplerConfig
from ddpm_core.training import OptimConfig, RunningTotals, StepResult, drop_labels, learning_rate, quartile_sums
from ddpm_core.unet import UNet
from pipelines.config import TrainSection
from pipelines.training.state import Worker, fresh_shares
from pipelines.training.step import StepState, step, step_parts
from tests.conftest import free_port
from tests.test_sampling import TINY as SAMPLING_TINY


def test_ema_update_is_the_exponential_average():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    start = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, 0.9 * start + 0.1 * model.weight)
    restored = EMA(torch.nn.Linear(3, 2), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    torch.testing.assert_close(restored.model.weight, ema.model.weight)
    assert (restored.decay, restored.warmup, restored.num_updates) == (0.9, False, 1)


def test_ema_warmup_follows_tensorflow_num_updates():
    ema = EMA(torch.nn.Linear(1, 1), decay=0.9999, warmup=True)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update(torch.nn.Linear(1, 1))
    assert decays == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.9999


def test_an_ema_of_a_sigma_rel_is_the_power_function_ema_of_that_width():
    """``EMA(sigma_rel=...)`` (``train.ema_sigma_rel``, tracked in training) averages as ddpm_core.phema.PowerEMA
    does at a constant batch (Karras et al. 2024, Eq. 127), resumes only as an EMA of the same width, and ignores
    the fixed decay."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema, power = EMA(model, decay=0.5, warmup=False, sigma_rel=0.1), PowerEMA(model, (0.1,))
    for step_index in range(1, 41):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        ema.update(model)
        power.update(model, step_index * 16, 16)
    for ours, reference in zip(ema.model.parameters(), power.emas[0].parameters(), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)
    assert ema.current_decay() == pytest.approx((1 - 1 / 41) ** (sigma_rel_to_gamma(0.1) + 1))
    resumed = EMA(torch.nn.Linear(3, 2), sigma_rel=0.1)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.num_updates == 40 and torch.equal(resumed.model.weight, ema.model.weight)
    with pytest.raises(ValueError, match="sigma_rel 0.1, this one of 0.2"):
        EMA(torch.nn.Linear(3, 2), sigma_rel=0.2).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="sigma_rel 0.1, this one of None"):
        EMA(torch.nn.Linear(3, 2)).load_state_dict(ema.state_dict())


def test_the_pipelines_step_tracks_the_ema_train_ema_sigma_rel_names():
    network = torch.nn.Linear(2, 2)
    parts = step_parts(network, TrainSection(num_workers=1, ema_sigma_rel=[0.07]), torch.device("cpu"), no_wrap)
    assert parts[2].sigma_rel == 0.07 and parts[2].gamma == pytest.approx(sigma_rel_to_gamma(0.07))
    fixed = step_parts(network, TrainSection(num_workers=1), torch.device("cpu"), no_wrap)[2]
    assert fixed.sigma_rel is None and fixed.decay == 0.999


def no_wrap(model: torch.nn.Module, options: dict) -> torch.nn.Module:
    return model


def test_learning_rate_warms_up_linearly_in_images():
    config = OptimConfig(lr=2e-4, warmup_images=1000)
    assert learning_rate(0, config) == 0.0
    assert learning_rate(500, config) == pytest.approx(1e-4)
    assert learning_rate(5000, config) == pytest.approx(2e-4)


def test_learning_rate_decays_as_the_inverse_square_root_after_its_reference():
    config = OptimConfig(lr=1e-3, warmup_images=1000, lr_decay_images=4000)
    assert learning_rate(500, config) == pytest.approx(5e-4)  # the warm-up is unchanged
    assert learning_rate(4000, config) == pytest.approx(1e-3)  # constant up to t_ref
    assert learning_rate(16000, config) == pytest.approx(5e-4)  # lr / sqrt(16000 / 4000)
    assert learning_rate(400_000, config) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="lr_decay_images"):
        OptimConfig(lr_decay_images=-1)


def test_quartile_sums_and_label_dropout():
    t = torch.tensor([0, 249, 250, 999, 998])
    sums, counts = quartile_sums(t, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), 1000)
    assert sums.tolist() == [3.0, 3.0, 0.0, 9.0] and counts.tolist() == [2.0, 1.0, 0.0, 2.0]
    labels = torch.arange(10).repeat(100)
    dropped = drop_labels(labels, null_class=10, probability=0.3, generator=torch.Generator().manual_seed(0))
    assert 0.25 < (dropped == 10).float().mean().item() < 0.35
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])


def step_result(loss: float, grad_norm: float, t: list[int], per_example: list[float]) -> StepResult:
    sums, counts = quartile_sums(torch.tensor(t), torch.tensor(per_example), 1000)
    return StepResult(torch.tensor(loss), torch.tensor(grad_norm), sums, counts)


def sum_two_workers(rank: int, port: int, results_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    totals = RunningTotals(torch.device("cpu"), dist.all_reduce)
    if rank == 0:  # two steps on worker 0 ...
        totals.add(step_result(1.0, 10.0, [0, 999], [0.5, 1.5]))
        totals.add(step_result(2.0, 20.0, [300, 600], [1.0, 3.0]))
    else:  # ... and two on worker 1, one of them non-finite
        totals.add(step_result(3.0, 30.0, [100, 200], [2.0, 4.0]))
        totals.add(step_result(float("nan"), 40.0, [900, 950], [float("nan"), 1.0]))
    checkpoint_window = totals.summed()  # a checkpoint step: the window goes on
    totals.add(step_result(5.0, 50.0, [0], [5.0]))
    first = totals.summed()
    totals.restart()  # a log step: a new window, the first one's sums are gone
    totals.add(step_result(rank + 1.0, 1.0, [0], [rank + 1.0]))
    second = totals.summed()
    if rank == 0:
        with open(results_path, "w") as out:
            json.dump(
                [checkpoint_window.loss_sum, checkpoint_window.steps, first.loss_sum, first.means(), second.means()],
                out,
            )
    dist.destroy_process_group()


def test_running_totals_are_the_means_over_steps_and_workers(tmp_path):
    results = tmp_path / "totals.json"
    torch.multiprocessing.spawn(sum_two_workers, args=(free_port(), str(results)), nprocs=2)
    checkpoint_loss_sum, checkpoint_steps, first_loss_sum, first, second = json.loads(results.read_text())
    assert math.isnan(checkpoint_loss_sum) and checkpoint_steps == 4, (
        "a non-finite step on any worker shows in every worker's loss sum"
    )
    assert math.isnan(first_loss_sum), "reading the sums at a checkpoint step does not end the window"
    assert math.isnan(first["loss"]) and first["grad_norm"] == pytest.approx((10 + 20 + 30 + 40 + 50 + 50) / 6)
    assert first["loss_q0"] == pytest.approx((0.5 + 2.0 + 4.0 + 5.0 + 5.0) / 5)  # t = 0, 100, 200, 0, 0
    assert first["loss_q1"] == pytest.approx(1.0)  # t = 300
    assert first["loss_q2"] == pytest.approx(3.0)  # t = 600
    assert math.isnan(first["loss_q3"])  # t = 999, 900 (nan), 950
    assert second == {"loss": 1.5, "grad_norm": 1.0, "loss_q0": 1.5}, "quartiles without a step are left out"


def test_short_training_run_on_digits_learns_the_data(tmp_path):
    """About 40 s of CPU training: the loss falls and samples have the data's pixel statistics."""
    summary = train_and_sample(
        tmp_path,
        train_images=24_000,
        batch_size=128,
        num_samples=100,
        seed=0,
        sampler=SamplerConfig(method="ddim", num_steps=50),
        log_every=20,
    )
    assert summary["last_logged_loss"] < 0.5 * summary["first_logged_loss"]
    assert summary["sample_pixel_mean"] == pytest.approx(summary["data_pixel_mean"], abs=0.05)
    assert summary["sample_pixel_std"] == pytest.approx(summary["data_pixel_std"], abs=0.06)
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["train_images"] >= 24_000


def test_an_allocation_failure_names_the_settings_to_change():
    from pipelines.advice import out_of_memory_advice

    with (
        pytest.raises(
            MemoryError, match=r"out of memory in a training step \(128 images per worker\): lower train\.batch_size"
        ) as caught,
        out_of_memory_advice("a training step (128 images per worker)", "lower train.batch_size (now 256)"),
    ):
        torch.empty(1 << 50)  # 4 PiB: the CPU allocator refuses it, as CUDA's refuses what does not fit
    assert "can't allocate memory" in str(caught.value) and isinstance(caught.value.__cause__, RuntimeError)
    with (
        pytest.raises(RuntimeError, match="unrelated"),  # other errors pass through unchanged
        out_of_memory_advice("a training step", "lower train.batch_size"),
    ):
        raise RuntimeError("unrelated")


@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_the_training_step_weights_the_loss_as_train_loss_weighting_says(weighting):
    """The pipeline's step (pipelines.training.step) trains on the weighted loss ``train.loss_weighting`` names: its
    loss is the batch mean of the per-example MSE times min(SNR(t), gamma) / SNR(t) for an eps-predicting network
    (Hang et al. 2023), with t and the noise drawn from the share's stream as the step draws them. (gamma 0.5: most
    of the 100 steps have an SNR above it, so the weights differ from 1.)"""
    train = TrainSection(
        num_workers=1, batch_size=8, loss_weighting=weighting, snr_gamma=0.5, optim=OptimConfig(warmup_images=0)
    )
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=100))
    torch.manual_seed(0)
    device = torch.device("cpu")
    parts = step_parts(UNet(SAMPLING_TINY), train, device, lambda model, options: model)
    state = StepState(*parts, fresh_shares(0, Worker(0, 1, device, None, 1, (0,)), 0), gradient_scale=1.0)
    x0 = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1  # [8, 1, 8, 8]
    generator = torch.Generator().set_state(state.shares[0].generator.get_state())  # the step's draws, replayed
    t = torch.randint(0, 100, (8,), generator=generator)  # [8]
    noise = torch.randn(x0.shape, generator=generator)  # [8, 1, 8, 8]
    with torch.no_grad():
        mse = diffusion.training_losses(state.model, x0, t, noise)["mse"]  # [8], unweighted
    snr = diffusion.alphas_cumprod[t] / (1 - diffusion.alphas_cumprod[t])  # [8] float64
    weights = snr.clamp(max=0.5) / snr if weighting == "min_snr" else torch.ones_like(snr)
    assert weighting == "none" or (weights < 0.9).any(), weights
    result = step(state, diffusion, [(x0, None)], train, None)
    assert result.loss.item() == pytest.approx((mse.double() * weights).mean().item(), rel=1e-5)
