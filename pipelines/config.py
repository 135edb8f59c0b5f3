"""One typed pipeline config: a YAML file plus ``section.key=value`` overrides, validated once at the edge.

Unknown keys and bad values fail before Ray starts, naming the key and what is allowed. The resolved config is
saved in the run root and logged to MLflow (secrets never live here: credentials come from the environment).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ddpm_core.diffusion import DiffusionConfig
from ddpm_core.samplers import SamplerConfig
from ddpm_core.training import OptimConfig
from ddpm_core.unet import PRESETS, UNetConfig, unet_preset
from ddpm_core.weights import check_sha256_spec


class ConfigError(ValueError):
    """A config problem, with the dotted key and the expectation in the message."""


@dataclass(frozen=True)
class DataSection:
    uri: str = "builtin:digits"  # any ddpm_core.data URI (file://, s3://, builtin:digits)
    split: str = "train"  # CIFAR-10 split
    holdout_fraction: float = 0.1  # share of images kept out of training (FID floor, held-out NLL)


@dataclass(frozen=True)
class ModelSection:
    preset: str = "digits"  # a ddpm_core.unet preset
    overrides: dict[str, Any] = field(default_factory=dict)  # UNetConfig fields replacing the preset's

    def unet(self) -> UNetConfig:
        return unet_preset(self.preset, **self.overrides)


def precision_name(use_gpu: bool, bf16_on_gpu: bool, bf16_on_cpu: bool) -> str:
    """The precision (a ``ddpm_core.precision`` name) of a section with ``bf16_on_gpu`` / ``bf16_on_cpu`` switches."""
    return "bf16" if (bf16_on_gpu if use_gpu else bf16_on_cpu) else "fp32"


@dataclass(frozen=True)
class TrainSection:
    num_workers: int = 2  # Ray Train data-parallel workers
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    batch_size: int = 128  # global batch, split across workers
    total_images: int = 100_000  # training length in images (EDM's kimg)
    checkpoint_every_images: int = 25_000
    log_every_images: int = 5_000
    grid_every_images: int = 50_000  # sample grid to MLflow (0: only at the end)
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    startup_retries: int = 10  # worker-group start attempts (60 s each) before failing: waits for autoscaling, never forever
    horizontal_flip: bool = False
    seed: int = 0
    lr: float = 1e-3
    warmup_images: int = 10_000
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    init_from: str | None = None  # snapshot URI whose weights start training (the retrain warm start)
    # Fast path (docs/benchmarks.md). bf16 autocast of the U-Net (the loss, gradients and AdamW stay float32): on GPU
    # workers, and on CPU workers only when asked: 1.2-1.7x faster with native bf16 (AVX512_BF16 or AMX), though it
    # cost the digits quickstart FID 0.632 -> 0.710; without native bf16 many times slower, and the workers warn.
    bf16_on_gpu: bool = True
    bf16_on_cpu: bool = False
    # These two off by default because neither helped where measured (2-core CPU).
    channels_last: bool = False  # NHWC activations (tensor-core friendly convolutions on GPUs)
    compile: bool = False  # torch.compile the U-Net for training (one-off compile time per worker start)
    # DDP's gradients as views into its all-reduce buckets: one gradient-sized buffer and one copy per step fewer, the
    # same numbers bit for bit (docs/benchmarks.md)
    gradient_as_bucket_view: bool = True

    def precision(self, use_gpu: bool) -> str:
        """The workers' precision name (``ddpm_core.precision``): ``bf16`` or ``fp32``."""
        return precision_name(use_gpu, self.bf16_on_gpu, self.bf16_on_cpu)

    def optim(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, warmup_images=self.warmup_images, grad_clip=self.grad_clip,
                           weight_decay=self.weight_decay, ema_decay=self.ema_decay, ema_warmup=self.ema_warmup)


