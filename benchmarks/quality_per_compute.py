"""Quality per compute: FID over the real-data floor for training recipes of one budget (docs/benchmarks.md,
"Quality per compute"), each on several noise seeds.

A variant is ``label=run_root:sampler[:ema[:guide]]``: a finished pipeline run (one training recipe at its images and
time), a sampler (``method:steps``, the method's default spacing), the EMA to sample (``fixed``: the run's snapshot;
a number: that sigma_rel reconstructed from the run's post-hoc snapshots, ``ddpm_core.phema``), and optionally
autoguidance by an earlier EMA of the same run (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
Itself"): ``IMAGESxW``, the same width reconstructed at IMAGES images seen, guiding with weight W
(``ddpm_core.samplers.autoguidance``); ``IMAGESxW@S`` reconstructs the guide at width S instead, and a last field
``LOW,HIGH`` guides only at the noise levels sigma in (LOW, HIGH] (Kynkaanniemi et al. 2024,
``ddpm_core.samplers.guidance_interval``). No training is added: the guide comes from the snapshots the run stored.
Each variant samples the same N images per seed (indices 0..N-1, noise seeded by (seed, index)) and is scored as the
evaluate stage scores (the run's cached reference statistics and feature network, as benchmarks/posthoc_ema.py). The
floor is the run's own: its hold-out FID carried to N against the reference's m images
(``FidEstimate.real_floor_at``). Writes JSON with each seed's FID and each variant's mean, the t-interval over seeds,
and mean / floor; where the run's extractor is the data set's classifier, also each seed's class coverage TVD (the
evaluate stage's mode coverage; over training runs the digits' FID follows it, docs/benchmarks.md), each seed's share
of each class, and the FID of the same images weighted to the training split's class mix
(``posthoc_ema.class_balanced_fid``: how much of the FID is the class mix).

    python benchmarks/quality_per_compute.py --seeds 1 2 3 --out benchmarks/results/quality_per_compute_digits.json \\
        --variant "L_simple, DDIM-50=runs/base:ddim:50" "+ DPM-Solver++-20=runs/base:dpm_solver++_2m:20" ...
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from common import write_result
from fid_vs_steps import outputs
from posthoc_ema import Scorer

from ddpm_core.checkpoint import Snapshot, load_snapshot
from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.metrics import FidEstimate
from ddpm_core.samplers import SamplerConfig, evaluations_per_image
from pipelines.config_file import load_config
from pipelines.contracts import EvaluateOutputs, TrainOutputs
from pipelines.evaluation.coverage import total_variation
from pipelines.training.posthoc import posthoc_snapshot

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # Student t


class GuideSpec(NamedTuple):
    """Autoguidance of a variant: the guide's EMA at ``guide_images`` images seen, of width ``guide_sigma_rel``,
    guiding in ``interval`` of noise levels (None: at every step)."""

    guide_images: int
    weight: float
    guide_sigma_rel: float
    interval: tuple[float, float] | None


def parse_variant(text: str) -> tuple[str, Path, SamplerConfig, float | None, GuideSpec | None]:
    """``label=run_root:method:steps[:ema[:IMAGESxW[@S][:LOW,HIGH]]]`` -> (label, run root, sampler, sigma_rel or None
    for the snapshot, the guide (its width S: the model's unless named; its interval of noise levels) or None)."""
    label, spec = text.split("=", 1)
    root, method, steps, *rest = spec.split(":")
    sigma_rel = None if not rest or rest[0] == "fixed" else float(rest[0])
    guide = None
    if len(rest) > 1:
        if sigma_rel is None:
            raise SystemExit(f"{text}: autoguidance needs a post-hoc EMA width (a number, not 'fixed')")
        point, _, guide_width = rest[1].partition("@")
        images, weight = point.split("x")
        interval = None if len(rest) < 3 else (float(rest[2].split(",")[0]), float(rest[2].split(",")[1]))
        guide = GuideSpec(int(images), float(weight), float(guide_width) if guide_width else sigma_rel, interval)
    return label, Path(root), SamplerConfig(method=method, num_steps=int(steps)), sigma_rel, guide


def floor_of(run_root: Path, num_samples: int) -> float:
    """The run's real-data floor at ``num_samples`` (its hold-out FID carried to N; the evaluate stage's own)."""
    evaluated = outputs(run_root, "evaluate", EvaluateOutputs)
    scores, held = evaluated.scores, evaluated.score_protocol.holdout_images
    if scores.fid_holdout_vs_train is None:
        raise SystemExit(f"{run_root}: its evaluate stage scored no hold-out images (no floor)")
    holdout = FidEstimate(scores.fid_holdout_vs_train, scores.fid_holdout_stderr or 0.0, 0.0, held, ())
    return holdout.real_floor_at(num_samples, evaluated.protocol.reference.reference_count)[0]


def weights_of(run_root: Path, sigma_rel: float | None, images: int | None = None) -> dict[str, torch.Tensor]:
    """The run's snapshot's weights, or the post-hoc EMA of ``sigma_rel`` at ``images`` (default: the end)."""
    train = outputs(run_root, "train", TrainOutputs)
    if sigma_rel is None:
        return load_snapshot(train.snapshot_uri).state_dict
    if train.posthoc_uri is None:
        raise SystemExit(f"{run_root}: trained without train.ema_profiles; no post-hoc EMA of {sigma_rel}")
    return posthoc_snapshot(train, sigma_rel, {}, images)


def evaluations(sampler: SamplerConfig, snapshot: Snapshot, guide: GuideSpec | None) -> int:
    """The network calls per image: the sampler's, doubled at the steps the guide guides."""
    guided = guide is not None and guide.weight != 1
    return evaluations_per_image(
        GaussianDiffusion.from_config(snapshot.diffusion), sampler, guided, guide.interval if guided else None
    )


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and its 95% t-interval over seeds."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = T_975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def class_tvds(training_shares: np.ndarray | None, counts: list[np.ndarray | None]) -> list[float] | None:
    """Each sample set's class coverage TVD from the run's training split's shares ``[K]`` (the evaluate stage's mode
    coverage, ``pipelines.evaluation.coverage``): None where the run's extractor is not the data set's classifier or
    its data has no labels."""
    if training_shares is None or any(count is None for count in counts):
        return None
    return [float(total_variation(count / count.sum(), training_shares)) for count in counts]


def measure(variant: str, seeds: list[int], num_samples: int, batch_size: int | None) -> dict[str, Any]:
    label, run_root, sampler, sigma_rel, guide = parse_variant(variant)
    config = load_config(str(run_root / "config.yaml"), [])
    batch_size = batch_size or config.sample.batch_size
    snapshot = load_snapshot(outputs(run_root, "train", TrainOutputs).snapshot_uri)
    weights = weights_of(run_root, sigma_rel)
    guiding = None if guide is None else (weights_of(run_root, guide.guide_sigma_rel, guide.guide_images), guide.weight)
    guided_at = None if guide is None else guide.interval
    scores = []
    for seed in seeds:
        scorer = Scorer(run_root, sampler, seed, num_samples, batch_size)
        scores.append(scorer.score(snapshot, weights, guiding, guided_at))
        print(f"{label:40s} seed {seed}: FID {scores[-1].fid:.3f} ({scores[-1].seconds:.1f} s)", flush=True)
    fids = [score.fid for score in scores]
    tvds = class_tvds(scorer.training_shares, [score.class_counts for score in scores])
    shares = None if tvds is None else [(score.class_counts / score.class_counts.sum()).tolist() for score in scores]
    balanced = None if tvds is None else [score.balanced_fid for score in scores]
    mean, low, high = interval(fids)
    floor = floor_of(run_root, num_samples)
    return {
        "label": label,
        "run_id": config.run_id,
        "loss_weighting": config.train.loss_weighting.value,
        "train_images": outputs(run_root, "train", TrainOutputs).images_seen,
        "ema": "snapshot" if sigma_rel is None else f"post-hoc sigma_rel {sigma_rel:g}",
        "autoguidance": None if guide is None else guide._asdict(),
        "sampler": sampler.to_dict(),
        "nfe": evaluations(sampler, snapshot, guide),
        "seeds": seeds,
        "fids": fids,
        "fid_mean": mean,
        "fid_ci_low": low,
        "fid_ci_high": high,
        "floor": floor,
        "fid_over_floor": mean / floor,
        "fid_over_floor_ci": [low / floor, high / floor],
        "class_tvds": tvds,
        "class_tvd_mean": None if tvds is None else statistics.fmean(tvds),
        "class_shares": shares,
        "class_balanced_fids": balanced,
        "class_balanced_fid_mean": None if balanced is None else statistics.fmean(balanced),
        "sampling_s_mean": statistics.fmean(score.seconds for score in scores),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variant",
        nargs="+",
        required=True,
        help="label=run_root:method:steps[:fixed|sigma_rel[:IMAGESxW[@GUIDE_SIGMA_REL][:LOW,HIGH]]]",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=None, help="default: each run's sample.batch_size")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [measure(variant, args.seeds, args.samples, args.batch_size) for variant in args.variant]
    result = {"benchmark": "quality_per_compute", "torch": torch.__version__, "threads": torch.get_num_threads()}
    write_result(args.out, {**result, "num_samples": args.samples, "rows": rows})
    for row in rows:
        print(
            f"{row['label']:40s} FID {row['fid_mean']:.3f} ({row['fid_ci_low']:.3f}-{row['fid_ci_high']:.3f}), "
            f"floor {row['floor']:.3f}, {row['fid_over_floor']:.2f}x"
        )


if __name__ == "__main__":
    main()
