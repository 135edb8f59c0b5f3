"""Prepare on Ray Data (pipelines.data.ingest): a class-sorted folder of PNGs becomes shuffled training files and a
hold-out split, split by image hash, fingerprinted in parallel, with unreadable files named or skipped; the same
folder prepared on the driver gives the same fingerprint, split and files; which sources are read in parts
(ddpm_core.data.list_source)."""

import io
import os
import tarfile

import mlflow
import numpy as np
import pytest
import ray
import torch
from PIL import Image

from ddpm_core.data import DataError, ReadOptions, SourceKind, content_fingerprint, fingerprint, list_source
from ddpm_core.storage import read_manifest
from pipelines.config_file import load_config
from pipelines.context import StageContext
from pipelines.contracts import ChampionRef
from pipelines.data.ingest import IngestPlan, UnitResult, convert_unit
from pipelines.data.shards import read_split, split_layout
from pipelines.data.splits import split_by_content
from pipelines.data.streaming import ImageStream, StreamSpec
from pipelines.runs import RunStore
from pipelines.stages import prepare

CLASSES, PER_CLASS = 4, 150


def class_folder(root, corrupt: str | None = None):
    """4 class folders of 150 8x8 grayscale PNGs whose pixel (0, 0) is the class and (0, 1), (0, 2) the index."""
    for label in range(CLASSES):
        os.makedirs(root / f"class{label}", exist_ok=True)
        for number in range(PER_CLASS):
            image = np.full((8, 8), 40 + label, np.uint8)
            image[0, 1], image[0, 2] = number % 256, number // 256
            Image.fromarray(image).save(root / f"class{label}" / f"{number:04d}.png")
    if corrupt:
        (root / corrupt).write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    return str(root)


def test_sources_read_in_parts_are_listed_and_others_are_not(tmp_path):
    listing = list_source(class_folder(tmp_path / "folder"))
    assert listing.kind is SourceKind.IMAGES and len(listing.paths) == CLASSES * PER_CLASS
    assert listing.class_names == ("class0", "class1", "class2", "class3") and listing.total_bytes > 0
    with tarfile.open(tmp_path / "s.tar", "w") as archive:
        info = tarfile.TarInfo("a.png")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"abc"))
    assert list_source(str(tmp_path / "s.tar")).kind is SourceKind.TAR
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    assert list_source(str(tmp_path / "x.npz")) is None and list_source("builtin:digits") is None
    with pytest.raises(DataError, match="does not exist"):
        list_source(str(tmp_path / "missing"))


def test_the_hold_out_choice_and_the_fingerprint_depend_on_content_only(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (400, 4, 4, 1), dtype=np.uint8)
    labels = np.arange(400) % 3
    chosen = split_by_content(images, labels, 0.25).holdout
    assert 0.15 < chosen.mean() < 0.35
    reversed_split = split_by_content(images[::-1], labels[::-1], 0.25)
    assert np.array_equal(reversed_split.holdout, chosen[::-1])  # an image's fate is its own, not its position's
    assert fingerprint(images, labels) == fingerprint(images[::-1], labels[::-1])  # order-free
    assert fingerprint(images, labels) != fingerprint(images, np.arange(400) % 4)  # labels count

    listing = list_source(class_folder(tmp_path / "folder"))
    read = ReadOptions()

    def results(files_per_unit):
        units = tuple(listing.paths[i : i + files_per_unit] for i in range(0, len(listing.paths), files_per_unit))
        plan = IngestPlan(listing, units, read, 0.1, str(tmp_path / f"out{files_per_unit}"), {}, {})
        rows = [convert_unit({"unit": np.array([u])}, plan)["result"][0] for u in range(len(units))]
        return [UnitResult.from_json(row) for row in rows]

    def fingerprint_of(results):
        count = sum(r.train + r.holdout for r in results)
        return content_fingerprint(sum(r.hash_sum for r in results), count, (8, 8, 1), True)

    by_100, by_7 = results(100), results(7)
    assert fingerprint_of(by_100) == fingerprint_of(by_7)  # any partition
    assert sum(r.holdout for r in by_100) == sum(r.holdout for r in by_7)  # the same images held out
    assert fingerprint_of(by_100) != fingerprint_of(by_100[:-1])


def test_the_nll_on_a_test_split_is_refused_on_ray_data_before_ray_starts(tmp_path):
    overrides = [f"data.uri={class_folder(tmp_path / 'f')}", "data.prepare_on=ray_data", "evaluate.nll_split=test"]
    with pytest.raises(DataError, match="evaluate.nll_split=test: .* has no separate test split"):
        run_prepare(tmp_path, overrides)
    assert not ray.is_initialized()


