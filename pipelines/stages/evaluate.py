"""evaluate: FID, Inception Score and precision/recall of the sample set on one feature network, the NLL bound of
held-out real images, and the same FID for held-out real images (the floor), all logged to MLflow with the protocol
that produced them (docs/evaluation.md).

Besides the sample stage's images, this stage samples two more sets under the same protocol (same indices, seed,
sampler and precision): an untrained network's (``evaluate.untrained_baseline``: the ceiling) and the registered
champion's (``evaluate.rescore_champion``: so that the register stage compares like with like).

With the distill stage on, the sample set is the distilled student's; the teacher is drawn beside it at the
student's NFEs and with its own sampler, as a FID-against-NFE table and plot (:mod:`pipelines.evaluation.distilled`).

It also scores memorization (the copy rate, Carlini et al. 2023) and, for labelled data, mode coverage (the class
histogram's total variation distance): :mod:`pipelines.evaluation.memorization` and
:mod:`pipelines.evaluation.coverage`."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param
from PIL import Image

from ddpm_core.checkpoint import read_snapshot_config
from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion
from ddpm_core.images import grid, labelled_rows, rows_by_class, save_grid
from ddpm_core.metrics import FidEstimate, kernel_inception_distance, kid_subset_size, precision_recall
from ddpm_core.samplers import SamplerConfig, evaluations_per_image
from ddpm_core.storage import filesystem, verify_committed, write_bytes
from pipelines.config import EvaluateSection, Extractor, NllSplit, PipelineConfig, registered_model_name
from pipelines.context import StageContext
from pipelines.contracts import (
    FID_INTERVAL_METHOD,
    AutoencoderOutputs,
    ChampionRef,
    ClassCoverage,
    DistillOutputs,
    EvaluateOutputs,
    FidProtocol,
    GuidancePoint,
    MemorizationScore,
    NfePoint,
    NllProtocol,
    PrepareOutputs,
    ReferenceSet,
    SampleOutputs,
    ScoreProtocol,
    Scores,
    TrainOutputs,
)
from pipelines.data.checks import require_images
from pipelines.data.recorded import REFERENCE, log_training_data
from pipelines.data.shards import (
    ImageSource,
    SplitLayout,
    read_first_images,
    read_images,
    read_images_at,
    read_sample_labels,
    sample_shard_uris,
    sample_sources,
    split_layout,
    split_sources,
)
from pipelines.evaluation.classes import ClassHits, sweep_plot
from pipelines.evaluation.coverage import class_coverage, coverage_table
from pipelines.evaluation.distilled import (
    SIDE_BY_SIDE_IMAGES,
    TEACHER_OWN,
    TEACHER_SOLVERS,
    nfe_plot,
    nfe_points,
    nfe_table,
    side_by_side,
    teacher_folder,
)
from pipelines.evaluation.likelihood import NllResult, held_out_bits_per_dim
from pipelines.evaluation.memorization import TrainingSet, memorization_score, pair_caption, pair_strips
from pipelines.evaluation.report import as_sentence, score_lines
from pipelines.evaluation.scoring import (
    ExtractorSpec,
    FeatureWorkers,
    PublishedStatistics,
    Summary,
    SummaryRequest,
    feature_workers,
    fid_estimate,
    predicted_classes,
    published_reference,
    reference_key,
    reference_summary,
    summarize,
    training_features,
)
from pipelines.execution import Execution
from pipelines.external import External
from pipelines.generation.sampling import SampleRequest, sample_to_shards
from pipelines.redaction import redact
from pipelines.registry.champion import champion_snapshot_uri, champion_version


@dataclass(frozen=True)
class FeatureNetwork:
    spec: ExtractorSpec
    extractor_id: str  # in every score's protocol
    weights_sha256: str | None  # Inception: the verified SHA-256 of its weights file


@dataclass(frozen=True)
class Scorer:
    """Scores image sets against one reference, the same way for every set."""

    network: FeatureNetwork
    reference: Summary  # the training split's
    reference_uri: str  # where it is cached
    published: PublishedStatistics | None  # FIDs are against these when given
    execution: Execution
    groups: int  # jackknife groups of every scored set (evaluate.fid_groups)
    training: TrainingSet | None = None  # the copy rate's neighbour search (None: memorization not scored)

    def request(
        self, num_images: int, inception_splits: int = 0, keep_first: int = 0, neighbours: bool = False
    ) -> SummaryRequest:
        """What every task of a set's summary computes; ``neighbours``: also each image's two nearest training
        images, in the same tasks as its features (when this scorer searches them)."""
        groups = min(self.groups, num_images)
        searched = self.training if neighbours else None
        return SummaryRequest(self.network.spec, num_images, inception_splits, keep_first, groups, searched)

    def summarize(self, sources: list[ImageSource], num_images: int) -> Summary:
        return summarize(sources, self.request(num_images), self.execution)

    def estimate(self, summary: Summary) -> FidEstimate:
        return fid_estimate(summary, self.reference, self.published)


@dataclass(frozen=True)
class RescoredChampion:
    champion: ChampionRef
    fid: FidEstimate  # its sample set's, drawn with this run's indices, seed and sampler
    difference: FidEstimate  # this run's FID minus the champion's, with the paired jackknife's standard error


@dataclass(frozen=True)
class Reconstruction:
    """A latent model's autoencoder scored on the held-out images (:func:`reconstruction_fid`)."""

    rfid: FidEstimate  # the reconstructions against the originals (Rombach et al. 2022, Table 8)
    excess: FidEstimate  # the reconstructions' FID minus the originals', both against the reference (paired)


