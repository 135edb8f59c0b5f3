"""Scheduled retraining against a real ``mlflow server``, each run a separate ``python -m pipelines retrain`` process
with its own local Ray, on a folder of PNG files: two runs of one schedule tick at once (exactly one proceeds), no
champion -> promoted, unchanged data -> skipped from a listing of the files without reading any image (their bytes are
replaced, sizes and times kept, and nothing notices), files rewritten with the same images -> prepare runs on Ray Data
tasks and finds the fingerprint the champion's prepare found on the driver -> skipped without training, changed data
-> warm start, the champion re-scored under the same protocol and the promotion margin applied (the champion kept; the
promotion rule is tested below)."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from ddpm_core.data import load_dataset
from pipelines.__main__ import main
from pipelines.contracts import ChampionRef
from tests.services import _stop, mlflow_server

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "run_id=nightly",
    "train.total_images=2048",
    "train.checkpoint_every_images=1024",
    "train.log_every_images=1024",
    "train.grid_every_images=null",  # no sample grids: nothing here looks at them
    "sample.num_samples=200",
    "sample.batch_size=100",
    "sample.num_steps=10",
    "evaluate.classifier_epochs=2",
    "train.ema_choice_images=64",  # the post-hoc EMA choice on a small budget
    "train.ema_choice_timesteps=4",
    "train.ema_snapshot_every_images=512",  # the quickstart's autoguidance: its guide from the snapshot at 512
    "evaluate.untrained_baseline=false",
    "evaluate.nll=false",
    "register.model_name=ddpm-nightly",
    "mlflow.experiment=nightly",
    "retrain.lease_ttl_s=60",
]


def write_png_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(folder / f"{index:05d}.png")


def retrain(tmp_path: Path, tracking_uri: str, tick: str, *overrides: str, wait: bool = True):
    command = [
        sys.executable,
        "-m",
        "pipelines",
        "retrain",
        "--config",
        "configs/digits.yaml",
        "--schedule-time",
        tick,
        *TINY,
        f"data.uri={tmp_path / 'data'}",
        f"storage.root={tmp_path / 'runs'}",
        f"mlflow.tracking_uri={tracking_uri}",
        *overrides,
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
        start_new_session=True,  # stopped as a group (its local Ray with it) when the test gives up on it
    )
    if not wait:
        return process
    output = finish(process)
    return process.returncode, output


def finish(process: subprocess.Popen) -> str:
    """The output of a :func:`retrain` process, which is stopped with its whole process group if it does not end in
    15 minutes or the test stops waiting for any other reason (nothing of it runs on into the next test)."""
    try:
        output, _ = process.communicate(timeout=900)
    except BaseException:
        _stop(process)
        raise
    return output


@contextlib.contextmanager
def unreadable_images(folder: Path):
    """Every image file's bytes replaced by zeros of the same size, with its modification time kept; restored after."""
    kept = {path: (path.read_bytes(), path.stat()) for path in folder.rglob("*.png")}
    for path, (data, stat) in kept.items():
        path.write_bytes(bytes(len(data)))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    try:
        yield
    finally:
        for path, (data, stat) in kept.items():
            path.write_bytes(data)
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def decision(tmp_path: Path, run_id: str) -> dict:
    return json.loads((tmp_path / "runs" / run_id / "retrain" / "decision.json").read_text())


