"""The EMA a run samples when ``train.ema_sigma_rel`` names several candidates (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", Sec. 3.2): after training, the power-function EMA of each
candidate width is reconstructed from the committed post-hoc snapshots (Appendix C.3,
:func:`pipelines.training.posthoc.posthoc_snapshot`) and scored on the hold-out split (``train.ema_choice``): by the
NLL bound in bits/dim (Ho et al. 2020, Eq. 5; the Monte Carlo estimate the tune stage ranks trials by), or by the
training objective (Eq. 14 weighted by ``train.loss_weighting``), a validation loss. The bound is dominated by the
least noisy steps, where a short average keeps detail; the objective weighs the steps as training did. Widths near
the best often score within their paired standard error of each other; ``train.ema_choice_tolerance`` then takes the
longest of them (the one-standard-error rule, Breiman et al. 1984, "Classification and Regression Trees", Sec. 3.4.3:
the most regularised candidate the data cannot tell from the best), which steadies what the noisy steps set, such as
an unconditional model's class mix (docs/benchmarks.md, "The EMA width on stable targets"). A latent model
is scored on the hold-out split's latents (one posterior sample of each), with the bound's decoder term a density:
bits per latent dimension of a continuous variable, a score for ranking networks of one latent space, not comparable
with pixel bits/dim.
Every candidate sees the same examples, timesteps and noise, so their differences are paired; the chosen one becomes
the run's snapshot, and the sweep goes to the train run as a table and a plot. It runs as a Ray task on the training
device."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch

from ddpm_core.checkpoint import Snapshot, load_snapshot, save_snapshot
from ddpm_core.data import to_model_range
from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.loss_weighting import LossWeighting
from ddpm_core.phema import reconstruct
from ddpm_core.samplers import null_conditioned
from pipelines.config import EmaChoice
from pipelines.contracts import EmaCandidate, LatentOutputs, lowest_scoring
from pipelines.data.latent_files import held_out_latents
from pipelines.data.shards import read_first_images
from pipelines.execution import Device
from pipelines.figures import png_bytes, subplots
from pipelines.training.posthoc import read_snapshots

SCORE_SEED = 0  # the timesteps and noise every candidate shares


@dataclass(frozen=True)
class EmaSweep:
    """What the choice reads: the run's snapshot (for its network and configs), its post-hoc snapshots, the
    candidates, and the hold-out split they are scored on."""

    snapshot_uri: str  # train.ema_decay's EMA at the end (the network's configs come from it)
    posthoc_uri: str
    images_seen: int  # the end of training, where the EMAs are reconstructed
    candidates: tuple[float, ...]  # train.ema_sigma_rel
    score: EmaChoice  # train.ema_choice: what each candidate is scored on
    weighting: LossWeighting  # train.loss_weighting: the objective's weights (score: loss)
    tolerance: float  # train.ema_choice_tolerance: paired standard errors above the lowest that may be chosen
    holdout_uri: str
    holdout_latent: LatentOutputs | None  # a latent model's: the hold-out split's latents, scored instead
    images: int  # the most hold-out images each candidate is scored on (train.ema_choice_images)
    timesteps: int  # Monte Carlo timesteps per example (train.ema_choice_timesteps)
    chosen_uri: str  # where the chosen EMA's snapshot is committed
    storage_options: dict[str, Any]


@dataclass(frozen=True)
class HeldOut:
    """The examples a network's held-out bound is scored on, in its data space: images ``[n, C, H, W]`` in [-1, 1],
    or a latent model's latents ``[n, c, h, w]`` (``continuous``)."""

    data: torch.Tensor
    continuous: bool

    @property
    def unit(self) -> str:
        return "latent bits/dim" if self.continuous else "bits/dim"

    def to(self, device: torch.device) -> HeldOut:
        return HeldOut(self.data.to(device), self.continuous)