@dataclass(frozen=True)
class Comparisons:
    """FIDs of other image sets under the sample set's protocol: where the model sits between floor and ceiling."""

    holdout: FidEstimate | None  # held-out real images (the floor)
    untrained: FidEstimate | None  # an untrained network (the ceiling)
    champion: RescoredChampion | None  # the registered champion
    reconstruction: Reconstruction | None = None  # a latent model's floor: its autoencoder's

    def apply(self, scores: Scores, num_samples: int, reference_count: int | None) -> Scores:
        """``scores`` with these comparisons filled in; the floor is the hold-out's FID carried to the sample set's
        size against a reference of ``reference_count`` images (FID falls as N grows: only equal sizes compare)."""
        holdout, champion, reconstruction = self.holdout, self.champion, self.reconstruction
        floor, floor_stderr = holdout.real_floor_at(num_samples, reference_count) if holdout else (None, None)
        rfid, excess = (reconstruction.rfid, reconstruction.excess) if reconstruction else (None, None)
        return dataclasses.replace(
            scores,
            fid_untrained=self.untrained.value if self.untrained else None,
            fid_holdout_vs_train=holdout.value if holdout else None,
            fid_holdout_stderr=holdout.stderr if holdout else None,
            fid_holdout_inf=holdout.unbiased if holdout else None,
            fid_floor=floor,
            fid_floor_stderr=floor_stderr,
            fid_over_floor=scores.fid / floor if floor is not None and floor > 0 else None,
            fid_champion=champion.fid.value if champion else None,
            fid_champion_stderr=champion.fid.stderr if champion else None,
            fid_minus_champion=champion.difference.value if champion else None,
            fid_minus_champion_stderr=champion.difference.stderr if champion else None,
            rfid=rfid.value if rfid else None,
            rfid_stderr=rfid.stderr if rfid else None,
            fid_reconstructed_minus_holdout=excess.value if excess else None,
            fid_reconstructed_minus_holdout_stderr=excess.stderr if excess else None,
        )


@dataclass(frozen=True)
class EvaluateSettings:
    evaluate: EvaluateSection
    champion: ChampionRef | None  # the registered champion to re-score beside this run's model (None: none asked)
    teacher_sampler: SamplerConfig | None = None  # a distilled student's teacher's own sampler (sample.*), drawn beside


def settings(config: PipelineConfig, external: External) -> EvaluateSettings:
    rescore = config.evaluate.rescore_champion and config.register.enabled
    champion = external.champion(registered_model_name(config)) if rescore else None
    return EvaluateSettings(config.evaluate, champion, config.sample.sampler if config.distill.enabled else None)


def check_data(settings: EvaluateSettings, prepare: PrepareOutputs, storage_options: dict[str, Any]) -> None:
    """The splits hold enough images for the scores asked for."""
    section = settings.evaluate
    needs = {"the FID's covariance (2 images)": prepare.num_train >= 2}
    if section.precision_recall:
        k = section.precision_recall_k
        needs[f"precision/recall's k-nearest neighbours (more than evaluate.precision_recall_k={k})"] = (
            prepare.num_train > k
        )
    if section.nll and section.nll_split is NllSplit.HOLDOUT:
        needs["the NLL bound (evaluate.nll, at least 1 hold-out image)"] = prepare.num_holdout >= 1
    require_images(prepare, needs)


@dataclass(frozen=True)
class SampleSetScores:
    """The sample set's scores, its FID estimate (for the paired comparison with the champion), how many images of
    each set precision/recall and KID compared, and its summary (features' statistics and neighbours)."""

    scores: Scores
    fid: FidEstimate
    compared: int
    summary: Summary


@dataclass(frozen=True)
class Diversity:
    """Memorization and mode coverage, or why each was not scored."""

    memorization: MemorizationScore | None
    memorization_skipped: str | None
    coverage: ClassCoverage | None
    coverage_skipped: str | None


def run(
    context: StageContext,
    settings: EvaluateSettings,
    prepare: PrepareOutputs,
    autoencoder: AutoencoderOutputs | None,
    train: TrainOutputs,
    sample: SampleOutputs,
    distill: DistillOutputs | None,
) -> EvaluateOutputs:
    section, upstream = settings.evaluate, (prepare, train, sample)
    first = feature_pass(context, section, (prepare, sample), context.execution(train.device))
    scorer, holdout = first.scorer, first.holdout
    ours = sample_set_scores(section, scorer, sample, first.samples)
    scores = ours.scores
    if sample.conditioning is not None and first.sample_classes is not None:
        hits = conditional_hits(prepare, sample.shard_uris, first.sample_classes, scorer.execution.storage_options)
        log_class_accuracy(context, hits, list(prepare.class_names or ()))
        scores = dataclasses.replace(scores, conditional_accuracy=hits.accuracy)
    sweep = guidance_sweep(context, section, upstream, scorer)
    compared = comparisons(context, settings, upstream, scorer, ours.fid, holdout)
    reconstruction = reconstruction_fid(scorer, autoencoder, holdout, compared.holdout)
    compared = dataclasses.replace(compared, reconstruction=reconstruction)
    nll, nll_protocol = held_out_nll(context, section, prepare, train, sample) if distill is None else (None, None)
    curve = nfe_curve(context, settings, scorer, (train, sample, distill), ours.fid)
    scores = dataclasses.replace(
        compared.apply(scores, sample.num_samples, None if scorer.published else scorer.reference.fid.count),
        nll_bpd=nll.bits_per_dim if nll else None,
        nll_bpd_stderr=nll.stderr if nll else None,
    )
    diversity = diversity_scores(context, section, (prepare, sample), first)
    protocol = fid_protocol(prepare, sample, scorer)
    outputs = EvaluateOutputs(
        scores=scores,
        protocol=protocol,
        protocol_hash=protocol_hash(protocol),
        nll_protocol=nll_protocol,
        grid_uri=save_sample_grid(context, section.grid_size, sample),
        reference_uri=scorer.reference_uri,
        rescored_champion=compared.champion.champion if compared.champion else None,
        score_protocol=score_protocol(section, upstream, ours.compared),
        guidance_sweep=sweep,
        scores_run_id=context.mlflow_run_id,
        nfe_curve=curve,
        **vars(diversity),
    )
    context.ran_with.update(settings_that_ran(section, outputs))
    log_to_mlflow(context, section.extractor, outputs)
    scored = train.ema_described() if distill is None else f"{distill.steps}-step student ({distill.method})"
    context.client.set_tag(context.mlflow_run_id, "model.ema", scored)  # which weights were scored
    if outputs.protocol.reference.reference == "training split":  # the data the FIDs are measured against
        log_training_data(context.client, context.mlflow_run_id, prepare, REFERENCE)
    context.log(f"evaluate: {as_sentence(score_lines(outputs))}")
    return outputs