def test_retrain_schedule(tmp_path, capsys):
    digits = load_dataset("builtin:digits")
    write_png_folder(tmp_path / "data", digits.images[:600], digits.labels[:600])
    with mlflow_server(tmp_path, str(tmp_path / "artifacts"), dict(os.environ)) as tracking_uri:
        client = MlflowClient(tracking_uri)

        # (1) two jobs for the same tick at once: one holds the run root's lease, the other exits 3 naming it
        first, second = (retrain(tmp_path, tracking_uri, "2026-11-20T02:00Z", wait=False) for _ in range(2))
        try:
            outputs = [finish(process) for process in (first, second)]
        finally:
            _stop(second)
        codes = sorted([first.returncode, second.returncode])
        assert codes == [0, 3], outputs
        winner, loser = (outputs[0], outputs[1]) if first.returncode == 0 else (outputs[1], outputs[0])
        assert "is held by" in loser and "Another run of this run_id is in progress" in loser
        assert "promoted: no champion yet" in winner
        assert decision(tmp_path, "nightly-20261120T0200Z")["decision"] == "promoted"
        champion = client.get_model_version_by_alias("ddpm-nightly", "champion")
        assert champion.version == "1" and len(client.search_model_versions("name='ddpm-nightly'")) == 1

        # (2) the next night, same data: skipped, nothing trained, no new version, the skip recorded in MLflow; no
        # image is read to decide: every file's bytes are replaced (sizes and times kept) while it decides
        with unreadable_images(tmp_path / "data"):
            code, output = retrain(tmp_path, tracking_uri, "2026-11-21T02:00Z")
        assert code == 0 and "skipped: data unchanged since champion v1: the same files" in output, output
        assert "[train]" not in output and "Started a local Ray instance" not in output
        assert not (tmp_path / "runs" / "nightly-20261121T0200Z" / "train").exists()
        assert len(client.search_model_versions("name='ddpm-nightly'")) == 1
        skipped = client.search_runs(
            [client.get_experiment_by_name("nightly").experiment_id], "tags.`ddpm.run_id` = 'nightly-20261121T0200Z'"
        )
        assert len(skipped) == 1 and skipped[0].data.tags["ddpm.retrain.decision"].startswith("skipped: data unchanged")
        main(["status", "nightly-20261121T0200Z", f"storage.root={tmp_path / 'runs'}"])  # reads files: run in-process
        assert "retrain   skipped: data unchanged" in capsys.readouterr().out

        # (2b) the files are rewritten with the same images: the listing differs, prepare (on Ray Data, where the
        # other runs prepare this small folder on the driver, as data.prepare_on=auto does) finds the champion's
        # fingerprint, and nothing is trained
        for path in sorted((tmp_path / "data").rglob("*.png"))[:5]:
            path.write_bytes(path.read_bytes())
        code, output = retrain(tmp_path, tracking_uri, "2026-11-21T03:00Z", "data.prepare_on=ray_data")
        assert code == 0 and "its files changed but hold the same images" in output, output[-3000:]
        assert "[prepare] running" in output and "[train]" not in output
        assert len(client.search_model_versions("name='ddpm-nightly'")) == 1

        # (3) a new image lands: trained, warm-started from the champion, the champion re-scored under this run's
        # protocol, and the promotion margin applied to the two scores: with a margin no FID can clear, the champion
        # stays, the new version becomes the challenger and records why
        Image.fromarray(digits.images[700][..., 0]).save(tmp_path / "data" / str(digits.labels[700]) / "new-00001.png")
        code, output = retrain(tmp_path, tracking_uri, "2026-11-22T02:00Z", "register.promotion_margin=1000")
        assert code == 0, output[-5000:]
        assert "warm start from champion v1" in output and "initial weights from" in output
        assert "re-scoring champion v1" in output
        third = decision(tmp_path, "nightly-20261122T0200Z")
        assert third["decision"] == "kept", third
        assert third["champion_fid"] is not None and third["challenger_fid"] is not None
        assert "re-scored under this run's protocol" in third["reason"] and "margin 1000" in third["reason"]
        assert client.get_model_version_by_alias("ddpm-nightly", "champion").version == "1"
        assert client.get_model_version_by_alias("ddpm-nightly", "challenger").version == "2"
        assert client.get_model_version("ddpm-nightly", "2").tags["registry.decision"].startswith("champion kept: FID")


def rule(margin: float = 0.0, z: float = 1.96):
    from pipelines.config import RegisterSection

    return RegisterSection(promotion_margin=margin, promotion_z=z)


@pytest.mark.parametrize(
    "fid, margin, rescored, promote, says",
    [
        (2.0, 0.0, ("m", "4", 2.5), True, "FID 2.0000 < champion v4's 2.5000 (re-scored under this run's protocol)"),
        (2.45, 0.1, ("m", "4", 2.5), False, "improvement 0.0500 <= margin 0.1"),
        (2.3, 0.1, ("m", "4", 2.5), True, "< champion v4's 2.5000"),
        # re-scored: version 4 of another model, so not this champion; its recorded FID (same protocol) decides
        (2.45, 0.0, ("other", "4", 2.0), True, "2.4500 < champion v4's 3.0000 (recorded under the same protocol)"),
        (2.0, 0.0, None, True, "recorded under the same protocol"),  # no re-score: the recorded FID, same protocol hash
    ],
)
def test_promotion_rule_margin(fid, margin, rescored, promote, says):
    from pipelines.registry.champion import Champion
    from pipelines.stages.register import Challenger, decide

    champion = Champion("m", "4", 3.0 if rescored else 2.5, "hash-a", "fp", "nightly-x", None, fid_stderr=0.01)
    rescore = ((ChampionRef(*rescored[:2]), rescored[2]), 0.01) if rescored else (None, None)
    challenger = Challenger(fid, 0.01, "hash-a", *rescore)
    decided, reason = decide(challenger, rule(margin), champion)
    assert decided is promote and says in reason


