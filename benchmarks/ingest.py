"""The streaming loader's costs (issue 20), three measurements in one run:

- ``per_core``: images per second one CPU core turns from a data-split file into a training batch (read the .npz,
  permute, flip, to a float tensor in [-1, 1]: ``decode_piece`` + ``to_model_range``) at 32x32 and 256x256 RGB, and
  PNG decoding (what prepare pays for an image folder), with the cores per GPU that the training rates measured on
  an H200 (docs/benchmarks.md) would need.
- ``memory``: how much a process's private memory (and the object-store pages it maps) grows while it streams a split
  of 1x, 2x, 4x and 8x a memory budget through Ray Data, against the resident loader's reading the same splits (each
  in a fresh process).
- ``data_wait``: the share of a training loop's wall time spent waiting for the stream's next batch, on the digits
  preset with two processes' worth of CPUs (one for the step, one for Ray Data's decode tasks), against the resident
  loader's draw.

    python benchmarks/ingest.py --out benchmarks/results/ingest_cpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import cpu_name, write_result

from ddpm_core.data import ImageDataset, random_batch, to_model_range
from pipelines.data.shards import read_split, shard_images_for, split_layout, write_split
from pipelines.data.streaming import ImageStream, Piece, StreamSpec, decode_piece

H200_TRAIN_RATES = {"the pipeline's step at cifar10, bf16 (measured)": 2215, "issue 21's target": 5000}
BUDGET_MB = 48.0


def write_random_split(root: str, count: int, size: int, shard_mb: float = 64.0) -> str:
    images = np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    dataset = ImageDataset(images, np.zeros(count, np.int64), "0" * 64, "random")
    write_split(root, dataset, np.arange(count), {}, shard_images_for(images.shape[1:], shard_mb))
    return root


def per_core_rates(size: int, count: int) -> tuple[float, float]:
    """Images per second on one thread of (a decode task: read a split file, permute, flip, as uint8; the
    conversion of its batch to float32 NCHW in [-1, 1], which a GPU worker does on its GPU)."""
    with tempfile.TemporaryDirectory() as folder:
        layout = split_layout(write_random_split(f"{folder}/split", count, size), {})
        decoding = converting = 0.0
        for file, source in enumerate(layout.sources):
            started = time.perf_counter()
            batch = decode_piece(Piece(0, file, 0, layout.counts[file]), source, 0, True, {})["images"]
            decoded = time.perf_counter()
            to_model_range(batch)
            decoding, converting = decoding + decoded - started, converting + time.perf_counter() - decoded
        return count / decoding, count / converting


def png_rate(size: int, count: int) -> float:
    """Images per second decoding PNG files to uint8 arrays on one thread (prepare's cost for an image folder)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(count):
        smooth = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        buffer = io.BytesIO()
        Image.fromarray(smooth).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    started = time.perf_counter()
    for data in encoded:
        np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return count / (time.perf_counter() - started)


def measure_per_core() -> dict:
    torch.set_num_threads(1)
    rows = {}
    for size, count in ((32, 40_000), (256, 1_023)):
        decode, convert = per_core_rates(size, count)
        rows[f"{size}x{size}"] = {
            "decode_task_img_per_s": decode,
            "to_float_img_per_s": convert,
            "decode_and_float_img_per_s": 1 / (1 / decode + 1 / convert),
            "png_decode_img_per_s": png_rate(size, 2000 if size == 32 else 200),
            "cores_per_gpu": {name: gpu / decode for name, gpu in H200_TRAIN_RATES.items()} if size == 32 else None,
        }
        print(f"per core {size}x{size}: {rows[f'{size}x{size}']}", flush=True)
    return rows


def memory_growth_child(mode: str, uri: str, count: int) -> dict[str, float]:
    """How far a fresh process's private and shared memory (MiB) rose while it read the split at ``uri`` with the
    ``mode`` loader."""
    command = [sys.executable, __file__, "--consume", mode, uri, str(count)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_mib() -> dict[str, float]:
    """This process's resident memory now, in MiB (Linux): private (``RssAnon``) and shared pages mapped from Ray's
    object store (``RssShmem``)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) / 1024 for name in ("RssAnon", "RssShmem")}


def consume(mode: str, uri: str, count: int) -> None:
    """Read every image of the split once, as a training worker would, and print as JSON how far this process's
    private and shared resident memory rose above their level before (libraries and Ray's client loaded first),
    sampled every 16 batches."""
    import ray

    if mode == "stream":
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20)
    before, peak = memory_mib(), memory_mib()

    def sample() -> None:
        peak.update({name: max(peak[name], value) for name, value in memory_mib().items()})

    if mode == "resident":
        images, _ = read_split(uri, {})
        sample()
        resident = to_model_range(images)  # [N, C, H, W] float32: what a worker keeps
        sample()
        assert len(resident) == count
    else:
        spec = StreamSpec(split_layout(uri, {}), 0, True, 1.0, 4, BUDGET_MB, {})
        steps = count // 128
        stream = ImageStream(spec, 0, 1, 0, steps * 128, 128)
        for step in range(steps):
            to_model_range(stream.next(torch.device("cpu"))[0])
            if step % 16 == 0:
                sample()
    print(json.dumps({name: peak[name] - before[name] for name in peak}))


def measure_memory() -> list[dict]:
    rows = []
    per_image = 32 * 32 * 3
    with tempfile.TemporaryDirectory() as folder:
        for multiple in (1, 2, 4, 8):
            count = int(multiple * BUDGET_MB * 2**20 // per_image)
            uri = write_random_split(f"{folder}/split{multiple}", count, 32, shard_mb=4.0)
            row = {"budget_multiple": multiple, "images": count, "split_mib": count * per_image / 2**20}
            for mode in ("stream", "resident"):
                growth = memory_growth_child(mode, uri, count)
                row[f"{mode}_private_mib"], row[f"{mode}_object_store_mapped_mib"] = (
                    growth["RssAnon"],
                    growth["RssShmem"],
                )
            print(f"memory {multiple}x: {row}", flush=True)
            rows.append(row)
    return rows


def measure_data_wait(steps: int = 200, warm: int = 5) -> dict:
    """Seconds waiting for data over a digits training loop, streamed and resident: the first ``warm`` steps (the
    stream's start: Ray Data plans and starts its tasks) apart from the rest."""
    import ray

    from ddpm_core.data import load_dataset
    from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion
    from ddpm_core.training import OptimConfig, make_optimizer, train_step
    from ddpm_core.unet import PRESETS, UNet

    torch.set_num_threads(1)
    digits = load_dataset("builtin:digits")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        uri = f"{folder}/digits"
        write_split(uri, digits, np.random.default_rng(0).permutation(len(digits.images)), {}, 64)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        for mode in ("stream", "resident"):
            torch.manual_seed(0)
            model, diffusion = UNet(PRESETS["digits"]), GaussianDiffusion.from_config(DiffusionConfig())
            optimizer, generator = make_optimizer(model, OptimConfig()), torch.Generator().manual_seed(0)
            resident = to_model_range(digits.images)
            stream = ImageStream(
                StreamSpec(split_layout(uri, {}), 0, True, 1.0, 4, BUDGET_MB, {}), 0, 1, 0, 64 * steps, 64
            )
            waited, started = 0.0, time.perf_counter()
            for step in range(steps):
                if step == warm:
                    startup, waited, started = time.perf_counter() - started, 0.0, time.perf_counter()
                asked = time.perf_counter()
                if mode == "stream":
                    batch = to_model_range(stream.next(torch.device("cpu"))[0])
                else:
                    batch = random_batch(resident, 64, generator, True)[0]
                waited += time.perf_counter() - asked
                train_step(model, diffusion, optimizer, batch, OptimConfig(), 0, None, None, generator=generator)
            total = time.perf_counter() - started
            results[mode] = {"steps": steps - warm, "batch": 64, "wait_s": waited, "total_s": total}
            results[mode].update(fraction=waited / total, first_steps=warm, first_steps_s=startup)
            print(f"data wait {mode}: {waited / total:.2%} of {total:.1f} s after {startup:.1f} s", flush=True)
        ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ingest_cpu.json"))
    parser.add_argument("--only", choices=("per_core", "memory", "data_wait"), nargs="*")
    parser.add_argument("--consume", nargs=3, metavar=("MODE", "URI", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consume:  # the child process of the memory measurement
        mode, uri, count = args.consume
        consume(mode, uri, int(count))
        return
    wanted = set(args.only or ("per_core", "memory", "data_wait"))
    result: dict = {"device": cpu_name(), "cpus": os.cpu_count(), "budget_mib": BUDGET_MB}
    for name, measure in (("per_core", measure_per_core), ("memory", measure_memory), ("data_wait", measure_data_wait)):
        if name in wanted:
            result[name] = measure()
            write_result(args.out, result)


if __name__ == "__main__":
    main()