def fid_protocol(prepare: PrepareOutputs, sample: SampleOutputs, scorer: Scorer) -> FidProtocol:
    """Everything that must match for two FIDs to compare."""
    return FidProtocol(
        num_samples=sample.num_samples,
        sampler=sample.sampler,
        seed=sample.seed,
        precision=sample.execution.precision,
        extractor_id=scorer.network.extractor_id,
        extractor_weights_sha256=scorer.network.weights_sha256,
        reference=reference_set(prepare, scorer),
        conditioning=sample.conditioning,
    )


def diversity_scores(
    context: StageContext,
    section: EvaluateSection,
    upstream: tuple[PrepareOutputs, SampleOutputs],
    first: FeaturePass,
) -> Diversity:
    """The copy rate (from the neighbours the sample set's and the held-out set's summaries found) with its closest
    pairs logged, and the class coverage (from the samples' classes) with its table logged; each with the reason it
    was skipped, if it was."""
    (prepare, sample), scorer = upstream, first.scorer
    memorized, memorization_skipped = None, memorization_skip_reason(section, prepare)
    samples, holdout = first.samples, first.holdout
    if samples.neighbours is not None and holdout is not None and holdout.neighbours is not None:
        memorized = memorization_score(
            samples.neighbours,
            holdout.neighbours,
            section.copy_false_positive_rate,
            scorer.network.extractor_id,
            scorer.training.count if scorer.training else 0,
        )
        memorized = dataclasses.replace(memorized, closest_pairs_uri=log_closest_pairs(context, memorized, upstream))
    coverage, coverage_skipped = None, coverage_skip_reason(section, prepare, sample)
    if coverage_skipped is None and first.sample_classes is not None:
        coverage = mode_coverage(section, prepare, sample, first.sample_classes)
        log_coverage(context, coverage)
    for what, reason in (("memorization", memorization_skipped), ("coverage", coverage_skipped)):
        if reason is not None:
            context.log(f"evaluate: {what} not scored: {reason}")
            context.client.set_tag(context.mlflow_run_id, f"{what}.skipped", reason)
    return Diversity(memorized, memorization_skipped, coverage, coverage_skipped)


def memorization_skip_reason(section: EvaluateSection, prepare: PrepareOutputs) -> str | None:
    """Why the copy rate is not scored (None: it is)."""
    if not section.memorization:
        return "evaluate.memorization is off"
    if prepare.num_holdout < 2:
        return (
            f"its threshold is calibrated on held-out real images, and there are {prepare.num_holdout} "
            f"(data.holdout_fraction {prepare.holdout_fraction:g}; at least 2 are needed)"
        )
    return None


def coverage_skip_reason(section: EvaluateSection, prepare: PrepareOutputs, sample: SampleOutputs) -> str | None:
    """Why mode coverage is not scored (None: it is)."""
    if not section.coverage:
        return "evaluate.coverage is off"
    if sample.conditioning is not None:
        return "a class-conditional model draws the classes it is asked for: its class accuracy is the score"
    if prepare.class_counts is None or prepare.class_names is None:
        return "the data has no class labels"
    if prepare.extractor_uri is None:
        return (
            "it needs the data set's classifier, which the prepare stage trains for evaluate.extractor=classifier "
            "(this run's is inception)"
        )
    return None


def mode_coverage(
    section: EvaluateSection, prepare: PrepareOutputs, sample: SampleOutputs, predicted: np.ndarray
) -> ClassCoverage:
    """The samples' class histogram (``predicted``: each sample's top-1 class ``[N]`` by the data set's classifier,
    :func:`classified`) against the training split's labels."""
    assert prepare.class_counts is not None and prepare.class_names is not None
    counts = np.bincount(predicted, minlength=len(prepare.class_counts))  # [K]
    return class_coverage(counts, prepare.class_counts, prepare.class_names, section.coverage_resamples, sample.seed)


def log_coverage(context: StageContext, coverage: ClassCoverage) -> None:
    """The per-class table (``coverage_table.json``) and a line with the TVD and the class seen least."""
    context.client.log_table(context.mlflow_run_id, coverage_table(coverage), "coverage_table.json")
    lowest = min(range(len(coverage.recall)), key=coverage.recall.__getitem__)
    context.log(
        f"evaluate: class coverage TVD {coverage.tvd:.4f} (95% bootstrap {coverage.tvd_low:.4f} to "
        f"{coverage.tvd_high:.4f}; a perfect model's {coverage.num_samples} samples: {coverage.tvd_floor:.4f}); "
        f"lowest recall: class {coverage.class_names[lowest]!r} {coverage.recall[lowest]:.2f}"
    )


