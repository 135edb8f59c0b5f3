"""How good a small first stage gets on this CPU: a KL autoencoder trained on ``builtin:mnist`` for a budget of
images, scored by rFID (the FID of held-out reconstructions against the held-out originals, the floor any latent
model on it inherits) beside the real-data floor at the same N, per training seed.

The data set is split by a fixed permutation into training images and 1,000 held-out images. The feature extractor
is the pipeline's domain classifier (:func:`ddpm_core.features.train_classifier`) trained on the training split. The
reconstructions decode the posterior's mean. The floor is the FID of 1,000 training images against the same
held-out set. Intervals are the jackknife's (10 groups of 100). The autoencoder's step is
:func:`ddpm_core.autoencoder.autoencoder_train_step`, the same one the autoencoder stage takes.

    python benchmarks/autoencoder_rfid.py --images 40000 --seeds 1 2 3 \\
        --grid docs/images/autoencoder_mnist_reconstructions.png --out benchmarks/results/autoencoder_rfid_mnist.json

``--save DIR`` writes the first seed's autoencoder as a diffusers folder, for ``autoencoder.weights_uri``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import write_result

from ddpm_core.autoencoder import (
    AutoencoderConfig,
    KLAutoencoder,
    autoencoder_train_step,
    latent_scaling_factor,
)
from ddpm_core.autoencoder_weights import save_autoencoder
from ddpm_core.data import load_dataset, to_model_range, to_uint8
from ddpm_core.features import ClassifierExtractor, train_classifier
from ddpm_core.images import grid, labelled_rows
from ddpm_core.metrics import FeatureStatistics, FidEstimate, fid_jackknife
from ddpm_core.training import OptimConfig, make_optimizer

HELD_OUT = 1000
GROUPS = 10


def fid_against(extractor: ClassifierExtractor, images: np.ndarray, reference: np.ndarray) -> FidEstimate:
    """FID of ``images`` against ``reference`` (uint8 NHWC), with the jackknife over index-contiguous groups."""
    ref_stats = FeatureStatistics.from_features(extractor(reference)[0])
    features = extractor(images)[0]  # [N, d]
    groups = [FeatureStatistics.from_features(part) for part in features.chunk(GROUPS)]
    return fid_jackknife(groups, (ref_stats.mean, ref_stats.covariance))


def train(
    config: AutoencoderConfig, x: torch.Tensor, args: argparse.Namespace, seed: int
) -> tuple[KLAutoencoder, float]:
    """The autoencoder after ``args.images`` training images drawn uniformly from ``x [N, C, H, W]``; seconds."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = KLAutoencoder(config)
    optim = OptimConfig(lr=args.lr, warmup_images=args.images // 20, grad_clip=1.0, ema_decay=0.0)
    optimizer = make_optimizer(model, optim)
    started, seen = time.perf_counter(), 0
    while seen < args.images:
        batch = x[torch.randint(0, len(x), (args.batch,), generator=generator)]
        autoencoder_train_step(model, optimizer, batch, optim, seen, args.kl_weight, generator)
        seen += args.batch
    return model.eval(), time.perf_counter() - started


@torch.no_grad()
def reconstruct(model: KLAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstructions of ``x`` through the posterior mean, and those means ``[N, c, h, w]``."""
    means = torch.cat([model.encode(part).mean for part in x.split(250)])
    return torch.cat([model.decode(part) for part in means.split(250)]), means


def one_seed(
    config: AutoencoderConfig,
    data: tuple[torch.Tensor, torch.Tensor, np.ndarray],
    extractor: ClassifierExtractor,
    args: argparse.Namespace,
    seed: int,
) -> tuple[dict, np.ndarray, KLAutoencoder]:
    """Train one autoencoder and score its held-out reconstructions; the row, the reconstructions (uint8) and the
    autoencoder."""
    train_x, held_x, held_u8 = data
    model, seconds = train(config, train_x, args, seed)
    reconstructions, means = reconstruct(model, held_x)
    reconstructed_u8 = to_uint8(reconstructions)
    rfid = fid_against(extractor, reconstructed_u8, held_u8)
    error = reconstructions.clamp(-1, 1) - held_x  # [N, C, H, W]
    row = {
        "seed": seed,
        "train_s": seconds,
        "rfid": rfid.value,
        "rfid_stderr": rfid.stderr,
        "l1": float(error.abs().mean()),
        "psnr_db": float(10 * torch.log10(4 / error.square().mean())),
        "latent_std": float(means.std()),
        "scaling_factor": latent_scaling_factor(means),
    }
    return row, reconstructed_u8, model


def save_pairs(originals: np.ndarray, reconstructions: np.ndarray, path: Path, count: int = 16) -> None:
    """The first ``count`` held-out images above their reconstructions, as one labelled PNG."""
    rows = [grid(originals[:count], count), grid(reconstructions[:count], count)]
    labelled_rows(rows, ["held-out", "reconstructed"]).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 64])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--latent-channels", type=int, default=4)
    parser.add_argument("--images", type=int, default=100_000, help="training images per seed")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--classifier-epochs", type=int, default=3, help="the feature extractor's training epochs")
    parser.add_argument("--grid", type=Path, default=None, help="PNG: held-out images, reconstructions")
    parser.add_argument(
        "--save", type=Path, default=None, help="folder: the first seed's autoencoder, as a diffusers AutoencoderKL"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dataset = load_dataset("builtin:mnist")
    order = np.random.default_rng(0).permutation(len(dataset.images))
    train_u8, held_u8 = dataset.images[order[HELD_OUT:]], dataset.images[order[:HELD_OUT]]
    classifier = train_classifier(train_u8, dataset.labels[order[HELD_OUT:]], epochs=args.classifier_epochs)
    extractor = ClassifierExtractor(classifier)
    floor = fid_against(extractor, train_u8[:HELD_OUT], held_u8)
    config = AutoencoderConfig(
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(args.blocks),
        layers_per_block=args.layers,
        latent_channels=args.latent_channels,
        norm_num_groups=min(32, *args.blocks),
    )
    data = (to_model_range(train_u8), to_model_range(held_u8), held_u8)
    header = {
        "benchmark": "autoencoder_rfid",
        "data": "builtin:mnist",
        "autoencoder": config.to_diffusers(),
        "params": sum(p.numel() for p in KLAutoencoder(config).parameters()),
        "latent_shape": list(config.latent_shape(1, 32)),
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "grid", "save")},
        "floor": {"fid": floor.value, "stderr": floor.stderr},
        "threads": torch.get_num_threads(),
    }
    rows: list[dict] = []
    for seed in args.seeds:
        row, reconstructions, model = one_seed(config, data, extractor, args, seed)
        rows.append(row)
        if args.grid is not None and seed == args.seeds[0]:
            save_pairs(held_u8, reconstructions, args.grid)
        if args.save is not None and seed == args.seeds[0]:
            row["saved_sha256"] = save_autoencoder(model, str(args.save))
            print(f"seed {seed}: saved to {args.save} (weights SHA-256 {row['saved_sha256']})", flush=True)
        rfids = [row["rfid"] for row in rows]
        write_result(args.out, {**header, "rows": rows, "rfid_mean": statistics.fmean(rfids)})
        print(f"seed {seed}: rFID {row['rfid']:.3f} (floor {floor.value:.3f}), {row['train_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
