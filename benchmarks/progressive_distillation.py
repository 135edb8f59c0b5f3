"""Progressive distillation of a finished pipeline run (Salimans & Ho 2022, Algorithm 2): is a few-step student as
good as its teacher's many steps, at what cost in training images (issue 33's measurement before its stage).

Round by round, from a teacher sampled with DDIM at ``2 x --first-student`` steps: a student initialised from its
teacher learns to do in one DDIM step what the teacher does in two (``ddpm_core.distillation.progressive_loss``,
truncated-SNR weighting), with AdamW at a learning rate annealed linearly to 0 within each round, as in the paper.
The student of a round is the teacher of the next. One process, no Ray: this times and scores the method; the
pipeline's stage runs the same loss on Ray Train.

Every student is sampled with DDIM at its own step count (``spacing: trailing``, whose grid is the student's) and
scored as the evaluate stage scores (benchmarks/posthoc_ema.py's Scorer: the run's reference statistics and feature
network, the same N images per noise seed). The teacher is scored beside it at the same NFE with DDIM and with
DPM-Solver++(2M), and at DDIM-50. Writes JSON with each seed's FID, the t-interval over seeds and the images and
seconds each round took.

    python benchmarks/progressive_distillation.py --run-root runs/quickstart --first-student 16 --last-student 1 \\
        --images-per-round 33000 --seeds 1 2 3 --out benchmarks/results/progressive_distillation_digits.json
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from common import write_result
from fid_vs_steps import outputs
from posthoc_ema import Scorer
from quality_per_compute import floor_of, interval

from ddpm_core.checkpoint import Snapshot, load_snapshot
from ddpm_core.data import random_batch, to_model_range
from ddpm_core.diffusion import GaussianDiffusion, Prediction
from ddpm_core.distillation import Reparameterized, progressive_loss
from ddpm_core.samplers import SamplerConfig
from pipelines.contracts import PrepareOutputs, TrainOutputs
from pipelines.data.shards import read_split


def learning_rate(peak: float, step: int, steps: int) -> float:
    """The round's learning rate: ``peak`` annealed linearly to 0 over its ``steps`` (Salimans & Ho 2022, App. E)."""
    return peak * (1 - step / steps)