def log_closest_pairs(
    context: StageContext, memorized: MemorizationScore, upstream: tuple[PrepareOutputs, SampleOutputs]
) -> str:
    """The closest pairs side by side, each row labelled with its ratio, as ``closest_pairs.png`` in the result
    folder and the artifact ``memorization/closest_pairs.png`` (their list: ``memorization/closest_pairs.json``);
    returns the PNG's URI."""
    (prepare, sample), options, pairs = upstream, context.store.options, memorized.closest_pairs
    sources = sample_sources(sample.shard_uris, options)
    starts = [source.first_index for source in sources]
    counts = tuple(stop - start for start, stop in zip(starts, [*starts[1:], sample.num_samples], strict=True))
    samples = read_images_at(SplitLayout(tuple(sources), counts), [p.sample_index for p in pairs], options)
    training = read_images_at(split_layout(prepare.shards_uri, options), [p.training_index for p in pairs], options)
    rows = [Image.fromarray(strip) for strip in pair_strips(samples, training, pairs)]
    picture = labelled_rows(rows, [pair_caption(pair, rank) for rank, pair in enumerate(pairs, 1)])
    uri = f"{context.result_uri}/closest_pairs.png"
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "closest_pairs.png")
        picture.save(path)
        fs, remote = filesystem(uri, options)
        with open(path, "rb") as file:
            write_bytes(fs, remote, file.read())
        context.client.log_artifact(context.mlflow_run_id, path, "memorization")
    listed = {"pairs": [vars(pair) for pair in pairs], "feature_space": memorized.feature_space}
    context.client.log_dict(context.mlflow_run_id, listed, "memorization/closest_pairs.json")
    return uri


def sample_evaluations(sample: SampleOutputs, diffusion: DiffusionConfig) -> int:
    """The network calls per image of the sample set: the sampler's, doubled at the steps it was autoguided."""
    guide = sample.autoguidance
    interval = None if guide is None else guide.interval
    return evaluations_per_image(GaussianDiffusion.from_config(diffusion), sample.sampler, guide is not None, interval)


def score_protocol(
    section: EvaluateSection, upstream: tuple[PrepareOutputs, TrainOutputs, SampleOutputs], compared: int
) -> ScoreProtocol:
    """How the scores were computed; ``compared``: the images of each set precision/recall and KID compared."""
    prepare, train, sample = upstream
    return ScoreProtocol(
        fid_groups=min(section.fid_groups, sample.num_samples),
        holdout_images=prepare.num_holdout,
        compared_images=compared,
        nfe=sample_evaluations(sample, train.config.diffusion),
        inception_score_splits=section.inception_score_splits if section.inception_score else None,
        precision_recall_k=section.precision_recall_k if section.precision_recall else None,
        kid_subset_size=kid_subset_size(section.kid_subset_size, compared) if section.kid else None,
        kid_subsets=section.kid_subsets if section.kid else None,
        autoguidance=sample.autoguidance,
    )


def settings_that_ran(section: EvaluateSection, outputs: EvaluateOutputs) -> dict[str, Any]:
    """The values that ran of the settings declared ``metadata=RESOLVED`` (capped by the images there were), by
    param key: the stage run logs these, not the config's requests (``pipelines.context.params_that_ran``)."""
    details, nll = outputs.score_protocol, outputs.nll_protocol
    ran: dict[str, Any] = {"evaluate.fid_groups": details.fid_groups}
    if section.first_feature_images:
        ran["evaluate.precision_recall_samples"] = details.compared_images
    if details.kid_subset_size is not None:
        ran["evaluate.kid_subset_size"] = details.kid_subset_size
    if nll is not None:
        ran["evaluate.nll_images"] = nll.num_images
    if outputs.guidance_sweep:
        ran["evaluate.guidance_samples"] = outputs.guidance_sweep[0].num_samples
    return ran


@dataclass(frozen=True)
class FeaturePass:
    """What the evaluate stage computes on its one held pool of feature workers (:func:`feature_pass`)."""

    scorer: Scorer
    samples: Summary  # the sample set's (:func:`sample_set_summary`)
    holdout: Summary | None  # the held-out images' (:func:`holdout_summary`)
    sample_classes: np.ndarray | None  # [N] each sample's class by the data set's classifier (:func:`classified`)


def feature_pass(
    context: StageContext,
    section: EvaluateSection,
    upstream: tuple[PrepareOutputs, SampleOutputs],
    execution: Execution,
) -> FeaturePass:
    """The scorer, the summaries of the sample set and of the held-out images, and (for a conditional model's
    accuracy or the class coverage) the samples' classes, all computed on one pool of feature workers, held while
    nothing else of the stage runs on the cluster."""
    prepare, sample = upstream
    network = feature_network(context, section, prepare)
    files = files_to_score(prepare, sample, execution.storage_options)
    sources = sample_sources(sample.shard_uris, execution.storage_options)
    with feature_workers(network.spec, files, execution) as workers:
        scorer = make_scorer(context, section, prepare, network, execution, workers)
        context.log(f"evaluate: features of {sample.num_samples} samples with {network.extractor_id}")
        generated = sample_set_summary(section, scorer, sources, sample.num_samples, workers)
        holdout = holdout_summary(scorer, prepare, workers)
        classes = None
        if sample.conditioning is not None or coverage_skip_reason(section, prepare, sample) is None:
            classes = classified(prepare, sources, workers)
        return FeaturePass(scorer, generated, holdout, classes)


def files_to_score(prepare: PrepareOutputs, sample: SampleOutputs, storage_options: dict[str, Any]) -> int:
    """The most files of one image set that :func:`feature_pass` computes features of: the sample set's, the
    training split's (for its reference statistics and features, unless cached) and the held-out split's."""
    splits = [prepare.shards_uri, *([prepare.holdout_uri] if prepare.num_holdout >= 2 else [])]
    return max(len(sample.shard_uris), *(len(split_sources(uri, storage_options)) for uri in splits))


