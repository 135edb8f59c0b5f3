"""The picture of samples over training: one strip per sample grid, kept in the train result folder (so restarts do
not lose the early ones), stacked oldest first with the images seen beside each."""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from ddpm_core.images import grid, labelled_rows
from pipelines.config_file import load_config
from pipelines.execution import Device
from pipelines.training.grids import samples_over_training, save_strip
from pipelines.training.job import TrainJob


def job(work: str, num_classes: int | None = None) -> TrainJob:
    config = load_config(None, [])
    unet = dataclasses.replace(config.model.unet(), num_classes=num_classes)
    return TrainJob(unet, config.diffusion, config.train, Device.CPU, "shards", None, work, {}, "tracking", "run")


def pixels(count: int, value_of: np.ndarray) -> np.ndarray:
    """``count`` 8x8 grey images, image i filled with ``value_of[i]``: [count, 8, 8, 1]."""
    return np.broadcast_to(value_of[:count, None, None, None], (count, 8, 8, 1)).astype(np.uint8).copy()


def test_strips_of_every_grid_stack_oldest_first_whatever_order_they_were_written_in(tmp_path):
    unconditional = job(str(tmp_path / "work"))
    values = {step: np.arange(64) + step % 100 for step in (2048, 0, 1024)}  # written out of order (a restart)
    for step, value in values.items():
        save_strip(unconditional, pixels(64, value), 8, step)
    composite = samples_over_training(unconditional)
    assert composite is not None
    strips = [grid(pixels(8, values[step]), columns=8) for step in (0, 1024, 2048)]
    expected = labelled_rows(strips, ["0 images", "1,024 images", "2,048 images"])
    assert composite.size == expected.size and np.array_equal(np.asarray(composite), np.asarray(expected))


def test_a_conditional_grid_keeps_one_image_of_each_class(tmp_path):
    conditional = job(str(tmp_path / "work"), num_classes=3)
    by_class = np.repeat([10, 20, 30], 8)  # rows_by_class's layout: 8 images of class 0, then of 1, then of 2
    save_strip(conditional, pixels(24, by_class), 8, 0)
    strip = Image.open(tmp_path / "work/grid_strips/000000000000.png")
    assert strip.size == grid(pixels(3, by_class[::8]), columns=3).size
    assert set(np.unique(np.asarray(strip))) == {10, 20, 30, 255}  # the three classes and the white padding


def test_no_grids_no_picture(tmp_path):
    assert samples_over_training(job(str(tmp_path / "work"))) is None
