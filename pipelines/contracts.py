"""What the stages hand each other: one frozen dataclass per stage's outputs, written into the stage's ``stage.json``
manifest and read back typed (:mod:`pipelines.typed`). A stage receives its upstream stages' outputs as arguments
(``train.run(context, prepare: PrepareOutputs, tune: TuneOutputs | None)``); nothing reads them by string key.

Field names are the keys of ``stage.json``: tools and tests read them there too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ddpm_core.autoencoder_weights import LatentSpace
from ddpm_core.diffusion import DiffusionConfig
from ddpm_core.distillation import student_sampler
from ddpm_core.fields import coerce_enum_fields
from ddpm_core.memorization import CopyRate
from ddpm_core.precision import Precision
from ddpm_core.samplers import SamplerConfig
from ddpm_core.training import OptimConfig
from ddpm_core.unet import UNetConfig
from pipelines.execution import Device


@dataclass(frozen=True)
class LatentOutputs:
    """The training split's latents (:mod:`pipelines.data.latents`) and the latent space they are in."""

    uri: str  # the committed folder of latent files
    shape: tuple[int, int, int]  # [c, h, w]
    count: int
    space: LatentSpace  # the autoencoder and the scaling factor: a snapshot of the model records it
    image_shape: tuple[int, int, int]  # [H, W, C] of the images the latents decode to


@dataclass(frozen=True)
class AutoencoderOutputs:
    """A latent model's first stage (pipelines.stages.autoencoder): the training split's latents in the space of the
    autoencoder it trained or loaded, and the hold-out split reconstructed by it (its floor)."""

    latent: LatentOutputs
    trained: bool  # autoencoder.train: the stage trained the folder of latent.space.autoencoder_uri
    images_seen: int | None  # the images it trained on (None: loaded from autoencoder.weights_uri)
    reconstruction_uris: tuple[str, ...]  # the hold-out split reconstructed, one sample shard per hold-out file
    # the hold-out split's latents in the same space (None: no hold-out images): what a latent model's held-out
    # bound is scored on (the post-hoc EMA choice, the tune stage's trials); required, so that a result committed
    # before it existed is not read (the stage runs again)
    holdout_latent: LatentOutputs | None
    rfid: float | None = None  # the reconstructions against the originals, in the domain classifier's features
    rfid_stderr: float | None = None  # its jackknife standard error


@dataclass(frozen=True)
class PrepareOutputs:
    fingerprint: str  # SHA-256 of the data set's pixels and labels
    num_train: int
    num_holdout: int
    shards_uri: str  # the training split (pipelines.data.shards)
    holdout_uri: str  # the hold-out split (pipelines.data.shards)
    num_classes: int | None
    test_uri: str | None = None  # the data set's test split, when the NLL is scored on it
    extractor_uri: str | None = None  # the classifier feature network, when evaluation or the tune stage uses it
    extractor_id: str | None = None
    extractor_holdout_accuracy: float | None = None
    class_names: tuple[str, ...] | None = None  # by label (an .npz's labels name themselves: "0", "1", ...)
    class_counts: tuple[int, ...] | None = None  # training images per class
    source_uri: str = ""  # data.uri, as read
    source_listing: str = ""  # ddpm_core.data.source_identity of data.uri when read: its files' names, sizes, versions
    source_split: str = "train"  # the split of a source that has several (CIFAR-10)
    holdout_fraction: float = 0.0  # data.holdout_fraction, as applied

    def described(self) -> str:
        """Which images these are, in words (e.g. ``train minus 0.1 hold-out``)."""
        return f"{self.source_split} minus {self.holdout_fraction:g} hold-out"

    @property
    def data_source(self) -> str:
        """Which data set this is, whatever its current files: ``<data.uri>#<split>`` (models of the same data set are
        compared for promotion; a data set that grew is still the same one)."""
        return f"{self.source_uri}#{self.source_split}"


@dataclass(frozen=True)
class TrialResult:
    trial_id: str
    params: dict[str, Any]  # the searched config keys and this trial's values
    images_seen: int
    bpd: float | None
    fid: float | None


