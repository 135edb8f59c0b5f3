"""The pipeline's config: a YAML file plus ``section.key=value`` overrides, read into one frozen
:class:`PipelineConfig`.

Sections are frozen dataclasses that check their own fields in ``__post_init__``. Where ``ddpm_core`` has a type
for a section it is used: ``diffusion`` is a ``DiffusionConfig``; ``train`` embeds ``OptimConfig`` and ``sample``
embeds ``SamplerConfig`` inline, so their fields keep their keys (``train.lr``, ``sample.method``) and their checks
stay in the library. Checks that relate sections live in :meth:`PipelineConfig.__post_init__`. Unknown keys and bad
values fail before Ray starts, naming the key, the value and what is allowed (:mod:`pipelines.typed`).

The resolved config is saved in the run root and logged to MLflow; credentials never live here (they come from the
environment). Measured costs of the settings are in docs/benchmarks.md, not here.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ddpm_core.autoencoder import AutoencoderConfig
from ddpm_core.data import ReadOptions
from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion, Prediction
from ddpm_core.discriminator import DiscriminatorConfig
from ddpm_core.fields import FieldError, allowed_values
from ddpm_core.loss_weighting import LossWeighting, Weighting
from ddpm_core.phema import MAX_SIGMA_REL
from ddpm_core.precision import Precision
from ddpm_core.samplers import ODE_SOLVERS, Method, SamplerConfig, spaced_timesteps
from ddpm_core.storage import s3_options
from ddpm_core.training import OptimConfig
from ddpm_core.unet import PRESETS, UNetConfig
from ddpm_core.weights import check_sha256_spec
from pipelines.typed import EXECUTION, INLINE, RESOLVED, WORKER_PATH, SchemaError, from_plain, to_plain

E = TypeVar("E", bound=enum.Enum)


class ConfigError(SchemaError):
    """A config problem, with the dotted key and the expectation in the message."""

    noun = "config key"


def choose(key: str, kind: type[E], value: E | str) -> E:
    """``value`` as a member of the closed set ``kind``; anything else is a :class:`ConfigError` listing the choices."""
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{key} {value!r} is not one of: {allowed_values(kind)}") from None


def coerce_choices(instance: object, section: str, kinds: dict[str, type[enum.Enum]]) -> None:
    """:func:`choose` for enum fields of a frozen section, in its ``__post_init__``."""
    for name, kind in kinds.items():
        object.__setattr__(instance, name, choose(f"{section}.{name}", kind, getattr(instance, name)))


def require_positive(section: str, values: dict[str, float]) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ConfigError(f"{section}.{name} must be > 0, got {value}")


def require_non_negative(section: str, values: dict[str, float]) -> None:
    for name, value in values.items():
        if value < 0:
            raise ConfigError(f"{section}.{name} must be >= 0, got {value}")


class Extractor(str, enum.Enum):
    """The feature network of FID, IS and precision/recall (docs/evaluation.md)."""

    CLASSIFIER = "classifier"  # a CNN trained on the data set's labels: small data sets
    INCEPTION = "inception"  # Inception-v3 pool3: the standard FID


class UnreadableImages(str, enum.Enum):
    """What prepare does with an image file that cannot be decoded."""

    FAIL = "fail"  # stop before anything runs, naming the file
    SKIP = "skip"  # leave it out, count it (metric skipped_images) and list it (artifact skipped_images.txt)


class Loader(str, enum.Enum):
    """How training workers get their images (docs/pipeline.md, "Data loading")."""

    RESIDENT = "resident"  # each worker holds its slice of the split on its device and draws batches there
    STREAM = "stream"  # Ray Data reads, decodes and flips shards in CPU tasks; workers consume a seeded epoch order
    AUTO = "auto"  # resident when a worker's resident slice fits data.memory_budget_mb, else stream


class Placement(str, enum.Enum):
    """How Ray places the training workers over the nodes (Ray's placement-group strategies)."""

    PACK = "PACK"  # as few nodes as possible (Ray's default)
    SPREAD = "SPREAD"  # over as many nodes as can hold one, where there is room
    STRICT_SPREAD = "STRICT_SPREAD"  # each worker on a node of its own, or the group does not start
    STRICT_PACK = "STRICT_PACK"  # all on one node, or the group does not start


class PrepareOn(str, enum.Enum):
    """Where prepare reads the data set and writes its splits (docs/pipeline.md, "Preparing data at scale")."""

    DRIVER = "driver"  # the whole data set in the job's driver process, before Ray starts
    RAY_DATA = "ray_data"  # Ray Data tasks, a few files each: folders of images, tar shards, Parquet files
    AUTO = "auto"  # ray_data when the source's files exceed data.memory_budget_mb and its format is read in parts


class DataSplit(str, enum.Enum):
    """Which split of a data set with its own splits (CIFAR-10 archives) is the training data."""

    TRAIN = "train"
    TEST = "test"


class NllSplit(str, enum.Enum):
    """Which real images the NLL bound is scored on."""

    HOLDOUT = "holdout"  # data.holdout_fraction of data.uri
    TEST = "test"  # the data set's own test split (CIFAR-10)


class EmaChoice(str, enum.Enum):
    """What the post-hoc EMA candidates are scored on, on the hold-out split (pipelines.training.ema_choice)."""

    BITS_PER_DIM = "bits_per_dim"  # the NLL bound (Ho et al. 2020, Eq. 5): dominated by the least noisy steps
    LOSS = "loss"  # the training objective (Eq. 14 weighted by train.loss_weighting): a validation loss


class SearchAlgorithm(str, enum.Enum):
    RANDOM = "random"
    GRID = "grid"
    OPTUNA = "optuna"
    HYPEROPT = "hyperopt"


class TrialMetric(str, enum.Enum):
    """What ranks tuning trials."""

    BPD = "bpd"  # the NLL bound in bits/dim on held-out images
    FID = "fid"  # a proxy FID at the trial's end


class TrialScheduler(str, enum.Enum):
    ASHA = "asha"
    NONE = "none"


@dataclass(frozen=True)
class DataSection:
    uri: str = field(default="builtin:digits", metadata=WORKER_PATH)  # file://, s3://, builtin:digits, ...
    split: DataSplit = DataSplit.TRAIN  # CIFAR-10 split
    holdout_fraction: float = 0.1  # share of images kept out of training (FID floor, held-out NLL)
    image_size: int | None = None  # center-crop and resize every image to this square size (None: images as read)
    unreadable_images: UnreadableImages = UnreadableImages.FAIL
    image_column: str = "image"  # Parquet data: the column of encoded images
    label_column: str = "label"  # Parquet data: the column of integer labels (absent from the files: no labels)
    loader: Loader = Loader.AUTO
    prepare_on: PrepareOn = PrepareOn.AUTO
    memory_budget_mb: float = 4096.0  # auto: the most a worker may hold to keep its slice resident (resident_bytes)
    shard_mb: float = 64.0  # prepare writes shards of at most this size (and at most 10,000 images)
    decode_cpus: float = field(
        default=1.0, metadata=EXECUTION
    )  # stream: Ray CPUs of each Ray Data decode task (beside the training workers' CPUs)
    prefetch_batches: int = field(
        default=4, metadata=EXECUTION
    )  # stream: batches each worker's iterator keeps ready ahead of the step

    def read_options(self) -> ReadOptions:
        skip = self.unreadable_images is UnreadableImages.SKIP
        return ReadOptions(self.image_size, skip, self.image_column, self.label_column)

    def __post_init__(self) -> None:
        coerce_choices(
            self,
            "data",
            {"split": DataSplit, "unreadable_images": UnreadableImages, "loader": Loader, "prepare_on": PrepareOn},
        )
        require_positive(
            "data",
            {"memory_budget_mb": self.memory_budget_mb, "shard_mb": self.shard_mb, "decode_cpus": self.decode_cpus},
        )
        require_non_negative("data", {"prefetch_batches": self.prefetch_batches})
        if not 0.0 <= self.holdout_fraction < 0.5:
            raise ConfigError(f"data.holdout_fraction must lie in [0, 0.5), got {self.holdout_fraction}")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"data.image_size must be null (images as read) or >= 1 pixels, got {self.image_size}")


