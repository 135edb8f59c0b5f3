"""A new user's bad inputs (issue 29): each is refused before the work it would spoil, with exit code 2 and a message
naming the key, option or file and what was expected; and what a user did not ask for is said, not done silently.
docs/reliability.md lists them."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray

from pipelines.__main__ import main
from pipelines.config_file import load_config
from pipelines.dag import STAGES
from pipelines.execution import ray_address
from tests.run_files import completed
from tests.services import _stop

REPO = Path(__file__).resolve().parents[1]
# The smallest run of every stage but register that still trains, samples and scores (about 40-60 s on 2 CPUs).
TINY = (
    "train.total_images=256",
    "sample.num_samples=20",
    "sample.batch_size=10",
    "sample.num_steps=2",
    "evaluate.classifier_epochs=1",
    "train.ema_choice_images=64",  # the post-hoc EMA choice on a small budget
    "train.ema_choice_timesteps=4",
    "evaluate.untrained_baseline=false",
    "evaluate.nll=false",
    "evaluate.inception_score=false",
    "evaluate.precision_recall=false",
    "evaluate.kid=false",
    "register.enabled=false",
)
OTHER_RAY = (  # a local Ray instance of another job on the host, as a second pipeline's; stops on SIGTERM
    "import signal, sys, time, ray\n"
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
    "ray.init(num_cpus=1, include_dashboard=False)\n"
    "print('gcs', ray.get_runtime_context().gcs_address, flush=True)\n"
    "time.sleep(600)\n"
)


@pytest.fixture
def local(tmp_path):
    return [f"storage.root={tmp_path / 'runs'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, float]:
    started = time.time()
    code = main(args)
    return code, capsys.readouterr().err, time.time() - started


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without a Ray address (each job decides for itself), with ``extra``."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return {**env, "PYTHONPATH": str(REPO), **extra}


@contextlib.contextmanager
def another_local_ray(env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A local Ray instance started by another process on this host (as a second pipeline's driver starts one);
    yields its GCS address and the process, and stops it (its whole process group) at the end."""
    process = subprocess.Popen(
        [sys.executable, "-c", OTHER_RAY],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until Ray is up (or the process ends)
        assert line.startswith("gcs "), f"the other Ray instance did not start: {line!r}"
        yield line.split()[1], process
    finally:
        _stop(process)


# 1-3: the config file


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "train:\n  lr: 0.001\n  batch_size: 64\n  lr: 0.01\n",
            "key 'train.lr' is given 2 times (lines 2 and 4)",
        ),
        (
            "train:\n  lr: 0.001\nsample:\n  num_samples: 10\ntrain:\n  batch_size: 64\n",
            "key 'train' is given 2 times (lines 1 and 5)",
        ),
        (
            "model:\n  overrides:\n    dropout: 0.1\n    dropout: 0.2\n    dropout: 0.3\n",
            "key 'model.overrides.dropout' is given 3 times (lines 3, 4 and 5)",
        ),
    ],
)
def test_a_key_given_twice_in_the_config_file_is_refused_naming_it_and_its_lines(
    text, message, tmp_path, local, capsys
):
    (tmp_path / "twice.yaml").write_text(text)
    code, err, _ = run_cli(["run", "--config", str(tmp_path / "twice.yaml"), *local], capsys)
    assert code == 2 and f"config file '{tmp_path / 'twice.yaml'}': {message}" in err, err
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()


def test_an_override_that_gives_a_key_twice_or_is_not_yaml_is_refused(capsys):
    code, err, _ = run_cli(["run", "model.overrides={dropout: 0.1, dropout: 0.2}"], capsys)
    assert code == 2 and "override 'model.overrides={dropout: 0.1, dropout: 0.2}' gives key " in err, err
    assert "'model.overrides.dropout' 2 times" in err
    code, err, _ = run_cli(["run", "train.lr=[1"], capsys)
    assert code == 2 and "override 'train.lr=[1': the value is not valid YAML" in err, err
    assert not ray.is_initialized()


def test_a_key_a_merge_brings_in_may_be_overridden(tmp_path):
    """YAML's merge key (``<<:``) is no duplicate: the mapping's own key wins, as YAML intends."""
    (tmp_path / "merge.yaml").write_text("evaluate:\n  <<: {classifier_epochs: 1, nll: true}\n  nll: false\n")
    config = load_config(tmp_path / "merge.yaml")
    assert config.evaluate.classifier_epochs == 1 and config.evaluate.nll is False