@dataclass(frozen=True)
class TuneOutputs:
    best_params: dict[str, Any]  # dotted config key -> value, applied to the train stage's config
    best_metric: dict[str, float]  # {tune.metric: value}
    best_trial_id: str
    best_checkpoint_uri: str | None  # the best trial's last training state (tune.warm_start)
    trials: int
    stopped_early: int
    trial_results: tuple[TrialResult, ...]


@dataclass(frozen=True)
class TrainedWith:
    """The settings a model was trained with, after the tune stage's choices."""

    diffusion: DiffusionConfig
    train: OptimConfig
    unet: UNetConfig  # the network, with the data's classes
    preset: str  # the model.preset it was built from


def where_guided(interval: tuple[float, float] | None) -> str:
    """A guidance interval in words, after its weight: ``", at noise levels sigma in (0, 1]"``; "" for every step."""
    return "" if interval is None else f", at noise levels sigma in ({interval[0]:g}, {interval[1]:g}]"


@dataclass(frozen=True)
class Conditioning:
    """How a class-conditional model is sampled: image i gets class ``classes[i mod len(classes)]``, guided with
    ``w = guidance_scale`` (Ho & Salimans 2022, Eq. 6; 0: the conditional model unguided)."""

    classes: tuple[int, ...]  # labels, in the order images cycle through them
    guidance_scale: float
    null_class: int  # the label the model was trained to read as "no class" (its number of classes)
    # the noise levels sigma in (low, high] where it guides (sample.guidance_interval); None: every step
    interval: tuple[float, float] | None = None

    def with_scale(self, guidance_scale: float) -> Conditioning:
        return dataclasses.replace(self, guidance_scale=guidance_scale)

    def described(self) -> str:
        return f"guidance scale w = {self.guidance_scale:g}{where_guided(self.interval)} (0: unguided)"

    def protocol(self) -> dict[str, Any]:
        """Its ``protocol.<key>`` params: FIDs under different guidance never compare (the interval only where set,
        so that a protocol without one hashes as before it existed)."""
        limited = {} if self.interval is None else {"guidance_interval": list(self.interval)}
        return {"guidance_scale": self.guidance_scale, "classes": list(self.classes), **limited}


@dataclass(frozen=True)
class Autoguidance:
    """How a sample set's model is guided by a weaker version of itself (Karras et al. 2024, "Guiding a Diffusion
    Model with a Bad Version of Itself", Eq. 1): ``pred = guide + weight * (model - guide)``, the guide being the
    model's own EMA width reconstructed at an earlier point of the same run. The guide is part of the sampled
    generator (its weights are stored in the sampled snapshot, :class:`ddpm_core.checkpoint.Guide`), like the EMA
    width, not of the FID protocol."""

    weight: float
    guide_at: float  # the guide's point as a fraction of the run's training images (sample.autoguidance_guide_at)
    guide_images: int  # ... in images seen
    guide_sigma_rel: float  # the guide's EMA width: the sampled one
    # the noise levels sigma in (low, high] where it guides (sample.autoguidance_interval); None: every step
    interval: tuple[float, float] | None = None

    def described(self) -> str:
        return (
            f"autoguided (w = {self.weight:g}{where_guided(self.interval)}) by its EMA sigma_rel "
            f"{self.guide_sigma_rel:g} at {self.guide_images:,} images ({self.guide_at:.0%} of the run)"
        )


@dataclass(frozen=True)
class EmaCandidate:
    """One EMA width of a post-hoc sweep and its held-out score (:mod:`pipelines.training.ema_choice`)."""

    sigma_rel: float
    score: float  # train.ema_choice's score of the hold-out examples (mean over them), in unit; lower is better
    stderr: float  # of that mean (Monte Carlo over timesteps); the candidates share timesteps and noise
    images: int  # hold-out examples scored (images, or a latent model's latents)
    minus_chosen: float = 0.0  # score minus the chosen width's, paired per example
    minus_chosen_stderr: float = 0.0  # its standard error over the examples
    # "bits/dim" (the NLL bound); a latent model's "latent bits/dim" (a density's, not comparable with pixel
    # bits/dim); or the training objective's, e.g. "min_snr-weighted loss"
    unit: str = "bits/dim"
    chosen: bool = False  # the sampled width (train.ema_choice_tolerance: not always the lowest score)


