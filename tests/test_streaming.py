"""The streaming loader (pipelines.data.streaming): its epoch order (disjoint files per worker, every image once per
epoch, seeded), resumption at any position equal to the uninterrupted order, the same order through Ray Data as
computed in one process, and the choice between resident and stream."""

import numpy as np
import pytest
import torch

from ddpm_core.autoencoder_weights import LatentSpace
from ddpm_core.data import ImageDataset
from ddpm_core.unet import UNetConfig
from pipelines.config import ConfigError, DataSection, Loader, TrainSection
from pipelines.contracts import LatentOutputs
from pipelines.data.shards import first_rows, read_first_images, read_images_at, split_layout, write_split
from pipelines.data.streaming import (
    ImageStream,
    StreamSpec,
    choose_loader,
    decode_piece,
    epoch_files,
    pieces,
    plan_stream,
    resident_bytes,
    training_loader,
)

NUM_IMAGES, PER_FILE, SEED = 230, 20, 7  # 12 files, the last one of 10 images


def numbered_split(tmp_path, labels: bool = True) -> str:
    """A split whose image i is 4x4x1 of value i % 256 at pixel (0, 0) and i // 256 at (0, 1), label i % 10:
    every image is told apart by its pixels, and a left-right flip is seen at row 0."""
    images = np.zeros((NUM_IMAGES, 4, 4, 1), np.uint8)
    index = np.arange(NUM_IMAGES)
    images[:, 0, 0, 0], images[:, 0, 1, 0] = index % 256, index // 256
    dataset = ImageDataset(images, (index % 10).astype(np.int64) if labels else None, "f" * 64, "numbered")
    uri = str(tmp_path / "shards")
    write_split(uri, dataset, index, {}, PER_FILE)
    return uri


def identities(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image index ``[n]``, flipped ``[n]``) of numbered images ``[n, 4, 4, 1]``, flipped or not."""
    flipped = images[:, 0, 0, 0] + images[:, 0, 1, 0] == 0  # both marks moved to the right end of row 0
    left = np.where(flipped[:, None], images[:, 0, ::-1, 0], images[:, 0, :, 0])  # [n, 4] row 0 unflipped
    return left[:, 0].astype(int) + 256 * left[:, 1].astype(int), flipped


def reference_order(uri: str, rank: int, world: int, start: int, count: int) -> np.ndarray:
    """The images of a worker's order computed in this process, piece by piece."""
    layout = split_layout(uri, {})
    parts = [
        decode_piece(piece, layout.sources[piece.file], SEED, True, {})["images"]
        for piece in pieces(layout, SEED, rank, world, start, count)
    ]
    return np.concatenate(parts)


def test_layout_counts_the_files_of_a_split(tmp_path):
    layout = split_layout(numbered_split(tmp_path), {})
    assert layout.counts == (20,) * 11 + (10,) and layout.count == NUM_IMAGES
    assert [source.first_index for source in layout.sources][:3] == [0, 20, 40]


def test_parts_of_a_split_are_read_from_the_files_that_hold_them(tmp_path):
    uri = numbered_split(tmp_path)
    assert identities(read_first_images(uri, 45, {}))[0].tolist() == list(range(45))
    assert len(read_first_images(uri, None, {})) == NUM_IMAGES
    wanted = [229, 0, 21, 20]
    assert identities(read_images_at(split_layout(uri, {}), wanted, {}))[0].tolist() == wanted


def test_the_first_rows_read_no_file_past_the_ones_that_hold_them():
    read = []

    def files():  # three files of 20 rows, each read when asked for
        for number in range(3):
            read.append(number)
            yield {"mean": np.arange(20 * number, 20 * (number + 1)), "logvar": np.zeros(20)}

    rows = first_rows(files(), 40)
    assert rows["mean"].tolist() == list(range(40)) and rows["logvar"].shape == (40,) and read == [0, 1]
    assert len(first_rows(files(), None)["mean"]) == 60 and first_rows(files(), 21)["mean"][-1] == 20


def test_in_each_epoch_the_workers_read_disjoint_files_and_all_of_them():
    for epoch in range(4):
        taken = [epoch_files(12, SEED, epoch, rank, 3) for rank in range(3)]
        assert sorted(file for files in taken for file in files) == list(range(12))
    assert epoch_files(12, SEED, 0, 0, 3) != epoch_files(12, SEED, 1, 0, 3)  # a new order every epoch
    assert epoch_files(12, SEED + 1, 0, 0, 3) != epoch_files(12, SEED, 0, 0, 3)  # seeded