def test_a_folder_given_as_the_config_file_is_named_a_folder(tmp_path, local, capsys):
    code, err, _ = run_cli(["run", "--config", str(tmp_path), *local], capsys)
    assert code == 2 and f"config file '{tmp_path}' is a folder: --config takes a YAML file" in err, err
    assert "does not exist" not in err


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_an_empty_config_file_is_refused_not_run_as_the_defaults(text, tmp_path, local, capsys):
    (tmp_path / "empty.yaml").write_text(text)
    code, err, _ = run_cli(["run", "--config", str(tmp_path / "empty.yaml"), *local], capsys)
    assert code == 2 and f"config file '{tmp_path / 'empty.yaml'}' is empty: it holds no settings" in err, err
    assert "leave out --config to run the embedded default" in err
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()


# 4: a folder as the SQLite tracking store


def test_a_folder_given_as_the_sqlite_tracking_store_is_named_before_anything_runs(tmp_path, capsys):
    """It used to be retried by MLflow until the tracking deadline and reported as a timeout (20 s)."""
    folder = tmp_path / "mlflow-store"
    folder.mkdir()
    args = ["run", f"storage.root={tmp_path / 'runs'}", f"mlflow.tracking_uri=sqlite:///{folder}"]
    code, err, elapsed = run_cli(args, capsys)
    assert code == 2 and f"mlflow.tracking_uri 'sqlite:///{folder}' names a folder" in err, err
    assert f"not a SQLite database file: name a file, e.g. sqlite:///{folder / 'mlflow.db'}" in err
    assert "no answer" not in err and elapsed < 10
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()


# 5: images that do not fit the model: advice for the mismatch there is


@pytest.mark.parametrize(
    "shape, wanted, unwanted",
    [
        (
            (8, 8, 3),
            ["8x8 images with 3 channel(s)", "set model.overrides.in_channels: 3", "convert the images to 1-channel"],
            ["with data.image_size", "model.overrides.image_size"],
        ),
        (
            (16, 16, 1),
            ["16x16 images with 1 channel(s)", "model.overrides.image_size: 16", "with data.image_size: 8"],
            ["in_channels", "convert the images"],
        ),
        (
            (32, 32, 3),
            ["model.preset 'cifar10' fits these images", "model.overrides.in_channels: 3", "convert the images"],
            [],
        ),
    ],
)
def test_images_that_do_not_fit_the_model_get_the_advice_that_fits_the_mismatch(
    shape, wanted, unwanted, tmp_path, local, capsys
):
    np.savez(tmp_path / "images.npz", images=np.zeros((20, *shape), np.uint8), labels=np.arange(20) % 10)
    code, err, _ = run_cli(["run", *local, f"data.uri={tmp_path / 'images.npz'}"], capsys)
    assert code == 2 and "but model.preset 'digits' expects 8x8 with 1:" in err, err
    assert all(text in err for text in wanted), err
    assert not any(text in err for text in unwanted), err
    assert not ray.is_initialized()


# 8: status of a run that does not exist


@pytest.mark.parametrize("command", ["status", "gc"])
def test_a_run_that_does_not_exist_is_named(command, tmp_path, local, capsys):
    code, err, _ = run_cli([command, "no-such-run", *local], capsys)
    assert code == 2, err
    assert f"there is no run 'no-such-run' at {tmp_path / 'runs' / 'no-such-run'}: check the run id" in err
    assert not (tmp_path / "runs" / "no-such-run").exists()


# 10: where a job's Ray runs


@pytest.mark.parametrize(
    "environ, address",
    [
        ({}, "local"),
        ({"RAY_ADDRESS": ""}, "local"),
        ({"RAY_ADDRESS": "10.0.0.5:6379"}, "10.0.0.5:6379"),  # as `ray job submit` sets it
        ({"RAY_ADDRESS": "auto"}, "auto"),  # the user's choice: the host's running instance
        ({"RAY_ADDRESS": "ray://head:10001"}, "ray://head:10001"),
    ],
)
def test_a_job_starts_its_own_local_ray_unless_ray_address_names_one(environ, address):
    assert ray_address(environ) == address


def test_a_job_never_joins_the_instance_ray_start_left_on_the_host(tmp_path):
    """``ray start`` leaves its address in ``$RAY_TMPDIR/ray/ray_current_cluster``; Ray's default (``address=None``)
    joins that instance, another job's, which may stop under it. The job starts its own."""
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    env = clean_env(RAY_TMPDIR=ray_tmp)
    script = (
        "import ray\nfrom pipelines.execution import connect\nconnect()\n"
        "print('joined', ray.get_runtime_context().gcs_address)\n"
    )
    try:
        with another_local_ray(env) as (other, process):
            Path(ray_tmp, "ray").mkdir(exist_ok=True)
            Path(ray_tmp, "ray", "ray_current_cluster").write_text(other)  # what `ray start` writes
            result = subprocess.run(
                [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
            )
            assert process.poll() is None  # the other instance ran throughout
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-3000:]
    joined = result.stdout.split("joined ", 1)[1].split()[0]
    assert joined != other


