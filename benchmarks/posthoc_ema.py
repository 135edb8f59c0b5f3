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
from ddpm_core.metrics import FeatureStatistics, frechet_distance, frechet_distance_from_stats
from ddpm_core.phema import reconstruct, sigma_rel_to_gamma
from ddpm_core.samplers import PerIndexNoise, SamplerConfig, autoguidance, guidance_interval, sample
from pipelines.config import Extractor
from pipelines.config_file import load_config
from pipelines.contracts import EvaluateOutputs, PrepareOutputs, SampleOutputs, TrainOutputs
from pipelines.evaluation.scoring import build_extractor, load_reference
from pipelines.figures import png_bytes, subplots
from pipelines.training.posthoc import read_snapshots

SIGMA_RELS = (0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.16, 0.20, 0.25)  # EDM2's Fig. 5 spans 0.01..0.25


class Score(NamedTuple):
    """One sample set's FID, its sampling time, and (where the run's extractor is the data set's classifier) the
    top-1 class of each sample, counted ``[K]``: what the evaluate stage's mode coverage reads; and the FID of the
    same images at the training split's class mix (:func:`class_balanced_fid`), where its classes are known."""

    fid: float
    seconds: float
    class_counts: np.ndarray | None
    balanced_fid: float | None


class Scorer:
    """Scores N images of a network under one protocol (sampler, seed, N, batch) as the evaluate stage does."""

    def __init__(self, run_root: Path, sampler: SamplerConfig, seed: int, num_samples: int, batch_size: int) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.sampler, self.seed, self.num_samples, self.batch_size = sampler, seed, num_samples, batch_size
        self.reference = load_reference(outputs(run_root, "evaluate", EvaluateOutputs).reference_uri, {})
        spec = extractor_spec(run_root)
        self.extractor = build_extractor(spec, {})
        self.classifies = spec.kind is Extractor.CLASSIFIER  # its logits are the data set's classes
        counts = outputs(run_root, "prepare", PrepareOutputs).class_counts
        self.training_shares = None if counts is None else np.asarray(counts, dtype=np.float64) / sum(counts)  # [K]

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
        if not self.classifies:
            return Score(fid, seconds, None, None)
        classes = logits.argmax(dim=1).numpy()  # [N]
        balanced = None
        if self.training_shares is not None:
            balanced = class_balanced_fid(features, classes, self.training_shares, self.reference.fid)
        return Score(fid, seconds, np.bincount(classes, minlength=logits.shape[1]), balanced)


def class_balanced_fid(
    features: torch.Tensor, classes: np.ndarray, shares: np.ndarray, reference: FeatureStatistics
) -> float:
    """The FID of features ``[N, d]`` with each sample weighted by its class's share in ``shares`` ``[K]`` over
    its class's share among ``classes`` ``[N]``: what the same images would score drawn at that class mix (a class
    the samples lack stays missing). A diagnostic: with a classifier's features the class mix weighs most in FID
    (docs/benchmarks.md, "The class mix"). Weighted mean and covariance, the covariance unbiased for reliability
    weights (``/ (1 - sum w^2)`` with ``sum w = 1``, which is ``/ (N - 1)`` for equal weights)."""
    sample_shares = np.bincount(classes, minlength=len(shares)) / len(classes)  # [K]
    weights = torch.as_tensor(shares[classes] / sample_shares[classes], dtype=torch.float64)  # [N]
    weights = weights / weights.sum()
    x = features.to(torch.float64)  # [N, d]
    mean = weights @ x  # [d]
    centred = x - mean  # [N, d]
    covariance = (centred * weights[:, None]).T @ centred / (1 - (weights**2).sum())  # [d, d]
    return frechet_distance(mean, covariance, reference.mean, reference.covariance)


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
        score = scorer.score(snapshot, weights)
        fid, seconds = score.fid, score.seconds
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