def lowest_scoring(candidates: Sequence[EmaCandidate]) -> EmaCandidate:
    """The candidate of the lowest held-out score (the chosen one unless ``train.ema_choice_tolerance`` took a longer
    width)."""
    return min(candidates, key=lambda candidate: candidate.score)


@dataclass(frozen=True)
class TrainOutputs:
    snapshot_uri: str  # EMA weights + configs (ddpm_core.checkpoint snapshot)
    initial_snapshot_uri: str  # the untrained network at the training seed (evaluate's baseline)
    images_seen: int
    device: Device  # where training ran; sampling and scoring run on the same kind
    loop_seconds: float | None  # the final attempt's training loop, checkpoints included
    checkpoint_path: str | None  # the last Ray Train checkpoint
    config: TrainedWith
    num_classes: int | None = None  # a class-conditional model's classes (label num_classes is the null class)
    # the committed post-hoc EMA snapshots (pipelines.training.posthoc), one folder per time; None: train.ema_profiles
    # was empty
    posthoc_uri: str | None = None
    # the EMA whose weights snapshot_uri holds: a power-function EMA's relative width (train.ema_sigma_rel, tracked or
    # chosen by the sweep); None: train.ema_decay's
    ema_sigma_rel: float | None = None
    ema_sweep: tuple[EmaCandidate, ...] = ()  # the post-hoc candidates and their scores, when several were named

    def __post_init__(self) -> None:
        coerce_enum_fields(self, "train", {"device": Device})

    def ema_described(self) -> str:
        """The sampled EMA, in words."""
        if self.ema_sigma_rel is None:
            return f"EMA of decay {self.config.train.ema_decay:g}"
        return f"power-function EMA, sigma_rel {self.ema_sigma_rel:g} ({self.ema_choice_described()})"

    def ema_choice_described(self) -> str:
        """How the sampled power-function EMA was found, in words."""
        if not self.ema_sweep:
            return "tracked in training"
        count, unit = len(self.ema_sweep), self.ema_sweep[0].unit
        lowest = lowest_scoring(self.ema_sweep).sigma_rel
        if lowest == self.ema_sigma_rel:
            return f"chosen of {count} on held-out {unit}"
        return (
            f"the longest of {count} within train.ema_choice_tolerance paired standard errors of the lowest held-out "
            f"{unit}, {lowest:g}'s"
        )


@dataclass(frozen=True)
class DistillRound:
    """One round of distillation: a student sampled in ``steps`` DDIM steps, trained from its teacher."""

    steps: int
    teacher_snapshot_uri: str
    snapshot_uri: str  # the student's weights (its snapshot's metadata names method, steps and teacher)
    images_seen: int
    loop_seconds: float | None  # the round's final attempt, checkpoints included
    mlflow_run_id: str  # the round's run (its loss and learning-rate curves), nested in the distill stage's


@dataclass(frozen=True)
class DistillOutputs:
    """The distill stage's student: what the sample stage draws from with :attr:`sampler`, scored and registered in
    place of its teacher (``train.snapshot_uri``)."""

    snapshot_uri: str  # the last round's student
    steps: int  # its sampling steps: its NFE
    method: str
    teacher_snapshot_uri: str  # the trained model the first round started from
    rounds: tuple[DistillRound, ...]
    images_seen: int  # training images of all rounds together (the teacher's cost is train's images_seen)
    loop_seconds: float | None  # of all rounds together (None: a round's is unknown)
    config: TrainedWith  # the student's network and diffusion (its prediction), and the rounds' optimiser

    @property
    def sampler(self) -> SamplerConfig:
        """The student's sampler: deterministic DDIM at its steps, on the trailing grid it was distilled on."""
        return student_sampler(self.steps)


