"""The class-conditional path through the whole pipeline (configs/digits-cond.yaml, shrunk): a real
``python -m pipelines run`` with its own local Ray and a local MLflow store, then the registered pyfunc drawing
chosen classes."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from ddpm_core.checkpoint import load_snapshot
from ddpm_core.data import to_uint8
from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.samplers import PerIndexNoise, SamplerConfig, classifier_free_guidance, sample
from pipelines.__main__ import main
from pipelines.typed import from_plain
from tests import run_files

REPO = Path(__file__).resolve().parents[1]
# guidance only at sigma > 0.4 (Kynkaanniemi et al. 2024): the sampler's 10 steps (t = 99, 199, ..., 999; sigma 0.17,
# 0.34, 0.52, ..., 2e4) are guided at all but the last two
INTERVAL = (0.4, 100000.0)
TINY = [
    "train.total_images=6144",
    "train.checkpoint_every_images=3072",
    "train.log_every_images=1024",
    "train.grid_every_images=null",  # no sample grids over training: no test here reads them
    "train.warmup_images=512",
    "train.ema_snapshot_every_images=1024",
    # the six widths of configs/digits-cond.yaml sample 0.03 at this budget (held-out bits/dim rise with the width,
    # 40.0 at 0.03 to 49.7 at 0.16): its two shortest choose the same snapshot, scoring a third as many
    "train.ema_sigma_rel=[0.03, 0.05]",
    "sample.num_samples=60",
    # shards of 35 and 25, the second's labels from index 35 on (not a multiple of the 10 classes); and the guidance
    # sweep's 30 images in one shard, one sampling actor to start for each of its sets
    "sample.batch_size=35",
    "sample.num_steps=10",
    "sample.guidance_scale=2",
    f"sample.guidance_interval=[{INTERVAL[0]}, {INTERVAL[1]}]",
    "evaluate.classifier_epochs=5",  # 0.94 on the hold-out (2 epochs: 0.53, too weak to judge the classes)
    "evaluate.untrained_baseline=false",
    "evaluate.nll_images=20",
    "evaluate.nll_timesteps=4",
    "evaluate.inception_score=false",
    "evaluate.precision_recall=false",
    "evaluate.guidance_scales=[0, 2]",
    "evaluate.guidance_samples=30",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return run_files.finished_run(tmp_path_factory.mktemp("conditional"), "digits-cond.yaml", TINY)


def outputs(root: Path, stage: str) -> dict:
    return run_files.outputs(root / "runs" / "quickstart-cond", stage)


def test_labels_flow_from_prepare_through_sampling(finished):
    prepare, sample = outputs(finished, "prepare"), outputs(finished, "sample")
    assert (
        prepare["class_names"] == [str(i) for i in range(10)] and sum(prepare["class_counts"]) == prepare["num_train"]
    )
    assert outputs(finished, "train")["num_classes"] == 10
    assert sample["conditioning"] == {
        "classes": list(range(10)),
        "guidance_scale": 2.0,
        "null_class": 10,
        "interval": list(INTERVAL),
    }
    for uri in sample["shard_uris"]:
        manifest = json.loads((Path(uri) / "manifest.json").read_text())
        start, stop = manifest["metadata"]["start"], manifest["metadata"]["stop"]
        labels = np.load(Path(uri) / "labels.npy")
        assert labels.dtype == np.int64 and labels.tolist() == [i % 10 for i in range(start, stop)]
        assert len(np.load(Path(uri) / "images.npy")) == len(labels)


def images_of(root: Path, indices: range, guidance_scale: float, interval: tuple[float, float] | None) -> np.ndarray:
    """Images ``indices`` of the sample set drawn here from the trained snapshot: classifier-free guidance at
    ``guidance_scale`` where sigma_t, computed here from the schedule, lies in ``interval`` (None: every step), the
    conditional model unguided elsewhere."""
    sampled, train = outputs(root, "sample"), outputs(root, "train")
    snapshot = load_snapshot(train["snapshot_uri"])
    model, diffusion = snapshot.build_model(), GaussianDiffusion.from_config(snapshot.diffusion)
    guided = classifier_free_guidance(model, guidance_scale, 10, snapshot.unet.in_channels)
    sigma = ((1 - diffusion.alphas_cumprod) / diffusion.alphas_cumprod).sqrt()  # [T]
    inside = (
        torch.ones_like(sigma, dtype=torch.bool) if interval is None else (sigma > interval[0]) & (sigma <= interval[1])
    )

    def limited(x, t, class_labels):  # one timestep per call, as the samplers call
        return guided(x, t, class_labels) if bool(inside[t[0]]) else model(x, t, class_labels=class_labels)

    labels = torch.tensor([i % 10 for i in indices])
    sampler = from_plain(SamplerConfig, sampled["sampler"])
    shape = (snapshot.unet.in_channels, snapshot.unet.image_size, snapshot.unet.image_size)
    drawn = sample(
        limited, diffusion, shape, PerIndexNoise(sampled["seed"], indices), sampler, {"class_labels": labels}
    )
    return to_uint8(drawn.samples)


def test_the_sample_set_is_guided_only_in_its_interval(finished):
    first = np.load(Path(outputs(finished, "sample")["shard_uris"][0]) / "images.npy")  # [35, H, W, C]
    indices = range(len(first))
    np.testing.assert_array_equal(first, images_of(finished, indices, 2.0, INTERVAL))
    everywhere = images_of(finished, indices, 2.0, None)
    assert np.abs(first.astype(int) - everywhere.astype(int)).max() > 8  # not as guided at every step


def test_accuracy_sweep_and_protocol_are_logged(finished):
    evaluate = outputs(finished, "evaluate")
    accuracy = evaluate["scores"]["conditional_accuracy"]
    # 6,144 training images already make the classes recognisable (0.78 measured at w = 2 with a classifier 0.94
    # right on the hold-out; chance is 0.1), and guidance raises the share (0.43 at w = 0, 0.83 at w = 2 measured on
    # the sweep's 30 images): a run that ignored the labels would fail both.
    assert accuracy > 0.5
    sweep_accuracy = [point["conditional_accuracy"] for point in evaluate["guidance_sweep"]]
    assert sweep_accuracy[1] > sweep_accuracy[0]
    assert evaluate["protocol"]["conditioning"]["guidance_scale"] == 2.0
    assert [point["guidance_scale"] for point in evaluate["guidance_sweep"]] == [0.0, 2.0]
    assert all(point["num_samples"] == 30 for point in evaluate["guidance_sweep"])
    client = MlflowClient(f"sqlite:///{finished / 'mlflow.db'}")
    run = client.get_run(run_files.manifest(finished / "runs/quickstart-cond", "evaluate")["mlflow_run_id"])
    assert run.data.metrics["conditional_accuracy"] == pytest.approx(accuracy)
    assert run.data.params["protocol.guidance_scale"] == "2.0"
    assert run.data.params["protocol.guidance_interval"] == str(list(INTERVAL))
    assert evaluate["protocol"]["conditioning"]["interval"] == list(INTERVAL)  # the sweep's sets are guided in it too
    assert not any(key.startswith("guidance_sweep.") for key in run.data.metrics)  # a table, not a step axis
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"samples.png", "guidance_sweep.png", "guidance_sweep.json", "class_accuracy.json"} <= artifacts
    assert {"guidance_sweep_table.json", "class_accuracy_table.json"} <= artifacts
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "guidance_sweep_table.json")).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [row["guidance_scale"] for row in rows] == [0.0, 2.0]
    assert [row["fid"] for row in rows] == pytest.approx([point["fid"] for point in evaluate["guidance_sweep"]])
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "class_accuracy_table.json")).read_text())
    assert len(table["data"]) == 10 and {"class", "accuracy", "requested"} <= set(table["columns"])
    said = (finished / "job.log").read_text()
    assert "conditional accuracy" in said and "guidance sweep (30 images each): w=0:" in said


def test_mlflow_holds_each_score_once_with_its_interval_and_what_ran(finished):
    """One home per score (the evaluate run; the parent, the register run and the logged model link to it), the FID
    interval logged, params as they ran (not the config's where the stage capped them), no section that is off,
    and the training data as a dataset input of the runs that read it."""
    client = MlflowClient(f"sqlite:///{finished / 'mlflow.db'}")
    root = finished / "runs/quickstart-cond"
    home = run_files.manifest(root, "evaluate")["mlflow_run_id"]
    experiment = client.get_run(home).info.experiment_id
    runs = client.search_runs([experiment], "tags.`ddpm.run_id` = 'quickstart-cond'")
    by_stage = {run.data.tags["ddpm.stage"]: run for run in runs}
    scores = client.get_run(home).data.metrics
    assert scores["fid_ci_low"] < scores["fid"] < scores["fid_ci_high"]
    for key in scores:
        assert [run.data.tags["ddpm.stage"] for run in runs if key in run.data.metrics] == ["evaluate"], key
    for stage in ("pipeline", "register"):
        assert by_stage[stage].data.tags["ddpm.scores_run_id"] == home
        assert f"runs/{home}?workflowType=machine_learning" in by_stage[stage].data.tags["mlflow.note.content"]
    version = client.get_model_version_by_alias("ddpm-digits-cond", "champion")
    assert version.tags["ddpm.scores_run_id"] == home and f"runs/{home}" in version.description
    model = client.get_logged_model(version.model_id or version.source.removeprefix("models:/"))  # models:/m-...
    assert {metric.run_id for metric in model.metrics or []} == {home} and "fid" in {m.key for m in model.metrics}

    evaluate = by_stage["evaluate"].data.params
    ran = run_files.outputs(root, "evaluate")["score_protocol"]["kid_subset_size"]
    assert evaluate["evaluate.kid_subset_size"] == str(ran) == evaluate["protocol.kid.subset_size"]
    assert evaluate["evaluate.kid_subset_size.configured"] == "1000"  # 60 samples: subsets of at most 30
    assert "evaluate.guidance_samples.configured" not in evaluate  # 30 asked, 30 ran
    assert "evaluate.kid_subset_size" not in by_stage["pipeline"].data.params  # the stage run's, as it ran
    assert not [key for run in runs for key in run.data.params if key.startswith("tune.")]

    fingerprint = run_files.outputs(root, "prepare")["fingerprint"]
    for stage in ("prepare", "train", "register"):
        (found,) = client.get_run(by_stage[stage].info.run_id).inputs.dataset_inputs
        assert found.dataset.name == "digits" and found.dataset.digest == fingerprint[:36], stage
        assert [(tag.key, tag.value) for tag in found.tags] == [("mlflow.data.context", "training")]
    (found,) = client.get_run(home).inputs.dataset_inputs  # the FID's reference statistics are of this data
    assert found.dataset.digest == fingerprint[:36] and found.tags[0].value == "fid_reference"


def test_the_registered_model_draws_the_classes_asked_for(finished):
    mlflow.set_tracking_uri(f"sqlite:///{finished / 'mlflow.db'}")
    uri = "models:/ddpm-digits-cond@champion"
    inputs = mlflow.models.get_model_info(uri).signature.inputs.input_names()
    assert inputs == ["index", "label"]
    model = mlflow.pyfunc.load_model(uri)
    params = {"num_steps": 10, "guidance_scale": 2.0}
    rows = pd.DataFrame({"index": range(4), "label": [i % 10 for i in range(4)]})
    drawn = model.predict(rows, params={**params, "seed": 1})  # the sample set's seed: its first four images
    np.testing.assert_array_equal(drawn, images_of(finished, range(4), 2.0, INTERVAL))
    version = MlflowClient().get_model_version_by_alias("ddpm-digits-cond", "champion")
    assert version.tags["guidance_interval"] == str(list(INTERVAL))
    sevens = model.predict(pd.DataFrame({"index": range(10), "label": [7] * 10}), params=params)
    assert sevens.shape == (10, 8, 8, 1) and sevens.dtype == np.uint8
    again = model.predict(pd.DataFrame({"index": [3], "label": [7]}), params=params)
    np.testing.assert_array_equal(again[0], sevens[3])  # image i depends on (seed, i, class) alone
    other = model.predict(pd.DataFrame({"index": [3], "label": [1]}), params=params)
    assert not np.array_equal(other[0], sevens[3])
    frames = model.predict(
        pd.DataFrame({"index": [3, 4], "label": [7, 7]}), params={**params, "progressive_frames": 3}
    )  # x_0 predicted along each chain (Sec. 4.3): image 3's three frames, then image 4's
    assert frames.shape == (6, 8, 8, 1)
    np.testing.assert_array_equal(frames[2], sevens[3])  # the last prediction is the sample
    fast = model.predict(
        pd.DataFrame({"index": [3], "label": [7]}),
        params={"num_steps": 5, "method": "dpm_solver++_2m", "spacing": "log_snr", "guidance_scale": 2.0},
    )
    assert fast.shape == (1, 8, 8, 1)
    with pytest.raises(Exception, match="classes of this model are 0..9"):
        model.predict(pd.DataFrame({"index": [0], "label": [10]}), params=params)


def test_figures_of_a_finished_run(finished, capsys):
    """The paper's interpolation (Fig. 9) and progressive decoding (Fig. 6) from the run's snapshot (a conditional
    model is drawn as its null-class model); bad arguments are named."""
    config = ["--config", str(REPO / "configs" / "digits-cond.yaml"), f"storage.root={finished / 'runs'}"]
    out = finished / "interpolation.png"
    assert (
        main(["interpolate", "quickstart-cond", *config, "--timesteps", "0", "40", "--columns", "3", "--out", str(out)])
        == 0
    )
    assert Image.open(out).size == (5 * 33 + 1, 2 * 33 + 1)  # 8x8 digits drawn 4x: 2 sources + 3 mixtures, 2 rows
    out = finished / "progressive.png"
    assert main(["progressive", "quickstart-cond", *config, "--samples", "2", "--frames", "3", "--out", str(out)]) == 0
    assert Image.open(out).size == (3 * 33 + 1, 2 * 33 + 1)
    assert main(["interpolate", "quickstart-cond", *config, "--pair", "0", "9999"]) == 2
    assert "image index 9999 is outside the 195 held-out images" in capsys.readouterr().err
    assert main(["interpolate", "quickstart-cond", *config, "--timesteps", "1000"]) == 2
    assert "--timesteps must lie in [0, 999], got [1000]" in capsys.readouterr().err
