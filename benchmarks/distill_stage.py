"""The distill stage measured through the pipeline (issue 33's acceptance): one ``python -m pipelines run`` per noise
seed (``sample.seed``; the first trains and distills, the others reuse both and re-run sample, evaluate and register),
then each seed's FID-against-NFE table (the evaluate stage's ``nfe_curve``: the student at each round's steps, the
teacher at those NFEs with DDIM and DPM-Solver++(2M), and with its own sampler) gathered into one JSON with the
t-interval over seeds, the student / teacher ratios paired by seed, and the costs of distillation and of training.

    python benchmarks/distill_stage.py --seeds 1 2 3 --out benchmarks/results/distill_stage_digits.json

Extra ``key=value`` arguments are config overrides for every run (e.g. ``storage.root=/tmp/runs``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import write_result
from quality_per_compute import interval

from pipelines.config_file import load_config
from pipelines.contracts import DistillOutputs, EvaluateOutputs, StageManifest, TrainOutputs
from pipelines.runs import RunStore

REPO = Path(__file__).resolve().parents[1]


def run_seed(config_path: str, seed: int, overrides: list[str]) -> None:
    """The pipeline at ``sample.seed=seed`` (a changed seed re-runs sample, evaluate and register only)."""
    command = [sys.executable, "-m", "pipelines", "run", "--config", config_path, f"sample.seed={seed}"]
    subprocess.run([*command, *overrides, "--allow-changes"], cwd=REPO, check=True)


def committed(store: RunStore, stage: str, kind: type) -> StageManifest[Any]:
    """The stage's current result (the run's head names it)."""
    manifest = store.read_manifest(stage, store.read_head()[stage], kind)
    assert manifest is not None, f"{stage} has no committed result"
    return manifest


def seed_rows(store: RunStore) -> dict[str, float]:
    """The current evaluate result's curve: ``"<model>, <sampler>, <nfe> NFE" -> FID``."""
    curve = committed(store, "evaluate", EvaluateOutputs).outputs.nfe_curve
    return {f"{point.model}, {point.sampler}, {point.nfe} NFE": point.fid for point in curve}


def costs(store: RunStore) -> dict[str, Any]:
    """Distillation's images and seconds (its rounds' loops, and the stage's wall time) beside training's."""
    distill, train = committed(store, "distill", DistillOutputs), committed(store, "train", TrainOutputs)
    return {
        "distill_images": distill.outputs.images_seen,
        "distill_loop_seconds": distill.outputs.loop_seconds,
        "distill_round_loop_seconds": [done.loop_seconds for done in distill.outputs.rounds],
        "distill_stage_seconds": distill.finished_at - distill.started_at,
        "teacher_images": train.outputs.images_seen,
        "teacher_loop_seconds": train.outputs.loop_seconds,
        "train_stage_seconds": train.finished_at - train.started_at,
    }


def summary(per_seed: list[dict[str, float]], student: str, teacher: str) -> dict[str, Any]:
    """Every row's FIDs by seed and their interval, and ``student`` / ``teacher`` paired by seed."""
    rows = {}
    for label in per_seed[0]:
        fids = [seed[label] for seed in per_seed]
        mean, low, high = interval(fids)
        rows[label] = {"fids": fids, "mean": mean, "ci_low": low, "ci_high": high}
    ratios = [seed[student] / seed[teacher] for seed in per_seed]
    mean, low, high = interval(ratios)
    ratio = {"student": student, "teacher": teacher, "per_seed": ratios, "mean": mean, "ci_low": low, "ci_high": high}
    return {"rows": rows, "student_over_teacher": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits-distill.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    store, per_seed = RunStore.of(config), []
    for seed in args.seeds:
        run_seed(args.config, seed, args.overrides)
        per_seed.append(seed_rows(store))
    teacher = config.sample.sampler
    nfe = teacher.method.network_evaluations(teacher.num_steps or config.diffusion.num_timesteps)
    student = f"student, ddim (trailing), {config.distill.steps} NFE"
    own = f"teacher, {teacher.method.value} ({teacher.timestep_spacing.value}), {nfe} NFE"
    result = {"benchmark": "distill_stage", "config": args.config, "seeds": args.seeds, "overrides": args.overrides}
    result.update(summary(per_seed, student, own), costs=costs(store))  # the seeds share the distill and train results
    write_result(args.out, result)
    ratio = result["student_over_teacher"]
    print(f"{student} / {own}: {ratio['mean']:.3f} ({ratio['ci_low']:.3f}-{ratio['ci_high']:.3f})")


if __name__ == "__main__":
    main()