@dataclass(frozen=True)
class NetworkExecution:
    """How sampling actors run the network (not what they compute)."""

    precision: Precision
    compile: bool  # torch.compile with frozen weights

    def __post_init__(self) -> None:
        coerce_enum_fields(self, "execution", {"precision": Precision})


@dataclass(frozen=True)
class SampleOutputs:
    shard_uris: tuple[str, ...]  # committed shards: images.npy uint8 [n, H, W, C], start/stop/seed in the manifest
    num_samples: int
    shard_size: int
    num_workers: int
    sampler: SamplerConfig
    seed: int  # image i comes from noise seeded by (seed, i)
    execution: NetworkExecution
    sampling_seconds: float  # inside the sampler, summed over shards, divided by the number of actors
    conditioning: Conditioning | None = None  # class-conditional: each shard also holds labels.npy
    # the weights the set was drawn from: train's, the distill stage's student, or train's with an autoguidance guide
    snapshot_uri: str = ""
    autoguidance: Autoguidance | None = None  # the guide stored in snapshot_uri (sample.autoguidance_weight)


@dataclass(frozen=True)
class ReferenceSet:
    """The real images FIDs are measured against (part of the protocol)."""

    reference: str  # "training split" or "published"
    reference_sha256: str | None = None  # published statistics: SHA-256 of the file
    reference_data_fingerprint: str | None = None  # training split: the data set's fingerprint ...
    reference_split: str | None = None  # ... the split ...
    reference_count: int | None = None  # ... and its number of images


@dataclass(frozen=True)
class FidProtocol:
    """Everything that must match for two FIDs to be comparable."""

    num_samples: int
    sampler: SamplerConfig
    seed: int
    precision: Precision
    extractor_id: str
    extractor_weights_sha256: str | None
    reference: ReferenceSet
    conditioning: Conditioning | None = None  # classes and guidance scale: FIDs under different w never compare

    def __post_init__(self) -> None:
        coerce_enum_fields(self, "protocol", {"precision": Precision})

    def flat(self) -> dict[str, Any]:
        """The protocol as logged (``protocol.<key>`` params) and hashed into ``fid.protocol_hash``."""
        reference = {name: value for name, value in vars(self.reference).items() if value is not None}
        conditioning = {} if self.conditioning is None else self.conditioning.protocol()
        return {
            "num_samples": self.num_samples,
            "sampler": self.sampler.to_dict(),
            "seed": self.seed,
            "precision": self.precision.value,
            "extractor_id": self.extractor_id,
            "extractor_weights_sha256": self.extractor_weights_sha256,
            **reference,
            **conditioning,
        }


@dataclass(frozen=True)
class NllProtocol:
    """How the NLL bound was estimated."""

    split: str
    num_images: int
    batch_size: int
    timesteps: int | None  # None: all T terms of the bound
    seed: int

    def params(self) -> dict[str, Any]:
        """The ``protocol.nll.<key>`` params."""
        return {
            "nll.split": self.split,
            "nll.num_images": self.num_images,
            "nll.batch_size": self.batch_size,
            "nll.timesteps": "all" if self.timesteps is None else self.timesteps,
            "nll.seed": self.seed,
        }


@dataclass(frozen=True)
class ScoreProtocol:
    """How the scores beside FID were computed (``protocol.*`` params; the summaries say it beside each number)."""

    fid_groups: int  # jackknife groups of the FID's standard error
    holdout_images: int  # held-out real images the floor is extrapolated from
    compared_images: int  # real and generated images each that precision/recall and KID compared
    nfe: int  # network evaluations per sample of the sampler
    inception_score_splits: int | None = None  # None: the Inception Score is off
    precision_recall_k: int | None = None  # None: precision/recall is off
    kid_subset_size: int | None = None  # None: KID is off
    kid_subsets: int | None = None
    autoguidance: Autoguidance | None = None  # the sampled model's guide (part of the model: logged, not hashed)

    def params(self) -> dict[str, Any]:
        """The ``protocol.*`` params of the evaluate run."""
        guide = self.autoguidance
        found = {
            "protocol.fid.jackknife_groups": self.fid_groups,
            "protocol.sampler.network_evaluations": self.nfe,  # follows from method and steps: logged, not hashed
            "protocol.inception_score.splits": self.inception_score_splits,
            "protocol.kid.subset_size": self.kid_subset_size,
            "protocol.kid.subsets": self.kid_subsets,
            "protocol.precision_recall.k": self.precision_recall_k,
            "protocol.precision_recall.samples": self.compared_images if self.precision_recall_k else None,
            "protocol.autoguidance.weight": guide.weight if guide else None,
            "protocol.autoguidance.guide_images": guide.guide_images if guide else None,
            "protocol.autoguidance.guide_sigma_rel": guide.guide_sigma_rel if guide else None,
            "protocol.autoguidance.interval": list(guide.interval) if guide and guide.interval else None,
        }
        return {key: value for key, value in found.items() if value is not None}