def distill_round(
    teacher: torch.nn.Module,
    initial: torch.nn.Module,
    diffusion: GaussianDiffusion,
    images: torch.Tensor,
    student_steps: int,
    args: argparse.Namespace,
    seed: int,
) -> tuple[torch.nn.Module, float, list[float]]:
    """One round: a copy of ``initial`` (the teacher's network) trained for ``args.images_per_round`` images
    (``images`` ``[N, C, H, W]`` in [-1, 1]) to take ``student_steps`` steps of ``diffusion``'s parameterisation.
    Returns the student, the seconds and the mean loss per tenth."""
    teacher.eval()
    student = copy.deepcopy(initial).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    steps = -(-args.images_per_round // args.batch_size)
    losses: list[float] = []
    window: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.lr, step, steps)
        x0 = random_batch(images, args.batch_size, generator, False, torch.contiguous_format)[0]  # [B, C, H, W]
        loss = progressive_loss(diffusion, student, teacher, x0, student_steps, generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
        optimizer.step()
        window.append(loss.item())
        if len(window) * 10 >= steps or step == steps - 1:
            losses.append(sum(window) / len(window))
            window = []
    return student.eval(), time.perf_counter() - started, losses


def score(scorer_of: dict[int, Scorer], snapshot: Snapshot, model: torch.nn.Module, label: str) -> dict[str, Any]:
    """FID of ``model`` on every seed's scorer, and its interval."""
    weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
    fids = [scorer.score(snapshot, weights).fid for scorer in scorer_of.values()]
    mean, low, high = interval(fids)
    print(f"{label:44s} FID {mean:.3f} ({low:.3f}-{high:.3f}) seeds {[round(f, 3) for f in fids]}", flush=True)
    return {"label": label, "fids": fids, "fid_mean": mean, "fid_ci_low": low, "fid_ci_high": high}


def scorers(run_root: Path, sampler: SamplerConfig, args: argparse.Namespace) -> dict[int, Scorer]:
    return {seed: Scorer(run_root, sampler, seed, args.samples, args.sample_batch) for seed in args.seeds}


def teacher_rows(run_root: Path, snapshot: Snapshot, model: torch.nn.Module, args: argparse.Namespace) -> list[dict]:
    """The teacher at DDIM-50, and at each student's NFE with DDIM and DPM-Solver++(2M) (trailing spacing)."""
    rows = []
    samplers = [SamplerConfig("ddim", 50)] + [
        SamplerConfig(method, nfe, spacing="trailing")
        for nfe in student_counts(args)
        for method in ("ddim", "dpm_solver++_2m")
    ]
    for sampler in samplers:
        label = f"teacher {sampler.method.value}-{sampler.num_steps} ({sampler.timestep_spacing.value})"
        rows.append({"nfe": sampler.num_steps, **score(scorers(run_root, sampler, args), snapshot, model, label)})
    return rows


def student_counts(args: argparse.Namespace) -> list[int]:
    """The students' step counts, halving from ``--first-student`` to ``--last-student``."""
    counts, steps = [], args.first_student
    while steps >= args.last_student:
        counts.append(steps)
        steps //= 2
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-root", type=Path, required=True)
    parser.add_argument("--first-student", type=int, default=16, help="the first student's steps (teacher: twice)")
    parser.add_argument("--last-student", type=int, default=1)
    parser.add_argument("--images-per-round", type=int, default=25000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--sample-batch", type=int, default=250)
    parser.add_argument(
        "--student-prediction",
        choices=["teacher", "eps", "x0", "v"],
        default="teacher",
        help="what the student's network predicts (initialised from the teacher's weights whatever it predicts)",
    )
    parser.add_argument("--skip-teacher", action="store_true", help="score the students only")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run_root = args.run_root
    snapshot = load_snapshot(outputs(run_root, "train", TrainOutputs).snapshot_uri)
    images_uint8, _ = read_split(outputs(run_root, "prepare", PrepareOutputs).shards_uri, {})  # [N, H, W, C]
    images = to_model_range(torch.from_numpy(images_uint8))  # [N, C, H, W] in [-1, 1]
    network = snapshot.build_model()
    prediction = snapshot.diffusion.prediction if args.student_prediction == "teacher" else args.student_prediction
    student_snapshot = Snapshot(snapshot.unet, replace(snapshot.diffusion, prediction=Prediction(prediction)), {}, {})
    diffusion = GaussianDiffusion.from_config(student_snapshot.diffusion)
    teacher: torch.nn.Module = Reparameterized(
        network, GaussianDiffusion.from_config(snapshot.diffusion), diffusion.prediction
    )
    result: dict[str, Any] = {"benchmark": "progressive_distillation", "torch": torch.__version__, **vars(args)}
    result.update(run_root=str(run_root), out=str(args.out), threads=torch.get_num_threads())
    result.update(teacher_prediction=snapshot.diffusion.prediction.value, student_prediction=diffusion.prediction.value)
    result["floor"] = floor_of(run_root, args.samples)
    result["teacher"] = [] if args.skip_teacher else teacher_rows(run_root, snapshot, network, args)
    result["students"], spent, initial = [], 0, network
    for round_index, steps in enumerate(student_counts(args)):
        student, seconds, losses = distill_round(teacher, initial, diffusion, images, steps, args, seed=round_index)
        spent += -(-args.images_per_round // args.batch_size) * args.batch_size
        sampler = SamplerConfig("ddim", steps, spacing="trailing")
        label = f"student {steps} steps ({spent} images)"
        row = score(scorers(run_root, sampler, args), student_snapshot, student, label)
        result["students"].append({"nfe": steps, "images_total": spent, "seconds": seconds, "losses": losses, **row})
        write_result(args.out, result)
        teacher = initial = student
    write_result(args.out, result)


if __name__ == "__main__":
    main()
