"""Post-hoc EMA length sweep (Karras et al. 2024, Sec. 3.2 and Fig. 5): FID against the EMA's relative width
``sigma_rel``, for a finished pipeline run trained with ``train.ema_profiles``.

Reads the run's committed post-hoc EMA snapshots once, reconstructs the power-function EMA of each ``sigma_rel``
candidate at the end of training by least squares (``ddpm_core.phema.reconstruct``, Appendix C.3), and scores each
exactly as benchmarks/fid_vs_steps.py scores a sampler: the same N images (indices 0..N-1, noise seeded by
(seed, index)), the run's sampler and sample seed unless given, its cached reference statistics and feature network.
The run's own snapshot (the EMA it sampled: ``train.ema_decay``'s, or the ``train.ema_sigma_rel`` it tracked or
chose) is scored the same way as a baseline; with the run's sampler, seed and N it reproduces the run's logged FID,
which checks that this script measures what the pipeline reports. Writes JSON and a plot of FID against sigma_rel.

    python benchmarks/posthoc_ema.py --run-root runs/quickstart --out benchmarks/results/posthoc_ema_digits.json \\
        --plot docs/images/posthoc_ema_digits.png
    python benchmarks/posthoc_ema.py --run-root runs/quickstart --sigma-rels 0.05 0.1 0.15 --seed 2 --out ...
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from common import device_name, write_result
from fid_vs_steps import extractor_spec, outputs

from ddpm_core.checkpoint import Snapshot, load_snapshot
from ddpm_core.data import to_uint8
from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.metrics import FeatureStatistics, frechet_distance_from_stats
from ddpm_core.phema import reconstruct, sigma_rel_to_gamma
from ddpm_core.samplers import PerIndexNoise, SamplerConfig, autoguidance, guidance_interval, sample
from pipelines.config import Extractor
from pipelines.config_file import load_config
from pipelines.contracts import EvaluateOutputs, SampleOutputs, TrainOutputs
from pipelines.evaluation.scoring import build_extractor, load_reference
from pipelines.figures import png_bytes, subplots
from pipelines.training.posthoc import read_snapshots

SIGMA_RELS = (0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.16, 0.20, 0.25)  # EDM2's Fig. 5 spans 0.01..0.25


class Score(NamedTuple):
    """One sample set's FID, its sampling time, and (where the run's extractor is the data set's classifier) the
    top-1 class of each sample, counted ``[K]``: what the evaluate stage's mode coverage reads."""

    fid: float
    seconds: float
    class_counts: np.ndarray | None


class Scorer:
    """Scores N images of a network under one protocol (sampler, seed, N, batch) as the evaluate stage does."""

    def __init__(self, run_root: Path, sampler: SamplerConfig, seed: int, num_samples: int, batch_size: int) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.sampler, self.seed, self.num_samples, self.batch_size = sampler, seed, num_samples, batch_size
        self.reference = load_reference(outputs(run_root, "evaluate", EvaluateOutputs).reference_uri, {})
        spec = extractor_spec(run_root)
        self.extractor = build_extractor(spec, {})
        self.classifies = spec.kind is Extractor.CLASSIFIER  # its logits are the data set's classes

    def score(
        self,
        snapshot: Snapshot,
        state_dict: dict[str, torch.Tensor],
        guide: tuple[dict[str, torch.Tensor], float] | None = None,
        interval: tuple[float, float] | None = None,
    ) -> Score:
        """The score of the snapshot's network with ``state_dict``'s weights; with ``guide`` (the guiding network's
        weights and the weight w), autoguided by it (``ddpm_core.samplers.autoguidance``), at the noise levels in
        ``interval`` (``ddpm_core.samplers.guidance_interval``; None: at every step)."""
        model = Snapshot(snapshot.unet, snapshot.diffusion, state_dict, {}).build_model().to(self.device)
        diffusion = GaussianDiffusion.from_config(snapshot.diffusion)
        if guide is not None:
            weaker = Snapshot(snapshot.unet, snapshot.diffusion, guide[0], {}).build_model().to(self.device)
            guided = autoguidance(model, weaker, guide[1], snapshot.unet.in_channels)
            model = guidance_interval(guided, model, diffusion.alphas_cumprod, interval)
        shape = (snapshot.unet.in_channels, snapshot.unet.image_size, snapshot.unet.image_size)
        started, batches = time.perf_counter(), []
        for start in range(0, self.num_samples, self.batch_size):
            noise = PerIndexNoise(self.seed, range(start, min(start + self.batch_size, self.num_samples)), self.device)
            batches.append(sample(model, diffusion, shape, noise, self.sampler).samples)
        seconds = time.perf_counter() - started
        features, logits = self.extractor(to_uint8(torch.cat(batches)))  # from [N, C, H, W] in [-1, 1]
        fid = frechet_distance_from_stats(FeatureStatistics.from_features(features), self.reference.fid)
        counts = np.bincount(logits.argmax(dim=1).numpy(), minlength=logits.shape[1]) if self.classifies else None
        return Score(fid, seconds, counts)