@dataclass(frozen=True)
class TuneSection:
    """Hyperparameter search before the long training run (the tune stage)."""

    enabled: bool = False
    space: dict[str, Any] = field(default_factory=dict)  # dotted config key -> {choice|grid: [..]} or {uniform|loguniform: [lo, hi]}
    search_alg: str = "random"  # random | grid | optuna | hyperopt
    num_samples: int = 4  # trials drawn (random/optuna/hyperopt); with grid: repeats of the whole grid
    metric: str = "bpd"  # what ranks trials: bpd (NLL bound, bits/dim) or fid (proxy FID at the trial's end)
    trial_images: int = 16_384  # training length of one trial
    report_every_images: int = 2_048  # interval of the bits/dim report (ASHA's time unit)
    scheduler: str = "asha"  # asha | none
    grace_period_images: int = 4_096  # ASHA: no trial is stopped before this
    reduction_factor: int = 2
    max_concurrent_trials: int = 1
    workers_per_trial: int = 2
    cpus_per_worker: float = 0.5
    cpus_per_trial: float = 0.5  # the trial's own driver actor
    bpd_images: int = 128  # held-out images of the bits/dim estimate
    bpd_timesteps: int = 8  # Monte Carlo timesteps per image
    proxy_fid_samples: int = 500  # 0 disables the proxy FID
    proxy_fid_steps: int = 20  # DDIM steps of the proxy FID sample
    warm_start: bool = False  # train starts from the best trial's checkpoint


@dataclass(frozen=True)
class SampleSection:
    num_samples: int = 1_000
    batch_size: int = 250  # images per shard (one task)
    num_workers: int = 2  # sampling actors (one per GPU on a GPU cluster)
    method: str = "ddim"
    num_steps: int | None = 100
    eta: float = 0.0
    spacing: str = "linspace"
    clip_denoised: bool = True
    seed: int = 1
    bf16_on_gpu: bool = True  # bf16 autocast of the U-Net in GPU sampling actors (the sampler's arithmetic stays float32)
    bf16_on_cpu: bool = False  # the same in CPU sampling actors (1.3x faster with native bf16: docs/benchmarks.md)
    compile: bool = False  # torch.compile (inductor, weights frozen) of the U-Net in each sampling actor

    def sampler(self) -> SamplerConfig:
        return SamplerConfig(method=self.method, num_steps=self.num_steps, eta=self.eta, spacing=self.spacing,
                             clip_denoised=self.clip_denoised)

    def execution(self, use_gpu: bool) -> dict[str, Any]:
        """How the sampling actors run the network (not what they compute): precision and compilation."""
        return {"precision": precision_name(use_gpu, self.bf16_on_gpu, self.bf16_on_cpu), "compile": self.compile}


@dataclass(frozen=True)
class EvaluateSection:
    """Scores of the sample set; see docs/evaluation.md for the protocol each one is logged with."""

    extractor: str = "classifier"  # classifier: a CNN trained on the data's labels (small data sets); inception: standard FID
    classifier_epochs: int = 15
    inception_weights_uri: str | None = None  # fsspec URI or path of pt_inception-2015-12-05-6726825d.pth (extractor=inception)
    inception_weights_sha256: str = "6726825d"  # its SHA-256, or a prefix (the one in the official file name by default)
    reference_stats_uri: str | None = None  # a published .npz with mu and sigma instead of statistics of the training split
    inception_score: bool = True  # Inception Score (with the classifier: the same formula on its logits)
    inception_score_splits: int = 10
    precision_recall: bool = True  # improved precision/recall (Kynkaanniemi et al. 2019) on the same features
    precision_recall_k: int = 3
    precision_recall_samples: int = 10_000  # at most this many real and as many generated images (the first of each set)
    nll: bool = True  # NLL bound in bits/dim of held-out real images
    nll_split: str = "holdout"  # holdout: data.holdout_fraction of data.uri; test: the data set's test split (CIFAR-10)
    nll_images: int | None = None  # None: the whole split
    nll_timesteps: int | None = None  # None: all T terms of the bound; K: unbiased estimate from K random timesteps
    nll_batch_size: int = 100
    grid_size: int = 100  # images in the sample grid artifact
    untrained_baseline: bool = True  # also score an untrained network under the same protocol
    rescore_champion: bool = True  # also score the registered champion under this run's protocol (fair comparison)