def make_scorer(
    context: StageContext,
    settings: EvaluateSection,
    prepare: PrepareOutputs,
    network: FeatureNetwork,
    execution: Execution,
    workers: FeatureWorkers,
) -> Scorer:
    """The network's scorer, with the training split's reference statistics and (for the copy rate) features, each
    from the cache or computed into it on ``workers``; the published statistics too when
    ``evaluate.reference_stats_uri`` names some."""

    def log(line: str) -> None:
        context.log(f"evaluate: {line}")

    key = reference_key(prepare.shards_uri, network.extractor_id, context.store.options)
    uri = context.store.cache_uri("reference", key)
    metadata = {"extractor_id": network.extractor_id, "data_fingerprint": prepare.fingerprint}
    reference = reference_summary(
        uri,
        prepare.shards_uri,
        SummaryRequest(network.spec, 0, keep_first=settings.first_feature_images),
        metadata,
        execution,
        log,
        workers,
    )
    published = (
        published_reference(settings.reference_stats_uri, execution.storage_options)
        if settings.reference_stats_uri
        else None
    )
    training = None
    if memorization_skip_reason(settings, prepare) is None:
        cache = context.store.cache_uri("training_features", key)
        training = training_features(cache, prepare.shards_uri, network.spec, execution, log, workers)
    return Scorer(network, reference, uri, published, execution, settings.fid_groups, training)


def sample_set_summary(
    settings: EvaluateSection,
    scorer: Scorer,
    sources: list[ImageSource],
    num_samples: int,
    workers: FeatureWorkers,
) -> Summary:
    """The summary of the sample set (its shards' ``sources``, ``num_samples`` images in all): its features'
    statistics (with the Inception Score's, when on), its first features (precision/recall and KID) and each sample's
    two nearest training images (when the scorer searches them)."""
    splits = settings.inception_score_splits if settings.inception_score else 0
    request = scorer.request(num_samples, splits, settings.first_feature_images, neighbours=True)
    return summarize(sources, request, scorer.execution, workers)


def sample_set_scores(
    settings: EvaluateSection, scorer: Scorer, sample: SampleOutputs, generated: Summary
) -> SampleSetScores:
    """FID (with its jackknife stderr and FID_inf), Inception Score, precision/recall and KID of the sample set, from
    its summary ``generated`` (:func:`sample_set_summary`); its FID estimate (for the paired comparison with the
    champion); how many images of each set precision/recall and KID compared (equal set sizes, as in Kynkaanniemi et
    al. 2019); and the summary."""
    count = min(len(scorer.reference.first_features), len(generated.first_features))
    real, fake = scorer.reference.first_features[:count], generated.first_features[:count]  # [count, d] each
    inception = generated.inception.inception_score() if generated.inception is not None else (None, None)
    precision, recall = (
        precision_recall(real, fake, settings.precision_recall_k) if settings.precision_recall else (None, None)
    )
    kid: tuple[float | None, float | None] = (None, None)
    if settings.kid:
        kid = kernel_inception_distance(
            real, fake, kid_subset_size(settings.kid_subset_size, count), settings.kid_subsets, sample.seed
        )
    fid = scorer.estimate(generated)
    scores = Scores(
        fid.value,
        inception_score=inception[0],
        inception_score_std=inception[1],
        precision=precision,
        recall=recall,
        fid_stderr=fid.stderr,
        fid_inf=fid.unbiased,
        kid=kid[0],
        kid_std=kid[1],
    )
    return SampleSetScores(scores, fid, count, generated)


def classified(prepare: PrepareOutputs, sources: list[ImageSource], workers: FeatureWorkers) -> np.ndarray:
    """The top-1 class ``[N]`` of each image of a sample set (its shards' ``sources``, in index order), by the data
    set's classifier."""
    if prepare.extractor_uri is None:
        raise RuntimeError("the samples' classes are the prepare stage's classifier's, and it made none")
    return predicted_classes(sources, prepare.extractor_uri, workers)


def conditional_hits(
    prepare: PrepareOutputs, shard_uris: tuple[str, ...], predicted: np.ndarray, storage_options: dict[str, Any]
) -> ClassHits:
    """How often the data set's classifier saw (``predicted``, :func:`classified`) the class each image of a
    conditional sample set was asked for."""
    if prepare.num_classes is None:
        raise RuntimeError("a conditional model is scored by the prepare stage's classifier, and it made none")
    requested = np.concatenate([read_sample_labels(uri, storage_options) for uri in shard_uris])  # [N]
    return ClassHits.of(requested, predicted, prepare.num_classes)


def log_class_accuracy(context: StageContext, hits: ClassHits, names: list[str]) -> None:
    """Per-class conditional accuracy as ``class_accuracy.json`` and as a table (``class_accuracy_table.json``: the
    run's artifact view shows it as one), and the worst class in the job's output."""
    per_class = hits.per_class(names)
    context.client.log_dict(context.mlflow_run_id, per_class, "class_accuracy.json")
    labels = [label for label in range(len(names)) if hits.requested[label] > 0]
    table = {
        "class": [names[label] for label in labels],
        "label": labels,
        "requested": [int(hits.requested[label]) for label in labels],
        "recognised": [int(hits.recognised[label]) for label in labels],
        "accuracy": [per_class[names[label]] for label in labels],
    }
    context.client.log_table(context.mlflow_run_id, table, "class_accuracy_table.json")
    worst = min(per_class, key=per_class.__getitem__)
    context.log(
        f"evaluate: conditional accuracy {hits.accuracy:.4f} over {int(hits.requested.sum())} samples "
        f"(lowest: class {worst!r} {per_class[worst]:.3f})"
    )