def sweep(run_root: Path, scorer: Scorer, sigma_rels: list[float]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per ``sigma_rel`` (the reconstructed EMA at the end of training), and the run's own snapshot's."""
    train = outputs(run_root, "train", TrainOutputs)
    if train.posthoc_uri is None:
        raise SystemExit(f"{run_root}: trained without train.ema_profiles; no post-hoc EMA to sweep")
    snapshot, snapshots = load_snapshot(train.snapshot_uri), read_snapshots(train.posthoc_uri, {})
    baseline_fid = scorer.score(snapshot, snapshot.state_dict).fid
    baseline = {"ema": train.ema_described(), "fid": baseline_fid}
    print(f"the run's snapshot ({baseline['ema']}): FID {baseline_fid:8.3f}", flush=True)
    rows = []
    for sigma_rel in sigma_rels:
        weights = reconstruct(snapshots, sigma_rel, train.images_seen)
        fid, seconds, _ = scorer.score(snapshot, weights)
        rows.append({"sigma_rel": sigma_rel, "gamma": sigma_rel_to_gamma(sigma_rel), "fid": fid, "sampling_s": seconds})
        print(f"sigma_rel {sigma_rel:5.3f} (gamma {rows[-1]['gamma']:7.2f}): FID {fid:8.3f}  ({seconds:6.1f} s)")
    return rows, baseline


def plot(rows: list[dict[str, Any]], baseline: dict[str, Any], tracked: list[float], title: str, path: Path) -> None:
    figure, axis = subplots(figsize=(6, 4), dpi=120)
    axis.plot([row["sigma_rel"] for row in rows], [row["fid"] for row in rows], "o-", label="post-hoc EMA")
    axis.axhline(baseline["fid"], color="gray", linestyle="--", label=baseline["ema"])
    for width in tracked:
        axis.axvline(width, color="tab:green", alpha=0.3, linewidth=3)
    axis.set_xlabel("EMA length sigma_rel (green: the profiles tracked in training)")
    axis.set_ylabel("FID (lower is better)")
    axis.set_title(title, fontsize=9)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(figure))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-root", type=Path, required=True, help="a finished run's directory (storage.root/run_id)")
    parser.add_argument("--sigma-rels", type=float, nargs="+", default=list(SIGMA_RELS), help="EMA widths to score")
    parser.add_argument("--samples", type=int, default=None, help="images per width (default: sample.num_samples)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's sample.batch_size")
    parser.add_argument("--seed", type=int, default=None, help="noise seed (default: the run's sample.seed)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    config = load_config(str(args.run_root / "config.yaml"), [])
    sampled = outputs(args.run_root, "sample", SampleOutputs)
    seed, num_samples = sampled.seed if args.seed is None else args.seed, args.samples or config.sample.num_samples
    scorer = Scorer(args.run_root, sampled.sampler, seed, num_samples, args.batch_size or config.sample.batch_size)
    rows, baseline = sweep(args.run_root, scorer, args.sigma_rels)
    evaluated = outputs(args.run_root, "evaluate", EvaluateOutputs)
    best = min(rows, key=lambda row: row["fid"])
    result = {
        "benchmark": "posthoc_ema",
        "run_id": config.run_id,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device_name": device_name(scorer.device),
        "extractor_id": evaluated.protocol.extractor_id,
        "run_fid": evaluated.scores.fid,
        "sampler": sampled.sampler.to_dict(),
        "seed": seed,
        "num_samples": num_samples,
        "ema_profiles": list(config.train.ema_profiles),
        "ema_snapshot_every_images": config.train.ema_snapshot_every_images,
        "baseline": baseline,
        "best_sigma_rel": best["sigma_rel"],
        "rows": rows,
    }
    write_result(args.out, result)
    if args.plot:
        title = f"{config.run_id}: FID of {num_samples} samples vs post-hoc EMA length ({result['extractor_id']})"
        plot(rows, baseline, list(config.train.ema_profiles), title, args.plot)


if __name__ == "__main__":
    main()
