"""The evaluate stage's scores in words, written once: the command line's summary, the evaluate stage's log line and
the registered version's description all render :func:`score_lines`. A new score is added here, beside its
computation and its declaration in :class:`pipelines.contracts.Scores`.

Numbers are written to what they mean (the metrics keep every digit): an FID to 3 significant digits with its 95%
interval to the same decimals, a value with a spread (± a standard error or deviation) to the spread's second
significant digit."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from ddpm_core.memorization import CopyRate
from pipelines.contracts import EvaluateOutputs, where_guided
from pipelines.tracking import run_link, set_note_part

# Every score has one home, the evaluate run; the parent run, the register run and the model version carry this tag
# with its run id, and a link to it in their descriptions
SCORES_RUN_TAG = "ddpm.scores_run_id"


@dataclass(frozen=True)
class Line:
    label: str  # what is measured, e.g. "FID"
    text: str  # the number, its uncertainty and how it was measured


def decimals(value: float, digits: int) -> int:
    """The decimals that write ``value`` to ``digits`` significant digits (none for its integer part)."""
    if value == 0 or not math.isfinite(value):
        return digits - 1
    return min(12, max(0, digits - 1 - math.floor(math.log10(abs(value)))))


def significant(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, in fixed notation: 0.63171 -> 0.632, 40.013 -> 40.0."""
    return f"{value:.{decimals(value, digits)}f}"


def with_spread(value: float, spread: float) -> str:
    """``value ± spread``, both to the spread's second significant digit: 0.00172, 0.00182 -> 0.0017 ± 0.0018."""
    places = decimals(spread, 2)
    return f"{value:.{places}f} ± {spread:.{places}f}"


def fid_text(evaluation: EvaluateOutputs) -> str:
    """The FID to 3 significant digits, with its 95% interval to the same decimals and the standard error."""
    scores, details = evaluation.scores, evaluation.score_protocol
    interval = scores.fid_interval()
    if interval is None or scores.fid_stderr is None:
        return significant(scores.fid)
    places = decimals(scores.fid, 3)
    low, high = (f"{bound:.{places}f}" for bound in interval)
    stderr = significant(scores.fid_stderr, 2)
    groups = details.fid_groups
    return f"{scores.fid:.{places}f} (95% interval {low} to {high}; stderr {stderr}, jackknife over {groups} groups)"


def score_lines(evaluation: EvaluateOutputs) -> list[Line]:
    """Each computed score with its interval and protocol, the FID first and its references after it."""
    scores, protocol, details = evaluation.scores, evaluation.protocol, evaluation.score_protocol
    count, sampler = protocol.num_samples, protocol.sampler
    conditioning = protocol.conditioning
    guided = (
        ""
        if conditioning is None
        else f", guidance w={conditioning.guidance_scale:g}{where_guided(conditioning.interval)}"
    )
    if details.autoguidance is not None:
        guided += f"; {details.autoguidance.described()}"
    lines = [
        Line(
            "FID",
            f"{fid_text(evaluation)} on {count:,} samples ({sampler.method.value}, {details.nfe} network "
            f"evaluations{guided}), extractor {protocol.extractor_id}",
        )
    ]
    if scores.fid_floor is not None and scores.fid_holdout_vs_train is not None:
        lines.append(Line("real-data floor", floor_text(evaluation)))
    if scores.rfid is not None:
        lines.append(Line("rFID", rfid_text(evaluation)))
    if scores.fid_inf is not None:
        held = (
            f" (held-out real images: {significant(scores.fid_holdout_inf)})"
            if scores.fid_holdout_inf is not None
            else ""
        )
        lines.append(Line("FID_inf", f"{significant(scores.fid_inf)}, the jackknife's bias-corrected FID{held}"))
    lines += comparison_lines(evaluation) + other_lines(evaluation) + diversity_lines(evaluation)
    return lines


def floor_text(evaluation: EvaluateOutputs) -> str:
    """The real-data floor at the sample set's N, how it was carried from the hold-out's N, and the model's ratio."""
    scores, details, count = evaluation.scores, evaluation.score_protocol, evaluation.protocol.num_samples
    floor, held = scores.fid_floor or 0.0, details.holdout_images
    spread = with_spread(floor, scores.fid_floor_stderr) if scores.fid_floor_stderr else significant(floor)
    m = evaluation.protocol.reference.reference_count
    against = f"{m:,} reference images" if m else "published statistics (m taken as infinite)"
    ratio = f"; the model is {scores.fid_over_floor:.2g}x it" if scores.fid_over_floor is not None else ""
    return (
        f"{spread} at {count:,} images ({held:,} held-out images score {significant(scores.fid_holdout_vs_train or 0)}"
        f" against {against}, scaled by (1/N + 1/m) / (1/n + 1/m)){ratio}"
    )


def rfid_text(evaluation: EvaluateOutputs) -> str:
    """A latent model's rFID at the hold-out's N, and what its autoencoder adds to a FID against the reference."""
    scores, held = evaluation.scores, evaluation.score_protocol.holdout_images
    rfid = with_spread(scores.rfid or 0.0, scores.rfid_stderr) if scores.rfid_stderr else significant(scores.rfid or 0)
    text = f"{rfid}: the {held:,} held-out images reconstructed by the autoencoder, against the originals"
    excess, stderr = scores.fid_reconstructed_minus_holdout, scores.fid_reconstructed_minus_holdout_stderr
    if excess is not None and stderr is not None:
        text += (
            f"; against the reference they score {with_spread(excess, stderr)} above the originals (paired "
            "jackknife): what the autoencoder adds to the real-data floor"
        )
    return text


