"""Sample grids as PNG."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ddpm_core.storage import filesystem, write_bytes


def grid(images: np.ndarray, columns: int | None = None, padding: int = 1, min_cell: int = 32) -> Image.Image:
    """Tile uint8 ``[N, H, W, C]`` images into one picture; small images are enlarged (nearest) to ``min_cell`` px."""
    count, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    scale = max(1, math.ceil(min_cell / max(height, width)))
    cell_h, cell_w = height * scale + padding, width * scale + padding
    canvas = np.full((rows * cell_h + padding, columns * cell_w + padding, channels), 255, dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        big = image.repeat(scale, axis=0).repeat(scale, axis=1)
        top, left = padding + row * cell_h, padding + column * cell_w
        canvas[top : top + height * scale, left : left + width * scale] = big
    return Image.fromarray(canvas[..., 0] if channels == 1 else canvas)


def labelled_rows(rows: Sequence[Image.Image], labels: Sequence[str], padding: int = 4) -> Image.Image:
    """Stack picture strips top to bottom, each with its label to its left (e.g. the images seen when a strip of
    samples was drawn): one picture of how samples change over training. Strips of unequal widths are left-aligned."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(int(measure.textlength(label, font=font)) for label in labels) + 2 * padding
    width = label_width + max(row.width for row in rows)
    canvas = Image.new("RGB", (width, sum(row.height for row in rows)), "white")
    draw, top = ImageDraw.Draw(canvas), 0
    for row, label in zip(rows, labels, strict=True):
        canvas.paste(row.convert("RGB"), (label_width, top))
        draw.text((padding, top + row.height // 2), label, fill="black", font=font, anchor="lm")
        top += row.height
    return canvas


def rows_by_class(images: np.ndarray, labels: np.ndarray, columns: int) -> np.ndarray:
    """The first ``columns`` images ``[n, H, W, C]`` of each class in ``labels`` ``[n]``, class after class (in order
    of first appearance), for a :func:`grid` of ``columns`` columns with one row per class; a class with fewer images
    leaves its row's end blank."""
    classes = list(dict.fromkeys(labels.tolist()))
    blank = np.full_like(images[:1], 255)  # [1, H, W, C]
    rows = []
    for label in classes:
        mine = images[labels == label][:columns]  # [<=columns, H, W, C]
        rows.append(np.concatenate([mine, *[blank] * (columns - len(mine))]))
    return np.concatenate(rows)  # [K * columns, H, W, C]


def save_grid(
    images: np.ndarray, uri: str, columns: int | None = None, storage_options: dict[str, Any] | None = None
) -> None:
    """Write :func:`grid` of ``images`` as a PNG to any fsspec URI."""
    buffer = io.BytesIO()
    grid(images, columns).save(buffer, format="PNG")
    fs, path = filesystem(uri, storage_options)
    write_bytes(fs, path, buffer.getvalue())
