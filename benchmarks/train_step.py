"""Throughput of the pipeline's own training step (``ddpm_core.training.train_step`` with AdamW, gradient clipping
and EMA, batches drawn from a device-resident data set by ``ddpm_core.data.random_batch`` as the trainer does), for each
fast-path variant, with the numbers the performance targets are stated in:

- images/s (median over timed windows), and the step's FLOPs from torch's FLOP counter, so that
  MFU = achieved FLOP/s / ``--peak-tflops`` (given for the device and dtype: 790 for an H100's dense bf16);
- peak device memory (CUDA only);
- the time split from the profiler, by the labels the trainer and ``train_step`` put on their regions:
  data, forward, backward, optimizer, EMA and logging (the log step's loss check and statistics read through
  ``RunningTotals``, every ``--log-every`` steps, amortised per step); on a GPU, the device time of the kernels
  launched in each region;
- with ``--world-size N`` > 1, N data-parallel processes as the trainer runs them (``DistributedDataParallel``, gloo on
  the CPU with the cores split between them, NCCL with one GPU each; ``--batch`` is the global batch, as
  ``train.batch_size``): the communication time (the profiler's gloo/NCCL collectives, which overlap the backward
  pass) and the exposed communication cost (the step against the same step without gradient synchronisation,
  ``no_sync``, timed in alternating windows).

Variants: ``eager`` or switches joined by ``+``: ``channels_last``, ``compile`` (e.g. ``channels_last+compile``) and,
with ``--world-size`` > 1, DDP's ``bucket_view`` (``gradient_as_bucket_view``) and ``static_graph``; dtype ``fp32`` or
``bf16`` (autocast, as the pipeline uses on GPUs).

    python benchmarks/train_step.py --preset cifar10 --batch 128 --dtype bf16 --peak-tflops 790 \\
        --out benchmarks/results/train_step_h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing
from common import device_name, synchronize, variant_switches, write_result
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from ddpm_core.data import random_batch
from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion
from ddpm_core.ema import EMA
from ddpm_core.precision import Precision, autocast_dtype
from ddpm_core.training import OptimConfig, RunningTotals, make_optimizer, train_step
from ddpm_core.unet import UNet, unet_preset

REGIONS = ("data", "forward", "backward", "optimizer", "ema", "logging")
SWITCHES = ("channels_last", "compile")  # a variant: "eager" (none) or switches joined by "+"
DDP_SWITCHES = ("bucket_view", "static_graph")  # DistributedDataParallel's gradient_as_bucket_view and static_graph
COLLECTIVES = ("gloo:", "nccl:")  # the profiler's names for c10d collectives, e.g. "gloo:all_reduce"


class Step:
    """One configured training step of the preset's U-Net on random data of the preset's shape, as the trainer runs
    it: DDP-wrapped when a process group is up, statistics summed on the device and read every ``log_every`` steps."""

    def __init__(self, preset: str, batch: int, device: torch.device, variant: str, dtype: str, log_every: int) -> None:
        config, switches = unet_preset(preset), variant_switches(variant, SWITCHES + DDP_SWITCHES)
        torch.manual_seed(0)
        self.memory_format = torch.channels_last if "channels_last" in switches else torch.contiguous_format
        self.model = UNet(config).to(device).to(memory_format=self.memory_format)
        self.distributed = dist.is_initialized()
        self.wrapped = (
            DistributedDataParallel(
                self.model,
                device_ids=[device] if device.type == "cuda" else None,
                gradient_as_bucket_view="bucket_view" in switches,
                static_graph="static_graph" in switches,
            )
            if self.distributed
            else self.model
        )
        self.step_model = torch.compile(self.wrapped) if "compile" in switches else self.wrapped
        self.totals = RunningTotals(device, dist.all_reduce if self.distributed else None)
        self.log_every, self.steps_done = log_every, 0
        self.diffusion = GaussianDiffusion.from_config(DiffusionConfig())
        self.optim = OptimConfig(lr=1e-4, warmup_images=0)
        self.optimizer = make_optimizer(self.model, self.optim)
        self.ema = EMA(self.model, 0.9999, warmup=False)
        self.autocast = autocast_dtype(dtype)
        self.generator = torch.Generator(device=device).manual_seed(0)
        shape = (max(4 * batch, 1024), config.in_channels, config.image_size, config.image_size)
        self.data = torch.rand(shape, generator=self.generator, device=device) * 2 - 1  # [N, C, H, W] in [-1, 1]
        self.batch, self.device = batch, device  # batch: this process's share of the global batch

    def __call__(self, sync_gradients: bool = True) -> None:
        with record_function("data"):
            x0, _ = random_batch(self.data, self.batch, self.generator, True, self.memory_format)
        with contextlib.nullcontext() if sync_gradients else self.wrapped.no_sync():
            result = train_step(
                self.step_model,
                self.diffusion,
                self.optimizer,
                x0,
                self.optim,
                10**9,
                self.ema,
                generator=self.generator,
                autocast_dtype=self.autocast,
            )
        self.totals.add(result)
        self.steps_done += 1
        if self.steps_done % self.log_every == 0:
            with record_function("logging"):
                window = self.totals.summed()
                math.isfinite(window.loss_sum)
                window.means()
                self.totals.restart()

    def flops_per_image(self) -> float:
        """Forward + backward FLOPs of the U-Net per image (torch's FLOP counter, eager, one batch)."""
        x = self.data[: self.batch]
        t = torch.randint(0, 1000, (self.batch,), device=self.device)
        with FlopCounterMode(display=False) as counter:
            self.model(x, t).square().mean().backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops() / self.batch


def time_split(step: Step, steps: int) -> dict[str, float]:
    """Milliseconds per step in each labelled region: device time on CUDA, host time on the CPU."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if step.device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        synchronize(step.device)
    on_device = step.device.type == "cuda"
    micros = {
        event.key: event.device_time_total if on_device else event.cpu_time_total for event in profiler.key_averages()
    }
    split = {f"{region}_ms": micros.get(region, 0.0) / 1000 / steps for region in REGIONS}
    if step.distributed:  # collectives run beside the backward pass (gloo's threads, NCCL's stream): they overlap it
        split["communication_ms"] = (
            sum(value for key, value in micros.items() if key.startswith(COLLECTIVES)) / 1000 / steps
        )
    return split


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def time_window(step: Step, steps: int, world: int, sync_gradients: bool = True) -> tuple[float, int]:
    """(images/s over all ``world`` processes, peak bytes allocated above the window's start) over ``steps`` steps."""
    if step.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(step.device)
    synchronize(step.device)
    base, start = allocated(step.device), time.perf_counter()
    for _ in range(steps):
        step(sync_gradients)
    synchronize(step.device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(step.device) - base if step.device.type == "cuda" else 0
    return steps * step.batch * world / seconds, peak


def measure(
    preset: str,
    batch: int,
    device: torch.device,
    variants: list[str],
    dtype: str,
    steps: int,
    windows: int,
    peak_tflops: float | None,
    log_every: int,
    world: int = 1,
) -> list[dict]:
    """Every variant built and warmed up first, then timed in alternating windows, so that machine noise (other
    load, clock changes) hits all of them alike; the median window counts. ``batch`` is the global batch."""
    built, warmup_s, resident = {}, {}, {}
    for variant in variants:
        before, started = allocated(device), time.perf_counter()
        built[variant] = Step(preset, batch // world, device, variant, dtype, log_every)
        for _ in range(3):  # warm-up: compilation, cuDNN autotuning, allocator
            built[variant]()
        if world > 1:
            built[variant](sync_gradients=False)
        synchronize(device)
        warmup_s[variant], resident[variant] = time.perf_counter() - started, allocated(device) - before
    rates, unsynced, transient = {v: [] for v in variants}, {v: [] for v in variants}, dict.fromkeys(variants, 0)
    for _ in range(windows):
        for variant, step in built.items():
            rate, peak = time_window(step, steps, world)
            rates[variant].append(rate)
            transient[variant] = max(transient[variant], peak)
            if world > 1:
                unsynced[variant].append(time_window(step, steps, world, sync_gradients=False)[0])
    rows = []
    for variant, step in built.items():
        images_per_s, flops = statistics.median(rates[variant]), step.flops_per_image()
        row = {
            "preset": preset,
            "batch": batch,
            "world_size": world,
            "device": device.type,
            "variant": variant,
            "dtype": dtype,
            "params": sum(p.numel() for p in step.model.parameters()),
            "images_per_s": images_per_s,
            "window_images_per_s": rates[variant],
            "warmup_s": warmup_s[variant],
            "gflop_per_image_fwd_bwd": flops / 1e9,
            "achieved_tflops": images_per_s * flops / 1e12,
            "mfu": images_per_s * flops / (peak_tflops * 1e12) if peak_tflops else None,
            # weights, gradients, AdamW and EMA state and the data (resident) + the step's activations (transient)
            "peak_memory_gib": (resident[variant] + transient[variant]) / 2**30 if device.type == "cuda" else None,
            **time_split(step, steps),
        }
        row["data_wait_fraction"] = row["data_ms"] / (1000 * batch / images_per_s)
        if world > 1:  # what gradient synchronisation adds to a step, beyond what overlaps with the backward pass
            row["images_per_s_without_gradient_sync"] = statistics.median(unsynced[variant])
            row["exposed_communication_ms"] = (
                1000 * batch / images_per_s - 1000 * batch / row["images_per_s_without_gradient_sync"]
            )
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    lines = [
        f"Device: {result['device_name']}; torch {result['torch']}; {result['world_size']} process(es) x "
        f"{result['threads']} CPU threads; peak {result['peak_tflops'] or 'not given'} TFLOP/s.",
        "",
        "| preset | batch | variant | dtype | img/s | GFLOP/img (f+b) | TFLOP/s | MFU | peak GiB | "
        "data / fwd / bwd / optim / EMA / logging ms per step | data wait | communication (exposed) ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        memory = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "n/a"
        split = " / ".join(f"{r[f'{region}_ms']:.1f}" for region in REGIONS)
        communication = (
            f"{r['communication_ms']:.1f} ({r['exposed_communication_ms']:.1f})"
            if r["world_size"] > 1
            else "n/a (one process)"
        )
        lines.append(
            f"| {r['preset']} | {r['batch']} | {r['variant']} | {r['dtype']} | {r['images_per_s']:.1f} | "
            f"{r['gflop_per_image_fwd_bwd']:.2f} | {r['achieved_tflops']:.3f} | {mfu} | {memory} | {split} | "
            f"{100 * r['data_wait_fraction']:.1f}% | {communication} |"
        )
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_parallel_worker(rank: int, world: int, port: int, threads: int, settings: dict, rows_path: str) -> None:
    """One process of ``--world-size``: its own device (or its share of the CPU cores), then the same ``measure``;
    rank 0 writes the rows. Collectives keep the processes in step, so rank 0's clock times the group."""
    device = torch.device("cuda", rank) if settings["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(threads)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        rows = measure(**{**settings, "device": device}, world=world)
        if rank == 0:
            Path(rows_path).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=[precision.value for precision in Precision],
        default="bf16" if torch.cuda.is_available() else "fp32",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["eager", "channels_last", "compile", "channels_last+compile"],
        help=f"'eager' or switches joined by '+': {', '.join(SWITCHES)}; with --world-size > 1 also "
        f"{', '.join(DDP_SWITCHES)}",
    )
    parser.add_argument("--steps", type=int, default=20, help="steps per timed window (and profiled)")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for --dtype, for MFU")
    parser.add_argument("--log-every", type=int, default=10, help="steps between log-step statistics reads")
    parser.add_argument(
        "--world-size", type=int, default=1, help="data-parallel processes (GPUs, or a split of the CPU cores)"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON output path")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.world_size > 1 and device.type == "cuda" and torch.cuda.device_count() < args.world_size:
        parser.error(f"--world-size {args.world_size} needs as many GPUs; this machine has {torch.cuda.device_count()}")
    for variant in args.variants:
        try:
            switches = variant_switches(variant, SWITCHES + DDP_SWITCHES)
        except ValueError as error:
            parser.error(f"--variants: {error}")
        if switches & set(DDP_SWITCHES) and args.world_size == 1:
            parser.error(
                f"--variants {variant}: {', '.join(sorted(switches & set(DDP_SWITCHES)))} needs --world-size > 1 (DDP)"
            )
    if args.batch % args.world_size:
        parser.error(f"--batch {args.batch} must be divisible by --world-size {args.world_size}")
    settings = {
        "preset": args.preset,
        "batch": args.batch,
        "device": device,
        "variants": args.variants,
        "dtype": args.dtype,
        "steps": args.steps,
        "windows": args.windows,
        "peak_tflops": args.peak_tflops,
        "log_every": args.log_every,
    }
    threads = max(1, torch.get_num_threads() // args.world_size) if device.type == "cpu" else torch.get_num_threads()
    if args.world_size == 1:
        rows = measure(**settings)
    else:
        with tempfile.TemporaryDirectory() as directory:
            rows_path = str(Path(directory) / "rows.json")
            torch.multiprocessing.spawn(
                data_parallel_worker,
                nprocs=args.world_size,
                args=(args.world_size, free_port(), threads, {**settings, "device": device.type}, rows_path),
            )
            rows = json.loads(Path(rows_path).read_text())
    result = {
        "benchmark": "train_step",
        "torch": torch.__version__,
        "world_size": args.world_size,
        "threads": threads,
        "device_name": device_name(device),
        "peak_tflops": args.peak_tflops,
        "rows": rows,
    }
    write_result(args.out, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