def read_held_out(
    holdout_uri: str, latent: LatentOutputs | None, count: int, storage_options: dict[str, Any]
) -> HeldOut:
    """The first ``count`` held-out examples: the hold-out split's images, or a latent model's hold-out latents
    (:func:`pipelines.data.latent_files.held_out_latents`, the posterior samples drawn from :data:`SCORE_SEED`)."""
    if latent is not None:
        return HeldOut(held_out_latents(latent, count, SCORE_SEED, storage_options), continuous=True)
    return HeldOut(to_model_range(read_first_images(holdout_uri, count, storage_options)), continuous=False)


def held_out_bits(
    network: torch.nn.Module,
    diffusion: GaussianDiffusion,
    held_out: HeldOut,
    timesteps: int,
    num_classes: int | None,
) -> dict[str, torch.Tensor]:
    """The NLL bound of each held-out example in bits/dim, ``{"total": [n], "stderr": [n]}`` (Ho et al. 2020, Eq. 5;
    :meth:`GaussianDiffusion.bits_per_dim_estimate` with ``timesteps`` uniform timesteps per example, drawn from the
    seed :data:`SCORE_SEED`: every network sees the same ones; a latent model's with the continuous decoder term). A
    conditional model is scored as its unconditional (null-class) model."""
    model = null_conditioned(network, num_classes) if num_classes is not None else network
    generator = torch.Generator().manual_seed(SCORE_SEED)
    return diffusion.bits_per_dim_estimate(  # under no_grad, as its decorator says
        model, held_out.data, timesteps, generator=generator, continuous=held_out.continuous
    )


def held_out_loss(
    network: torch.nn.Module,
    diffusion: GaussianDiffusion,
    held_out: HeldOut,
    timesteps: int,
    num_classes: int | None,
    weighting: LossWeighting,
) -> dict[str, torch.Tensor]:
    """The training objective of each held-out example, ``{"total": [n], "stderr": [n]}``
    (:meth:`GaussianDiffusion.loss_estimate`: Eq. 14 weighted by ``weighting``, over ``timesteps`` uniform timesteps
    and their noise per example, drawn from the seed :data:`SCORE_SEED`). A conditional model is scored as its
    unconditional (null-class) model, as :func:`held_out_bits` does."""
    model = null_conditioned(network, num_classes) if num_classes is not None else network
    generator = torch.Generator().manual_seed(SCORE_SEED)
    return diffusion.loss_estimate(model, held_out.data, timesteps, generator=generator, weighting=weighting)


def score_unit(sweep: EmaSweep, held_out: HeldOut) -> str:
    """What a candidate's score is measured in: the bound's unit, or the objective's weighting."""
    if sweep.score is EmaChoice.LOSS:
        return f"{sweep.weighting.kind.value}-weighted loss"
    return held_out.unit


def held_out_score(
    sweep: EmaSweep, network: torch.nn.Module, diffusion: GaussianDiffusion, held_out: HeldOut, num_classes: int | None
) -> dict[str, torch.Tensor]:
    """One candidate's ``train.ema_choice`` score of each held-out example, ``{"total": [n], "stderr": [n]}``."""
    if sweep.score is EmaChoice.LOSS:
        return held_out_loss(network, diffusion, held_out, sweep.timesteps, num_classes, sweep.weighting)
    return held_out_bits(network, diffusion, held_out, sweep.timesteps, num_classes)


def held_out_bits_per_dim(
    network: torch.nn.Module,
    diffusion: GaussianDiffusion,
    held_out: HeldOut,
    timesteps: int,
    num_classes: int | None,
) -> tuple[float, float]:
    """:func:`held_out_bits`' mean over the examples, and that mean's Monte Carlo standard error."""
    estimate = held_out_bits(network, diffusion, held_out, timesteps, num_classes)
    return estimate["total"].mean().item(), estimate["stderr"].pow(2).sum().sqrt().item() / len(held_out.data)