FID_Z95 = 1.96  # the normal quantile of a two-sided 95% interval
FID_INTERVAL_METHOD = "normal 95%: fid ± 1.96 * the delete-a-group jackknife stderr"


@dataclass(frozen=True)
class Scores:
    """The evaluate stage's numbers (docs/evaluation.md); each ``None`` when switched off or not applicable."""

    fid: float
    fid_untrained: float | None = None  # an untrained network under the same protocol: the ceiling
    fid_holdout_vs_train: float | None = None  # held-out real images: the floor
    fid_champion: float | None = None  # the registered champion, re-scored under this protocol
    inception_score: float | None = None
    inception_score_std: float | None = None
    precision: float | None = None
    recall: float | None = None
    nll_bpd: float | None = None
    nll_bpd_stderr: float | None = None
    conditional_accuracy: float | None = None  # share of samples the classifier assigns their requested class
    # uncertainty and comparability (docs/evaluation.md, "Scores at the margin"); FIDs of different N compare only
    # through the *_inf estimates or the floor at equal N
    fid_stderr: float | None = None  # delete-a-group jackknife standard error of fid
    fid_inf: float | None = None  # jackknife bias-corrected fid: an estimate of FID as N -> infinity
    fid_holdout_stderr: float | None = None
    fid_holdout_inf: float | None = None
    # the FID of real images at the sample set's N: the hold-out's, scaled by (1/N + 1/m) / (1/n + 1/m) (n hold-out
    # images, m reference images; ddpm_core.metrics.FidEstimate.real_floor_at), and its standard error
    fid_floor: float | None = None
    fid_floor_stderr: float | None = None
    fid_over_floor: float | None = None  # fid / fid_floor: how far the model is from real data at equal N
    kid: float | None = None  # kernel inception distance on the same features (unbiased at any N)
    kid_std: float | None = None  # its standard deviation over subsets
    fid_champion_stderr: float | None = None
    fid_minus_champion: float | None = None  # fid - fid_champion on the same sample indices
    fid_minus_champion_stderr: float | None = None  # its paired jackknife standard error
    # a latent model's floor (docs/latent.md): rFID, the held-out images reconstructed by its autoencoder against
    # the originals (Rombach et al. 2022, Table 8); and, against the reference, the reconstructions' FID minus the
    # originals' on the same indices: what the autoencoder adds to any of its samples' FID at the hold-out's N
    rfid: float | None = None
    rfid_stderr: float | None = None
    fid_reconstructed_minus_holdout: float | None = None
    fid_reconstructed_minus_holdout_stderr: float | None = None  # its paired jackknife standard error

    def present(self) -> dict[str, float]:
        """The scores that were computed, by name (MLflow metric keys)."""
        return {name: value for name, value in vars(self).items() if value is not None}

    def fid_interval(self) -> tuple[float, float] | None:
        """The FID's 95% interval: ``fid`` ± 1.96 jackknife standard errors (normal approximation; None without a
        standard error)."""
        if self.fid_stderr is None:
            return None
        return self.fid - FID_Z95 * self.fid_stderr, self.fid + FID_Z95 * self.fid_stderr

    def metrics(self) -> dict[str, float]:
        """What the evaluate run logs: the computed scores and the FID interval's bounds (``fid_ci_low``,
        ``fid_ci_high``)."""
        interval = self.fid_interval()
        bounds = {"fid_ci_low": interval[0], "fid_ci_high": interval[1]} if interval is not None else {}
        return {**self.present(), **bounds}


