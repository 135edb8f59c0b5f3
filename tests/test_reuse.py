"""A result is reused only when nothing it read has changed, on real runs of a tiny pipeline (local Ray, a local MLflow
store): while a stage runs it reads no config beyond its settings (a traced run); the same config re-runs nothing;
another config is refused before anything is written, or with ``--allow-changes`` recomputes exactly the stages
that read the changed key, and going back finds the first config's results by fingerprint; ``gc`` removes what no
manifest of the run's config references; renaming the registered model re-scores the new name's champion."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipelines.__main__ import main
from pipelines.config_file import load_config
from pipelines.dag import STAGES, external_for, run_pipeline
from tests.config_trace import ReadTrace
from tests.run_files import completed, outputs

TINY = [
    "run_id=reuse",
    "train.total_images=512",
    "train.checkpoint_every_images=512",
    "train.log_every_images=256",
    "train.grid_every_images=null",
    "sample.num_samples=100",
    "sample.batch_size=50",
    "sample.num_steps=4",
    "evaluate.classifier_epochs=1",
    "train.ema_choice_images=64",  # the post-hoc EMA choice on a small budget
    "train.ema_choice_timesteps=4",
    "sample.autoguidance_weight=1",  # the guide point would precede every post-hoc snapshot of so short a run
    "evaluate.untrained_baseline=false",
    "evaluate.nll_images=16",
    "evaluate.nll_timesteps=4",
    "evaluate.precision_recall_samples=100",
    "evaluate.kid_subsets=4",
    "register.model_name=reuse-a",
    "register.promotion_margin=1000",  # only a model with no champion is promoted: decisions do not depend on noise
    "mlflow.experiment=reuse",
]
STAGE_NAMES = ("prepare", "train", "sample", "evaluate", "register")
RENAMED = "register.model_name=reuse-b"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("reuse")


def args(workdir: Path, *overrides: str) -> list[str]:
    location = [f"storage.root={workdir / 'runs'}", f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}"]
    return ["--config", "configs/digits.yaml", *TINY, *location, *overrides]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    return {str(path): (path.stat().st_size, path.stat().st_mtime_ns) for path in root.rglob("*") if path.is_file()}


def executed(out: str) -> set[str]:
    return {name for name in STAGE_NAMES if f"[{name}] running" in out}


def test_a_stage_reads_no_config_beyond_its_settings_while_it_runs(local_ray, workdir, monkeypatch, capsys):
    """The first run, traced: every config field read while a stage runs belongs to a section its settings hold
    (hashed, or declared an execution field), or to a value an upstream stage handed it (hashed through that stage's
    fingerprint)."""
    config = load_config(args(workdir)[1], args(workdir)[2:])
    trace = ReadTrace(config)
    held: dict[str, set[int]] = {}

    def traced(stage):
        def run(context, settings, *upstream):
            held[stage.name] = trace.embedded(settings) | trace.embedded(upstream)  # (upstream: hashed by fingerprint)
            trace.phase = f"running {stage.name}"
            try:
                return stage.run(context, settings, *upstream)
            finally:
                trace.phase = "outside"

        return dataclasses.replace(stage, run=run)

    monkeypatch.setattr("pipelines.dag.STAGES", tuple(traced(stage) for stage in STAGES))
    with trace.installed():
        run_pipeline(config, external=external_for(config))
    assert set(held) == set(STAGE_NAMES)
    for name in STAGE_NAMES:
        stray = {key for phase, key, owner in trace.reads if phase == f"running {name}" and owner not in held[name]}
        assert not stray, f"{name} read config keys outside its settings: {sorted(stray)}"
    assert any(phase == "running train" for phase, _, _ in trace.reads)  # the trace saw the stage's own reads
    capsys.readouterr()


def test_the_same_config_re_runs_nothing(workdir, capsys):
    code, out, _ = cli(capsys, "run", *args(workdir))
    assert code == 0 and not executed(out)
    assert all(f"[{name}] up to date" in out for name in STAGE_NAMES)


def test_another_config_is_refused_before_anything_is_written(workdir, capsys):
    before = tree(workdir / "runs")
    code, _, err = cli(capsys, "run", *args(workdir, "train.lr=2e-3"))
    assert code == 2
    assert "train.lr 0.001 -> 0.002" in err and "train, sample, evaluate, register would be computed" in err
    assert "--allow-changes" in err
    assert tree(workdir / "runs") == before


def test_allowed_changes_recompute_exactly_the_stages_that_read_the_key(workdir, capsys):
    code, out, _ = cli(capsys, "run", "--allow-changes", *args(workdir, "train.lr=2e-3"))
    assert code == 0, out
    assert executed(out) == {"train", "sample", "evaluate", "register"} and "[prepare] up to date" in out
    run_root = workdir / "runs" / "reuse"
    assert len(completed(run_root, "train")) == 2 and len(completed(run_root, "prepare")) == 1

    code, out, _ = cli(capsys, "status", "reuse", *args(workdir))  # compared with the first config
    assert code == 0
    assert "train.lr 0.002 -> 0.001" in out
    assert "kept " in out and "train.lr 0.002 (now 0.001)" in out

    code, out, _ = cli(capsys, "run", "--allow-changes", *args(workdir))  # back: found by fingerprint
    assert code == 0 and not executed(out), out


def test_renaming_the_model_compares_with_the_new_names_champion(workdir, capsys):
    # reuse-b's champion: the other learning rate's model, its training and samples (the test above) reused: gc, below,
    # has not removed them yet
    other = args(workdir, "train.lr=2e-3", RENAMED)
    code, out, _ = cli(capsys, "run", "--allow-changes", *other)
    assert code == 0 and "reuse-b v1 -> challenger, champion (no champion yet)" in out
    assert executed(out) == {"evaluate", "register"}, out

    code, out, _ = cli(capsys, "run", "--allow-changes", *args(workdir, RENAMED))
    assert code == 0, out
    assert executed(out) == {"evaluate", "register"}
    assert "re-scoring champion v1 of reuse-b" in out
    evaluated = outputs(workdir / "runs" / "reuse", "evaluate")
    assert evaluated["rescored_champion"] == {"model_name": "reuse-b", "version": "1"}
    registered = outputs(workdir / "runs" / "reuse", "register")
    assert registered["model_name"] == "reuse-b" and registered["previous_champion"] == "1"
    assert "re-scored under this run's protocol" in registered["reason"], json.dumps(registered)


def test_gc_removes_what_no_manifest_of_the_config_references(workdir, capsys):
    run_root = workdir / "runs" / "reuse"
    code, out, _ = cli(capsys, "gc", "reuse", *args(workdir)[2:])
    assert code == 0 and "a dry run" in out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    # The run's config is the renamed model's now (the test above): the other learning rate's results (evaluated and
    # registered under each name) and the first name's evaluation and registration are referenced by none.
    unreferenced = ["evaluate"] * 3 + ["register"] * 3 + ["sample", "train"]
    assert sorted(name.split("/")[0] for name in listed) == unreferenced, out
    assert len(completed(run_root, "train")) == 2  # a dry run removes nothing
    code, out, _ = cli(capsys, "gc", "reuse", "--delete", *args(workdir)[2:])
    assert code == 0 and "removed" in out
    assert all(len(completed(run_root, name)) == 1 for name in STAGE_NAMES)
    code, out, _ = cli(capsys, "run", *args(workdir, RENAMED))
    assert code == 0 and not executed(out)


# another whole run (38 s): make test-all. In CI: the promotion rule never compares models of different data sets
# (tests/test_retrain.py), and a renamed model's run re-scores that name's champion (above)
@pytest.mark.slow
def test_a_model_of_another_data_set_is_registered_but_never_compared(workdir, capsys):
    """The same model name, another data folder: the new version is registered, the champion (trained on the
    built-in digits) is neither re-scored nor compared, and the decision says why."""
    from PIL import Image

    from ddpm_core.data import load_dataset

    digits, folder = load_dataset("builtin:digits"), workdir / "folder"
    for index in range(300):
        (folder / str(digits.labels[index])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.images[index, ..., 0]).save(folder / str(digits.labels[index]) / f"{index:04d}.png")
    overrides = (
        "run_id=reuse-folder",
        "register.model_name=reuse-b",
        f"data.uri={folder}",
        "register.promotion_margin=0",
    )
    code, out, _ = cli(capsys, "run", *args(workdir, *overrides))
    assert code == 0, out
    assert "trained on other data (builtin:digits#train; this run: " in out and "re-scoring" not in out
    registered = outputs(workdir / "runs" / "reuse-folder", "register")
    assert not registered["promoted"] and registered["previous_champion"] == "1"
    assert "a model of another data set is registered, never compared or promoted" in registered["reason"]
