"""Sample quality per cost: FID against the number of network evaluations (NFE), for a finished pipeline run.

Takes the run's EMA snapshot, its sample seed and its cached reference statistics and feature network (classifier or
Inception, as the run's evaluate stage used), samples the same N images (indices 0..N-1, noise seeded by
(seed, index)) with each sampler (DDIM with eta = 0, DPM-Solver++(2M), Heun, ancestral; ``method:steps[:spacing]``)
and scores each set exactly as the evaluate stage does. The row with the run's own sampler reproduces the run's
logged FID, which checks that this script measures what the pipeline reports. Writes JSON and a plot of FID against
NFE, one line per sampler and spacing.

    python benchmarks/fid_vs_steps.py --run-root runs/quickstart --out benchmarks/results/fid_vs_nfe_digits.json \\
        --plot docs/images/fid_vs_nfe_digits.png
    python benchmarks/fid_vs_steps.py --run-root runs/quickstart --seed 2 --samplers ddim:50 \\
        dpm_solver++_2m:20:trailing --out ...     # another noise seed: the spread of FID between sample sets
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TypeVar

import torch
from common import device_name, write_result

from ddpm_core.checkpoint import load_snapshot
from ddpm_core.data import to_uint8
from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.metrics import FeatureStatistics, frechet_distance_from_stats
from ddpm_core.samplers import PerIndexNoise, SamplerConfig, sample
from pipelines.config import Extractor
from pipelines.config_file import load_config
from pipelines.contracts import EvaluateOutputs, PrepareOutputs, SampleOutputs, TrainOutputs
from pipelines.evaluation.scoring import ExtractorSpec, build_extractor, load_reference
from pipelines.figures import png_bytes, subplots
from pipelines.runs import RunStore

T = TypeVar("T")
SAMPLERS = [  # method:steps[:spacing]
    *(f"ddim:{steps}" for steps in (10, 20, 50, 100)),
    *(f"dpm_solver++_2m:{steps}:trailing" for steps in (5, 10, 15, 20)),
    *(f"dpm_solver++_2m:{steps}:log_snr" for steps in (10, 20)),
    *(f"heun:{steps}:karras" for steps in (5, 10, 25)),
    *(f"heun:{steps}:trailing" for steps in (10, 25)),
]


def outputs(run_root: Path, stage: str, kind: type[T]) -> T:
    """A finished stage's current outputs (the result the run's head names), typed."""
    manifest = RunStore(str(run_root.parent), run_root.name).current_manifest(stage, kind)
    if manifest is None:
        raise SystemExit(f"{run_root}: the {stage} stage has not finished")
    return manifest.outputs


def extractor_spec(run_root: Path) -> ExtractorSpec:
    config = load_config(str(run_root / "config.yaml"), [])
    if config.evaluate.extractor is Extractor.CLASSIFIER:
        return ExtractorSpec(Extractor.CLASSIFIER, outputs(run_root, "prepare", PrepareOutputs).extractor_uri or "")
    return ExtractorSpec(
        Extractor.INCEPTION, config.evaluate.inception_weights_uri or "", config.evaluate.inception_weights_sha256
    )


def score(run_root: Path, num_samples: int, batch_size: int, samplers: list[str], seed: int | None) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    snapshot = load_snapshot(outputs(run_root, "train", TrainOutputs).snapshot_uri)
    model, diffusion = snapshot.build_model().to(device), GaussianDiffusion.from_config(snapshot.diffusion)
    shape = (snapshot.unet.in_channels, snapshot.unet.image_size, snapshot.unet.image_size)
    seed = outputs(run_root, "sample", SampleOutputs).seed if seed is None else seed
    reference = load_reference(outputs(run_root, "evaluate", EvaluateOutputs).reference_uri, {})
    extractor = build_extractor(extractor_spec(run_root), {})
    rows = []
    for name in samplers:
        method, steps, *spacing = name.split(":")
        config = SamplerConfig(method=method, num_steps=int(steps), spacing=spacing[0] if spacing else None)
        started = time.perf_counter()
        batches = []
        for start in range(0, num_samples, batch_size):
            noise = PerIndexNoise(seed, range(start, min(start + batch_size, num_samples)), device)
            batches.append(sample(model, diffusion, shape, noise, config).samples)
        images = torch.cat(batches)  # [N, C, H, W]
        seconds = time.perf_counter() - started
        features, _ = extractor(to_uint8(images))
        fid = frechet_distance_from_stats(FeatureStatistics.from_features(features), reference.fid)
        rows.append(
            {
                "method": method,
                "steps": int(steps),
                "spacing": config.timestep_spacing.value,
                "nfe": config.method.network_evaluations(int(steps)),
                "num_samples": num_samples,
                "sampling_s": seconds,
                "images_per_s": num_samples / seconds,
                "fid": fid,
            }
        )
        print(
            f"{name:26s} NFE {rows[-1]['nfe']:5d}: FID {fid:8.3f}  ({seconds:7.1f} s, "
            f"{num_samples / seconds:7.1f} img/s)",
            flush=True,
        )
    return rows


def plot(rows: list[dict], title: str, path: Path) -> None:
    figure, axis = subplots(figsize=(6, 4), dpi=120)
    lines: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        lines.setdefault((row["method"], row["spacing"]), []).append(row)
    for (method, spacing), points in lines.items():
        points = sorted(points, key=lambda point: point["nfe"])
        style = "s" if len(points) == 1 else "o-"
        axis.plot([p["nfe"] for p in points], [p["fid"] for p in points], style, label=f"{method} ({spacing})")
    axis.set_xscale("log")
    axis.set_xlabel("network evaluations per image (NFE)")
    axis.set_ylabel("FID (lower is better)")
    axis.set_title(title, fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(figure))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-root", type=Path, required=True, help="a finished run's directory (storage.root/run_id)")
    parser.add_argument(
        "--samples", type=int, default=None, help="images per sampler (default: the run's sample.num_samples)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: the run's sample.batch_size (identical images)"
    )
    parser.add_argument(
        "--samplers",
        nargs="+",
        default=SAMPLERS,
        help="method:steps[:spacing], e.g. ddim:50 dpm_solver++_2m:10:log_snr",
    )
    parser.add_argument("--seed", type=int, default=None, help="noise seed (default: the run's sample.seed)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    config = load_config(str(args.run_root / "config.yaml"), [])
    num_samples = args.samples or config.sample.num_samples
    rows = score(args.run_root, num_samples, args.batch_size or config.sample.batch_size, args.samplers, args.seed)
    evaluated = outputs(args.run_root, "evaluate", EvaluateOutputs)
    result = {
        "benchmark": "fid_vs_steps",
        "run_id": config.run_id,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device_name": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "extractor_id": evaluated.protocol.extractor_id,
        "run_fid": evaluated.scores.fid,
        "run_sampler": evaluated.protocol.sampler.to_dict(),
        "seed": config.sample.seed if args.seed is None else args.seed,
        "rows": rows,
    }
    write_result(args.out, result)
    if args.plot:
        plot(rows, f"{config.run_id}: FID of {num_samples} samples vs NFE ({result['extractor_id']})", args.plot)


if __name__ == "__main__":
    main()