@dataclass(frozen=True)
class GuidancePoint:
    """One guidance scale of the sweep (``evaluate.guidance_scales``), on ``num_samples`` images."""

    guidance_scale: float
    num_samples: int
    fid: float
    conditional_accuracy: float


@dataclass(frozen=True)
class ChampionRef:
    """A registered model's champion as a run compares against it: resolved before the run starts and hashed into
    the fingerprints of the stages that read it, so that a champion that changes re-runs them."""

    model_name: str
    version: str | None  # None: the model has no champion (other than a version this run registered)


COPY_CRITERION = "d1 / d2 < threshold: nearest over second-nearest training image (Carlini et al. 2023)"
COPY_INTERVAL_METHOD = "Wilson score 95%"
COVERAGE_INTERVAL_METHOD = "percentile bootstrap 95% over resampled samples"


@dataclass(frozen=True)
class ClosestPair:
    """A sample and its nearest training image, among the samples most like copies (smallest ratio)."""

    sample_index: int  # in the sample set
    training_index: int  # in the training split
    ratio: float  # d1 / d2 in the extractor's feature space


@dataclass(frozen=True)
class MemorizationScore:
    """The copy rate of the sample set (Carlini et al. 2023; Somepalli et al. 2023; docs/evaluation.md): the share of
    samples whose nearest training image is much nearer than the second nearest (``d1 / d2`` below a threshold
    calibrated on held-out real images at ``false_positive_rate``), in the extractor's feature space and in pixels,
    each with its Wilson interval; and the held-out images' own rate under a threshold calibrated without them."""

    feature_space: str  # the extractor id (the pixel space is the other)
    false_positive_rate: float  # evaluate.copy_false_positive_rate
    heldout_images: int  # the calibration set
    training_images: int  # searched for each sample's two nearest
    threshold: float  # of d1 / d2, in the feature space
    threshold_pixels: float
    copy_rate: CopyRate  # samples, feature space
    copy_rate_pixels: CopyRate
    heldout_rate: CopyRate  # the false-positive check: each half of the held-out images under the other's threshold
    heldout_rate_pixels: CopyRate
    closest_pairs: tuple[ClosestPair, ...]  # smallest ratio first (feature space)
    closest_pairs_uri: str = ""  # the side-by-side PNG in the stage's result folder

    def metrics(self) -> dict[str, float]:
        """``copy_rate``, ``copy_rate_ci_low``, ``copy_rate_ci_high`` and the same for ``copy_rate_pixels``,
        ``copy_rate_heldout`` and ``copy_rate_heldout_pixels``; the two thresholds."""
        found = {"copy_threshold": self.threshold, "copy_threshold_pixels": self.threshold_pixels}
        for key, rate in (
            ("copy_rate", self.copy_rate),
            ("copy_rate_pixels", self.copy_rate_pixels),
            ("copy_rate_heldout", self.heldout_rate),
            ("copy_rate_heldout_pixels", self.heldout_rate_pixels),
        ):
            found.update({key: rate.rate, f"{key}_ci_low": rate.low, f"{key}_ci_high": rate.high})
        return found

    def params(self) -> dict[str, Any]:
        """The ``protocol.memorization.*`` params."""
        return {
            "protocol.memorization.criterion": COPY_CRITERION,
            "protocol.memorization.feature_space": f"{self.feature_space} and pixels",
            "protocol.memorization.false_positive_rate": self.false_positive_rate,
            "protocol.memorization.heldout_images": self.heldout_images,
            "protocol.memorization.training_images": self.training_images,
            "protocol.memorization.interval": COPY_INTERVAL_METHOD,
        }


