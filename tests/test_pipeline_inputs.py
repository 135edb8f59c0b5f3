"""Bad input to the pipeline fails early: before Ray starts, with a message naming the problem, exit code 2."""

from pathlib import Path

import pytest
import ray
import torch

from ddpm_core.precision import autocast_dtype, cpu_has_native_bf16
from pipelines.__main__ import main
from pipelines.config import ConfigError
from pipelines.config_file import load_config
from tests.run_files import completed


@pytest.fixture
def local(tmp_path):
    return [f"storage.root={tmp_path / 'runs'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]


def run_cli(args, capsys):
    code = main(["run", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'; allowed keys under train: allow_long_run, batch_size"),
        ("sampler.steps=10", "unknown config key 'sampler'"),
        ("train.lr=abc", "train.lr: expected a number, got 'abc'"),
        ("train.lr=-1", "train.lr is out of range"),
        ("train.lr_decay_images=-5", "train.lr_decay_images is out of range: -5"),
        ("diffusion.schedule=warp", "diffusion.schedule: 'warp' is not one of linear, cosine"),
        ("diffusion.num_timesteps=1", "num_timesteps must be >= 2"),
        ("diffusion.schedule_params={logsnr_shift: 1}", "schedule 'linear' got unexpected parameters ['logsnr_shift']"),
        ("diffusion.schedule_params={beta_end: 2.0}", "diffusion.schedule_params: schedule 'linear' with {'beta_end'"),
        ("train.batch_size=3", "train.batch_size 3 must be a multiple of train.num_workers 2"),
        ("train.num_workers=[2, 1]", "train.num_workers [min, max] needs 1 <= min <= max, got [2, 1]"),
        ("train.num_workers=[1, 2, 4]", "train.num_workers: expected a number or [min, max] of two integers"),
        ("train.num_workers=[1, 3]", "train.batch_size 128 must be a multiple of train.num_workers 3 (its maximum"),
        ("train.elastic_resize_interval_s=-1", "train.elastic_resize_interval_s must be >= 0"),
        ("train.loss_weighting=min-snr", "train.loss_weighting 'min-snr' is not one of: none, min_snr, truncated_snr"),
        ("train.snr_gamma=0", "train.snr_gamma must be a positive number (min-SNR's clipping), got 0"),
        ("train.stf_reference=32", "train.stf_reference must be 0 (off) or at least the images of one share's micro"),
        ("train.stf_reference=-1", "train.stf_reference must be 0 (off) or at least the images of one share's micro"),
        ("train.stf_reference=many", "train.stf_reference: expected an integer, got 'many'"),
        ("train.loss_weighting=truncated_snr", "by 1/SNR = 24,777 (steps with SNR >= 1 by 1): train a v- or x0-"),
        ("train.ema_sigma_rel=0.5", "train.ema_sigma_rel: a number or a list of distinct numbers in (0, 0.2887]"),
        ("train.ema_sigma_rel=[0.1, 0.1]", "train.ema_sigma_rel: a number or a list of distinct numbers in (0, 0."),
        ("train.ema_sigma_rel=[]", "train.ema_sigma_rel: a number or a list of distinct numbers in (0, 0.2887]"),
        ("train.ema_sigma_rel=fast", "train.ema_sigma_rel: expected a number, got 'fast'"),
        ("train.ema_sigma_rel=[0.05, 0.1]", "chooses among EMAs reconstructed after training, which needs train.ema_"),
        ("train.ema_choice_images=0", "train.ema_choice_images must be > 0, got 0"),
        ("train.ema_choice=fid", "train.ema_choice 'fid' is not one of: bits_per_dim, loss"),
        ("train.ema_choice_timesteps=1", "train.ema_choice_timesteps must be in [2, 1000] (a Monte Carlo estimate"),
        ("train.ema_choice_tolerance=-1", "train.ema_choice_tolerance must be a number >= 0 (paired standard errors"),
        ("run_id=../escape", "no path separators"),
        ("sample.method=euler", "sample.method: 'euler' is not one of ancestral, ddim"),
        ("model.preset=imagenet", "model.preset 'imagenet' is not one of"),
        ("train.use_gpu=maybe", "train.use_gpu: expected true or false"),
        ("sample.compile_on_gpu=fast", "sample.compile_on_gpu: expected true or false"),
        ("evaluate.extractor=clip", "evaluate.extractor 'clip' is not one of: classifier, inception"),
        ("evaluate.extractor=inception", "needs evaluate.inception_weights_uri"),
        ("evaluate.inception_weights_sha256=xyz", "evaluate.inception_weights_sha256: expected 8 to 64 lowercase hex"),
        ("evaluate.nll_timesteps=1", "evaluate.nll_timesteps must be null (all terms) or in [2, 1000]"),
        ("evaluate.nll_split=valid", "evaluate.nll_split 'valid' is not one of: holdout, test"),
        ("evaluate.inception_score_splits=5000", "evaluate.inception_score_splits 5000 exceeds sample.num_samples"),
    ],
)
def test_config_errors_name_the_key(override, message, local, capsys):
    code, err = run_cli([*local, override], capsys)
    assert code == 2 and message in err
    assert not ray.is_initialized()


def test_config_file_errors(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    assert main(["run", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_precision_is_bf16_on_gpus_and_float32_on_cpus_unless_switched():
    config = load_config(None, [])
    assert (config.sample.precision(use_gpu=False), config.sample.precision(use_gpu=True)) == ("fp32", "bf16")
    assert (config.train.precision(use_gpu=False), config.train.precision(use_gpu=True)) == ("fp32", "bf16")
    fp32 = load_config(None, ["sample.bf16_on_gpu=false", "sample.compile_on_cpu=true", "train.bf16_on_gpu=false"])
    assert fp32.sample.precision(use_gpu=True) == "fp32" and fp32.sample.compiled(use_gpu=False)
    assert fp32.train.precision(use_gpu=True) == "fp32"
    for section in (config.train, config.sample):  # torch.compile: on GPUs by default, not on CPUs
        assert (section.compiled(use_gpu=False), section.compiled(use_gpu=True)) == (False, True)
    assert [autocast_dtype(config.sample.precision(use_gpu)) for use_gpu in (False, True)] == [None, torch.bfloat16]
    with pytest.raises(ValueError, match="precision 'fp16' is not one of fp32, bf16"):
        autocast_dtype("fp16")
    bf16 = load_config(None, ["sample.bf16_on_cpu=true", "train.bf16_on_cpu=true"])
    assert bf16.sample.precision(use_gpu=False) == bf16.train.precision(use_gpu=False) == "bf16"
    from pipelines.execution import Device
    from pipelines.training.job import TrainJob  # what the training workers are handed

    workers = [
        TrainJob(c.model.unet(), c.diffusion, c.train, Device.CPU, "shards", None, "work", {}, "tracking", "run")
        for c in (config, bf16)
    ]
    assert [autocast_dtype(job.precision) for job in workers] == [None, torch.bfloat16]


def test_bf16_on_a_cpu_without_bf16_units_is_named_with_its_setting():
    from pipelines.advice import slow_precision_advice

    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n"
    assert cpu_has_native_bf16(avx2) is False
    assert cpu_has_native_bf16(avx2.replace("fma", "fma avx512f avx512_bf16")) is True
    assert cpu_has_native_bf16(avx2.replace("fma", "fma amx_bf16 amx_tile")) is True
    assert cpu_has_native_bf16("processor\t: 0\nCPU implementer\t: 0x41\n") is None  # no flags line: cannot tell
    native, unknown = avx2.replace("fma", "fma avx512_bf16"), "processor\t: 0\nCPU implementer\t: 0x41\n"
    advice = slow_precision_advice("bf16", "cpu", "train.bf16_on_cpu", avx2)
    assert "train.bf16_on_cpu=true on a CPU without bf16 units" in advice and "set train.bf16_on_cpu=false" in advice
    assert slow_precision_advice("bf16", "cpu", "train.bf16_on_cpu", unknown) is None
    assert slow_precision_advice("bf16", "cpu", "train.bf16_on_cpu", native) is None
    assert slow_precision_advice("bf16", "cuda", "train.bf16_on_gpu", avx2) is None
    assert slow_precision_advice("fp32", "cpu", "train.bf16_on_cpu", avx2) is None


def test_yaml_and_overrides_resolve(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 2e-4\n  total_images: 5000\n")
    config = load_config(tmp_path / "c.yaml", ["train.total_images=6000", "model.overrides={dropout: 0.2}"])
    assert config.train.optim.lr == 2e-4 and config.train.total_images == 6000 and config.model.unet().dropout == 0.2
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["train.lr"])


def test_missing_data_uri_fails_before_ray_starts(tmp_path, local, capsys):
    code, err = run_cli([*local, f"data.uri={tmp_path / 'missing'}"], capsys)
    assert code == 2 and "does not exist" in err and str(tmp_path / "missing") in err
    assert not ray.is_initialized()
    assert not completed(tmp_path / "runs" / "quickstart", "prepare")  # nothing recorded as complete


def test_corrupt_data_fails_before_ray_starts(tmp_path, local, capsys):
    folder = tmp_path / "images" / "0"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    code, err = run_cli([*local, f"data.uri={tmp_path / 'images'}"], capsys)
    assert code == 2 and "corrupt or unreadable image" in err and "a.png" in err
    assert not ray.is_initialized()


def test_parquet_without_the_configured_image_column_fails_before_ray_starts(tmp_path, local, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"pixels": [b"x"], "label": [0]}), tmp_path / "train.parquet")
    code, err = run_cli([*local, f"data.uri={tmp_path / 'train.parquet'}"], capsys)
    assert code == 2 and "has no column 'image'" in err and "data.image_column" in err and "pixels, label" in err
    assert not ray.is_initialized()


def test_data_that_does_not_fit_the_model_is_rejected(tmp_path, local, capsys):
    import numpy as np

    np.savez(tmp_path / "big.npz", images=np.zeros((10, 16, 16, 3), np.uint8), labels=np.arange(10))
    code, err = run_cli([*local, f"data.uri={tmp_path / 'big.npz'}"], capsys)
    assert code == 2 and "16x16 images with 3 channel(s)" in err and "model.preset 'digits' expects 8x8" in err


def test_unreachable_s3_endpoint_fails_before_any_stage(tmp_path, capsys):
    code, err = run_cli(
        [
            "storage.root=s3://bucket/runs",
            "storage.endpoint_url=http://127.0.0.1:9",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        capsys,
    )
    assert code == 2 and "storage.root 's3://bucket/runs' is not writable" in err
    assert not ray.is_initialized()


def test_missing_s3_credentials_fail_before_any_stage(tmp_path, s3_bucket, s3_endpoint, monkeypatch, capsys):
    bucket, _ = s3_bucket
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    code, err = run_cli(
        [
            f"storage.root=s3://{bucket}/runs",
            f"storage.endpoint_url={s3_endpoint}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        capsys,
    )
    assert code == 2 and "is not writable" in err and "AWS_ACCESS_KEY_ID" in err
    assert "credentials" in err.lower()
    assert not ray.is_initialized()


def test_dag_command_prints_text_and_mermaid(capsys):
    assert main(["dag"]) == 0
    out = capsys.readouterr().out
    assert "prepare" in out and "flowchart LR" in out and "sample --> evaluate" in out


@pytest.mark.parametrize(
    "space, message",
    [
        ("{}", "tune.space is empty"),
        (
            "{train.lrr: {choice: [0.001]}}",
            "tune.space.train.lrr: value 0.001 is not a valid config: unknown config key 'train.lrr'",
        ),
        ("{train.lr: {choice: []}}", "tune.space.train.lr.choice: expected a non-empty list"),
        ("{train.lr: {uniform: [0.01, 0.001]}}", "low 0.01 > high 0.001"),
        ("{train.lr: {loguniform: [0, 0.001]}}", "bounds must be > 0"),
        (
            "{diffusion.schedule: {choice: [linear, warp]}}",
            "value 'warp' is not a valid config: diffusion.schedule: 'warp' is not one of",
        ),
        (
            "{train.loss_weighting: {choice: [none, min_snr, truncated_snr]}}",  # eps-prediction (the default)
            "value 'truncated_snr' is not a valid config: train.loss_weighting truncated_snr with diffusion.prediction",
        ),
        (
            "{train.ema_sigma_rel: {choice: [[0.05, 0.1], 0.2]}}",
            "tune.space.train.ema_sigma_rel: value [0.05, 0.1] is a post-hoc choice after training, which a trial",
        ),
        ("{train.lr: {normal: [0.001, 0.1]}}", "expected one of {choice: [...], grid: [...]"),
        ("{train.lr: {grid: [0.001]}}", "use 'grid' with tune.search_alg=grid"),
    ],
)
def test_bad_search_spaces_fail_before_any_trial(space, message, local, capsys):
    code, err = run_cli([*local, "tune.enabled=true", f"tune.space={space}"], capsys)
    assert code == 2 and message in err
    assert not ray.is_initialized()


def test_tune_needs_held_out_images(local, capsys):
    code, err = run_cli(
        [*local, "tune.enabled=true", "tune.space={train.lr: {choice: [0.001]}}", "data.holdout_fraction=0"], capsys
    )
    assert code == 2 and "tune.enabled needs data.holdout_fraction > 0" in err


def test_a_post_hoc_ema_choice_needs_held_out_images(local, capsys):
    posthoc = ["train.ema_profiles=[0.05, 0.1]", "train.ema_snapshot_every_images=5000"]
    code, err = run_cli([*local, *posthoc, "train.ema_sigma_rel=[0.05, 0.1]", "data.holdout_fraction=0"], capsys)
    assert code == 2 and "needs data.holdout_fraction > 0: the candidates are scored on held-out images" in err


def test_missing_inception_weights_fail_before_any_stage(tmp_path, local, capsys):
    missing = tmp_path / "models" / "pt_inception-2015-12-05-6726825d.pth"
    code, err = run_cli([*local, "evaluate.extractor=inception", f"evaluate.inception_weights_uri={missing}"], capsys)
    assert (
        code == 2 and "evaluate.extractor=inception" in err and "does not exist" in err and "docs/evaluation.md" in err
    )
    assert not ray.is_initialized()
    assert not list((tmp_path / "runs").rglob("stage.json")), "no stage may run, or be marked complete"


def test_nll_on_a_test_split_needs_one(local, capsys):
    code, err = run_cli([*local, "evaluate.nll_split=test"], capsys)
    assert code == 2 and "has no separate test split" in err
    assert not ray.is_initialized()


def test_an_unknown_from_stage_fails_before_anything(tmp_path, local, capsys):
    code, err = run_cli([*local, "--from", "trian"], capsys)
    assert code == 2 and "--from 'trian' is not a stage; stages: prepare, autoencoder, tune, train" in err
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()


# what a shipped config asks the user to set on the command line (the hash of their own copy of a model)
USER_PINNED = {"celebahq256-latent.yaml": ["autoencoder.weights_sha256=0123456789abcdef"]}


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_config_passes_the_checks_made_before_ray(path):
    """The configs in configs/ load, and their stages' checks pass (what `python -m pipelines run` checks before
    anything runs; their data and weights are not read here), given what they ask the user to set."""
    from pipelines.dag import check_config

    config = load_config(path, USER_PINNED.get(path.name, []))
    check_config(config)
    assert config.model.unet(config.model.num_classes or 10).image_size in (8, 32, 256)


@pytest.mark.parametrize("name", sorted(USER_PINNED))
def test_a_config_that_asks_for_a_hash_refuses_to_run_without_it(name):
    with pytest.raises(ConfigError, match="needs autoencoder.weights_sha256"):
        load_config(Path(__file__).resolve().parents[1] / "configs" / name, [])