@dataclass(frozen=True)
class ModelSection:
    preset: str = "digits"  # a ddpm_core.unet preset
    overrides: dict[str, Any] = field(default_factory=dict)  # UNetConfig fields replacing the preset's
    conditional: bool = False  # class-conditional with a null class (classifier-free guidance; docs/conditional.md)
    num_classes: int | None = None  # conditional: the number of classes (None: the data set's)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset {self.preset!r} is not one of {', '.join(sorted(PRESETS))}")
        if "num_classes" in self.overrides:
            raise ConfigError(
                "model.overrides.num_classes: set model.conditional=true instead (the number of classes comes from "
                "the data, or from model.num_classes)"
            )
        if self.num_classes is not None and (not self.conditional or self.num_classes < 1):
            raise ConfigError(
                f"model.num_classes {self.num_classes} needs model.conditional=true and must be >= 1 "
                "(null: the data set's number of classes)"
            )
        self.unet(self.num_classes or 1)  # the overrides fit the U-Net

    def unconditional_unet(self) -> UNetConfig:
        """The preset with the overrides applied, checked as ``model.overrides.<field>``, before any classes."""
        return from_plain(UNetConfig, self.overrides, "model.overrides", PRESETS[self.preset], ConfigError)

    def unet(self, data_classes: int | None = None) -> UNetConfig:
        """The preset with the overrides applied, checked as ``model.overrides.<field>``; a conditional model gets
        ``model.num_classes`` classes, else the data set's ``data_classes``."""
        unet = self.unconditional_unet()
        if not self.conditional:
            return unet
        classes = self.num_classes or data_classes
        if classes is None:
            raise ConfigError("model.conditional needs the number of classes: labelled data or model.num_classes")
        return dataclasses.replace(unet, num_classes=classes)


@dataclass(frozen=True)
class AutoencoderSection:
    """Latent diffusion (Rombach et al. 2022; docs/latent.md): the diffusion model works on the latents of an
    autoencoder and its samples are decoded into images. The autoencoder is a diffusers ``AutoencoderKL`` folder at
    ``weights_uri``, or with ``train`` one the ``autoencoder`` stage trains on the training split (App. G's
    KL-regularised first stage, :mod:`ddpm_core.autoencoder`)."""

    weights_uri: str | None = field(default=None, metadata=WORKER_PATH)  # the folder (config.json + safetensors)
    weights_sha256: str | None = None  # the safetensors file's SHA-256, or a prefix of at least 8 hex digits
    train: bool = False  # train the autoencoder in the pipeline (the autoencoder stage) instead of weights_uri
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # train: widths, one level each; f = 2^(levels - 1)
    layers_per_block: int = 1  # train: ResNet blocks per encoder level
    latent_channels: int = 4  # train: c, the latents' channels
    images: int = 40_000  # train: training images, all workers together
    batch_size: int = 32  # train: the global batch, split over the workers
    learning_rate: float = 1e-3  # train: AdamW's, after a linear warm-up over the first 5% of images
    kl_weight: float = 1e-6  # train: the KL term's weight (LDM's "KL-reg")
    seed: int = 0  # train: initial weights, batches and posterior draws
    checkpoint_every_images: int = 10_000  # train: a resumable checkpoint this often
    discriminator_start_images: int | None = None  # train: images before the patch discriminator joins (null: none)
    discriminator_weight: float = 0.5  # train: the factor of its adaptive weight (LDM's disc_weight)
    discriminator_layers: int = 3  # train: its stride-2 layers (3: pix2pix's 70x70 patches)
    num_workers: int = field(default=1, metadata=EXECUTION)  # train: Ray Train DDP workers
    scaling_factor: float | None = None  # the latents' scale (None: 1/std of the training split's latents, as LDM)
    encode_batch: int = field(default=64, metadata=EXECUTION)  # images per encoder forward pass
    encode_actors: int = field(default=2, metadata=EXECUTION)  # Ray Data actors encoding the training split

    @property
    def latent(self) -> bool:
        """Whether the diffusion model is a latent one (the autoencoder stage runs)."""
        return self.weights_uri is not None or self.train

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        require_positive(
            "autoencoder",
            {
                "encode_batch": self.encode_batch,
                "encode_actors": self.encode_actors,
                "layers_per_block": self.layers_per_block,
                "latent_channels": self.latent_channels,
                "images": self.images,
                "batch_size": self.batch_size,
                "learning_rate": self.learning_rate,
                "checkpoint_every_images": self.checkpoint_every_images,
                "num_workers": self.num_workers,
                "discriminator_weight": self.discriminator_weight,
                "discriminator_layers": self.discriminator_layers,
            },
        )
        require_non_negative("autoencoder", {"kl_weight": self.kl_weight})
        if self.discriminator_start_images is not None:
            require_non_negative("autoencoder", {"discriminator_start_images": self.discriminator_start_images})
        if self.scaling_factor is not None and not self.scaling_factor > 0:
            raise ConfigError(f"autoencoder.scaling_factor must be > 0 or null (estimated), got {self.scaling_factor}")
        if self.train:
            self.check_trained()
        elif self.weights_uri is not None:
            self.check_weights()
        if self.discriminator_start_images is not None and not self.train:
            raise ConfigError(
                "autoencoder.discriminator_start_images trains a discriminator: it needs autoencoder.train"
            )

    def check_trained(self) -> None:
        if self.weights_uri is not None:
            raise ConfigError(
                "autoencoder.train with autoencoder.weights_uri: train one, or load the folder; set one of them"
            )
        if self.batch_size % self.num_workers:
            raise ConfigError(
                f"autoencoder.batch_size={self.batch_size} is not a multiple of autoencoder.num_workers="
                f"{self.num_workers}: each worker takes an equal part of the global batch"
            )
        try:
            self.architecture(1)
        except FieldError as error:
            raise ConfigError(str(error)) from None
        start = self.discriminator_start_images
        if start is not None and start >= self.images:
            raise ConfigError(
                f"autoencoder.discriminator_start_images={start} is not below autoencoder.images={self.images}: the "
                "discriminator would never join; lower it, or set it null to train without one"
            )

    @property
    def discriminator(self) -> DiscriminatorConfig | None:
        """LDM's patch discriminator after ``discriminator_start_images`` (None: L1 + KL only)."""
        if self.discriminator_start_images is None:
            return None
        return DiscriminatorConfig(
            self.discriminator_start_images, self.discriminator_weight, layers=self.discriminator_layers
        )

    def check_weights(self) -> None:
        if self.weights_sha256 is None:
            raise ConfigError(
                "autoencoder.weights_uri needs autoencoder.weights_sha256: the SHA-256 (or its first 8+ hex digits) of "
                "the folder's diffusion_pytorch_model.safetensors, as `sha256sum` prints it"
            )
        try:
            check_sha256_spec(self.weights_sha256, "autoencoder.weights_sha256")
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def architecture(self, channels: int) -> AutoencoderConfig:
        """The network ``train`` trains, for images of ``channels`` channels (GroupNorm groups: 32, or the
        narrowest width when that is smaller)."""
        groups = min(32, *self.block_out_channels) if self.block_out_channels else 32
        return AutoencoderConfig(
            in_channels=channels,
            out_channels=channels,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=groups,
        )

    @property
    def source(self) -> str:
        """The key that makes the model a latent one, for messages."""
        return "autoencoder.train" if self.train else "autoencoder.weights_uri"


