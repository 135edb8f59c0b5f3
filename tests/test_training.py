"""EMA, learning-rate warm-up, per-quartile losses, and a short real training run on the bundled digits."""

import json

import pytest
import torch

from ddpm_core.demo import train_and_sample
from ddpm_core.ema import EMA
from ddpm_core.samplers import SamplerConfig
from ddpm_core.training import OptimConfig, drop_labels, learning_rate, quartile_sums


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


def test_learning_rate_warms_up_linearly_in_images():
    config = OptimConfig(lr=2e-4, warmup_images=1000)
    assert learning_rate(0, config) == 0.0
    assert learning_rate(500, config) == pytest.approx(1e-4)
    assert learning_rate(5000, config) == pytest.approx(2e-4)


def test_quartile_sums_and_label_dropout():
    t = torch.tensor([0, 249, 250, 999, 998])
    sums, counts = quartile_sums(t, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), 1000)
    assert sums.tolist() == [3.0, 3.0, 0.0, 9.0] and counts.tolist() == [2.0, 1.0, 0.0, 2.0]
    labels = torch.arange(10).repeat(100)
    dropped = drop_labels(labels, null_class=10, probability=0.3, generator=torch.Generator().manual_seed(0))
    assert 0.25 < (dropped == 10).float().mean().item() < 0.35
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])


def test_short_training_run_on_digits_learns_the_data(tmp_path):
    """About 40 s of CPU training: the loss falls and samples have the data's pixel statistics."""
    summary = train_and_sample(tmp_path, train_images=24_000, batch_size=128, num_samples=100, seed=0,
                               sampler=SamplerConfig(method="ddim", num_steps=50), log_every=20)
    assert summary["last_logged_loss"] < 0.5 * summary["first_logged_loss"]
    assert summary["sample_pixel_mean"] == pytest.approx(summary["data_pixel_mean"], abs=0.05)
    assert summary["sample_pixel_std"] == pytest.approx(summary["data_pixel_std"], abs=0.06)
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["train_images"] >= 24_000


def test_an_allocation_failure_names_the_settings_to_change():
    from pipelines.stages.context import out_of_memory_advice

    with pytest.raises(MemoryError, match=r"out of memory in a training step \(128 images per worker\): lower train\.batch_size") as caught:
        with out_of_memory_advice("a training step (128 images per worker)", "lower train.batch_size (now 256)"):
            torch.empty(1 << 50)  # 4 PiB: the CPU allocator refuses it, as CUDA's refuses what does not fit
    assert "can't allocate memory" in str(caught.value) and isinstance(caught.value.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="unrelated"):  # other errors pass through unchanged
        with out_of_memory_advice("a training step", "lower train.batch_size"):
            raise RuntimeError("unrelated")