@dataclass(frozen=True)
class RegisterSection:
    enabled: bool = True
    model_name: str = "ddpm-digits"
    promotion_margin: float = 0.0  # promote only when FID < champion's FID - margin (both under the same protocol)


@dataclass(frozen=True)
class RetrainSection:
    """Scheduled retraining (``python -m pipelines retrain``)."""

    if_data_changed: bool = True  # skip (no training, no GPUs) when the data fingerprint equals the champion's
    warm_start: bool = True  # initialise from the champion's weights (else from scratch)
    lease_ttl_s: float = 120.0  # a crashed run's lease on its run root expires after this
    lease_wait_s: float = 0.0  # how long a second run of the same run root waits before giving up


@dataclass(frozen=True)
class StorageSection:
    root: str = "runs"  # fsspec URI or local path; a relative path is under the working directory
    endpoint_url: str | None = None  # S3-compatible endpoint (else AWS_ENDPOINT_URL / AWS default)
    region: str | None = None

    def options(self) -> dict[str, Any]:
        """fsspec storage options (credentials come from the standard AWS environment variables)."""
        if not self.root.startswith("s3://"):
            return {}
        client: dict[str, Any] = {}
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            client["endpoint_url"] = endpoint
        if self.region:
            client["region_name"] = self.region
        # Fail fast on an unreachable endpoint. Throttling and transient errors are retried twice over: botocore's
        # standard mode (3 attempts, exponential backoff: the AWS default) inside s3fs's own 5 tries of each call, which
        # rides out outages of several seconds and fails a permanent one within about half a minute.
        retries = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}
        return {"client_kwargs": client, "config_kwargs": retries}

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