def comparison_lines(evaluation: EvaluateOutputs) -> list[Line]:
    """The untrained network (the ceiling) and the re-scored champion, under the same protocol."""
    scores, lines = evaluation.scores, []
    if scores.fid_untrained is not None:
        lines.append(Line("untrained FID", f"{significant(scores.fid_untrained)}, the same protocol (the ceiling)"))
    champion = evaluation.rescored_champion
    if champion is not None and scores.fid_champion is not None:
        difference = ""
        if scores.fid_minus_champion is not None and scores.fid_minus_champion_stderr is not None:
            difference = (
                f"; FID - champion's {with_spread(scores.fid_minus_champion, scores.fid_minus_champion_stderr)}"
            )
        lines.append(
            Line(
                "champion FID",
                f"{significant(scores.fid_champion)}, {champion.model_name} v{champion.version} re-scored under this "
                f"protocol{difference} (paired jackknife)",
            )
        )
    return lines


def other_lines(evaluation: EvaluateOutputs) -> list[Line]:
    """KID, Inception Score, precision/recall, the NLL bound and a conditional model's class accuracy."""
    scores, details, lines = evaluation.scores, evaluation.score_protocol, []
    if scores.kid is not None and scores.kid_std is not None:
        lines.append(
            Line(
                "KID",
                f"{with_spread(scores.kid, scores.kid_std)} (std over {details.kid_subsets} subsets of "
                f"{details.kid_subset_size} images each; unbiased at any N)",
            )
        )
    if scores.inception_score is not None and scores.inception_score_std is not None:
        splits = details.inception_score_splits
        lines.append(
            Line("IS", f"{with_spread(scores.inception_score, scores.inception_score_std)} (std over {splits} splits)")
        )
    if scores.precision is not None and scores.recall is not None:
        lines.append(
            Line(
                "precision/recall",
                f"{scores.precision:.2f} / {scores.recall:.2f} (k={details.precision_recall_k}, "
                f"{details.compared_images:,} images of each set)",
            )
        )
    nll = evaluation.nll_protocol
    if scores.nll_bpd is not None and scores.nll_bpd_stderr is not None and nll is not None:
        timesteps = "all" if nll.timesteps is None else nll.timesteps
        lines.append(
            Line(
                "NLL bound",
                f"{with_spread(scores.nll_bpd, scores.nll_bpd_stderr)} bits/dim ({nll.num_images:,} {nll.split} "
                f"images, timesteps: {timesteps})",
            )
        )
    if scores.conditional_accuracy is not None:
        lines.append(Line("class accuracy", f"{scores.conditional_accuracy:.2f} (the data set's classifier)"))
    return lines


def rate_text(rate: CopyRate) -> str:
    """A share with its 95% interval: ``0.012 (95% interval 0.006 to 0.021; 12 of 1,000)``."""
    return f"{rate.rate:.3f} (95% interval {rate.low:.3f} to {rate.high:.3f}; {rate.count:,} of {rate.total:,})"


def diversity_lines(evaluation: EvaluateOutputs) -> list[Line]:
    """The copy rate in both spaces with the held-out images' own (the false-positive check), and class coverage."""
    lines, memorized, coverage = [], evaluation.memorization, evaluation.coverage
    if memorized is not None:
        lines.append(
            Line(
                "copy rate",
                f"{rate_text(memorized.copy_rate)} in {memorized.feature_space}'s features, "
                f"{rate_text(memorized.copy_rate_pixels)} in pixels (samples whose nearest of "
                f"{memorized.training_images:,} training images is much nearer than the second; threshold at a "
                f"{memorized.false_positive_rate:g} false-positive rate on {memorized.heldout_images:,} held-out "
                f"images, which score {memorized.heldout_rate.rate:.3f} out of sample)",
            )
        )
    if coverage is not None:
        lines.append(
            Line(
                "class coverage",
                f"TVD {significant(coverage.tvd)} (95% bootstrap interval {significant(coverage.tvd_low)} to "
                f"{significant(coverage.tvd_high)}; a perfect model's {coverage.num_samples:,} samples: "
                f"{significant(coverage.tvd_floor)}), lowest class recall {min(coverage.recall):.2f}",
            )
        )
    return lines


def as_summary(lines: list[Line]) -> str:
    """Aligned lines for a terminal."""
    width = max(len(line.label) for line in lines) + 2
    return "\n".join(f"{line.label + ':':<{width}}{line.text}" for line in lines)


def as_sentence(lines: list[Line]) -> str:
    """One line for a log."""
    return "; ".join(f"{line.label} {line.text}" for line in lines)


def as_markdown(lines: list[Line]) -> list[str]:
    """Markdown lines for MLflow descriptions."""
    return [f"- **{line.label}** {line.text}" for line in lines]


def link_scores(client: MlflowClient, run_id: str, home: str, evaluation: EvaluateOutputs) -> None:
    """Every score has one home, the evaluate run ``home`` (metrics with their intervals and protocol): ``run_id``
    gets the tag ``ddpm.scores_run_id`` and, ending its description, the headline FID in words with a link there
    (replacing the line an earlier execution wrote)."""
    experiment = client.get_run(home).info.experiment_id
    fid = score_lines(evaluation)[0]
    link = run_link(experiment, home, "evaluate run")
    line = f"Scores: {fid.label} {fid.text}. Every score, with its interval and protocol, is on the {link}."
    client.set_tag(run_id, SCORES_RUN_TAG, home)
    set_note_part(client, run_id, "Scores: ", line)
