"""What a new user gets wrong fails early and by name (docs/reliability.md): before Ray starts with exit code 2
where the input can be checked then, and within a bounded time (tested with a deadline, not waited out) where a
server has to be asked."""

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from ddpm_core import storage
from ddpm_core.checkpoint import save_snapshot
from ddpm_core.diffusion import DiffusionConfig
from ddpm_core.unet import UNet, unet_preset
from pipelines import preflight
from pipelines.__main__ import main
from pipelines.config_file import load_config
from pipelines.dag import STAGES, external_for
from pipelines.plan import plan
from pipelines.preflight import STORAGE_DEADLINE_S
from pipelines.runs import RunStore
from tests.run_files import completed
from tests.services import silent_server
from tests.test_deadlines import SHORT

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def local(tmp_path):
    return [f"storage.root={tmp_path / 'runs'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]


def run_cli(args, capsys, command="run"):
    started = time.time()
    code = main([command, *args])
    captured = capsys.readouterr()
    return code, captured.err, captured.out, time.time() - started


@pytest.mark.parametrize(
    "override, message",
    [
        ("sample.seed=-1", "sample.seed must be >= 0, got -1"),
        ("train.seed=-1", "train.seed must be >= 0, got -1"),
        ("register.model_name=team/ddpm:v1", "register.model_name 'team/ddpm:v1' must be a non-empty name without '/'"),
        ("data.split=tset", "data.split 'tset' is not one of: train, test"),
        ("model.overrides.chanels=64", "unknown config key 'model.overrides.chanels'"),
    ],
)
def test_more_config_errors_name_the_key(override, message, local, capsys):
    code, err, _, _ = run_cli([*local, override], capsys)
    assert code == 2 and message in err, err
    assert not ray.is_initialized()


def test_an_absurd_sampling_plan_is_refused(local, capsys):
    code, err, _, _ = run_cli([*local, "sample.num_samples=1000000", "sample.batch_size=1"], capsys)
    assert code == 2 and "cuts sample.num_samples 1000000 into 1000000 shards" in err
    assert "use sample.batch_size >= 100" in err


def test_a_config_file_holding_a_scalar_is_named(tmp_path, local, capsys):
    (tmp_path / "scalar.yaml").write_text("3\n")
    code, err, _, _ = run_cli(["--config", str(tmp_path / "scalar.yaml"), *local, "train.lr=0.001"], capsys)
    assert code == 2 and "must hold a mapping of sections" in err


def test_from_a_disabled_stage_is_refused(local, capsys):
    code, err, _, _ = run_cli([*local, "--from", "tune"], capsys)
    assert code == 2 and "--from tune: the tune stage is disabled in this config (tune.enabled is false)" in err


def test_a_truncated_npz_is_named(tmp_path, local, capsys):
    buffer = io.BytesIO()
    np.savez(buffer, images=np.zeros((50, 8, 8, 1), np.uint8), labels=np.arange(50) % 10)
    (tmp_path / "data.npz").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    code, err, _, _ = run_cli([*local, f"data.uri={tmp_path / 'data.npz'}"], capsys)
    assert code == 2 and "data.npz: not a readable .npy/.npz file" in err and "Traceback" not in err
    assert not ray.is_initialized()


def test_a_data_set_too_small_for_the_scores_fails_in_prepare(tmp_path, local, capsys):
    """What the scores need of the splits is checked as soon as prepare has made them, before any Ray work: only the
    prepare stage may have finished."""
    np.savez(tmp_path / "three.npz", images=np.zeros((3, 8, 8, 1), np.uint8), labels=np.arange(3))
    code, err, _, _ = run_cli([*local, f"data.uri={tmp_path / 'three.npz'}"], capsys)
    assert code == 2 and "leaves 3 training and 0 hold-out images" in err
    assert "precision/recall's k-nearest neighbours" in err and "the NLL bound (evaluate.nll" in err
    assert not ray.is_initialized()
    run_root = tmp_path / "runs" / "quickstart"
    assert not [stage.name for stage in STAGES if stage.name != "prepare" and completed(run_root, stage.name)]


def test_init_from_must_name_a_snapshot_of_this_model(tmp_path, local, capsys):
    code, err, _, _ = run_cli([*local, f"train.init_from={tmp_path / 'nowhere'}"], capsys)
    assert code == 2 and f"train.init_from '{tmp_path / 'nowhere'}' is not a usable snapshot" in err
    other = unet_preset("digits", base_channels=16)
    save_snapshot(str(tmp_path / "other"), UNet(other), other, DiffusionConfig())
    # another run id: the first attempt saved its config as quickstart's, and a run id keeps one config
    code, err, _, _ = run_cli([*local, "run_id=other-model", f"train.init_from={tmp_path / 'other'}"], capsys)
    assert code == 2 and "holds a U-Net with config" in err and "warm-start only from the same model" in err
    assert not ray.is_initialized()


def test_a_storage_endpoint_that_never_answers_fails_within_the_deadline(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(storage, "FIRST_CONTACT", SHORT)  # the root's first contact: 8.5 s, not the default 26
    with silent_server() as host:  # which asserts that something connected to it
        args = [
            "storage.root=s3://bucket/runs",
            f"storage.endpoint_url=http://{host}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ]
        code, err, _, seconds = run_cli(args, capsys)
    assert code == 2 and "storage.root 's3://bucket/runs' is not writable" in err and "no answer within" in err
    assert seconds < STORAGE_DEADLINE_S + 15, seconds
    assert not ray.is_initialized()


def test_an_unreachable_tracking_server_is_named_within_the_deadline(local, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "MLFLOW_DEADLINE_S", 3.0)  # the bound and its announcement, not the default 20 s
    code, err, out, seconds = run_cli([local[0], "mlflow.tracking_uri=http://127.0.0.1:1"], capsys)
    assert code == 2 and "MLflow at 'http://127.0.0.1:1' does not answer" in err and "mlflow.tracking_uri" in err
    assert "trying again for up to" in out  # the wait is announced, not silent
    assert seconds < preflight.MLFLOW_DEADLINE_S + 15, seconds
    assert not ray.is_initialized()


def test_outputs_inside_a_job_working_directory_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg.zip"}})
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, err, _, _ = run_cli([], capsys)
    assert code == 2 and "storage.root 'runs' and the MLflow store sqlite:///mlflow.db (the default)" in err
    assert "`ray job submit --working-dir`" in err
    code, err, _, _ = run_cli([f"storage.root={tmp_path}", "mlflow.tracking_uri=sqlite:///mlflow.db"], capsys)
    assert code == 2 and "the MLflow store sqlite:///mlflow.db would be written inside" in err
    assert not ray.is_initialized()


def test_status_takes_overrides_after_its_options_and_counts_an_unreadable_manifest_as_no_result(tmp_path, capsys):
    """A truncated stage.json of the run's config counts as no result: status says the stage is not computed (the
    next run executes it again)."""
    (tmp_path / "c.yaml").write_text("run_id: r1\n")
    # status resolves the registry's champion (an input of evaluate and register): a store of the test's own
    where = [f"storage.root={tmp_path / 'runs'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    config = load_config(tmp_path / "c.yaml", where)
    RunStore.of(config).save_config(config)  # the run exists: its config is saved
    planned = plan(STAGES, config, external_for(config))
    prepare = tmp_path / "runs" / "r1" / "prepare" / planned["prepare"].fingerprint[:16]
    prepare.mkdir(parents=True)
    (prepare / "stage.json").write_text('{"stage": "prep')  # truncated
    code, _, out, _ = run_cli(["r1", "--config", str(tmp_path / "c.yaml"), *where], capsys, "status")
    assert code == 0 and f"run r1 at {tmp_path / 'runs' / 'r1'}" in out
    assert f"prepare   not computed for this config (result {prepare.name})" in out
    assert "tune      disabled" in out
    assert f"train     not computed for this config (result {planned['train'].fingerprint[:16]})" in out
    with pytest.raises(SystemExit):
        main(["status", "r1", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_more_training_workers_than_the_cluster_has_fail_in_seconds(tmp_path):
    args = [
        sys.executable,
        "-m",
        "pipelines",
        "run",
        "run_id=big",
        "train.num_workers=64",
        "evaluate.classifier_epochs=1",
        "train.ema_choice_images=64",  # the post-hoc EMA choice on a small budget
        "train.ema_choice_timesteps=4",
        f"storage.root={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    started = time.time()
    run = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(
        r"error: 64 training workers need more than this cluster has \(64 CPU asked, the cluster has \d+\): "
        r"lower train.num_workers / train.cpus_per_worker",
        run.stderr,
    ), run.stderr
    assert "Traceback" not in run.stderr and time.time() - started < 60
    assert not completed(tmp_path / "runs" / "big", "train")