@dataclass(frozen=True)
class ClassCoverage:
    """Mode coverage of an unconditional sample set: the data set's classifier's histogram of the samples against the
    training split's label histogram, as total variation distance with a bootstrap interval, and per-class recall."""

    tvd: float  # 0.5 * sum_k |q_k - p_k|
    tvd_low: float
    tvd_high: float
    tvd_floor: float  # the mean TVD of as many images drawn from the training histogram itself (sampling noise)
    resamples: int
    seed: int
    num_samples: int
    class_names: tuple[str, ...]
    training_share: tuple[float, ...]  # p_k, by label
    sample_share: tuple[float, ...]  # q_k, by label
    recall: tuple[float, ...]  # min(1, q_k / p_k): how much of each class's expected share is present

    def metrics(self) -> dict[str, float]:
        return {
            "coverage_tvd": self.tvd,
            "coverage_tvd_ci_low": self.tvd_low,
            "coverage_tvd_ci_high": self.tvd_high,
            "coverage_tvd_floor": self.tvd_floor,
            "coverage_min_recall": min(self.recall),
        }

    def params(self) -> dict[str, Any]:
        return {
            "protocol.coverage.classifier": "the data set's classifier (prepare stage), top-1",
            "protocol.coverage.interval": COVERAGE_INTERVAL_METHOD,
            "protocol.coverage.resamples": self.resamples,
            "protocol.coverage.seed": self.seed,
        }


@dataclass(frozen=True)
class NfePoint:
    """One model and sampler on the FID-against-NFE curve of a distilled student and its teacher
    (:mod:`pipelines.evaluation.distilled`), under the sample set's protocol."""

    model: str  # "student" or "teacher"
    sampler: str  # method (spacing)
    steps: int
    nfe: int
    fid: float
    fid_stderr: float | None
    snapshot_uri: str


@dataclass(frozen=True)
class EvaluateOutputs:
    scores: Scores
    protocol: FidProtocol
    protocol_hash: str  # 16 hex digits of the SHA-256 of protocol.flat()
    nll_protocol: NllProtocol | None
    grid_uri: str
    reference_uri: str  # the cached reference statistics (pipelines.reference)
    rescored_champion: ChampionRef | None  # the champion re-scored in scores.fid_champion
    score_protocol: ScoreProtocol
    guidance_sweep: tuple[GuidancePoint, ...] = ()
    scores_run_id: str = ""  # the evaluate run that holds these scores as metrics (their one home in MLflow)
    memorization: MemorizationScore | None = None  # None: off or not computable (memorization_skipped says why)
    memorization_skipped: str | None = None
    coverage: ClassCoverage | None = None  # None: off or not computable (coverage_skipped says why)
    coverage_skipped: str | None = None
    nfe_curve: tuple[NfePoint, ...] = ()  # a distilled student's FID against NFE beside its teacher's

    def metrics(self) -> dict[str, float]:
        """Every number the evaluate run logs as a metric: the scores, the copy rates and the coverage."""
        found = self.scores.metrics()
        if self.memorization is not None:
            found.update(self.memorization.metrics())
        if self.coverage is not None:
            found.update(self.coverage.metrics())
        return found


@dataclass(frozen=True)
class RegisterOutputs:
    model_name: str
    version: str
    promoted: bool
    reason: str
    previous_champion: str | None
    challenger_fid: float
    champion_fid: float | None
    model_uri: str


StageOutputs = (
    PrepareOutputs
    | AutoencoderOutputs
    | TuneOutputs
    | TrainOutputs
    | DistillOutputs
    | SampleOutputs
    | EvaluateOutputs
    | RegisterOutputs
)
T = TypeVar("T")


@dataclass(frozen=True)
class StageManifest(Generic[T]):
    """``{run root}/{stage}/{fingerprint[:16]}/stage.json``, written last: a result exists exactly when it does."""

    stage: str
    status: str  # "complete"
    fingerprint: str  # of the stage's inputs: the hash of its settings and of its upstream stages' fingerprints
    settings: dict[str, Any]  # the inputs it was computed from, as hashed (status says which keys differ)
    upstream: dict[str, str]  # the fingerprints of the upstream results it read, by stage
    started_at: float
    finished_at: float
    mlflow_run_id: str
    outputs: T