def guidance_sweep(
    context: StageContext,
    settings: EvaluateSection,
    upstream: tuple[PrepareOutputs, TrainOutputs, SampleOutputs],
    scorer: Scorer,
) -> tuple[GuidancePoint, ...]:
    """FID and conditional accuracy at each ``evaluate.guidance_scales`` w, on the first ``guidance_samples`` images
    (same seed, sampler and classes as the sample set), logged with the trade-off plot. These FIDs are of smaller sets
    than the sample set's: compare them with each other, not with ``fid``."""
    prepare, train, sample = upstream
    conditioning = sample.conditioning
    if conditioning is None or not settings.guidance_scales:
        return ()
    count = min(settings.guidance_samples, sample.num_samples)
    points = []
    for scale in settings.guidance_scales:
        context.log(f"evaluate: guidance sweep, w = {scale:g} on {count} images")
        request = dataclasses.replace(
            SampleRequest.like(
                sample, sample.snapshot_uri or train.snapshot_uri, f"{context.result_uri}/guidance_w{scale:g}"
            ),
            num_samples=count,
            conditioning=conditioning.with_scale(scale),
        )
        uris, _ = sample_to_shards(request, scorer.execution, context.log)
        options, sources = scorer.execution.storage_options, sample_sources(uris, scorer.execution.storage_options)
        with feature_workers(scorer.network.spec, len(sources), scorer.execution) as workers:
            fid = scorer.estimate(summarize(sources, scorer.request(count), scorer.execution, workers)).value
            predicted = classified(prepare, sources, workers)
        accuracy = conditional_hits(prepare, tuple(uris), predicted, options).accuracy
        points.append(GuidancePoint(scale, count, fid, accuracy))
    log_guidance_sweep(context, points)
    return tuple(points)


def log_guidance_sweep(context: StageContext, points: list[GuidancePoint]) -> None:
    """The sweep as a table (``guidance_sweep_table.json``, one row per w; not as metrics, whose charts would put the
    sweep's position on a step axis), as JSON, and as a plot of FID and accuracy against w beside the trade-off."""
    client, run_id = context.client, context.mlflow_run_id
    table = {name: [getattr(point, name) for point in points] for name in GuidancePoint.__dataclass_fields__}
    client.log_table(run_id, table, "guidance_sweep_table.json")
    client.log_dict(run_id, {"points": [vars(point) for point in points]}, "guidance_sweep.json")
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "guidance_sweep.png")
        with open(path, "wb") as file:
            file.write(sweep_plot(points))
        client.log_artifact(run_id, path)
    said = ", ".join(f"w={p.guidance_scale:g}: FID {p.fid:.3g} acc {p.conditional_accuracy:.2f}" for p in points)
    context.log(f"evaluate: guidance sweep ({points[0].num_samples} images each): {said}")


def feature_network(context: StageContext, settings: EvaluateSection, prepare: PrepareOutputs) -> FeatureNetwork:
    """The configured feature network: prepare's classifier, or Inception with verified weights."""
    if settings.extractor is Extractor.CLASSIFIER:
        if prepare.extractor_uri is None or prepare.extractor_id is None:
            raise RuntimeError("evaluate.extractor=classifier, but the prepare stage made no classifier")
        return FeatureNetwork(ExtractorSpec(Extractor.CLASSIFIER, prepare.extractor_uri), prepare.extractor_id, None)
    from ddpm_core.inception import HOW_TO_PROVIDE
    from ddpm_core.weights import fetch_verified

    uri = settings.inception_weights_uri or ""  # required by the config when extractor=inception
    _, digest = fetch_verified(uri, settings.inception_weights_sha256, HOW_TO_PROVIDE, context.store.options)
    return FeatureNetwork(ExtractorSpec(Extractor.INCEPTION, uri, digest), f"inception-v3-compat-{digest[:16]}", digest)


def comparisons(
    context: StageContext,
    settings: EvaluateSettings,
    upstream: tuple[PrepareOutputs, TrainOutputs, SampleOutputs],
    scorer: Scorer,
    ours: FidEstimate,
    holdout_set: Summary | None,
) -> Comparisons:
    """FIDs of the held-out images (from their summary), of an untrained network and of the champion."""
    prepare, train, sample = upstream
    holdout = scorer.estimate(holdout_set) if holdout_set is not None else None
    untrained = None
    if settings.evaluate.untrained_baseline:
        context.log("evaluate: sampling an untrained network under the same protocol for the baseline FID")
        untrained = scorer.estimate(
            summary_of_snapshot(context, scorer, sample, train.initial_snapshot_uri, "untrained_shards")
        )
    champion = settings.champion if same_data(context, settings.champion, prepare.data_source) else None
    return Comparisons(holdout, untrained, rescore_champion(context, champion, scorer, sample, ours))


def reconstruction_fid(
    scorer: Scorer,
    autoencoder: AutoencoderOutputs | None,
    holdout_set: Summary | None,
    holdout: FidEstimate | None,
) -> Reconstruction | None:
    """A latent model's floor: the autoencoder stage's reconstructions of the held-out images, scored against the
    originals (rFID) and against this protocol's reference beside the originals (None: a pixel model, or fewer than
    2 held-out images). ``holdout``: the originals' FID against the reference, already estimated from their summary
    ``holdout_set``."""
    if autoencoder is None or holdout_set is None or holdout is None:
        return None
    sources = sample_sources(autoencoder.reconstruction_uris, scorer.execution.storage_options)
    reconstructed = scorer.summarize(sources, holdout_set.fid.count)
    rfid = fid_estimate(reconstructed, holdout_set, None)
    # the same hold-out indices in both sets: the paired jackknife counts their correlated errors
    excess = scorer.estimate(reconstructed).minus(holdout)
    return Reconstruction(rfid, excess)