@dataclass(frozen=True)
class PipelineConfig:
    run_id: str = "quickstart"
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    tune: TuneSection = field(default_factory=TuneSection)
    train: TrainSection = field(default_factory=TrainSection)
    sample: SampleSection = field(default_factory=SampleSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    register: RegisterSection = field(default_factory=RegisterSection)
    retrain: RetrainSection = field(default_factory=RetrainSection)
    storage: StorageSection = field(default_factory=StorageSection)
    mlflow: MlflowSection = field(default_factory=MlflowSection)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.value if isinstance(value, enum.Enum) else value


RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is tuple or annotation is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value  # enums and other types: checked by the dataclass itself


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {key!r}; allowed keys{' under ' + prefix if prefix else ''}: {', '.join(sorted(names))}")
    values = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = _build(annotation, value, key)
        else:
            values[name] = _check_type(value, annotation, key)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        message = str(error)
        raise ConfigError(message if message.startswith(prefix) or not prefix else f"{prefix}: {message}") from None


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML config (or the embedded default when ``path`` is None), apply ``key=value`` overrides
    (values parsed as YAML), and validate everything."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} must look like section.key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    config = _build(PipelineConfig, data, "")
    _validate(config)
    if config.tune.enabled:
        search_space_values(config)
    return config


def _validate(config: PipelineConfig) -> None:
    if not RUN_ID.match(config.run_id):
        raise ConfigError(f"run_id {config.run_id!r} must be 1-128 letters, digits, '.', '_' or '-' (no path separators)")
    if config.model.preset not in PRESETS:
        raise ConfigError(f"model.preset {config.model.preset!r} is not one of {', '.join(sorted(PRESETS))}")
    for build, library_prefix, key_prefix in ((config.model.unet, "unet.", "model.overrides."),
                                              (config.train.optim, "optim.", "train."),
                                              (config.sample.sampler, "sampler.", "sample.")):
        try:
            build()
        except ValueError as error:
            raise ConfigError(str(error).replace(library_prefix, key_prefix)) from None
    train, sample = config.train, config.sample
    positive = {"train.num_workers": train.num_workers, "train.batch_size": train.batch_size,
                "train.total_images": train.total_images, "train.checkpoint_every_images": train.checkpoint_every_images,
                "train.log_every_images": train.log_every_images, "sample.num_samples": sample.num_samples,
                "sample.batch_size": sample.batch_size, "sample.num_workers": sample.num_workers,
                "train.cpus_per_worker": train.cpus_per_worker}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    if train.batch_size % train.num_workers:
        raise ConfigError(f"train.batch_size {train.batch_size} must be a multiple of train.num_workers {train.num_workers}")
    if train.max_failures < 0 or train.grid_every_images < 0 or train.startup_retries < 0:
        raise ConfigError("train.max_failures, train.startup_retries and train.grid_every_images must be >= 0")
    if not 0.0 <= config.data.holdout_fraction < 0.5:
        raise ConfigError(f"data.holdout_fraction must lie in [0, 0.5), got {config.data.holdout_fraction}")
    tune = config.tune
    if tune.search_alg not in ("random", "grid", "optuna", "hyperopt"):
        raise ConfigError(f"tune.search_alg {tune.search_alg!r} is not one of random, grid, optuna, hyperopt")
    if tune.metric not in ("bpd", "fid"):
        raise ConfigError(f"tune.metric {tune.metric!r} is not one of bpd, fid")
    if tune.metric == "fid" and tune.proxy_fid_samples < 2:
        raise ConfigError("tune.metric=fid needs tune.proxy_fid_samples >= 2")
    if tune.scheduler not in ("asha", "none"):
        raise ConfigError(f"tune.scheduler {tune.scheduler!r} is not one of asha, none")
    for key in ("num_samples", "trial_images", "report_every_images", "max_concurrent_trials", "workers_per_trial",
                "bpd_images", "bpd_timesteps", "reduction_factor", "grace_period_images"):
        if getattr(tune, key) <= 0:
            raise ConfigError(f"tune.{key} must be > 0, got {getattr(tune, key)}")
    if tune.bpd_timesteps < 2:
        raise ConfigError("tune.bpd_timesteps must be >= 2 (the estimate's standard error needs two)")
    if tune.enabled and config.data.holdout_fraction <= 0:
        raise ConfigError("tune.enabled needs data.holdout_fraction > 0: trials are ranked on held-out images")
    if sample.num_steps is not None and sample.num_steps > config.diffusion.num_timesteps:
        raise ConfigError(f"sample.num_steps {sample.num_steps} exceeds diffusion.num_timesteps {config.diffusion.num_timesteps}")
    _validate_evaluate(config)
    if config.register.promotion_margin < 0:
        raise ConfigError(f"register.promotion_margin must be >= 0, got {config.register.promotion_margin}")
    if config.retrain.lease_ttl_s < 10 or config.retrain.lease_wait_s < 0:
        raise ConfigError("retrain.lease_ttl_s must be >= 10 and retrain.lease_wait_s >= 0")


def _validate_evaluate(config: PipelineConfig) -> None:
    evaluate = config.evaluate
    if evaluate.extractor not in ("classifier", "inception"):
        raise ConfigError(f"evaluate.extractor {evaluate.extractor!r} is not one of: classifier, inception")
    if evaluate.extractor == "inception" and not evaluate.inception_weights_uri:
        raise ConfigError("evaluate.extractor=inception needs evaluate.inception_weights_uri: the fsspec URI or path of "
                          "pt_inception-2015-12-05-6726825d.pth (see docs/evaluation.md, 'Inception weights')")
    try:
        check_sha256_spec(evaluate.inception_weights_sha256, "evaluate.inception_weights_sha256")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if evaluate.nll_split not in ("holdout", "test"):
        raise ConfigError(f"evaluate.nll_split {evaluate.nll_split!r} is not one of: holdout, test")
    if evaluate.nll and evaluate.nll_split == "holdout" and config.data.holdout_fraction <= 0:
        raise ConfigError("evaluate.nll with evaluate.nll_split=holdout needs data.holdout_fraction > 0 "
                          "(or set evaluate.nll_split=test, or evaluate.nll=false)")
    if evaluate.nll_timesteps is not None and not 2 <= evaluate.nll_timesteps <= config.diffusion.num_timesteps:
        raise ConfigError(f"evaluate.nll_timesteps must be null (all terms) or in [2, {config.diffusion.num_timesteps}], "
                          f"got {evaluate.nll_timesteps}")
    for key in ("inception_score_splits", "precision_recall_k", "precision_recall_samples", "nll_batch_size", "classifier_epochs"):
        if getattr(evaluate, key) <= 0:
            raise ConfigError(f"evaluate.{key} must be > 0, got {getattr(evaluate, key)}")
    if evaluate.nll_images is not None and evaluate.nll_images <= 0:
        raise ConfigError(f"evaluate.nll_images must be null (the whole split) or > 0, got {evaluate.nll_images}")
    if evaluate.inception_score and evaluate.inception_score_splits > config.sample.num_samples:
        raise ConfigError(f"evaluate.inception_score_splits {evaluate.inception_score_splits} exceeds sample.num_samples "
                          f"{config.sample.num_samples}")
    if evaluate.precision_recall and min(evaluate.precision_recall_samples, config.sample.num_samples) <= evaluate.precision_recall_k:
        raise ConfigError(f"evaluate.precision_recall needs more than precision_recall_k={evaluate.precision_recall_k} samples")


def with_overrides(config: PipelineConfig, overrides: dict[str, Any]) -> PipelineConfig:
    """``config`` with dotted-key values replaced (e.g. the tune stage's best parameters), validated again."""
    data = config.to_dict()
    for key, value in overrides.items():
        _set_dotted(data, key, value)
    resolved = _build(PipelineConfig, data, "")
    _validate(resolved)
    return resolved


DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform")


def search_space_values(config: PipelineConfig) -> dict[str, tuple[str, list[Any]]]:
    """Parse ``tune.space`` into {key: (distribution, values)} and check that every value it can produce is a valid
    config: candidate lists in full, and both ends of each range."""
    tune = config.tune
    if not tune.space:
        raise ConfigError("tune.space is empty: name at least one config key to search, e.g. train.lr: {loguniform: [1e-4, 1e-3]}")
    parsed: dict[str, tuple[str, list[Any]]] = {}
    for key, spec in tune.space.items():
        where = f"tune.space.{key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: expected one of {{{', '.join(f'{d}: [...]' for d in DISTRIBUTIONS)}}}, got {spec!r}")
        distribution, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{distribution}: expected a non-empty list, got {values!r}")
        if distribution in ("uniform", "loguniform"):
            if len(values) != 2:
                raise ConfigError(f"{where}.{distribution}: expected [low, high], got {values!r}")
            try:
                low, high = float(values[0]), float(values[1])
            except (TypeError, ValueError):
                raise ConfigError(f"{where}.{distribution}: bounds must be numbers, got {values!r}") from None
            if low > high:
                raise ConfigError(f"{where}.{distribution}: low {low:g} > high {high:g}")
            if distribution == "loguniform" and low <= 0:
                raise ConfigError(f"{where}.loguniform: bounds must be > 0, got {values!r}")
            values = [low, high]
        if distribution == "grid" and tune.search_alg != "grid" or distribution != "grid" and tune.search_alg == "grid":
            raise ConfigError(f"{where}: use 'grid' with tune.search_alg=grid and choice/uniform/loguniform otherwise")
        for value in values:
            try:
                with_overrides(config, {key: value})
            except ConfigError as error:
                raise ConfigError(f"{where}: value {value!r} is not a valid config: {error}") from None
        parsed[key] = (distribution, values)
    return parsed


def save_resolved(config: PipelineConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
