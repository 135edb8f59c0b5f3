"""The whole plan is checked before the first stage (issue 29): a training plan estimated to take longer than
``LONG_RUN_DAYS`` is refused before Ray starts unless ``train.allow_long_run``, and so are intervals that would make
more checkpoints, sample grids or log points than allowed; and the registered pyfunc samples a request batch after
batch, with the same images whatever the batch size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch

from ddpm_core.checkpoint import save_snapshot
from ddpm_core.diffusion import DiffusionConfig
from ddpm_core.unet import PRESETS, UNet, unet_preset
from pipelines.__main__ import main
from pipelines.config import LONG_RUN_DAYS, ConfigError, training_flops_per_image
from pipelines.config_file import load_config
from pipelines.dag import check_config
from pipelines.registry.serving import DEFAULTS

ABSURD = "train.total_images=1000000000000000"  # 1e15 images
REPO = Path(__file__).resolve().parents[1]
# intervals of few events in any plan here: the checkpoint and log intervals' own limits are tested apart
QUIET = (
    "train.checkpoint_every_images=10000000000000",
    "train.grid_every_images=0",
    "train.log_every_images=10000000000000",
    "train.ema_profiles=[]",  # no post-hoc EMA snapshots (their limit is tested in tests/test_posthoc_ema_pipeline.py)
    "train.ema_snapshot_every_images=0",
    "train.ema_sigma_rel=null",
    "sample.autoguidance_weight=1",  # the quickstart's guide is one of those snapshots
)


@pytest.fixture
def local(tmp_path):
    return [f"storage.root={tmp_path / 'runs'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]


def test_an_absurd_training_plan_is_refused_before_ray_starts(local, capsys):
    code = main(["run", *local, ABSURD])
    err = capsys.readouterr().err
    assert code == 2, err
    assert (
        "train.total_images 1,000,000,000,000,000 would train for at least 90,422 days, an optimistic estimate" in err
    )
    assert "7,812,500,000,000 optimizer steps (train.total_images / train.batch_size 128) at 1 ms each" in err
    assert "At most 331,776,000,000 images fit in 30 days" in err and "train.allow_long_run=true" in err
    assert "Traceback" not in err and not ray.is_initialized()


def test_the_switch_lets_a_long_plan_through_every_check():
    config = load_config("configs/digits.yaml", [ABSURD, "train.allow_long_run=true", *QUIET])
    check_config(config)  # every enabled stage's check passes: only the estimate is waived
    assert config.train.total_images == 10**15


def test_the_estimate_counts_the_models_flops_and_names_them():
    """The cifar10 preset's counted FLOPs are the 37.3 GFLOP per image that docs/benchmarks.md measured for a whole
    training step; with few steps (a huge batch), the FLOP bound refuses and says so."""
    assert training_flops_per_image(PRESETS["cifar10"]) == pytest.approx(37.32e9, rel=0.01)
    with pytest.raises(ConfigError) as refused:
        load_config("configs/cifar10.yaml", ["train.total_images=10000000000000", "train.batch_size=1048576"])
    message = str(refused.value)
    assert "1,250,000,000,000 images per worker (train.num_workers 8) of 37.3 GFLOP each" in message
    assert "model.preset 'cifar10'" in message and "spread it over more workers (train.num_workers)" in message


@pytest.mark.parametrize(
    "path, rate",
    [
        ("configs/digits.yaml", 3_436),
        ("configs/cifar10.yaml", 3_436),
        # no rate measured at 256x256: the cifar10 rate scaled by the FLOP ratio (the same utilisation)
        ("configs/celebahq256.yaml", 3_436 * 37.32 / 1_491.1),
    ],
    ids=["digits", "cifar10", "celebahq256"],
)
def test_a_plan_the_fastest_measured_rate_finishes_in_time_is_never_refused(path, rate):
    """The bounds are optimistic: what 8 workers at the fastest rate measured (3,436 img/s per H200, cifar10 preset,
    docs/benchmarks.md) train in LONG_RUN_DAYS is accepted."""
    images = int(rate * 8 * LONG_RUN_DAYS * 86_400)
    config = load_config(path, [f"train.total_images={images}", "train.num_workers=8", "train.batch_size=128", *QUIET])
    assert config.train.total_images == images


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["train.total_images=2000000", "train.checkpoint_every_images=1"],
            "train.checkpoint_every_images 1 makes 15,625 checkpoints (each a committed copy of the whole training "
            "state) in train.total_images 2,000,000 (train.batch_size 128): at most 10,000 are allowed; "
            "use train.checkpoint_every_images >= 200",
        ),
        (
            ["train.total_images=2000000", "train.grid_every_images=128"],
            "train.grid_every_images 128 makes 15,625 sample grids",
        ),
        (
            ["train.total_images=200000000", "train.log_every_images=128", "train.checkpoint_every_images=100000"],
            "train.log_every_images 128 makes 1,562,500 log points",
        ),
    ],
)
def test_intervals_that_make_too_many_events_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as refused:
        load_config("configs/digits.yaml", overrides)
    assert message in str(refused.value)


# The registered pyfunc, saved and loaded as MLflow does (models from code: pipelines/registry/serving.py).


def saved_pyfunc(directory, num_classes=None, model_config=None, batch_size_param=True):
    """A tiny snapshot (digits preset, 16 channels, 100 timesteps) saved as the register stage logs it, with
    ``batch_size`` among the signature's params (default 64) if ``batch_size_param``."""
    import mlflow
    from mlflow.models import infer_signature

    unet = unet_preset("digits", base_channels=16, num_classes=num_classes)
    torch.manual_seed(0)
    save_snapshot(str(directory / "snapshot"), UNet(unet), unet, DiffusionConfig(num_timesteps=100))
    example = pd.DataFrame({"index": [0, 1]} | ({"label": [0, 1]} if num_classes else {}))
    params = {**DEFAULTS, **({"batch_size": 64} if batch_size_param else {})}
    params |= {"guidance_scale": 1.0} if num_classes else {}
    signature = infer_signature(example, np.zeros((2, 8, 8, 1), np.uint8), params=params)
    mlflow.pyfunc.save_model(
        str(directory / "model"),
        python_model=str(REPO / "pipelines" / "registry" / "serving.py"),
        artifacts={"snapshot": str(directory / "snapshot")},
        signature=signature,
        model_config=model_config,
        pip_requirements=["torch"],
    )
    return str(directory / "model")


