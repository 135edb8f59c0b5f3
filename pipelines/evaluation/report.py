"""The evaluate stage's scores in words, written once: the command line's summary, the evaluate stage's log line and
the registered version's description all render :func:`score_lines`. A new score is added here, beside its
computation and its declaration in :class:`pipelines.contracts.Scores`."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.contracts import EvaluateOutputs


@dataclass(frozen=True)
class Line:
    label: str  # what is measured, e.g. "FID"
    text: str  # the number, its uncertainty and how it was measured


def score_lines(evaluation: EvaluateOutputs) -> list[Line]:
    """Each computed score with its interval and protocol, the FID first and its references after it."""
    scores, protocol, details = evaluation.scores, evaluation.protocol, evaluation.score_protocol
    count, sampler = protocol.num_samples, protocol.sampler
    guided = f", guidance w={protocol.conditioning.guidance_scale:g}" if protocol.conditioning is not None else ""
    interval = ""
    if scores.fid_stderr is not None:
        low, high = scores.fid - 1.96 * scores.fid_stderr, scores.fid + 1.96 * scores.fid_stderr
        interval = f" ± {scores.fid_stderr:.3f} (95%: {low:.3f}-{high:.3f}, jackknife over {details.fid_groups} groups)"
    lines = [
        Line(
            "FID",
            f"{scores.fid:.3f}{interval} on {count:,} samples ({sampler.method.value}, {details.nfe} network "
            f"evaluations{guided}), extractor {protocol.extractor_id}",
        )
    ]
    if scores.fid_floor is not None and scores.fid_holdout_vs_train is not None:
        ratio = f"; the model is {scores.fid_over_floor:.2f}x it" if scores.fid_over_floor is not None else ""
        if scores.fid_floor <= 0:  # FID_inf + k / N, both from the hold-out's own jackknife: noisy on few images
            ratio = "; at or below 0: too few held-out images to resolve it (no ratio)"
        lines.append(
            Line(
                "real-data floor",
                f"{scores.fid_floor:.3f} at {count:,} images (from {details.holdout_images:,} held-out images, whose "
                f"FID is {scores.fid_holdout_vs_train:.3f} at N={details.holdout_images:,}){ratio}",
            )
        )
    if scores.fid_inf is not None:
        held = f" (held-out real images: {scores.fid_holdout_inf:.3f})" if scores.fid_holdout_inf is not None else ""
        lines.append(Line("FID_inf", f"{scores.fid_inf:.3f}, the jackknife's bias-corrected FID{held}"))
    lines += comparison_lines(evaluation) + other_lines(evaluation)
    return lines


def comparison_lines(evaluation: EvaluateOutputs) -> list[Line]:
    """The untrained network (the ceiling) and the re-scored champion, under the same protocol."""
    scores, lines = evaluation.scores, []
    if scores.fid_untrained is not None:
        lines.append(Line("untrained FID", f"{scores.fid_untrained:.3f}, the same protocol (the ceiling)"))
    champion = evaluation.rescored_champion
    if champion is not None and scores.fid_champion is not None:
        difference = ""
        if scores.fid_minus_champion is not None and scores.fid_minus_champion_stderr is not None:
            difference = f"; FID - champion's {scores.fid_minus_champion:+.3f} ± {scores.fid_minus_champion_stderr:.3f}"
        lines.append(
            Line(
                "champion FID",
                f"{scores.fid_champion:.3f}, {champion.model_name} v{champion.version} re-scored under this "
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
                f"{scores.kid:.5f} ± {scores.kid_std:.5f} (std over {details.kid_subsets} subsets of "
                f"{details.kid_subset_size} images each; unbiased at any N)",
            )
        )
    if scores.inception_score is not None and scores.inception_score_std is not None:
        splits = details.inception_score_splits
        lines.append(
            Line("IS", f"{scores.inception_score:.3f} ± {scores.inception_score_std:.3f} (std over {splits} splits)")
        )
    if scores.precision is not None and scores.recall is not None:
        lines.append(
            Line(
                "precision/recall",
                f"{scores.precision:.3f} / {scores.recall:.3f} (k={details.precision_recall_k}, "
                f"{details.compared_images:,} images of each set)",
            )
        )
    nll = evaluation.nll_protocol
    if scores.nll_bpd is not None and scores.nll_bpd_stderr is not None and nll is not None:
        timesteps = "all" if nll.timesteps is None else nll.timesteps
        lines.append(
            Line(
                "NLL bound",
                f"{scores.nll_bpd:.3f} ± {scores.nll_bpd_stderr:.3f} bits/dim ({nll.num_images:,} {nll.split} images, "
                f"timesteps: {timesteps})",
            )
        )
    if scores.conditional_accuracy is not None:
        lines.append(Line("class accuracy", f"{scores.conditional_accuracy:.4f} (the data set's classifier)"))
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