def check_latent(config: PipelineConfig) -> None:
    """What a latent model (``autoencoder.weights_uri`` or ``autoencoder.train``) cannot be combined with yet, each
    named with its reason."""
    if not config.autoencoder.latent:
        return
    refused = {
        "evaluate.nll": (
            config.evaluate.nll,
            "the bound of a latent model is in nats of latents, not comparable with pixel bits/dim; set "
            "evaluate.nll=false",
        ),
        "distill.enabled": (config.distill.enabled, "distillation of latent models is not built; set it false"),
        "train.horizontal_flip": (
            config.train.horizontal_flip,
            "a flipped latent is not the latent of the flipped image; set it false",
        ),
        "data.loader": (
            config.data.loader is Loader.STREAM,
            "the latents are held resident by the training workers; use data.loader=auto or resident",
        ),
        "sample.clip_denoised": (
            config.sample.sampler.clip_denoised,
            "latents are not bounded by [-1, 1], and clipping each predicted x_0 to it distorts them; set it false",
        ),
    }
    for key, (on, why) in refused.items():
        if on:
            raise ConfigError(f"{key} with {config.autoencoder.source} (a latent model): {why}")


# The most of each event a training run may make (train.<key>: limit, what one is); a plan with more is a mistake.
# cifar10.yaml makes 80 checkpoints, 16 grids and 800 log points in its 102.4M images.
MAX_TRAINING_EVENTS = {
    "checkpoint_every_images": (10_000, "checkpoints (each a committed copy of the whole training state)"),
    "grid_every_images": (10_000, "sample grids (each 64 images sampled, logged to MLflow)"),
    "log_every_images": (1_000_000, "log points (each an all-reduce and a row of MLflow metrics)"),
    "ema_snapshot_every_images": (1_000, "post-hoc EMA snapshots (each a committed copy of every profile's weights)"),
}