def rows_per_call(model):
    """Wraps the loaded pyfunc's network; returns the list of batch sizes it is called with."""
    inner = model.unwrap_python_model()
    network, sizes = inner.model, []

    def counted(x, *args, **kwargs):
        sizes.append(x.shape[0])
        return network(x, *args, **kwargs)

    inner.model = counted
    return sizes


@pytest.fixture(scope="module")
def pyfunc_uri(tmp_path_factory):
    return saved_pyfunc(tmp_path_factory.mktemp("pyfunc"))


@pytest.mark.parametrize("params", [{}, {"method": "ancestral"}, {"progressive_frames": 3}])
def test_the_pyfunc_samples_in_batches_with_the_images_of_one_batch(pyfunc_uri, params):
    import mlflow

    model = mlflow.pyfunc.load_model(pyfunc_uri)
    sizes, rows = rows_per_call(model), pd.DataFrame({"index": range(10)})
    common = {"num_steps": 4, "seed": 3, **params}
    whole = model.predict(rows, params={**common, "batch_size": 10})
    assert set(sizes) == {10}
    sizes.clear()
    batched = model.predict(rows, params={**common, "batch_size": 4})
    assert sorted(set(sizes)) == [2, 4]  # the network never sees more rows than the batch size
    assert batched.dtype == np.uint8 and batched.shape == whole.shape
    assert np.array_equal(batched, whole)  # bit for bit: row i's noise depends on (seed, i) alone


def test_the_batch_size_comes_from_the_model_config_and_is_checked(tmp_path):
    import mlflow

    """A model logged with a model config (as the register stage logs conditional ones) takes the batch size at
    load time; without ``batch_size`` among its signature's params (MLflow would fill in that default)."""
    uri = saved_pyfunc(tmp_path, model_config={"batch_size": 64}, batch_size_param=False)
    model = mlflow.pyfunc.load_model(uri, model_config={"batch_size": 3})
    sizes = rows_per_call(model)
    model.predict(pd.DataFrame({"index": range(7)}), params={"num_steps": 2})
    assert sizes == [3, 3, 3, 3, 1, 1]  # two steps of each batch of at most 3 rows
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="batch_size \\(params\\) must be a positive integer"):
            model.unwrap_python_model().predict(None, pd.DataFrame({"index": [0]}), params={"batch_size": bad})
    with pytest.raises(Exception, match="batch_size \\(model_config\\) must be a positive integer"):
        mlflow.pyfunc.load_model(uri, model_config={"batch_size": 0})


def test_a_conditional_pyfunc_gives_the_same_images_in_batches(tmp_path):
    import mlflow

    model = mlflow.pyfunc.load_model(saved_pyfunc(tmp_path, num_classes=3))
    rows = pd.DataFrame({"index": range(7), "label": [0, 1, 2, 0, 1, 2, 0]})
    common = {"num_steps": 3, "guidance_scale": 1.5}
    whole = model.predict(rows, params={**common, "batch_size": 7})
    assert np.array_equal(model.predict(rows, params={**common, "batch_size": 3}), whole)


def test_the_pyfunc_and_its_signature_have_the_same_sampling_defaults():
    """serving.py is the model's own code and imports no pipeline module, so register.py states the defaults again
    for the signature: the two must not drift."""
    from pipelines.stages.register import SAMPLING_PARAMS

    assert SAMPLING_PARAMS == DEFAULTS
