"""The tune stage on digits: 4 trials over {linear, cosine} x learning rates, two at a time on a 2-core CPU (each
with two DDP workers, 1 CPU in all), ASHA stopping weak trials on held-out bits/dim, the best configuration flowing
into train, and nested MLflow trial runs."""

import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipelines.config import PipelineConfig
from tests import run_files

REPO = Path(__file__).resolve().parents[1]
SPACE = "{diffusion.schedule: {grid: [linear, cosine]}, train.lr: {grid: [1.0e-5, 2.0e-3]}}"


def test_tune_stage_picks_the_best_trial_by_bits_per_dim_and_train_uses_it(tmp_path):
    args = [
        sys.executable,
        "-m",
        "pipelines",
        "run",
        "run_id=tuned",
        "tune.enabled=true",
        "tune.search_alg=grid",
        f"tune.space={SPACE}",
        "tune.num_samples=1",
        "tune.trial_images=4096",
        "tune.report_every_images=1024",
        "tune.grace_period_images=2048",
        "tune.proxy_fid_samples=200",
        "tune.proxy_fid_steps=10",
        "tune.warm_start=true",
        "tune.cpus_per_worker=0.25",
        "tune.max_concurrent_trials=2",
        "train.total_images=1024",
        "train.checkpoint_every_images=1024",
        "train.log_every_images=1024",
        "train.grid_every_images=0",
        "sample.num_samples=50",
        "sample.batch_size=50",
        "sample.num_steps=5",
        "evaluate.classifier_epochs=2",
        "train.ema_choice_images=64",  # the post-hoc EMA choice on a small budget
        "train.ema_choice_timesteps=4",
        "evaluate.untrained_baseline=false",
        "evaluate.nll=false",
        "register.enabled=false",
        f"storage.root={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "mlflow.experiment=tune",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    (tmp_path / "run.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]

    tune = run_files.outputs(tmp_path / "runs/tuned", "tune")
    trials = tune["trial_results"]
    assert tune["trials"] == 4 and len(trials) == 4
    assert tune["stopped_early"] >= 1  # ASHA stopped a weak trial at its first rung
    assert any(t["images_seen"] < 4096 for t in trials)
    finished = [t for t in trials if t["images_seen"] == 4096]
    # Chosen by the comparable metric: the lowest bits/dim among the trials that report it at the end.
    assert tune["best_metric"]["bpd"] == min(t["bpd"] for t in finished)
    assert tune["best_params"]["train.lr"] == 2.0e-3  # a learning rate of 1e-5 cannot compete in 4k images
    assert all(t["fid"] is not None for t in finished)  # the proxy FID at each finished trial's end

    train = run_files.outputs(tmp_path / "runs/tuned", "train")
    assert train["config"]["diffusion"]["schedule"] == tune["best_params"]["diffusion.schedule"]
    assert train["config"]["train"]["lr"] == tune["best_params"]["train.lr"]
    assert "warm start from" in result.stdout + result.stderr

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tune")
    tune_run = client.search_runs([experiment.experiment_id], "tags.`ddpm.stage` = 'tune'")[0]
    trial_runs = client.search_runs([experiment.experiment_id], "tags.`ddpm.stage` = 'tune-trial'")
    assert len(trial_runs) == 4
    assert all(run.data.tags["mlflow.parentRunId"] == tune_run.info.run_id for run in trial_runs)
    assert all({"diffusion.schedule", "train.lr"} <= set(run.data.params) for run in trial_runs)
    assert all(len(client.get_metric_history(run.info.run_id, "bpd")) >= 2 for run in trial_runs)
    assert sum(run.data.tags.get("ddpm.best_trial") == "true" for run in trial_runs) == 1
    assert tune_run.data.params["best.train.lr"] == "0.002"
    (train_run,) = client.search_runs([experiment.experiment_id], "tags.`ddpm.stage` = 'train'")
    assert train_run.data.params["train.lr"] == "0.002"  # what ran, the config's value beside it
    assert train_run.data.params["train.lr.configured"] == str(PipelineConfig().train.optim.lr)
