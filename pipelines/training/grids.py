"""Samples over training at a glance: each sample grid of rank 0 leaves one strip of its images in storage (the
first row; a conditional model's: one image of each class), and at the end the driver stacks the strips, one row
per grid labelled with the images seen, into ``samples_over_training.png`` on the grids' MLflow run."""

from __future__ import annotations

import io

import numpy as np
from mlflow.tracking import MlflowClient
from PIL import Image

from ddpm_core.images import grid, labelled_rows
from ddpm_core.storage import filesystem, write_bytes
from pipelines.training.job import TrainJob

COMPOSITE = "samples_over_training.png"


def save_strip(job: TrainJob, pixels: np.ndarray, per_row: int, images_seen: int) -> None:
    """Keep one strip of a grid's ``pixels`` ``[n, H, W, C]`` (laid out ``per_row`` to a row): its first row, or with
    one row per class, each row's first image."""
    strip = pixels[::per_row] if job.unet.num_classes else pixels[:per_row]  # [k, H, W, C]
    buffer = io.BytesIO()
    grid(strip, columns=len(strip)).save(buffer, format="PNG")
    fs, path = filesystem(f"{job.grid_strips_uri}/{images_seen:012d}.png", job.storage_options)
    write_bytes(fs, path, buffer.getvalue())


def samples_over_training(job: TrainJob) -> Image.Image | None:
    """The strips this training left (across restarts: they live in its result folder), oldest first; None if none."""
    fs, folder = filesystem(job.grid_strips_uri, job.storage_options)
    if not fs.exists(folder):
        return None
    paths = sorted(path for path in fs.ls(folder, detail=False) if path.endswith(".png"))
    if not paths:
        return None
    strips = [Image.open(io.BytesIO(fs.cat_file(path))) for path in paths]
    labels = [f"{int(path.rsplit('/', 1)[-1].removesuffix('.png')):,} images" for path in paths]
    return labelled_rows(strips, labels)


def log_samples_over_training(job: TrainJob, client: MlflowClient) -> None:
    """Log :func:`samples_over_training` as ``samples_over_training.png`` beside the grids it summarises."""
    if job.grids_run_id is None:
        return
    composite = samples_over_training(job)
    if composite is not None:
        client.log_image(job.grids_run_id, composite, artifact_file=COMPOSITE)