def holdout_summary(scorer: Scorer, prepare: PrepareOutputs, workers: FeatureWorkers) -> Summary | None:
    """The held-out real images' summary (the floor's FID; with their neighbours, the copy threshold's
    calibration), or None with fewer than 2 of them."""
    if prepare.num_holdout < 2:
        return None
    sources = split_sources(prepare.holdout_uri, scorer.execution.storage_options)
    return summarize(sources, scorer.request(prepare.num_holdout, neighbours=True), scorer.execution, workers)


def same_data(context: StageContext, champion: ChampionRef | None, data_source: str) -> bool:
    """Whether the champion was trained on this data set (or records none): only then is it re-scored, as only then
    does the register stage compare the two (a model of other data is registered, never compared)."""
    if champion is None or champion.version is None:
        return False
    found = champion_version(context.client, champion.model_name, champion.version)
    if found is None or found.data_source is None or found.data_source == data_source:
        return True
    context.log(
        f"evaluate: champion v{champion.version} of {champion.model_name} was trained on other data "
        f"({found.data_source}; this run: {data_source}): not re-scored, and register will not compare them"
    )
    return False


def summary_of_snapshot(
    context: StageContext,
    scorer: Scorer,
    sample: SampleOutputs,
    snapshot_uri: str,
    folder: str,
    sampler: SamplerConfig | None = None,
) -> Summary:
    """The feature summary of another snapshot's images, sampled like the sample stage's (same indices, seed,
    precision; the same sampler unless ``sampler``) into this stage's work folder."""
    request = SampleRequest.like(sample, snapshot_uri, f"{context.result_uri}/{folder}")
    request = request if sampler is None else dataclasses.replace(request, sampler=sampler)
    uris, _ = sample_to_shards(request, scorer.execution, context.log)
    return scorer.summarize(sample_sources(uris, scorer.execution.storage_options), sample.num_samples)


def rescore_champion(
    context: StageContext, champion: ChampionRef | None, scorer: Scorer, sample: SampleOutputs, ours: FidEstimate
) -> RescoredChampion | None:
    """The registered champion's FID under exactly this run's protocol, so that the register stage compares like
    with like even when the data (and so the reference statistics) changed; and the difference of the two FIDs with
    the paired jackknife's standard error (both sets share their sample indices, so their errors correlate)."""
    if champion is None or champion.version is None:
        return None
    name, version = champion.model_name, champion.version
    snapshot_uri = champion_snapshot_uri(context.store, context.tracking_uri, name, version)
    classes = read_snapshot_config(snapshot_uri, scorer.execution.storage_options)[0].num_classes
    our_classes = sample.conditioning.null_class if sample.conditioning is not None else None
    if classes != our_classes:
        context.log(
            f"evaluate: champion v{version} of {name} is a model of "
            f"{classes or 'no'} classes and this one of {our_classes or 'no'}: it cannot draw this run's sample set, "
            "so it is not re-scored (nor compared)"
        )
        return None
    context.log(f"evaluate: re-scoring champion v{version} of {name} under this protocol")
    theirs = scorer.estimate(summary_of_snapshot(context, scorer, sample, snapshot_uri, f"champion_v{version}_shards"))
    return RescoredChampion(champion, theirs, ours.minus(theirs))


def nfe_curve(
    context: StageContext,
    settings: EvaluateSettings,
    scorer: Scorer,
    models: tuple[TrainOutputs, SampleOutputs, DistillOutputs | None],
    student_fid: FidEstimate,
) -> tuple[NfePoint, ...]:
    """A distilled student's FID against NFE beside its teacher's (:mod:`pipelines.evaluation.distilled`), logged as
    a table, JSON and a plot; () without the distill stage."""
    _, sample, distill = models
    if distill is None or settings.teacher_sampler is None:
        return ()
    steps = ", ".join(str(done.steps) for done in distill.rounds)
    context.log(
        f"evaluate: the teacher and the earlier students at {steps} NFE; no NLL bound (a distilled student models "
        "its few-step grid, not every timestep of the bound)"
    )

    def score(snapshot_uri: str, sampler: SamplerConfig, folder: str) -> FidEstimate:
        return scorer.estimate(summary_of_snapshot(context, scorer, sample, snapshot_uri, folder, sampler))

    points = nfe_points(distill, settings.teacher_sampler, student_fid, score)
    log_side_by_side(context, sample, distill.steps, settings.teacher_sampler)
    client, run_id = context.client, context.mlflow_run_id
    client.log_table(run_id, nfe_table(points), "fid_vs_nfe_table.json")
    client.log_dict(run_id, {"points": [dataclasses.asdict(p) for p in points]}, "fid_vs_nfe.json")
    client.log_image(run_id, Image.open(io.BytesIO(nfe_plot(points, sample.num_samples))), "fid_vs_nfe.png")
    said = "; ".join(f"{p.model} {p.sampler} {p.nfe} NFE: {p.fid:.3f}" for p in points)
    context.log(f"evaluate: FID against NFE: {said}")
    return points