class NoChampion:
    def champion(self, model_name):
        return ChampionRef(model_name, None)

    def data_listing(self, uri):
        return f"listing of {uri}"


def run_prepare(tmp_path, overrides):
    """The prepare stage of a config, run as the runner would, into ``tmp_path/runs``."""
    config = load_config(None, [f"storage.root={tmp_path / 'runs'}", "run_id=ingest", *overrides])
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(tracking)
    run = client.create_run(client.create_experiment("ingest"))
    store = RunStore.of(config)
    context = StageContext("prepare", store, "f" * 64, run.info.run_id, tracking, print, "digest")
    return prepare.run(context, prepare.settings(config, NoChampion()))


def test_the_same_folder_gives_the_same_fingerprint_split_and_files_on_the_driver_and_on_ray_data(local_ray, tmp_path):
    uri = class_folder(tmp_path / "folder")
    base = [f"data.uri={uri}", "data.shard_mb=0.005", "evaluate.classifier_epochs=2"]
    driver = run_prepare(tmp_path / "driver", [*base, "data.prepare_on=driver"])
    on_ray = run_prepare(tmp_path / "ray", [*base, "data.prepare_on=ray_data"])
    assert driver.fingerprint == on_ray.fingerprint
    assert (driver.num_train, driver.num_holdout) == (on_ray.num_train, on_ray.num_holdout)
    assert driver.class_counts == on_ray.class_counts and driver.class_names == on_ray.class_names
    for split, count in (("shards_uri", 7), ("holdout_uri", 1)):  # file for file, byte for byte
        files = [read_manifest(getattr(outputs, split))["files"] for outputs in (driver, on_ray)]
        assert files[0] == files[1] and len(files[0]) == count
    assert driver.extractor_id == on_ray.extractor_id  # the classifier trains on the written split, on both paths


def test_prepare_on_ray_data_shuffles_a_class_sorted_folder_into_mixed_files(local_ray, tmp_path):
    uri = class_folder(tmp_path / "folder", corrupt="class2/0007.png")
    inception = ["evaluate.extractor=inception", f"evaluate.inception_weights_uri={tmp_path / 'unused.pth'}"]
    base = [f"data.uri={uri}", "data.prepare_on=ray_data", *inception, "data.shard_mb=0.005"]
    with pytest.raises(DataError, match=r"unreadable image .*class2/0007.png"):
        run_prepare(tmp_path / "a", base)
    outputs = run_prepare(tmp_path / "b", [*base, "data.unreadable_images=skip"])
    assert outputs.num_train + outputs.num_holdout == CLASSES * PER_CLASS - 1
    assert 0.05 < outputs.num_holdout / (CLASSES * PER_CLASS) < 0.15  # data.holdout_fraction 0.1, by hash
    assert outputs.class_names == ("class0", "class1", "class2", "class3") and outputs.num_classes == CLASSES
    assert sum(outputs.class_counts) == outputs.num_train
    layout = split_layout(outputs.shards_uri, {})
    assert layout.count == outputs.num_train and set(layout.counts[:-1]) == {81}  # 0.005 MiB of 8x8x1 images
    images, labels = read_split(outputs.shards_uri, {})
    assert np.array_equal(images[:, 0, 0, 0] - 40, labels)  # labels travel with their images
    full = [file for file, count in enumerate(layout.counts) if count == 81]
    assert len(full) >= 3
    for file in full:  # each full file mixes the classes the source had sorted
        first = layout.sources[file].first_index
        assert len(set(labels[first : first + 81].tolist())) == CLASSES

    def identity(pixels):  # [n, 8, 8, 1] -> class x 1000 + index
        marks = pixels[:, 0, :3, 0].astype(int)
        return marks[:, 0] * 1000 + marks[:, 1] + 256 * marks[:, 2]

    holdout, _ = read_split(outputs.holdout_uri, {})
    identity, held = identity(images), identity(holdout)
    assert len(set(identity.tolist()) | set(held.tolist())) == CLASSES * PER_CLASS - 1  # each image once
    assert not list((tmp_path / "b/runs/ingest/prepare").glob("*/staging"))

    spec = StreamSpec(layout, 0, True, 0.5, 2, 16.0, {})  # the streaming loader reads files of varied sizes
    stream = ImageStream(spec, 0, 2, 0, 64 * 5, 64)
    assert all(stream.next(torch.device("cpu"))[0].shape == (64, 8, 8, 1) for _ in range(5))
    with pytest.raises(StopIteration):
        stream.next(torch.device("cpu"))