def test_an_epoch_shows_every_image_of_the_worker_once_flipped_about_half(tmp_path):
    uri = numbered_split(tmp_path)
    layout = split_layout(uri, {})
    files = epoch_files(len(layout.counts), SEED, 0, 1, 2)
    length = sum(layout.counts[file] for file in files)
    index, flipped = identities(reference_order(uri, 1, 2, 0, length))
    expected = np.concatenate(
        [
            np.arange(source.first_index, source.first_index + layout.counts[file])
            for file, source in ((f, layout.sources[f]) for f in files)
        ]
    )
    assert sorted(index) == sorted(expected)  # each image of the worker's files exactly once
    assert 0.3 < flipped.mean() < 0.7
    assert not np.array_equal(index, np.sort(index))  # shuffled within files


def test_resuming_at_any_position_continues_the_uninterrupted_order(tmp_path):
    uri = numbered_split(tmp_path)
    whole = reference_order(uri, 0, 2, 0, 400)  # more than three epochs of this worker
    for start in (0, 1, 19, 20, 57, 115, 333):
        assert np.array_equal(reference_order(uri, 0, 2, start, 400 - start), whole[start:]), start


def test_fewer_files_than_workers_is_refused_naming_what_to_do(tmp_path):
    layout = split_layout(numbered_split(tmp_path), {})
    with pytest.raises(ValueError, match="fewer than the 13 training workers"):
        pieces(layout, SEED, 0, 13, 0, 10)


def test_ray_data_delivers_the_order_in_batches_from_any_position(local_ray, tmp_path):
    uri = numbered_split(tmp_path)
    spec = StreamSpec(split_layout(uri, {}), SEED, True, 0.5, 2, 16.0, {})
    for start, count in ((0, 240), (37, 160)):
        stream = ImageStream(spec, 1, 2, start, count, 16)
        batches = [stream.next(torch.device("cpu")) for _ in range(count // 16)]
        images = torch.cat([images for images, _ in batches]).numpy()  # [count, 4, 4, 1]
        assert images.dtype == np.uint8 and images.shape == (count, 4, 4, 1)
        assert np.array_equal(images, reference_order(uri, 1, 2, start, count))
        labels = torch.cat([labels for _, labels in batches]).numpy()
        assert np.array_equal(labels, identities(images)[0] % 10)  # labels travel with their images
        with pytest.raises(StopIteration):  # exactly the images asked for
            stream.next(torch.device("cpu"))


def test_a_split_without_labels_streams_images_only(local_ray, tmp_path):
    uri = numbered_split(tmp_path, labels=False)
    stream = ImageStream(StreamSpec(split_layout(uri, {}), SEED, False, 0.5, 1, 16.0, {}), 0, 1, 0, 32, 16)
    images, labels = stream.next(torch.device("cpu"))
    assert labels is None and images.shape == (16, 4, 4, 1)
    assert not identities(images.numpy())[1].any()  # no flips asked for


def test_auto_holds_a_slice_resident_when_it_fits_the_budget_and_streams_otherwise():
    values = 3 * 32 * 32  # CIFAR-10: 45,000 training images on 2 workers
    needed = resident_bytes(45_000, values, 2)
    assert needed == 45_000 * values * 3  # the uint8 split while read + half of it as float32
    fits = DataSection(memory_budget_mb=needed / 2**20)
    assert choose_loader(fits, 45_000, values, 2)[0] is Loader.RESIDENT
    small = DataSection(memory_budget_mb=needed / 2**20 * 0.99)
    loader, why = choose_loader(small, 45_000, values, 2)
    assert loader is Loader.STREAM and "data.memory_budget_mb" in why
    assert choose_loader(DataSection(loader="resident", memory_budget_mb=1), 45_000, values, 2)[0] is Loader.RESIDENT
    assert choose_loader(DataSection(loader="stream"), 10, values, 2)[0] is Loader.STREAM


def test_a_latent_model_holds_its_latents_resident_whatever_the_images_would_need():
    unet = UNetConfig(image_size=32, in_channels=3)
    latent = LatentOutputs("mem://latents", (4, 8, 8), 45_000, LatentSpace("mem://vae", "ab", "cd", 0.18), (32, 32, 3))
    streamed = DataSection(loader="stream")
    assert training_loader(streamed, 45_000, unet, 2, None)[0] is Loader.STREAM
    loader, why = training_loader(streamed, 45_000, unet, 2, latent)
    assert loader is Loader.RESIDENT and "45000 posteriors" in why and "mem://latents" in why
    assert plan_stream(streamed, TrainSection(), ("mem://images", 45_000), unet, 2, {}, latent)[0] is None


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("loader", "disk", "data.loader 'disk' is not one of"),
        ("memory_budget_mb", 0, "data.memory_budget_mb must be > 0"),
        ("shard_mb", -1, "data.shard_mb must be > 0"),
        ("prefetch_batches", -1, "data.prefetch_batches must be >= 0"),
    ],
)
def test_bad_loader_settings_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        DataSection(**{key: value})