def score_candidates(sweep: EmaSweep) -> tuple[EmaCandidate, ...]:
    """Each candidate's reconstructed EMA, scored on the hold-out split; the best one's snapshot is committed to
    ``sweep.chosen_uri`` with its width in the metadata. Runs where it is called (a Ray task: :func:`choose_ema`)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    snapshot = load_snapshot(sweep.snapshot_uri, sweep.storage_options)
    snapshots = read_snapshots(sweep.posthoc_uri, sweep.storage_options)
    held_out = read_held_out(sweep.holdout_uri, sweep.holdout_latent, sweep.images, sweep.storage_options).to(device)
    diffusion = GaussianDiffusion.from_config(snapshot.diffusion)
    estimates, weights = {}, {}
    for sigma_rel in sweep.candidates:
        weights[sigma_rel] = reconstruct(snapshots, sigma_rel, sweep.images_seen)
        network = Snapshot(snapshot.unet, snapshot.diffusion, weights[sigma_rel], {}).build_network().to(device)
        estimates[sigma_rel] = held_out_score(sweep, network, diffusion, held_out, snapshot.unet.num_classes)
    best = chosen_width({sigma_rel: estimate["total"] for sigma_rel, estimate in estimates.items()}, sweep.tolerance)
    unit = score_unit(sweep, held_out)
    chosen = Snapshot(snapshot.unet, snapshot.diffusion, weights[best], {}).build_network()
    metadata = {**snapshot.metadata, "ema_sigma_rel": best, "ema": f"post-hoc, chosen on held-out {unit}"}
    save_snapshot(sweep.chosen_uri, chosen, snapshot.unet, snapshot.diffusion, metadata, sweep.storage_options)
    scores = {sigma_rel: (estimate, estimates[best]) for sigma_rel, estimate in estimates.items()}
    return tuple(candidate(sigma_rel, paired, unit, sigma_rel == best) for sigma_rel, paired in scores.items())


def paired_difference(totals: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """The mean of ``totals - reference`` (each ``[n]``: per-example scores on the same timesteps and noise) and its
    standard error over the examples."""
    difference = totals - reference  # [n]
    return difference.mean().item(), difference.std().item() / len(difference) ** 0.5


def chosen_width(totals: dict[float, torch.Tensor], tolerance: float) -> float:
    """The width to sample, from each width's per-example scores ``[n]`` (paired: the same examples, timesteps and
    noise): the longest whose mean exceeds the lowest mean by at most ``tolerance`` standard errors of their paired
    difference; with ``tolerance`` 0, the lowest."""
    lowest = min(totals, key=lambda sigma_rel: totals[sigma_rel].mean().item())

    def within(sigma_rel: float) -> bool:
        gap, stderr = paired_difference(totals[sigma_rel], totals[lowest])
        return gap <= tolerance * stderr

    return max(sigma_rel for sigma_rel in totals if sigma_rel >= lowest and within(sigma_rel))


def candidate(
    sigma_rel: float, paired: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]], unit: str, chosen: bool
) -> EmaCandidate:
    """One width's score, and its paired difference from the chosen width's (``paired``: the estimates of both):
    per example, on the same timesteps and noise, so the difference's standard error (over examples) is far below
    either score's own."""
    estimate, best = paired
    totals = estimate["total"]  # [n]
    minus_chosen, minus_chosen_stderr = paired_difference(totals, best["total"])
    return EmaCandidate(
        sigma_rel=sigma_rel,
        score=totals.mean().item(),
        stderr=estimate["stderr"].pow(2).sum().sqrt().item() / len(totals),
        images=len(totals),
        minus_chosen=minus_chosen,
        minus_chosen_stderr=minus_chosen_stderr,
        unit=unit,
        chosen=chosen,
    )