@pytest.mark.parametrize(
    "fid, stderr, champion_stderr, promote, says",
    [
        # improvement 0.1; combined stderr sqrt(0.03^2 + 0.04^2) = 0.05: 1.96 x 0.05 = 0.098 < 0.1, intervals apart
        (2.4, 0.03, 0.04, True, "improvement 0.1000 > margin 0 and > 1.96 x stderr 0.0500 = 0.0980"),
        # the same improvement with twice the noise: the intervals overlap, the champion stays
        (2.4, 0.06, 0.08, False, "<= 1.96 x stderr 0.1000 = 0.1960 (independent sets, in quadrature)"),
        # a champion recorded before intervals existed: the challenger's stderr alone
        (2.4, 0.06, None, False, "the champion has no recorded stderr"),
    ],
)
def test_promotion_needs_more_than_the_combined_uncertainty(fid, stderr, champion_stderr, promote, says):
    from pipelines.registry.champion import Champion
    from pipelines.stages.register import Challenger, decide

    champion = Champion("m", "4", 2.5, "hash-a", "fp", None, None, fid_stderr=champion_stderr)
    decided, reason = decide(Challenger(fid, stderr, "hash-a"), rule(), champion)
    assert decided is promote and says in reason


def test_promotion_with_a_rescored_champion_uses_the_paired_stderr():
    """Both sets share their sample indices: the paired stderr of the difference decides, not the two intervals
    (which here overlap widely)."""
    from pipelines.registry.champion import Champion
    from pipelines.stages.register import Challenger, decide

    champion = Champion("m", "4", 9.9, "hash-x", "fp", None, None, fid_stderr=0.5)
    challenger = Challenger(2.4, 0.5, "hash-a", (ChampionRef("m", "4"), 2.5), difference_stderr=0.02)
    promote, reason = decide(challenger, rule(), champion)
    assert promote and "1.96 x stderr 0.0200 = 0.0392 (paired jackknife on shared sample indices)" in reason
    promote, reason = decide(Challenger(2.47, 0.5, "hash-a", (ChampionRef("m", "4"), 2.5), 0.02), rule(), champion)
    assert not promote and "improvement 0.0300 > margin 0 and <= 1.96 x stderr 0.0200" in reason
    # z = 0 restores the bare margin rule
    assert decide(Challenger(2.47, 0.5, "hash-a", (ChampionRef("m", "4"), 2.5), 0.02), rule(z=0.0), champion)[0]


def test_promotion_rule_never_compares_models_of_different_data_sets():
    from pipelines.registry.champion import Champion
    from pipelines.stages.register import Challenger, decide

    champion = Champion("m", "4", 9.0, "hash-a", "fp", None, None, data_source="s3://a/images#train")
    better = Challenger(0.1, 0.01, "hash-a", data_source="s3://b/images#train")
    promote, reason = decide(better, rule(), champion)
    assert not promote and "trained on other data (s3://a/images#train; this model: s3://b/images#train)" in reason
    same = Challenger(0.1, 0.01, "hash-a", data_source="s3://a/images#train")  # the same data set, grown or not
    assert decide(same, rule(), champion)[0]


def test_promotion_rule_never_compares_across_protocols():
    from pipelines.registry.champion import Champion
    from pipelines.stages.register import Challenger, decide

    promote, reason = decide(
        Challenger(0.1, 0.01, "hash-b"), rule(), Champion("m", "4", 2.5, "hash-a", "fp", None, None)
    )
    assert not promote and "another protocol" in reason
    assert decide(Challenger(5.0, 0.01, "hash-b"), rule(), None) == (True, "no champion yet")
