"""Images the pipeline cannot represent are refused, never altered quietly (issue 29, group 3): every image mode a
folder of PNG/JPEG files can hold is read as it is meant to be seen, or refused naming the file and its mode."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ddpm_core.data import DataError, load_dataset, to_model_range


def folder_of(tmp_path, images: dict[str, Image.Image], **save) -> str:
    root = tmp_path / "images"
    root.mkdir()
    for name, image in images.items():
        image.save(root / name, **save)
    return str(root)


def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    """Mid-gray 16-bit pixels land at mid-gray (about 0 in the model's [-1, 1] range); the whole 16-bit range maps
    onto the 8-bit one in order. (An 8-bit conversion used to clip 99.6% of such pixels to white.)"""
    gray = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    ramp = Image.fromarray(np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8))
    dataset = load_dataset(folder_of(tmp_path, {"gray.png": gray, "ramp.png": ramp}))
    assert gray.mode.startswith("I")  # what PIL makes of a 16-bit PNG
    by_name = dict(zip(("gray", "ramp"), dataset.images, strict=True))  # files are read in name order
    assert abs(float(to_model_range(by_name["gray"][None]).mean())) < 0.01
    values = by_name["ramp"].reshape(-1)
    assert values[0] == 0 and values[-1] == 255 and np.all(np.diff(values.astype(int)) >= 0)


def test_alpha_is_dropped_only_when_every_pixel_is_opaque(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    opaque = Image.fromarray(np.concatenate([pixels, np.full((8, 8, 1), 255, np.uint8)], axis=2), "RGBA")
    dataset = load_dataset(folder_of(tmp_path, {"a.png": opaque}))
    assert np.array_equal(dataset.images[0], pixels)
    see_through = np.concatenate([pixels, np.full((8, 8, 1), 255, np.uint8)], axis=2)
    see_through[0, 0, 3] = 0
    (tmp_path / "b").mkdir()
    Image.fromarray(see_through, "RGBA").save(tmp_path / "b" / "t.png")
    with pytest.raises(DataError, match=r"t\.png: mode RGBA with transparent pixels"):
        load_dataset(str(tmp_path / "b"))


def test_palette_and_bilevel_images_are_expanded(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    palette = Image.fromarray(pixels).quantize(colors=16)
    expected = np.asarray(palette.convert("RGB"))
    assert np.array_equal(load_dataset(folder_of(tmp_path, {"p.png": palette})).images[0], expected)
    (tmp_path / "one").mkdir()
    Image.fromarray(np.eye(8, dtype=bool)).save(tmp_path / "one" / "b.png")  # mode "1"
    bilevel = load_dataset(str(tmp_path / "one")).images[0, ..., 0]
    assert set(np.unique(bilevel).tolist()) == {0, 255} and bilevel[3, 3] == 255 and bilevel[3, 4] == 0


def test_a_jpeg_is_turned_by_its_exif_orientation(tmp_path):
    image = Image.new("RGB", (6, 2), (200, 30, 30))  # 6 wide, 2 high
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    image.save(tmp_path / "r.jpg", exif=exif.tobytes())
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "r.jpg").write_bytes((tmp_path / "r.jpg").read_bytes())
    assert load_dataset(str(tmp_path / "f")).images.shape == (1, 6, 2, 3)  # seen upright: 2 wide, 6 high


def test_cmyk_is_refused_naming_the_file(tmp_path):
    """CMYK has no faithful RGB reading without its colour profile: refused, not converted on a guess."""
    root = tmp_path / "odd"
    root.mkdir()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(root / "x.jpg")
    with pytest.raises(DataError, match=r"x\.jpg: mode CMYK is not read"):
        load_dataset(str(root))