def choose_ema(sweep: EmaSweep, device: Device, runtime_env: dict[str, Any]) -> tuple[EmaCandidate, ...]:
    """:func:`score_candidates` as a Ray task on one CPU, or one GPU where training ran on GPUs."""
    task = ray.remote(score_candidates).options(
        num_cpus=1, num_gpus=1 if device is Device.GPU else 0, runtime_env=runtime_env, max_retries=2
    )
    scored: tuple[EmaCandidate, ...] = ray.get(task.remote(sweep))
    return scored


def best_of(candidates: Sequence[EmaCandidate]) -> EmaCandidate:
    """The sampled candidate: the one the sweep chose, or (a sweep recorded before the choice was marked) the
    lowest."""
    chosen = [candidate for candidate in candidates if candidate.chosen]
    return chosen[0] if chosen else lowest_scoring(candidates)


def tolerance_note(candidates: Sequence[EmaCandidate]) -> str:
    """What the plot's legend and the log add when the chosen width is not the lowest-scoring one: "" or
    ``" (the lowest: 0.07; within train.ema_choice_tolerance)"``."""
    lowest = lowest_scoring(candidates)
    return (
        ""
        if lowest is best_of(candidates)
        else f" (the lowest: {lowest.sigma_rel:g}; within train.ema_choice_tolerance)"
    )


def sweep_plot(candidates: Sequence[EmaCandidate], profiles: Sequence[float]) -> bytes:
    """PNG of the held-out score (``train.ema_choice``'s, in the candidates' unit) against the EMA width (bars: two
    standard errors; green: the profiles tracked in training, from which every other width is reconstructed)."""
    figure, axis = subplots(figsize=(6, 4), dpi=120)
    widths = [c.sigma_rel for c in candidates]
    axis.errorbar(
        widths,
        [c.minus_chosen for c in candidates],
        yerr=[2 * c.minus_chosen_stderr for c in candidates],
        fmt="o-",
        capsize=3,
        label="reconstructed EMA (bars: 2 paired standard errors)",
    )
    best = best_of(candidates)
    axis.plot(
        [best.sigma_rel], [0.0], "r*", markersize=14, label=f"chosen: {best.sigma_rel:g}{tolerance_note(candidates)}"
    )
    for width in profiles:
        axis.axvline(width, color="tab:green", alpha=0.3, linewidth=3)
    axis.set_xlabel("EMA length sigma_rel (green: the profiles tracked in training)")
    unit = candidates[0].unit
    axis.set_ylabel(f"held-out {unit} minus the chosen's\n({candidates[0].images} examples)")
    axis.set_title(
        f"Post-hoc EMA sweep (Karras et al. 2024)\nthe chosen scores {best.score:.6g} {unit}; lower is better",
        fontsize=9,
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return png_bytes(figure)


def log_sweep(
    client: Any, run_id: str, candidates: Sequence[EmaCandidate], profiles: Sequence[float], log: Callable[[str], None]
) -> None:
    """The sweep in the train run: ``ema_sweep_table.json`` (one row per width), ``ema_sweep.png``, and the chosen
    width as the ``ema.chosen_sigma_rel`` tag."""
    table = {name: [getattr(candidate, name) for candidate in candidates] for name in EmaCandidate.__dataclass_fields__}
    client.log_table(run_id, table, "ema_sweep_table.json")
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "ema_sweep.png")
        with open(path, "wb") as file:
            file.write(sweep_plot(candidates, profiles))
        client.log_artifact(run_id, path)
    best = best_of(candidates)
    client.set_tag(run_id, "ema.chosen_sigma_rel", f"{best.sigma_rel:g}")
    said = ", ".join(f"{c.sigma_rel:g}: {c.score:.6g}" for c in candidates)
    unit = candidates[0].unit
    sampled = f"sampling the EMA of {best.sigma_rel:g}{tolerance_note(candidates)}"
    log(f"train: post-hoc EMA sweep, held-out {unit} by sigma_rel: {said}; {sampled}")