# 9 and 10: --from a stage whose upstream stages have no result, with another pipeline's Ray on the host (the
# session's guided_run, tests/conftest.py: a TinyRun)


@dataclass(frozen=True)
class TinyRun:
    root: Path  # storage.root
    overrides: list[str]
    result: subprocess.CompletedProcess[str]
    seconds: float
    other_alive: bool  # the other local Ray instance ran throughout


def test_from_a_stage_whose_upstream_stages_have_no_result_says_they_run_first(guided_run):
    result = guided_run.result
    assert result.returncode == 0, result.stderr[-3000:]
    line = "--from evaluate: prepare, train, sample have no result for this config yet and run first"
    assert line in result.stdout, result.stdout[-3000:]
    assert result.stdout.index(line) < result.stdout.index("[prepare] running")
    run_root = guided_run.root / "quickstart"
    optional = ("autoencoder", "tune", "distill", "register")
    assert all(completed(run_root, stage.name) for stage in STAGES if stage.name not in optional)


def test_a_second_pipelines_local_ray_on_the_host_is_no_error(guided_run):
    """Ray's state API, which Ray Train's placement-group cleaner calls in its own actor, looked for the cluster among
    the host's processes and raised "Found multiple active Ray instances" in the middle of the job's output."""
    output = guided_run.result.stdout + guided_run.result.stderr
    assert guided_run.other_alive and guided_run.result.returncode == 0, output[-3000:]
    assert "Found multiple active Ray instances" not in output and "Traceback" not in output, output[-5000:]


# 6 and 7: the figure commands check their options before the work


def test_interpolate_refuses_a_negative_pair_index_naming_pair(guided_run, capsys):
    code, err, _ = run_cli(["interpolate", "quickstart", "--pair", "-1", "3", *guided_run.overrides], capsys)
    assert code == 2 and "--pair takes two hold-out image indices counted from 0, got -1 3 (-1 is negative)" in err
    code, err, _ = run_cli(["interpolate", "quickstart", "--pair", "0", "100000", *guided_run.overrides], capsys)
    assert code == 2 and "--pair: image index 100000 is outside the" in err, err


@pytest.mark.parametrize("command", ["interpolate", "progressive"])
def test_a_figure_out_that_cannot_be_written_is_refused_before_the_work(command, guided_run, tmp_path, capsys):
    (tmp_path / "a-file").write_text("in the way")
    out = tmp_path / "a-file" / "figure.png"
    code, err, elapsed = run_cli([command, "quickstart", "--out", str(out), *guided_run.overrides], capsys)
    assert code == 2 and f"--out '{out}': its folder '{tmp_path / 'a-file'}' cannot be made" in err, err
    assert f"({tmp_path / 'a-file'} is a file)" in err and elapsed < 10
    code, err, _ = run_cli([command, "quickstart", "--out", str(tmp_path), *guided_run.overrides], capsys)
    assert code == 2 and f"--out '{tmp_path}' is a folder: give a file name" in err, err


def test_a_figure_out_in_a_read_only_folder_is_refused(guided_run, tmp_path, capsys):
    # root writes through a folder's mode bits, so as root the folder is one no process may write to: sysfs
    folder = tmp_path / "read-only" if os.geteuid() != 0 else Path("/sys/kernel")
    folder.mkdir(exist_ok=True)
    mode = folder.stat().st_mode
    if os.geteuid() != 0:
        folder.chmod(0o555)
    try:
        code, err, _ = run_cli(
            ["progressive", "quickstart", "--out", str(folder / "p.png"), *guided_run.overrides], capsys
        )
    finally:
        if os.geteuid() != 0:
            folder.chmod(mode)
    assert code == 2 and f"--out '{folder / 'p.png'}' cannot be written (Permission denied)" in err, err


def test_a_figure_out_in_a_missing_folder_is_written_there(guided_run, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "interpolation.png"
    args = ["interpolate", "quickstart", "--out", str(out), "--timesteps", "0", "10", "--columns", "2"]
    assert main([*args, *guided_run.overrides]) == 0, capsys.readouterr().err
    assert out.stat().st_size > 0 and f"wrote {out}" in capsys.readouterr().out