def log_side_by_side(context: StageContext, sample: SampleOutputs, steps: int, teacher: SamplerConfig) -> None:
    """The first images of the student and of its teacher's sets, the same noise in every row
    (``student_vs_teacher.png``, in the result folder and on the run)."""
    options, count = context.store.options, min(SIDE_BY_SIDE_IMAGES, sample.num_samples)

    def first(uri: str) -> np.ndarray:
        return read_images(sample_sources([uri], options)[0], options)[:count]

    def drawn(folder: str) -> np.ndarray:
        return first(sample_shard_uris(f"{context.result_uri}/{folder}", sample.num_samples, sample.shard_size)[0][0])

    strips = [
        (f"teacher, {teacher.method.value}-{teacher.num_steps}", drawn(TEACHER_OWN)),
        (f"student, {steps} step{'' if steps == 1 else 's'}", first(sample.shard_uris[0])),
        *((f"teacher, {m.value}-{steps}", drawn(teacher_folder(m, steps))) for m in TEACHER_SOLVERS),
    ]
    picture, buffer = side_by_side(strips), io.BytesIO()
    picture.save(buffer, format="PNG")
    write_bytes(*filesystem(f"{context.result_uri}/student_vs_teacher.png", options), buffer.getvalue())
    context.client.log_image(context.mlflow_run_id, picture, "student_vs_teacher.png")


def held_out_nll(
    context: StageContext,
    settings: EvaluateSection,
    prepare: PrepareOutputs,
    train: TrainOutputs,
    sample: SampleOutputs,
) -> tuple[NllResult | None, NllProtocol | None]:
    """The NLL bound of the held-out (or test) images, and how it was estimated."""
    if not settings.nll:
        return None, None
    uri = prepare.holdout_uri if settings.nll_split is NllSplit.HOLDOUT else prepare.test_uri
    if uri is None:
        raise RuntimeError("evaluate.nll_split=test, but the prepare stage wrote no test split")
    options = context.store.options
    images = read_first_images(uri, settings.nll_images, options)  # [N, H, W, C]: only the files needed
    protocol = NllProtocol(
        settings.nll_split.value, len(images), settings.nll_batch_size, settings.nll_timesteps, sample.seed
    )
    context.log(
        f"evaluate: NLL bound of {len(images)} {protocol.split} images "
        f"({'all T terms' if protocol.timesteps is None else f'{protocol.timesteps} random timesteps each'})"
    )
    verify_committed(train.snapshot_uri, options)  # here, not as a failure inside every task
    return held_out_bits_per_dim(train.snapshot_uri, images, protocol, context.execution(train.device)), protocol


def reference_set(prepare: PrepareOutputs, scorer: Scorer) -> ReferenceSet:
    if scorer.published is not None:
        return ReferenceSet("published", reference_sha256=scorer.published.sha256)
    return ReferenceSet(
        "training split",
        reference_data_fingerprint=prepare.fingerprint,
        reference_split=prepare.described(),
        reference_count=scorer.reference.fid.count,
    )


def protocol_hash(protocol: FidProtocol) -> str:
    return hashlib.sha256(json.dumps(protocol.flat(), sort_keys=True).encode()).hexdigest()[:16]


def log_to_mlflow(context: StageContext, extractor: Extractor, outputs: EvaluateOutputs) -> None:
    """The scores as metrics, the protocol as ``protocol.*`` params, its hash and the extractor as tags."""
    client, run_id = context.client, context.mlflow_run_id
    logged_at = int(time.time() * 1000)  # one timestamp: register links these very entries to the logged model
    metrics = [Metric(key, value, logged_at, 0) for key, value in outputs.metrics().items()]
    client.log_batch(run_id, metrics=metrics)
    params = {f"protocol.{key}": value for key, value in outputs.protocol.flat().items() if key != "sampler"}
    params.update({f"protocol.sampler.{key}": value for key, value in outputs.protocol.sampler.to_dict().items()})
    params.update(outputs.score_protocol.params())
    if outputs.nll_protocol is not None:
        params.update({f"protocol.{key}": value for key, value in outputs.nll_protocol.params().items()})
    params["protocol.reference_uri"] = outputs.reference_uri
    for found in (outputs.memorization, outputs.coverage):
        if found is not None:
            params.update(found.params())
    if outputs.scores.fid_interval() is not None:
        params["protocol.fid.interval"] = FID_INTERVAL_METHOD  # how fid_ci_low and fid_ci_high were computed
    client.log_batch(run_id, params=[Param(key, redact(str(value))) for key, value in params.items()])
    client.set_tag(run_id, "fid.protocol_hash", outputs.protocol_hash)
    description = (
        "Inception-v3 pool3 (torch-fidelity port of the TF 2015-12-05 graph)"
        if extractor is Extractor.INCEPTION
        else "CNN classifier trained on the data set's labels"
    )
    client.set_tag(run_id, "fid.extractor", f"{outputs.protocol.extractor_id} ({description})")


def save_sample_grid(context: StageContext, size: int, sample: SampleOutputs) -> str:
    """The first ``evaluate.grid_size`` samples as a PNG grid in the run root and as an MLflow artifact; a conditional
    sample set's has one row per class (at most ten images each)."""
    options = context.store.options
    conditioning = sample.conditioning
    classes = len(set(conditioning.classes)) if conditioning else 0
    columns = min(10, max(1, size // classes)) if classes else 10
    wanted = columns * len(conditioning.classes) if conditioning else size  # image i has class classes[i mod K]
    shards_for_grid = max(1, -(-wanted // sample.shard_size))  # ceil
    uris = sample.shard_uris[:shards_for_grid]
    images = np.concatenate([read_images(source, options) for source in sample_sources(uris, options)])[:wanted]
    if conditioning is not None:  # [n, H, W, C] -> one row of `columns` images per class
        labels = np.concatenate([read_sample_labels(uri, options) for uri in uris])[:wanted]
        images = rows_by_class(images, labels, columns)
    grid_uri = f"{context.result_uri}/samples.png"
    save_grid(images, grid_uri, columns=columns, storage_options=options)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "samples.png")
        grid(images, columns=columns).save(path)
        context.client.log_artifact(context.mlflow_run_id, path)
    return grid_uri
