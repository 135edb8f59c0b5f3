"""Throughput of the pipeline's own training step (built and taken by ``pipelines.training.step.step_parts`` and
``step``, the code a training worker runs: ``ddpm_core.training.train_step`` with AdamW, its learning-rate warm-up,
gradient clipping and EMA, batches drawn from a device-resident data set by ``ddpm_core.data.random_batch`` as the
trainer does), for each fast-path variant and batch size, with the numbers the performance targets are stated in:

- images/s (median over timed windows), and the step's FLOPs from torch's FLOP counter, so that
  MFU = achieved FLOP/s / ``--peak-tflops`` (given for the device and dtype: 790 for an H100/H200's dense bf16);
- peak device memory (CUDA only);
- the time split by the regions the trainer and ``train_step`` label: data, forward, backward, optimizer, EMA and
  logging (the log step's loss check and statistics read through ``RunningTotals``, every ``--log-every`` steps,
  amortised per step), from the timed windows themselves: CUDA events around each region on a GPU (the backward
  pass's kernels run on the forward's stream, so they fall in ``backward``), the host clock on a CPU;
- with ``--kernels K``, the K kernels (GPU) or operators (CPU) that took the most time, from the profiler over one
  extra window;
- with ``--world-size N`` > 1, N data-parallel processes as the trainer runs them (``DistributedDataParallel``, gloo on
  the CPU with the cores split between them, NCCL with one GPU each; ``--batch`` is the global batch, as
  ``train.batch_size``): the communication time (the profiler's gloo/NCCL collectives, which overlap the backward
  pass) and the exposed communication cost (the step against the same step without gradient synchronisation,
  ``no_sync``, timed in alternating windows).

Variants: ``eager`` or switches joined by ``+``: ``channels_last``, ``compile`` (e.g. ``channels_last+compile``) and,
with ``--world-size`` > 1, DDP's ``bucket_view`` (``gradient_as_bucket_view``) and ``static_graph``; dtype ``fp32`` or
``bf16`` (autocast, as the pipeline uses on GPUs). Each (batch, variant) row is measured on its own and the JSON is
rewritten as soon as it is done, so a run cut short keeps what it finished; ``warmup_s`` (building, compiling,
autotuning) and ``overhead_s`` (everything else outside the timed windows) say what each row cost.

    python benchmarks/train_step.py --preset cifar10 --batch 16 32 64 128 --dtype bf16 --peak-tflops 790 \\
        --out benchmarks/results/train_step_h200.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import socket
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing
from common import device_name, synchronize, variant_switches, write_result
from torch.autograd import DeviceType
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from ddpm_core.data import random_batch
from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion
from ddpm_core.precision import Precision, autocast_dtype
from ddpm_core.training import RunningTotals
from ddpm_core.unet import UNet, UNetConfig, unet_preset
from pipelines.config import TrainSection
from pipelines.training.step import Share, StepState, device_generator, step, step_parts

REGIONS = ("data", "forward", "backward", "optimizer", "ema", "logging")
SWITCHES = ("channels_last", "compile")  # a variant: "eager" (none) or switches joined by "+"
DDP_SWITCHES = ("bucket_view", "static_graph")  # DistributedDataParallel's gradient_as_bucket_view and static_graph
COLLECTIVES = ("gloo:", "nccl:")  # the profiler's names for c10d collectives, e.g. "gloo:all_reduce"


class RegionClock:
    """Time spent in each labelled region while ``recording``: on CUDA, a pair of events recorded on the current
    stream around the region (its kernels' time on the device, read once the stream has drained); on the CPU, where
    operators run synchronously, the host clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda, self.recording = device.type == "cuda", False
        self.events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = defaultdict(list)
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        if not self.recording:
            yield
        elif self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events[name].append((start, end))
        else:
            started = time.perf_counter()
            yield
            self.seconds[name] += time.perf_counter() - started

    def milliseconds_per_step(self, steps: int) -> dict[str, float]:
        """``{region}_ms`` per step over everything recorded (call after synchronising the device)."""
        totals = {name: 1000 * seconds for name, seconds in self.seconds.items()}
        for name, pairs in self.events.items():
            totals[name] = totals.get(name, 0.0) + sum(start.elapsed_time(end) for start, end in pairs)
        return {f"{region}_ms": totals.get(region, 0.0) / steps for region in REGIONS}


class Step:
    """One configured training step of the preset's U-Net on random data of the preset's shape, built and taken by the
    pipeline's own code (``pipelines.training.step.step_parts`` and ``step``, as a training worker does; the variant's
    switches are the ``train`` section's), DDP-wrapped when a process group is up (Ray Train's ``prepare_model`` wraps
    it the same way in the pipeline), statistics summed on the device and read every ``log_every`` steps, its regions
    timed by ``self.clock`` while it records."""

    def __init__(
        self, config: UNetConfig, batch: int, device: torch.device, variant: str, dtype: str, log_every: int
    ) -> None:
        switches, self.config = variant_switches(variant, SWITCHES + DDP_SWITCHES), config
        compiled = "compile" in switches
        self.train = TrainSection(
            channels_last="channels_last" in switches,
            compile_on_cpu=compiled,
            compile_on_gpu=compiled,
            gradient_as_bucket_view="bucket_view" in switches,
        )
        self.distributed, self.wrapped = dist.is_initialized(), None

        def wrap(model: torch.nn.Module, options: dict) -> torch.nn.Module:
            if not self.distributed:
                return model
            ids = [device] if device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(model, ids, static_graph="static_graph" in switches, **options)
            return self.wrapped

        torch.manual_seed(0)
        generator = torch.Generator(device=device).manual_seed(0)
        share = Share(0, generator, device_generator(device).get_state())  # the whole batch: one share
        self.state = StepState(*step_parts(UNet(config).to(device), self.train, device, wrap), [share])
        self.memory_format = torch.channels_last if self.train.channels_last else torch.contiguous_format
        self.totals = RunningTotals(device, dist.all_reduce if self.distributed else None)
        self.log_every = log_every
        self.diffusion = GaussianDiffusion.from_config(DiffusionConfig())
        self.autocast = autocast_dtype(dtype)
        shape = (max(4 * batch, 1024), config.in_channels, config.image_size, config.image_size)
        self.data = torch.rand(shape, generator=generator, device=device) * 2 - 1  # [N, C, H, W] in [-1, 1]
        self.batch, self.device = batch, device  # batch: this process's share of the global batch
        self.clock = RegionClock(device)

    def __call__(self, sync_gradients: bool = True) -> None:
        state = self.state
        with self.clock.region("data"):
            x0, _ = random_batch(self.data, self.batch, state.shares[0].generator, True, self.memory_format)
        unsynced = self.wrapped.no_sync() if self.wrapped is not None and not sync_gradients else None
        with unsynced or contextlib.nullcontext():
            result = step(state, self.diffusion, [(x0, None)], self.train, self.autocast, region=self.clock.region)
        state.advance(self.batch)
        self.totals.add(result)
        if state.step % self.log_every == 0:
            with self.clock.region("logging"):
                window = self.totals.summed()
                math.isfinite(window.loss_sum)
                window.means()
                self.totals.restart()

    def flops_per_image(self) -> float:
        """Forward + backward FLOPs of the U-Net per image (torch's FLOP counter, eager, one batch)."""
        x = self.data[: self.batch]
        t = torch.randint(0, 1000, (self.batch,), device=self.device)
        with FlopCounterMode(display=False) as counter:
            self.state.model(x, t).square().mean().backward()
        self.state.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops() / self.batch


def profiled(step: Step, steps: int, kernels: int) -> dict[str, object]:
    """One extra window under the profiler: the collectives' time per step when data-parallel (they overlap the
    backward pass: gloo's threads, NCCL's stream), and with ``kernels`` > 0 the heaviest kernels (device time on
    CUDA) or operators (self time on the CPU)."""
    on_device = step.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        synchronize(step.device)
    events = profiler.key_averages()
    found: dict[str, object] = {}
    if step.distributed:
        micros = sum(
            e.device_time_total if on_device else e.cpu_time_total for e in events if e.key.startswith(COLLECTIVES)
        )
        found["communication_ms"] = micros / 1000 / steps
    if kernels:
        found["top_kernels"] = heaviest(events, steps, kernels, on_device)
    return found


def heaviest(events: list, steps: int, count: int, on_device: bool) -> list[dict[str, object]]:
    """The ``count`` kernels (on CUDA: the device-side events, by their time) or operators (on the CPU: by self time)
    that took longest, per step and as a share of all of them."""
    if on_device:
        timed = [(e.key, e.self_device_time_total) for e in events if e.device_type == DeviceType.CUDA]
    else:
        timed = [(e.key, e.self_cpu_time_total) for e in events]
    ranked = sorted((entry for entry in timed if entry[1] > 0), key=lambda entry: entry[1], reverse=True)
    total = sum(micros for _, micros in ranked)
    return [
        {"name": name[:160], "ms_per_step": micros / 1000 / steps, "share": micros / total}
        for name, micros in ranked[:count]
    ]


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def time_window(step: Step, steps: int, world: int, sync_gradients: bool = True) -> tuple[float, int]:
    """(images/s over all ``world`` processes, peak bytes allocated above the window's start) over ``steps`` steps;
    the regions are recorded in windows with gradient synchronisation only."""
    if step.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(step.device)
    synchronize(step.device)
    base, start = allocated(step.device), time.perf_counter()
    step.clock.recording = sync_gradients
    for _ in range(steps):
        step(sync_gradients)
    synchronize(step.device)
    step.clock.recording = False
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(step.device) - base if step.device.type == "cuda" else 0
    return steps * step.batch * world / seconds, peak


@dataclass(frozen=True)
class Settings:
    """What every row of one run shares."""

    preset: str
    device: torch.device
    dtype: str
    steps: int  # per timed window
    windows: int
    peak_tflops: float | None
    log_every: int
    kernels: int  # heaviest kernels to list per row (0: no profiler)
    world: int = 1
    overrides: tuple[tuple[str, int], ...] = ()  # U-Net fields other than the preset's (e.g. a latent shape)

    def unet(self) -> UNetConfig:
        return unet_preset(self.preset, **dict(self.overrides))


def measure(settings: Settings, batch: int, variant: str, flops_per_image: float | None) -> dict:
    """One row: the variant built and warmed up, then timed in ``windows`` windows (alternating with windows without
    gradient synchronisation when data-parallel); the median window counts. ``batch`` is the global batch."""
    started, device, world = time.perf_counter(), settings.device, settings.world
    before = allocated(device)
    step = Step(settings.unet(), batch // world, device, variant, settings.dtype, settings.log_every)
    for _ in range(3):  # warm-up: compilation, cuDNN autotuning, allocator
        step()
    if world > 1:
        step(sync_gradients=False)
    synchronize(device)
    warmup_s, resident = time.perf_counter() - started, allocated(device) - before
    rates, unsynced, transient, timed_s = [], [], 0, 0.0
    for _ in range(settings.windows):
        window_started = time.perf_counter()
        rate, peak = time_window(step, settings.steps, world)
        timed_s += time.perf_counter() - window_started
        rates.append(rate)
        transient = max(transient, peak)
        if world > 1:
            unsynced.append(time_window(step, settings.steps, world, sync_gradients=False)[0])
    split = step.clock.milliseconds_per_step(settings.steps * settings.windows)
    flops = flops_per_image or step.flops_per_image()
    images_per_s = statistics.median(rates)
    row = {
        "preset": settings.preset,
        "image_shape": [step.config.in_channels, step.config.image_size, step.config.image_size],
        "batch": batch,
        "world_size": world,
        "device": device.type,
        "variant": variant,
        "dtype": settings.dtype,
        "params": sum(p.numel() for p in step.state.model.parameters()),
        "images_per_s": images_per_s,
        "window_images_per_s": rates,
        "gflop_per_image_fwd_bwd": flops / 1e9,
        "achieved_tflops": images_per_s * flops / 1e12,
        "mfu": images_per_s * flops / (settings.peak_tflops * 1e12) if settings.peak_tflops else None,
        # weights, gradients, AdamW and EMA state and the data (resident) + the step's activations (transient)
        "peak_memory_gib": (resident + transient) / 2**30 if device.type == "cuda" else None,
        **split,
        **(profiled(step, settings.steps, settings.kernels) if world > 1 or settings.kernels else {}),
    }
    row["data_wait_fraction"] = row["data_ms"] / (1000 * batch / images_per_s)
    if world > 1:  # what gradient synchronisation adds to a step, beyond what overlaps with the backward pass
        row["images_per_s_without_gradient_sync"] = statistics.median(unsynced)
        row["exposed_communication_ms"] = (
            1000 * batch / images_per_s - 1000 * batch / row["images_per_s_without_gradient_sync"]
        )
    row["warmup_s"] = warmup_s
    row["overhead_s"] = time.perf_counter() - started - warmup_s - timed_s
    return row


def measure_all(
    settings: Settings, batches: list[int], variants: list[str], on_row: Callable[[list[dict]], None]
) -> None:
    """Every (batch, variant) row in turn, handing the rows so far to ``on_row`` after each; FLOPs per image are
    counted once (they do not depend on the batch or the variant)."""
    rows: list[dict] = []
    for batch in batches:
        for variant in variants:
            rows.append(measure(settings, batch, variant, rows[0]["gflop_per_image_fwd_bwd"] * 1e9 if rows else None))
            on_row(rows)


def markdown(result: dict) -> str:
    lines = [
        f"Device: {result['device_name']}; torch {result['torch']}; {result['world_size']} process(es) x "
        f"{result['threads']} CPU threads; peak {result['peak_tflops'] or 'not given'} TFLOP/s.",
        "",
        "| preset | batch | variant | dtype | img/s | GFLOP/img (f+b) | TFLOP/s | MFU | peak GiB | "
        "data / fwd / bwd / optim / EMA / logging ms per step | data wait | communication (exposed) ms | "
        "warm-up / overhead s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
            f"{100 * r['data_wait_fraction']:.1f}% | {communication} | {r['warmup_s']:.1f} / {r['overhead_s']:.1f} |"
        )
    for r in result["rows"]:
        for kernel in r.get("top_kernels", []):
            lines.append(
                f"- {r['batch']} {r['variant']}: {kernel['ms_per_step']:.2f} ms ({100 * kernel['share']:.1f}%) "
                f"{kernel['name']}"
            )
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ResultFile:
    """The JSON result, rewritten with the rows so far after every row."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path, self.header = path, header

    def __call__(self, rows: list[dict]) -> None:
        write_result(self.path, {**self.header, "rows": rows})
        print(
            f"row {len(rows)}: batch {rows[-1]['batch']} {rows[-1]['variant']}: "
            f"{rows[-1]['images_per_s']:.1f} img/s (warm-up {rows[-1]['warmup_s']:.1f} s, "
            f"overhead {rows[-1]['overhead_s']:.1f} s)",
            flush=True,
        )


def data_parallel_worker(
    rank: int, port: int, threads: int, settings: Settings, batches: list[int], variants: list[str], out: ResultFile
) -> None:
    """One process of ``--world-size``: its own device (or its share of the CPU cores), then the same rows; rank 0
    writes them. Collectives keep the processes in step, so rank 0's clock times the group."""
    world = settings.world
    device = torch.device("cuda", rank) if settings.device.type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(threads)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        measure_all(replace(settings, device=device), batches, variants, out if rank == 0 else lambda rows: None)
    finally:
        dist.destroy_process_group()


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch", type=int, nargs="+", default=[128], help="global batch size(s), one row each")
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
    parser.add_argument("--steps", type=int, default=20, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for --dtype, for MFU")
    parser.add_argument("--log-every", type=int, default=10, help="steps between log-step statistics reads")
    parser.add_argument("--kernels", type=int, default=0, help="list the K heaviest kernels per row (profiler)")
    parser.add_argument(
        "--world-size", type=int, default=1, help="data-parallel processes (GPUs, or a split of the CPU cores)"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON output path")
    args = parser.parse_args()
    if args.world_size > 1 and args.device == "cuda" and torch.cuda.device_count() < args.world_size:
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
    for batch in args.batch:
        if batch % args.world_size:
            parser.error(f"--batch {batch} must be divisible by --world-size {args.world_size}")
    return args


def main() -> None:
    args = parse_arguments()
    device = torch.device(args.device)
    settings = Settings(
        args.preset,
        device,
        args.dtype,
        args.steps,
        args.windows,
        args.peak_tflops,
        args.log_every,
        args.kernels,
        args.world_size,
    )
    threads = max(1, torch.get_num_threads() // args.world_size) if device.type == "cpu" else torch.get_num_threads()
    header = {
        "benchmark": "train_step",
        "torch": torch.__version__,
        "world_size": args.world_size,
        "threads": threads,
        "device_name": device_name(device),
        "peak_tflops": args.peak_tflops,
    }
    out = ResultFile(args.out, header)
    if args.world_size == 1:
        measure_all(settings, args.batch, args.variants, out)
    else:
        torch.multiprocessing.spawn(
            data_parallel_worker,
            nprocs=args.world_size,
            args=(free_port(), threads, settings, args.batch, args.variants, out),
        )
    print(markdown(json.loads(args.out.read_text())))


if __name__ == "__main__":
    main()
