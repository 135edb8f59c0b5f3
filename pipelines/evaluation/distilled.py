"""A distilled student beside its teacher: FID against the number of network evaluations (NFE) for both, under the
student's protocol (the same N images, indices, seed, precision, feature network and reference).

The student of each round is drawn at its own steps (DDIM on its trailing grid, the grid it was distilled on); the
teacher at each of those NFEs with DDIM and with DPM-Solver++(2M) (Lu et al. 2022, the best few-step solver measured
here: docs/benchmarks.md), both on the trailing grid, and once with its configured sampler (``sample.method`` /
``num_steps``: the quality it was trained for). Issue 33's acceptance reads this table: the student at 4 NFE against
the teacher's best solver at 4 NFE and against its many-step FID."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from ddpm_core.distillation import student_sampler
from ddpm_core.images import grid, labelled_rows
from ddpm_core.metrics import FidEstimate
from ddpm_core.samplers import Method, SamplerConfig, Spacing
from pipelines.contracts import DistillOutputs, NfePoint
from pipelines.figures import png_bytes, subplots

TEACHER_SOLVERS = (Method.DDIM, Method.DPM_SOLVER_PP_2M)
TEACHER_OWN = "teacher_configured_shards"  # the folder of the teacher's set drawn with its own sampler
SIDE_BY_SIDE_IMAGES = 12  # images per row of the student-beside-teacher picture

# (snapshot URI, sampler, folder) -> the FID of that snapshot's images under the sample set's protocol
DrawAndScore = Callable[[str, SamplerConfig, str], FidEstimate]


def nfe_points(
    distill: DistillOutputs, teacher_sampler: SamplerConfig, student_fid: FidEstimate, score: DrawAndScore
) -> tuple[NfePoint, ...]:
    """The FID-against-NFE table: the final student (its FID is the sample set's), the earlier rounds' students, the
    teacher at every round's NFE with each of :data:`TEACHER_SOLVERS`, and the teacher with ``teacher_sampler``."""
    points = [point("student", distill.sampler, student_fid, distill.snapshot_uri)]
    for done in distill.rounds[:-1]:
        sampler = student_sampler(done.steps)
        fid = score(done.snapshot_uri, sampler, f"student_{done.steps}steps_shards")
        points.append(point("student", sampler, fid, done.snapshot_uri))
    teacher = distill.teacher_snapshot_uri
    for steps in sorted({done.steps for done in distill.rounds}):
        for method in TEACHER_SOLVERS:
            sampler = SamplerConfig(method=method, num_steps=steps, spacing=Spacing.TRAILING)
            fid = score(teacher, sampler, teacher_folder(method, steps))
            points.append(point("teacher", sampler, fid, teacher))
    fid = score(teacher, teacher_sampler, TEACHER_OWN)
    points.append(point("teacher", teacher_sampler, fid, teacher))
    return tuple(points)


def teacher_folder(method: Method, steps: int) -> str:
    """The folder of the teacher's set drawn with ``method`` at ``steps`` (trailing spacing)."""
    return f"teacher_{method.value}_{steps}steps_shards"


def side_by_side(strips: Sequence[tuple[str, np.ndarray]]) -> Image.Image:
    """Labelled rows of images ``[n, H, W, C]`` uint8, one per set: the same indices, so the same starting noise, in
    every row (a deterministic student and its teacher map each noise to comparable images)."""
    return labelled_rows([grid(images, columns=len(images)) for _, images in strips], [label for label, _ in strips])


def point(model: str, sampler: SamplerConfig, fid: FidEstimate, snapshot_uri: str) -> NfePoint:
    steps = sampler.num_steps or 0
    return NfePoint(
        model=model,
        sampler=f"{sampler.method.value} ({sampler.timestep_spacing.value})",
        steps=steps,
        nfe=sampler.method.network_evaluations(steps),
        fid=fid.value,
        fid_stderr=fid.stderr,
        snapshot_uri=snapshot_uri,
    )


def nfe_table(points: Sequence[NfePoint]) -> dict[str, list[object]]:
    """The points as MLflow's table artifact (one row each)."""
    return {name: [getattr(p, name) for p in points] for name in NfePoint.__dataclass_fields__}


def nfe_plot(points: Sequence[NfePoint], num_samples: int) -> bytes:
    """PNG of FID against NFE (log axes): one line per model and sampler, with +-1 standard error bars."""
    figure, axes = subplots(figsize=(6.5, 4.2), dpi=120)
    for label in dict.fromkeys(f"{p.model}, {p.sampler}" for p in points):
        line = sorted((p for p in points if f"{p.model}, {p.sampler}" == label), key=lambda p: p.nfe)
        errors = [p.fid_stderr or 0.0 for p in line]
        marker = "o-" if line[0].model == "student" else "s--"
        axes.errorbar([p.nfe for p in line], [p.fid for p in line], yerr=errors, fmt=marker, capsize=3, label=label)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")  # a few-step teacher's FID is tens of times a student's
    axes.set_xlabel("network evaluations per image (NFE)")
    axes.set_ylabel(f"FID ({num_samples} samples)")
    axes.set_title("Distilled student and its teacher")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return png_bytes(figure)