@dataclass(frozen=True)
class TrainSection:
    # Ray Train data-parallel workers: a number, or [min, max] for elastic training (Ray Train's elastic worker group:
    # it goes on with as few as min when capacity is lost and grows back to max, restarting from the last checkpoint)
    num_workers: int | tuple[int, int] = 2
    # elastic training: how often a running group looks for capacity to grow into (Ray's resize monitor)
    elastic_resize_interval_s: float = field(default=60.0, metadata=EXECUTION)
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = field(default=1.0, metadata=EXECUTION)
    batch_size: int = 128  # global batch, split across workers
    total_images: int = 100_000  # training length in images (EDM's kimg)
    checkpoint_every_images: int = 25_000
    log_every_images: int = 5_000
    grid_every_images: int | None = 50_000  # sample grid to MLflow (0: only at the end; null: never)
    max_failures: int = field(default=2, metadata=EXECUTION)  # worker-group restarts from the last checkpoint
    # how Ray places the workers' bundles: PACK (as few nodes as possible), SPREAD (over nodes where it can),
    # STRICT_SPREAD (one worker per node, or none start)
    placement: Placement = field(default=Placement.PACK, metadata=EXECUTION)
    startup_retries: int = field(
        default=10, metadata=EXECUTION
    )  # worker-group start attempts (60 s each): waits for autoscaling, never forever
    horizontal_flip: bool = False
    seed: int = 0
    # the per-timestep weight of the denoising loss (ddpm_core.loss_weighting): none (L_simple), min_snr (Hang et al.
    # 2023: w = min(SNR(t), train.snr_gamma)) or truncated_snr (Salimans & Ho 2022: w = max(SNR(t), 1))
    loss_weighting: Weighting = Weighting.NONE
    snr_gamma: float = 5.0
    class_dropout: float = 0.1  # conditional models: probability of training a label as the null class (CFG)
    # stable targets (Xu et al. 2023, ddpm_core.stable_targets): regress on the posterior mean of each x_t under a
    # reference batch of this many images, the last ones each share of the global batch drew (its micro-batch among
    # them), a class-conditional model's within the trained class; 0: off (Algorithm 1's one-image targets)
    stf_reference: int = 0
    # post-hoc EMA (Karras et al. 2024, Sec. 3): the sigma_rel of the power-function EMAs tracked during training, e.g.
    # [0.05, 0.10], each in (0, 0.2887] (ddpm_core.phema.MAX_SIGMA_REL); empty: off (train.ema_decay's EMA is the
    # snapshot's either way)
    ema_profiles: tuple[float, ...] = ()
    ema_snapshot_every_images: int = 0  # how often the profiles are stored (needed with train.ema_profiles)
    # the EMA that is sampled and scored (pipelines.training.ema_choice): null: train.ema_decay's; a number: the
    # power-function EMA of that relative width, tracked in training (tune can search it); a list of candidates: each
    # reconstructed after training from the train.ema_profiles snapshots, and the one of the lowest held-out
    # train.ema_choice score
    ema_sigma_rel: float | tuple[float, ...] | None = None
    # that score: bits_per_dim (the NLL bound) or loss (the training objective, weighted as trained)
    ema_choice: EmaChoice = EmaChoice.BITS_PER_DIM
    # what each candidate is scored on: the first hold-out images (at most this many) and the uniform timesteps per
    # image of the score's Monte Carlo estimate (as evaluate.nll_images / evaluate.nll_timesteps)
    ema_choice_images: int = 512
    ema_choice_timesteps: int = 32
    # which candidate is sampled: the longest width whose score exceeds the lowest by at most this many standard
    # errors of their paired difference (1: the one-standard-error rule, Breiman et al. 1984: the most averaged EMA
    # the hold-out split cannot tell from the best); 0: the lowest
    ema_choice_tolerance: float = 0.0
    # lr, warmup_images, lr_decay_images, grad_clip, weight_decay, ema_decay, ema_warmup: train.<field>
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, warmup_images=10_000, ema_decay=0.999, ema_warmup=True),
        metadata=INLINE,
    )
    # snapshot URI whose weights start training (the retrain warm start)
    init_from: str | None = field(default=None, metadata=WORKER_PATH)
    # bf16 autocast of the U-Net (the loss, gradients and AdamW stay float32) on GPU workers, and on CPU workers only
    # when asked: it pays only with native bf16 units and costs quality (docs/benchmarks.md, "bf16 on the CPU")
    bf16_on_gpu: bool = True
    bf16_on_cpu: bool = False
    channels_last: bool = False  # NHWC activations (tensor-core friendly convolutions on GPUs)
    # torch.compile of the training step's U-Net (a one-off compilation per worker start): on GPU workers, off on CPUs
    # (measured: docs/benchmarks.md, "The fast path")
    compile_on_gpu: bool = True
    compile_on_cpu: bool = False
    gradient_as_bucket_view: bool = True  # DDP's gradients as views into its all-reduce buckets (same numbers)
    # go ahead with a plan estimated to train longer than LONG_RUN_DAYS (check_training_length), which is refused
    allow_long_run: bool = field(default=False, metadata=EXECUTION)

    def __post_init__(self) -> None:
        self.check_num_workers()
        require_positive(
            "train",
            {
                "batch_size": self.batch_size,
                "total_images": self.total_images,
                "cpus_per_worker": self.cpus_per_worker,
                "checkpoint_every_images": self.checkpoint_every_images,
                "log_every_images": self.log_every_images,
                "ema_choice_images": self.ema_choice_images,
            },
        )
        require_non_negative(
            "train",
            {
                "max_failures": self.max_failures,
                "startup_retries": self.startup_retries,
                "grid_every_images": self.grid_every_images or 0,
                "seed": self.seed,
            },
        )
        coerce_choices(self, "train", {"loss_weighting": Weighting, "ema_choice": EmaChoice})
        if not 0 < self.snr_gamma < float("inf"):
            raise ConfigError(f"train.snr_gamma must be a positive number (min-SNR's clipping), got {self.snr_gamma}")
        if not 0 <= self.ema_choice_tolerance < float("inf"):
            raise ConfigError(
                "train.ema_choice_tolerance must be a number >= 0 (paired standard errors; 0: the lowest score), "
                f"got {self.ema_choice_tolerance}"
            )
        placement = str(getattr(self.placement, "value", self.placement)).upper()  # Ray's names, in any case
        object.__setattr__(self, "placement", choose("train.placement", Placement, placement))
        if self.batch_size % self.max_workers:
            raise ConfigError(
                f"train.batch_size {self.batch_size} must be a multiple of train.num_workers {self.max_workers} (its "
                "maximum: the global batch is split into that many equal shares)"
            )
        if self.elastic_resize_interval_s < 0:
            raise ConfigError(f"train.elastic_resize_interval_s must be >= 0, got {self.elastic_resize_interval_s}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"train.class_dropout must lie in [0, 1), got {self.class_dropout}")
        self.check_stf_reference()
        self.check_ema_profiles()
        self.check_ema_sigma_rel()

    @property
    def weighting(self) -> LossWeighting:
        """The loss weighting the training step applies."""
        return LossWeighting(self.loss_weighting, self.snr_gamma)

    def check_stf_reference(self) -> None:
        """``train.stf_reference``: 0 (off), or a reference batch that holds a share's whole micro-batch."""
        micro = self.batch_size // self.max_workers
        if self.stf_reference != 0 and not micro <= self.stf_reference:
            raise ConfigError(
                f"train.stf_reference must be 0 (off) or at least the images of one share's micro-batch "
                f"(train.batch_size / train.num_workers = {micro}), which it holds; got {self.stf_reference}"
            )

    def check_num_workers(self) -> None:
        """``train.num_workers``: a positive number, or ``[min, max]`` with 1 <= min <= max (stored as a tuple)."""
        value = self.num_workers
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ConfigError(
                    f"train.num_workers: expected a number or [min, max] of two integers, got {list(value)}"
                )
            if not 1 <= value[0] <= value[1]:
                raise ConfigError(f"train.num_workers [min, max] needs 1 <= min <= max, got {list(value)}")
            object.__setattr__(self, "num_workers", (value[0], value[1]))
        elif value < 1:
            raise ConfigError(f"train.num_workers must be >= 1, got {value}")

    @property
    def max_workers(self) -> int:
        """The most workers the group has, and the number of equal shares the global batch is split into: the
        data-parallel layout that the training's result depends on, whatever size the group has at a moment."""
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def min_workers(self) -> int:
        """The fewest workers training goes on with (``max_workers`` unless elastic)."""
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    def check_ema_profiles(self) -> None:
        """``train.ema_profiles``: distinct widths in ``(0, MAX_SIGMA_REL]`` (Karras et al. 2024, Eq. 123: gamma >= 0),
        stored every ``train.ema_snapshot_every_images`` (> 0; one longer than the run stores the end only, as a
        shortened run of a config written for a longer one does); no interval without them."""
        profiles, every = self.ema_profiles, self.ema_snapshot_every_images
        bad = [width for width in profiles if not 0.0 < width <= MAX_SIGMA_REL]
        if bad:
            raise ConfigError(
                f"train.ema_profiles: each sigma_rel must lie in (0, {MAX_SIGMA_REL:.4f}] (a power-function EMA's "
                f"relative width, Karras et al. 2024), got {bad[0]} in {list(profiles)}; e.g. [0.05, 0.10]"
            )
        if len(set(profiles)) != len(profiles):
            raise ConfigError(f"train.ema_profiles: each sigma_rel once, got {list(profiles)}")
        if profiles and every <= 0:
            raise ConfigError(
                f"train.ema_snapshot_every_images must be > 0 with train.ema_profiles {list(profiles)}, got {every}: "
                "the profiles are stored that often (and at the end)"
            )
        if every and not profiles:
            raise ConfigError(
                f"train.ema_snapshot_every_images {every} stores nothing without train.ema_profiles (e.g. [0.05, "
                "0.10]); set both, or neither"
            )

    def check_ema_sigma_rel(self) -> None:
        """``train.ema_sigma_rel``: widths in ``(0, MAX_SIGMA_REL]``, each once; several (a post-hoc choice) need
        ``train.ema_profiles`` to reconstruct them from. One width in a list is stored as the number."""
        widths = self.ema_candidates
        bad = [width for width in widths if not 0.0 < width <= MAX_SIGMA_REL]
        if bad or len(set(widths)) != len(widths) or (self.ema_sigma_rel is not None and not widths):
            raise ConfigError(
                f"train.ema_sigma_rel: a number or a list of distinct numbers in (0, {MAX_SIGMA_REL:.4f}] (the EMA's "
                f"relative width, Karras et al. 2024), got {self.ema_sigma_rel!r}; e.g. 0.1 or [0.05, 0.1, 0.15]"
            )
        if len(widths) > 1 and not self.ema_profiles:
            raise ConfigError(
                f"train.ema_sigma_rel {list(widths)} chooses among EMAs reconstructed after training, which needs "
                "train.ema_profiles (e.g. [0.05, 0.10]) and train.ema_snapshot_every_images; or give one number"
            )
        object.__setattr__(self, "ema_sigma_rel", None if not widths else widths[0] if len(widths) == 1 else widths)

    @property
    def ema_candidates(self) -> tuple[float, ...]:
        """The EMA widths ``train.ema_sigma_rel`` names (none: ``train.ema_decay``'s EMA)."""
        value = self.ema_sigma_rel
        return () if value is None else tuple(value) if isinstance(value, (tuple, list)) else (value,)

    @property
    def tracked_sigma_rel(self) -> float | None:
        """The width of the power-function EMA tracked in training instead of ``train.ema_decay``'s (one is named)."""
        return self.ema_sigma_rel if isinstance(self.ema_sigma_rel, float) else None

    def check_events(self) -> None:
        """At most :data:`MAX_TRAINING_EVENTS` checkpoints, sample grids and log points (checked after the length of
        the run, :func:`check_training_length`): an interval is rounded up to whole steps (at most one event per
        step), so a run makes ``ceil(total_images / max(every, batch_size))``."""
        for key, every in (
            ("checkpoint_every_images", self.checkpoint_every_images),
            ("grid_every_images", self.grid_every_images or 0),
            ("log_every_images", self.log_every_images),
            ("ema_snapshot_every_images", self.ema_snapshot_every_images),
        ):
            limit, what = MAX_TRAINING_EVENTS[key]
            events = -(-self.total_images // max(every, self.batch_size)) if every else 1
            if events > limit:
                raise ConfigError(
                    f"train.{key} {every} makes {events:,} {what} in train.total_images {self.total_images:,} "
                    f"(train.batch_size {self.batch_size}): at most {limit:,} are allowed; use train.{key} >= "
                    f"{-(-self.total_images // limit):,}"
                )

    def precision(self, use_gpu: bool) -> Precision:
        """The training workers' precision on the device kind given."""
        return Precision.chosen(use_gpu, self.bf16_on_gpu, self.bf16_on_cpu)

    def compiled(self, use_gpu: bool) -> bool:
        """Whether training workers compile the U-Net on the device kind given."""
        return self.compile_on_gpu if use_gpu else self.compile_on_cpu


LONG_RUN_DAYS = 30.0  # a training plan estimated to take longer is refused, unless train.allow_long_run
# Optimistic bounds, so that the estimate is a lower bound on the time a plan takes (docs/pipeline.md, "Plans checked
# before the first stage"). No training worker computes faster than PEAK_FLOPS (above the dense bf16 peak of every
# accelerator: H100/H200 0.99, B200 2.25 PFLOP/s), and no optimizer step (forward, backward, all-reduce, AdamW, EMA)
# takes less than MIN_STEP_S (the fastest step measured: 37 ms, batch 128 of the cifar10 preset at 3,436 img/s on
# an H200, docs/benchmarks.md).
PEAK_FLOPS = 2.5e15
MIN_STEP_S = 1e-3
# Up to this many images per worker the FLOPs are not counted (a count takes up to a second): refusing such a plan
# would take over PEAK_FLOPS * LONG_RUN_DAYS / 1e8 = 65 TFLOP per image, 43x the image256 preset's 1.5 TFLOP.
COUNTED_ABOVE_IMAGES_PER_WORKER = 10**8
FASTEST_MEASURED = "3,436 img/s per H200 at the cifar10 preset, batch 128, docs/benchmarks.md"
FASTEST_STEP_S = 128 / 3_436


@functools.cache
def training_flops_per_image(unet: UNetConfig) -> float:
    """FLOPs of one training image through the U-Net: three times its forward pass (the backward pass costs about
    twice the forward, Kaplan et al. 2020, Sec. 2.1), counted by torch's FLOP counter on the meta device (no memory,
    no arithmetic). The cifar10 preset: 37.3 GFLOP, as ``benchmarks/train_step.py`` counts a whole step."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ddpm_core.unet import UNet

    config = dataclasses.replace(unet, num_classes=None)  # a class embedding is one row per image: negligible
    with torch.device("meta"):
        network = UNet(config)
        images = torch.empty(1, config.in_channels, config.image_size, config.image_size)
        timesteps = torch.zeros(1, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        network(images, timesteps)
    return 3.0 * float(counter.get_total_flops())


def check_training_length(train: TrainSection, model: ModelSection) -> None:
    """Refuse a plan estimated to train longer than :data:`LONG_RUN_DAYS`, unless ``train.allow_long_run``.

    The estimate is a lower bound: ``max(steps * MIN_STEP_S, images per worker * FLOP per image / PEAK_FLOPS)``,
    with ``steps = ceil(total_images / batch_size)`` and the FLOPs of the model counted
    (:func:`training_flops_per_image`), so a plan refused here could not finish in time on any hardware."""
    if train.allow_long_run:
        return
    total, batch, workers = train.total_images, train.batch_size, train.max_workers
    steps, limit_s = -(-total // batch), LONG_RUN_DAYS * 86_400
    estimates = [
        (
            steps * MIN_STEP_S,
            f"{steps:,} optimizer steps (train.total_images / train.batch_size {batch}) at {MIN_STEP_S * 1e3:g} ms "
            f"each, {FASTEST_STEP_S / MIN_STEP_S:.0f} times faster than the fastest step measured ({FASTEST_MEASURED})",
            int(limit_s / MIN_STEP_S) * batch,
            "raise train.batch_size or lower train.total_images",
        )
    ]
    if total / workers > COUNTED_ABOVE_IMAGES_PER_WORKER:
        flops = training_flops_per_image(model.unet(model.num_classes or 1))
        estimates.append(
            (
                total / workers * flops / PEAK_FLOPS,
                f"{total / workers:,.0f} images per worker (train.num_workers {workers}) of {flops / 1e9:,.1f} GFLOP "
                f"each (the U-Net of model.preset {model.preset!r}, forward and backward, counted) at "
                f"{PEAK_FLOPS / 1e15:g} PFLOP/s per worker, above every accelerator's bf16 peak; the fastest rate "
                f"measured is {FASTEST_MEASURED}",
                int(limit_s * PEAK_FLOPS / flops) * workers,
                "lower train.total_images or spread it over more workers (train.num_workers)",
            )
        )
    seconds, source, _, advice = max(estimates)
    if seconds > limit_s:
        raise ConfigError(
            f"train.total_images {total:,} would train for at least {seconds / 86_400:,.0f} days, an optimistic "
            f"estimate from {source}. At most {min(fit for _, _, fit, _ in estimates):,} images fit in "
            f"{LONG_RUN_DAYS:g} days by that estimate: {advice}, or set train.allow_long_run=true to go ahead"
        )


@dataclass(frozen=True)
class TuneSection:
    """Hyperparameter search before the long training run (the tune stage; docs/tuning.md)."""

    enabled: bool = False
    # dotted key -> {choice|grid: [..]} or {uniform|loguniform: [lo, hi]}
    space: dict[str, Any] = field(default_factory=dict)
    search_alg: SearchAlgorithm = SearchAlgorithm.RANDOM
    num_samples: int = 4  # trials drawn (random/optuna/hyperopt); with grid: repeats of the whole grid
    metric: TrialMetric = TrialMetric.BPD
    trial_images: int = 16_384  # training length of one trial
    report_every_images: int = 2_048  # interval of the bits/dim report (ASHA's time unit)
    scheduler: TrialScheduler = TrialScheduler.ASHA
    grace_period_images: int = 4_096  # ASHA: no trial is stopped before this
    reduction_factor: int = 2
    max_concurrent_trials: int = 1
    workers_per_trial: int = 2
    cpus_per_worker: float = field(default=0.5, metadata=EXECUTION)
    cpus_per_trial: float = field(default=0.5, metadata=EXECUTION)  # the trial's own driver actor
    bpd_images: int = 128  # held-out images of the bits/dim estimate
    bpd_timesteps: int = 8  # Monte Carlo timesteps per image
    proxy_fid_samples: int = 500  # 0 disables the proxy FID
    proxy_fid_steps: int = 20  # DDIM steps of the proxy FID sample
    warm_start: bool = False  # train starts from the best trial's checkpoint

    def __post_init__(self) -> None:
        coerce_choices(
            self, "tune", {"search_alg": SearchAlgorithm, "metric": TrialMetric, "scheduler": TrialScheduler}
        )
        require_positive(
            "tune",
            {
                name: getattr(self, name)
                for name in (
                    "num_samples",
                    "trial_images",
                    "report_every_images",
                    "max_concurrent_trials",
                    "workers_per_trial",
                    "bpd_images",
                    "bpd_timesteps",
                    "reduction_factor",
                    "grace_period_images",
                    "cpus_per_worker",
                    "cpus_per_trial",
                )
            },
        )
        if self.bpd_timesteps < 2:
            raise ConfigError("tune.bpd_timesteps must be >= 2 (the estimate's standard error needs two)")
        if self.metric is TrialMetric.FID and self.proxy_fid_samples < 2:
            raise ConfigError("tune.metric=fid needs tune.proxy_fid_samples >= 2")

    @property
    def proxy_fid(self) -> bool:
        """Whether trials end with a proxy FID (it needs the classifier's reference statistics)."""
        return self.enabled and self.proxy_fid_samples > 0


class DistillMethod(str, enum.Enum):
    PROGRESSIVE = "progressive"  # Salimans & Ho 2022, Algorithm 2: each round halves the steps
    CONSISTENCY = "consistency"  # Song et al. 2023, Algorithm 2: one round along the teacher's DDIM trajectories


@dataclass(frozen=True)
class DistillSection:
    """A few-step student distilled from the trained model (the distill stage; docs/distillation.md). With it on, the
    sample stage draws from the student (DDIM at ``distill.steps`` on their trailing grid), evaluate scores it beside
    its teacher and register registers it as ``<register.model_name>-<steps>step``."""

    enabled: bool = False
    method: DistillMethod = DistillMethod.PROGRESSIVE
    steps: int = 4  # the final student's sampling steps (its NFE)
    # progressive: the DDIM steps the first round's student halves (32 -> rounds of 16, 8 and 4 steps); consistency:
    # N, the teacher's DDIM steps along which the student learns to map every point to the trajectory's end
    teacher_steps: int = 32
    images_per_round: int = 33_280  # training images of each round (3 rounds: 99,840, the quickstart teacher's budget)
    batch_size: int = 128  # global batch, split over train.num_workers (train.max_workers shares)
    lr: float = 8e-4  # AdamW's learning rate at the start of each round, annealed linearly to 0 (their App. E)
    # what the student's network predicts (initialised from its teacher's weights whatever the teacher predicts):
    # v or x0 (Salimans & Ho 2022, Sec. 4; an eps student's x_0 estimate is unstable at the few steps of a student)
    prediction: Prediction = Prediction.V
    # consistency: the decay mu of the target network theta^-, the EMA of the student's weights (Song et al. 2023,
    # Algorithm 2; 0.95 for their CIFAR-10 distillation); the student's snapshot is that EMA
    target_ema: float = 0.95
    checkpoint_every_images: int = field(default=8_320, metadata=EXECUTION)
    log_every_images: int = field(default=2_560, metadata=EXECUTION)

    def __post_init__(self) -> None:
        coerce_choices(self, "distill", {"method": DistillMethod, "prediction": Prediction})
        require_positive(
            "distill",
            {
                name: getattr(self, name)
                for name in ("steps", "images_per_round", "batch_size", "lr", "checkpoint_every_images")
            },
        )
        require_positive("distill", {"log_every_images": self.log_every_images})
        if self.prediction is Prediction.EPS:
            raise ConfigError(
                "distill.prediction eps: a few-step student's x_0 estimate from eps blows up at high noise (Salimans & "
                "Ho 2022, Sec. 4); use v (the default) or x0"
            )
        if not 0.0 <= self.target_ema < 1.0:
            raise ConfigError(f"distill.target_ema must lie in [0, 1), got {self.target_ema}")
        if self.method is DistillMethod.CONSISTENCY:
            if self.teacher_steps % self.steps:
                raise ConfigError(
                    f"distill.teacher_steps {self.teacher_steps} must be a multiple of distill.steps {self.steps} "
                    "for consistency distillation: the student is sampled at points of the grid it was trained on"
                )
            return
        ratio = self.teacher_steps // self.steps if self.teacher_steps > self.steps else 0
        if ratio < 2 or self.teacher_steps != self.steps * ratio or ratio & (ratio - 1):
            raise ConfigError(
                f"distill.teacher_steps {self.teacher_steps} must be distill.steps {self.steps} times a power of two "
                f"(2, 4, 8, ...): each round halves the steps, e.g. teacher_steps={2 * self.steps}"
            )

    @property
    def rounds(self) -> tuple[int, ...]:
        """The students' steps, round by round: half the teacher's, then half again, down to ``steps``; consistency
        distillation's one round, sampled at ``steps``."""
        if self.method is DistillMethod.CONSISTENCY:
            return (self.steps,)
        counts, steps = [], self.teacher_steps // 2
        while steps >= self.steps:
            counts.append(steps)
            steps //= 2
        return tuple(counts)


MAX_SAMPLE_SHARDS = 10_000  # a plan with more is a mistake (50,000 CIFAR-10 images at batch 250 are 200 shards)


def check_interval(key: str, interval: tuple[float, float] | None) -> None:
    """A guidance interval is null or two noise levels ``0 <= low < high``. Another key says whether it is read:
    ``sample.autoguidance_weight=1`` turns a config's autoguidance off whole, interval included."""
    if interval is not None and (len(interval) != 2 or not 0 <= interval[0] < interval[1]):
        raise ConfigError(
            f"{key} {list(interval)} must be two noise levels [low, high] with 0 <= low < high (sigma_t = "
            "sqrt((1 - abar_t) / abar_t); e.g. [0, 1.0]: guide from sigma 1 down to the end), or null (every step)"
        )


@dataclass(frozen=True)
class SampleSection:
    num_samples: int = 1_000
    batch_size: int = 250  # images per shard (one task)
    num_workers: int = field(default=2, metadata=EXECUTION)  # sampling actors (one per GPU on a GPU cluster)
    # method, num_steps, eta, spacing, clip_denoised: sample.<field>
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(method=Method.DDIM, num_steps=100), metadata=INLINE
    )
    seed: int = 1
    # conditional models (docs/conditional.md): w of Ho & Salimans (2022), Eq. 6; 0 is the conditional model unguided
    guidance_scale: float = 1.0
    classes: tuple[int | str, ...] | None = None  # names or labels to draw, image i of class i mod K (None: all)
    # [low, high]: guide only where the step's noise level sigma_t = sqrt((1 - abar_t) / abar_t) lies in (low, high],
    # the conditional model unguided elsewhere (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval");
    # null: every step (docs/conditional.md, "Guidance in a limited interval")
    guidance_interval: tuple[float, float] | None = None
    # autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", Eq. 1): the model
    # guided by its own sampled EMA width reconstructed at an earlier point of the run, pred = guide + w (model -
    # guide), two network calls per step; 1: off (docs/benchmarks.md, "Autoguidance by an earlier EMA of the same run")
    autoguidance_weight: float = 1.0
    autoguidance_guide_at: float = 0.3  # the guide's point: this fraction of the run's training images
    # [low, high]: autoguide only at noise levels sigma_t in (low, high], as guidance_interval; null: every step
    # (docs/benchmarks.md, "Autoguidance in a limited interval")
    autoguidance_interval: tuple[float, float] | None = None
    bf16_on_gpu: bool = (
        True  # bf16 autocast of the U-Net in GPU sampling actors (the sampler's arithmetic stays float32)
    )
    bf16_on_cpu: bool = False  # the same in CPU sampling actors (docs/benchmarks.md, "bf16 on the CPU")
    # torch.compile (inductor, weights frozen) of the U-Net in each sampling actor: on GPUs, off on CPUs, where a cold
    # compilation outweighs a short run (measured: docs/benchmarks.md, "The fast path")
    compile_on_gpu: bool = True
    compile_on_cpu: bool = False

    def __post_init__(self) -> None:
        require_positive(
            "sample", {"num_samples": self.num_samples, "batch_size": self.batch_size, "num_workers": self.num_workers}
        )
        require_non_negative("sample", {"seed": self.seed, "guidance_scale": self.guidance_scale})
        if self.classes is not None and not self.classes:
            raise ConfigError("sample.classes must name at least one class, or be null (all classes, balanced)")
        if not self.autoguidance_weight >= 1:
            raise ConfigError(
                "sample.autoguidance_weight must be >= 1 (1: off; above 1 each step moves away from the guide, "
                f"e.g. 1.25), got {self.autoguidance_weight}"
            )
        check_interval("sample.guidance_interval", self.guidance_interval)
        check_interval("sample.autoguidance_interval", self.autoguidance_interval)
        if not 0 < self.autoguidance_guide_at < 1:
            raise ConfigError(
                "sample.autoguidance_guide_at must lie in (0, 1): the fraction of the run's training images at which "
                f"the guide's EMA is reconstructed (e.g. 0.3), got {self.autoguidance_guide_at}"
            )
        shards = -(-self.num_samples // self.batch_size)
        if shards > MAX_SAMPLE_SHARDS:
            raise ConfigError(
                f"sample.batch_size {self.batch_size} cuts sample.num_samples {self.num_samples} into {shards} shards "
                f"(each a committed folder, and a network call of batch_size images): at most {MAX_SAMPLE_SHARDS} are "
                f"allowed; use sample.batch_size >= {-(-self.num_samples // MAX_SAMPLE_SHARDS)}"
            )

    @property
    def autoguided(self) -> bool:
        return self.autoguidance_weight != 1

    def precision(self, use_gpu: bool) -> Precision:
        """The sampling actors' precision on the device kind given (part of the FID protocol)."""
        return Precision.chosen(use_gpu, self.bf16_on_gpu, self.bf16_on_cpu)

    def compiled(self, use_gpu: bool) -> bool:
        """Whether sampling actors compile the U-Net on the device kind given."""
        return self.compile_on_gpu if use_gpu else self.compile_on_cpu


@dataclass(frozen=True)
class EvaluateSection:
    """Scores of the sample set; see docs/evaluation.md for the protocol each one is logged with."""

    extractor: Extractor = Extractor.CLASSIFIER
    classifier_epochs: int = 15
    # fsspec URI or path of pt_inception-2015-12-05-6726825d.pth
    inception_weights_uri: str | None = field(default=None, metadata=WORKER_PATH)
    inception_weights_sha256: str = (
        "6726825d"  # its SHA-256, or a prefix (the one in the official file name by default)
    )
    reference_stats_uri: str | None = (
        None  # a published .npz with mu and sigma instead of statistics of the training split
    )
    inception_score: bool = True  # Inception Score (with the classifier: the same formula on its logits)
    inception_score_splits: int = 10
    precision_recall: bool = True  # improved precision/recall (Kynkaanniemi et al. 2019) on the same features
    precision_recall_k: int = 3
    precision_recall_samples: int = field(
        default=10_000, metadata=RESOLVED
    )  # at most this many real and as many generated images (the first of each set)
    kid: bool = True  # kernel inception distance on the same first images as precision/recall
    kid_subset_size: int = field(
        default=1000, metadata=RESOLVED
    )  # images of each set per KID subset (at most half of the smaller set)
    kid_subsets: int = 100  # random subsets KID is averaged over (its std is over these)
    fid_groups: int = field(
        default=10, metadata=RESOLVED
    )  # index-contiguous groups of the delete-a-group jackknife (FID stderr and FID_inf)
    nll: bool = True  # NLL bound in bits/dim of held-out real images
    nll_split: NllSplit = NllSplit.HOLDOUT
    nll_images: int | None = field(default=None, metadata=RESOLVED)  # None: the whole split
    nll_timesteps: int | None = None  # None: all T terms of the bound; K: unbiased estimate from K random timesteps
    nll_batch_size: int = 100
    grid_size: int = 100  # images in the sample grid artifact
    untrained_baseline: bool = True  # also sample and score an untrained network under the same protocol
    rescore_champion: bool = True  # also sample and score the registered champion under this run's protocol
    guidance_scales: tuple[float, ...] = ()  # conditional models: FID and class accuracy at each w (a smaller set)
    guidance_samples: int = field(default=500, metadata=RESOLVED)  # images per guidance scale of the sweep
    memorization: bool = True  # copy rate: samples nearer one training image than its runner-up (Carlini et al. 2023)
    copy_false_positive_rate: float = 0.01  # share of held-out real images the copy threshold may flag
    coverage: bool = True  # labelled data: the samples' class histogram against the training split's (TVD)
    coverage_resamples: int = 1000  # bootstrap resamples of the TVD's interval

    @property
    def first_feature_images(self) -> int:
        """How many of the first real and generated images precision/recall and KID compare (0: both are off)."""
        return self.precision_recall_samples if self.precision_recall or self.kid else 0

    def __post_init__(self) -> None:
        coerce_choices(self, "evaluate", {"extractor": Extractor, "nll_split": NllSplit})
        if self.extractor is Extractor.INCEPTION and not self.inception_weights_uri:
            raise ConfigError(
                "evaluate.extractor=inception needs evaluate.inception_weights_uri: the fsspec URI or path of "
                "pt_inception-2015-12-05-6726825d.pth (see docs/evaluation.md, 'Inception weights')"
            )
        try:
            check_sha256_spec(self.inception_weights_sha256, "evaluate.inception_weights_sha256")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        require_positive(
            "evaluate",
            {
                name: getattr(self, name)
                for name in (
                    "inception_score_splits",
                    "precision_recall_k",
                    "precision_recall_samples",
                    "nll_batch_size",
                    "classifier_epochs",
                    "grid_size",
                    "guidance_samples",
                    "kid_subset_size",
                    "kid_subsets",
                    "coverage_resamples",
                )
            },
        )
        if not 0.0 < self.copy_false_positive_rate < 1.0:
            raise ConfigError(
                "evaluate.copy_false_positive_rate must be in (0, 1) (the share of held-out real images the copy "
                f"threshold may flag, e.g. 0.01), got {self.copy_false_positive_rate}"
            )
        if self.nll_images is not None and self.nll_images <= 0:
            raise ConfigError(f"evaluate.nll_images must be null (the whole split) or > 0, got {self.nll_images}")
        negative = [scale for scale in self.guidance_scales if scale < 0]
        if negative:
            raise ConfigError(f"evaluate.guidance_scales must all be >= 0 (w = 0: no guidance), got {negative[0]}")
        if self.fid_groups < 2:
            raise ConfigError(
                f"evaluate.fid_groups must be >= 2 (the jackknife deletes one of them at a time), got {self.fid_groups}"
            )


@dataclass(frozen=True)
class RegisterSection:
    enabled: bool = True
    model_name: str = "ddpm-digits"  # the MLflow registered model
    promotion_margin: float = 0.0  # promote only when FID < champion's FID - margin (both under the same protocol)
    promotion_z: float = 1.96  # ... and the improvement exceeds this many standard errors of the FID difference
    max_copy_rate: float | None = 0.05  # never promote a model whose copy rate exceeds this (null: no ceiling)

    def __post_init__(self) -> None:
        require_non_negative("register", {"promotion_margin": self.promotion_margin, "promotion_z": self.promotion_z})
        if self.max_copy_rate is not None and not 0.0 <= self.max_copy_rate <= 1.0:
            raise ConfigError(
                f"register.max_copy_rate must be null (no ceiling) or a share in [0, 1], got {self.max_copy_rate}"
            )
        if not self.model_name.strip() or any(character in self.model_name for character in "/:"):
            raise ConfigError(
                f"register.model_name {self.model_name!r} must be a non-empty name without '/' or ':' "
                "(MLflow's rule for registered models), e.g. ddpm-cifar10"
            )


@dataclass(frozen=True)
class RetrainSection:
    """Scheduled retraining (``python -m pipelines retrain``)."""

    if_data_changed: bool = field(
        default=True, metadata=EXECUTION
    )  # skip (no training, no GPUs) when the data fingerprint equals the champion's
    warm_start: bool = field(
        default=True, metadata=EXECUTION
    )  # initialise from the champion's weights (else from scratch)
    lease_ttl_s: float = field(
        default=120.0, metadata=EXECUTION
    )  # a crashed run's lease on its run root expires after this
    lease_wait_s: float = field(
        default=0.0, metadata=EXECUTION
    )  # how long a second run of the same run root waits before giving up

    def __post_init__(self) -> None:
        if self.lease_ttl_s < 10 or self.lease_wait_s < 0:
            raise ConfigError("retrain.lease_ttl_s must be >= 10 and retrain.lease_wait_s >= 0")


@dataclass(frozen=True)
class ClusterSection:
    """The Ray cluster the pipeline runs on."""

    # True on a cluster that adds nodes on demand (KubeRay or `ray up` with an autoscaler): a stage that asks for more
    # than the cluster has now waits for nodes (at most train.startup_retries minutes) instead of failing at once.
    autoscaling: bool = field(default=False, metadata=EXECUTION)


@dataclass(frozen=True)
class StorageSection:
    # fsspec URI or local path; a relative path is under the working directory
    root: str = field(default="runs", metadata=WORKER_PATH)
    endpoint_url: str | None = field(
        default=None, metadata=EXECUTION
    )  # S3-compatible endpoint (else AWS_ENDPOINT_URL / AWS default)
    region: str | None = field(default=None, metadata=EXECUTION)
    # True when storage.root (and every other local path the config names) is one mount that every node of the
    # cluster sees (NFS, a shared volume): a local root on a cluster of several nodes is refused otherwise
    shared_filesystem: bool = field(default=False, metadata=EXECUTION)

    def options(self) -> dict[str, Any]:
        """fsspec storage options of every URL the run touches, keyed by protocol (credentials come from the standard
        AWS environment variables): ``storage.endpoint_url`` / ``storage.region`` apply to every ``s3://`` URL (the
        root, ``data.uri``, ``train.init_from``, weights and reference URIs), whatever the root is.
        :func:`ddpm_core.storage.filesystem` takes the entry of a URL's protocol and adds its deadlines."""
        return {"s3": s3_options(self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL"), self.region)}

    def resolved_root(self) -> str:
        if "://" in self.root:
            return self.root.rstrip("/")
        return str(Path(self.root).expanduser().resolve())


@dataclass(frozen=True)
class MlflowSection:
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "ddpm-pipeline"

    def resolved_tracking_uri(self) -> str:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        return uri or f"sqlite:///{Path('mlflow.db').resolve()}"


def check_loss_weighting(weighting: Weighting, diffusion: DiffusionConfig) -> None:
    """Truncated-SNR weighting on an eps-predicting network weights its error by max(SNR, 1) / SNR, which is
    1 / SNR(T) at the noisiest step: refused where that exceeds 1,000 (2.5e4 on the linear schedule of T = 1000)."""
    if weighting is not Weighting.TRUNCATED_SNR or diffusion.prediction is not Prediction.EPS:
        return
    abar = float(GaussianDiffusion.from_config(diffusion).alphas_cumprod[-1])
    largest = (1 - abar) / abar
    if largest > 1_000:
        raise ConfigError(
            f"train.loss_weighting truncated_snr with diffusion.prediction eps weights the noisiest step's error by "
            f"1/SNR = {largest:,.0f} (steps with SNR >= 1 by 1): train a v- or x0-predicting network "
            "(diffusion.prediction=v, as Salimans & Ho 2022 do) or use train.loss_weighting=min_snr"
        )


def check_sampler(sampler: SamplerConfig, diffusion: DiffusionConfig) -> None:
    """The sampler fits the schedule: its steps are distinct timesteps of it, and only DDIM takes eta."""
    steps, num_timesteps = sampler.num_steps, diffusion.num_timesteps
    if steps is not None and steps > num_timesteps:
        raise ConfigError(f"sample.num_steps {steps} exceeds diffusion.num_timesteps {num_timesteps}")
    if sampler.eta > 0 and sampler.method is not Method.DDIM:
        raise ConfigError(
            f"sample.eta {sampler.eta:g} applies to sample.method=ddim only ({sampler.method.value} is "
            f"{'a deterministic ODE solver' if sampler.method in ODE_SOLVERS else 'stochastic by itself'}); set it to 0"
        )
    spacing = sampler.timestep_spacing
    if steps is not None and spacing.needs_schedule:
        try:
            spaced_timesteps(num_timesteps, steps, spacing, GaussianDiffusion.from_config(diffusion).alphas_cumprod)
        except ValueError as error:
            raise ConfigError(f"sample.spacing {spacing.value}: {error}") from None


def check_distill(distill: DistillSection, train: TrainSection, num_timesteps: int) -> None:
    """The rounds fit the schedule (the first student's steps are pairs of distinct timesteps) and the batch splits
    into the training workers' shares."""
    if not distill.enabled:
        return
    if distill.teacher_steps > num_timesteps:
        raise ConfigError(
            f"distill.teacher_steps {distill.teacher_steps} exceeds diffusion.num_timesteps {num_timesteps}"
        )
    if distill.method is DistillMethod.CONSISTENCY and distill.teacher_steps > num_timesteps // 2:
        raise ConfigError(
            f"distill.teacher_steps {distill.teacher_steps} exceeds {num_timesteps // 2}, half of "
            f"diffusion.num_timesteps {num_timesteps}: consistency distillation's grid would repeat the boundary "
            "timestep 0"
        )
    if distill.batch_size % train.max_workers:
        raise ConfigError(
            f"distill.batch_size {distill.batch_size} must be a multiple of train.num_workers {train.max_workers} "
            "(its maximum: the global batch is split into that many equal shares, as in training)"
        )


def check_autoguidance(sample: SampleSection, train: TrainSection, distill: DistillSection) -> None:
    """Autoguidance's guide is the sampled EMA width reconstructed at ``sample.autoguidance_guide_at`` of the run from
    the post-hoc snapshots: it needs them, a power-function EMA width, and a snapshot at or before that point."""
    if not sample.autoguided:
        return
    key = f"sample.autoguidance_weight {sample.autoguidance_weight:g}"
    if distill.enabled:
        raise ConfigError(
            f"{key} guides the trained model, not a distilled student: set it to 1 or distill.enabled=false"
        )
    if not train.ema_profiles or not train.ema_candidates:
        raise ConfigError(
            f"{key} guides the model by its own EMA at an earlier point of the run, reconstructed from post-hoc "
            "snapshots: set train.ema_profiles (e.g. [0.05, 0.10]), train.ema_snapshot_every_images and "
            "train.ema_sigma_rel (e.g. [0.05, 0.10])"
        )
    guide_images = sample.autoguidance_guide_at * train.total_images
    if train.ema_snapshot_every_images > guide_images:
        raise ConfigError(
            f"sample.autoguidance_guide_at {sample.autoguidance_guide_at:g} puts the guide at {guide_images:,.0f} "
            f"images, before the first post-hoc snapshot (train.ema_snapshot_every_images "
            f"{train.ema_snapshot_every_images:,}): raise the fraction, store snapshots more often, or set "
            "sample.autoguidance_weight=1 (off)"
        )


def registered_model_name(config: PipelineConfig) -> str:
    """The registered model this run's model is a version of: ``register.model_name``, or for a distilled student
    ``<register.model_name>-<distill.steps>step``, so that students are compared only with students of their NFE."""
    name = config.register.model_name
    return f"{name}-{config.distill.steps}step" if config.distill.enabled else name


RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class PipelineConfig:
    run_id: str = "quickstart"
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    tune: TuneSection = field(default_factory=TuneSection)
    train: TrainSection = field(default_factory=TrainSection)
    distill: DistillSection = field(default_factory=DistillSection)
    autoencoder: AutoencoderSection = field(default_factory=AutoencoderSection)
    sample: SampleSection = field(default_factory=SampleSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    register: RegisterSection = field(default_factory=RegisterSection)
    retrain: RetrainSection = field(default_factory=RetrainSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    storage: StorageSection = field(default_factory=StorageSection)
    mlflow: MlflowSection = field(default_factory=MlflowSection)

    def __post_init__(self) -> None:
        """The checks that relate sections (each section checks its own fields)."""
        if not RUN_ID.match(self.run_id):
            raise ConfigError(
                f"run_id {self.run_id!r} must be 1-128 letters, digits, '.', '_' or '-' (no path separators)"
            )
        check_training_length(self.train, self.model)
        self.train.check_events()
        num_timesteps, num_samples = self.diffusion.num_timesteps, self.sample.num_samples
        check_sampler(self.sample.sampler, self.diffusion)
        check_loss_weighting(self.train.loss_weighting, self.diffusion)
        check_distill(self.distill, self.train, num_timesteps)
        check_autoguidance(self.sample, self.train, self.distill)
        check_latent(self)
        if self.tune.enabled and self.data.holdout_fraction <= 0:
            raise ConfigError("tune.enabled needs data.holdout_fraction > 0: trials are ranked on held-out images")
        if len(self.train.ema_candidates) > 1 and self.data.holdout_fraction <= 0:
            raise ConfigError(
                f"train.ema_sigma_rel {list(self.train.ema_candidates)} needs data.holdout_fraction > 0: the "
                "candidates are scored on held-out images (or give one number)"
            )
        if not 2 <= self.train.ema_choice_timesteps <= num_timesteps:
            raise ConfigError(
                f"train.ema_choice_timesteps must be in [2, {num_timesteps}] (a Monte Carlo estimate with a standard "
                f"error), got {self.train.ema_choice_timesteps}"
            )
        evaluate = self.evaluate
        if evaluate.nll and evaluate.nll_split is NllSplit.HOLDOUT and self.data.holdout_fraction <= 0:
            raise ConfigError(
                "evaluate.nll with evaluate.nll_split=holdout needs data.holdout_fraction > 0 "
                "(or set evaluate.nll_split=test, or evaluate.nll=false)"
            )
        if evaluate.nll_timesteps is not None and not 2 <= evaluate.nll_timesteps <= num_timesteps:
            raise ConfigError(
                f"evaluate.nll_timesteps must be null (all terms) or in [2, {num_timesteps}], "
                f"got {evaluate.nll_timesteps}"
            )
        if evaluate.inception_score and evaluate.inception_score_splits > num_samples:
            raise ConfigError(
                f"evaluate.inception_score_splits {evaluate.inception_score_splits} exceeds sample.num_samples "
                f"{num_samples}"
            )
        class_keys = {
            "sample.classes": self.sample.classes is not None,
            "evaluate.guidance_scales": bool(evaluate.guidance_scales),
            "sample.guidance_interval": self.sample.guidance_interval is not None,
        }
        given = [key for key, present in class_keys.items() if present]
        if not self.model.conditional and given:
            other = " (autoguidance's interval is sample.autoguidance_interval)" if "interval" in given[0] else ""
            raise ConfigError(f"{given[0]} needs a class-conditional model: set model.conditional=true{other}")
        if (
            evaluate.precision_recall
            and min(evaluate.precision_recall_samples, num_samples) <= evaluate.precision_recall_k
        ):
            raise ConfigError(
                f"evaluate.precision_recall needs more than precision_recall_k={evaluate.precision_recall_k} samples"
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, with the keys users write (the resolved ``config.yaml``, MLflow params)."""
        plain: dict[str, Any] = to_plain(self)
        return plain
