"""register: log the EMA snapshot (or the distill stage's student, as a version of ``<register.model_name>-<N>step``)
as an MLflow pyfunc model, register a version, set alias ``challenger``, and move alias ``champion`` to it when its FID
beats the current champion's by more than ``register.promotion_margin`` under the same protocol (the champion
re-scored by evaluate in this run, or its recorded FID when the protocol hash matches), or when there is no champion.
A champion scored under another protocol is never compared: the decision says so."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import Dataset, Metric
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from ddpm_core.memorization import CopyRate
from ddpm_core.samplers import SamplerConfig
from ddpm_core.storage import filesystem, verify_committed
from ddpm_core.unet import UNetConfig
from pipelines.config import PipelineConfig, RegisterSection, registered_model_name
from pipelines.context import StageContext, StageStopped
from pipelines.contracts import (
    AutoencoderOutputs,
    Autoguidance,
    ChampionRef,
    DistillOutputs,
    EvaluateOutputs,
    LatentOutputs,
    PrepareOutputs,
    RegisterOutputs,
    SampleOutputs,
    TrainOutputs,
)
from pipelines.data.recorded import log_training_data, training_dataset
from pipelines.evaluation.report import SCORES_RUN_TAG, as_markdown, link_scores, score_lines
from pipelines.external import External
from pipelines.registry.champion import (
    COMPARED_WITH_TAG,
    CONFIG_TAG,
    DATA_SOURCE_TAG,
    SNAPSHOT_TAG,
    Champion,
    champion_version,
    current_champion,
)

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
Upstream = tuple[PrepareOutputs, TrainOutputs, EvaluateOutputs]
# the pyfunc's params (method: ancestral, ddim, dpm_solver++_2m, heun; spacing: a samplers.Spacing); a logged model's
# sampling defaults are the evaluated sampler's (sampler_defaults).
# pipelines/registry/serving.py holds the same: it is logged as the model's code, which imports no pipeline module
SAMPLING_PARAMS = {
    "seed": 0,
    "method": "ddim",
    "num_steps": 50,
    "eta": 0.0,
    "spacing": "",  # "": the method's own (ddpm_core.samplers.Method.default_spacing)
    "progressive_frames": 0,
}


@dataclass(frozen=True)
class RegisterSettings:
    register: RegisterSection
    champion: ChampionRef  # the champion this run's model is compared with, resolved before the run


def settings(config: PipelineConfig, external: External) -> RegisterSettings:
    return RegisterSettings(config.register, external.champion(registered_model_name(config)))


def run(
    context: StageContext,
    settings: RegisterSettings,
    prepare: PrepareOutputs,
    autoencoder: AutoencoderOutputs | None,
    train: TrainOutputs,
    sample: SampleOutputs,
    evaluate: EvaluateOutputs,
    distill: DistillOutputs | None,
) -> RegisterOutputs:
    name, client = settings.champion.model_name, context.client  # a student's: <register.model_name>-<N>step
    champion = compared_champion(context, settings.champion)  # before this version takes any alias
    model = registered_snapshot(train, sample, distill)
    latent = autoencoder.latent if autoencoder is not None else None
    version, model_id = log_model(context, name, (prepare, latent), model, evaluate)
    tag_version(context, (name, version), prepare, evaluate, settings.champion)
    client.set_model_version_tag(name, version, SNAPSHOT_TAG, model.snapshot_uri)
    if distill is not None:
        tag_student(context, (name, version), settings.register.model_name, distill)
    client.set_registered_model_alias(name, "challenger", version)
    challenger = Challenger.of(evaluate, prepare.data_source)
    promote, reason = decide(challenger, settings.register, champion)
    if promote:
        client.set_registered_model_alias(name, "champion", version)
    decision = ("promoted to champion: " if promote else "champion kept: " if champion else "not promoted: ") + reason
    client.set_tag(context.mlflow_run_id, "registry.decision", decision)
    client.set_model_version_tag(name, version, "registry.decision", decision)
    describe_version(context, (name, version, model_id), (prepare, train, evaluate), decision + model.note)
    context.log(f"register: {name} v{version} -> challenger" + (", champion" if promote else "") + f" ({reason})")
    return RegisterOutputs(
        model_name=name,
        version=version,
        promoted=promote,
        reason=reason,
        previous_champion=champion.version if champion else None,
        challenger_fid=evaluate.scores.fid,
        champion_fid=challenger.rescored[1] if challenger.rescored else (champion.fid if champion else None),
        model_uri=f"models:/{name}/{version}",
    )


@dataclass(frozen=True)
class RegisteredSnapshot:
    """The weights a version holds: the sampled ones (the train stage's EMA snapshot, with its autoguidance guide where
    the sample stage added one), or the distill stage's student."""

    snapshot_uri: str
    unet: UNetConfig
    note: str  # a sentence for the version's description ("": the trained model itself)
    autoguidance: Autoguidance | None = None


def registered_snapshot(
    train: TrainOutputs, sample: SampleOutputs, distill: DistillOutputs | None
) -> RegisteredSnapshot:
    if distill is None and sample.autoguidance is not None:
        note = (
            f"\n\nSampled {sample.autoguidance.described()}: the guide's weights are stored beside the model's, and "
            "the `autoguidance_weight` param sets w (1: unguided, one network call per step instead of two)."
        )
        return RegisteredSnapshot(sample.snapshot_uri, train.config.unet, note, sample.autoguidance)
    if distill is None:
        return RegisteredSnapshot(train.snapshot_uri, train.config.unet, "")
    note = (
        f"\n\nA {distill.steps}-step student, distilled ({distill.method}) from `{distill.teacher_snapshot_uri}` in "
        f"{distill.images_seen:,} images (its teacher trained on {train.images_seen:,}); by default it samples in "
        f"{distill.steps} DDIM step{'' if distill.steps == 1 else 's'}."
    )
    return RegisteredSnapshot(distill.snapshot_uri, distill.config.unet, note)


def tag_student(context: StageContext, version: tuple[str, str], teacher_model: str, distill: DistillOutputs) -> None:
    """A student's provenance as tags: its NFE, method, teacher snapshot, and the teacher's registered version (the
    version of ``register.model_name`` holding the same snapshot, registered by a run with distillation off)."""
    teacher = teacher_version(context.client, teacher_model, distill.teacher_snapshot_uri)
    tags = {
        "nfe": distill.sampler.method.network_evaluations(distill.steps),
        "method": distill.method,
        "teacher_snapshot": distill.teacher_snapshot_uri,
        "teacher_version": f"{teacher_model}/{teacher}" if teacher else "none (the teacher is not registered)",
    }
    for key, value in tags.items():
        context.client.set_model_version_tag(*version, key, str(value))


def teacher_version(client: MlflowClient, name: str, snapshot_uri: str) -> str | None:
    """The newest version of ``name`` whose weights are ``snapshot_uri`` (its ``snapshot_uri`` tag), if any."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    found = [v.version for v in versions if v.tags.get(SNAPSHOT_TAG) == snapshot_uri]
    return max(found, key=int) if found else None


def compared_champion(context: StageContext, resolved: ChampionRef) -> Champion | None:
    """The champion resolved before the run (this stage's input), after checking that the alias has not moved to
    another run's version since: a decision against a champion that is no longer one would be wrong."""
    client, name = context.client, resolved.model_name
    now = current_champion(client, name)
    if now is not None and now.version != resolved.version and now.run_id != context.store.run_id:
        raise StageStopped(
            f"the champion of {name} changed while this run ran (v{resolved.version or ' none'} when it started, "
            f"v{now.version} now): run the same command again to compare with v{now.version}"
        )
    return champion_version(client, name, resolved.version) if resolved.version else None


def tag_version(
    context: StageContext,
    version: tuple[str, str],
    prepare: PrepareOutputs,
    evaluate: EvaluateOutputs,
    compared_with: ChampionRef,
) -> None:
    """What a later run reads of its champion, as tags: the FID and its standard error (the promotion test's inputs,
    at full precision; every score is on the evaluate run), the protocol, the data and the provenance."""
    scores = evaluate.scores
    tags = {
        "fid": scores.fid,
        "fid_stderr": scores.fid_stderr,
        "protocol_hash": evaluate.protocol_hash,
        "ddpm.run_id": context.store.run_id,
        "extractor_id": evaluate.protocol.extractor_id,
        "data_fingerprint": prepare.fingerprint,
        "data_listing": prepare.source_listing,
        DATA_SOURCE_TAG: prepare.data_source,
        COMPARED_WITH_TAG: compared_with.version or "none",
        CONFIG_TAG: context.config_digest,
    }
    if evaluate.protocol.conditioning is not None:
        tags["guidance_scale"] = evaluate.protocol.conditioning.guidance_scale
        interval = evaluate.protocol.conditioning.interval  # None (every step): no tag
        tags["guidance_interval"] = None if interval is None else str(list(interval))
        tags["conditional_accuracy"] = evaluate.scores.conditional_accuracy
    if evaluate.memorization is not None:  # the copy-rate gate's input (pipelines.registry.champion.copy_rate_of)
        copies = evaluate.memorization.copy_rate
        tags.update(copy_rate=copies.rate, copy_rate_ci_low=copies.low, copy_rate_ci_high=copies.high)
    for key, value in tags.items():
        if value is not None:
            context.client.set_model_version_tag(*version, key, str(value))


def log_model(
    context: StageContext,
    name: str,
    data: tuple[PrepareOutputs, LatentOutputs | None],
    model: RegisteredSnapshot,
    evaluate: EvaluateOutputs,
) -> tuple[str, str]:
    """The snapshot as an MLflow pyfunc model (code: ``pipelines/registry/serving.py`` + ``ddpm_core``) in this stage's
    run, registered as a new version of ``name``; returns (version, logged model id). Its sampling defaults are the
    evaluated sampler's (a student's: DDIM at its steps). A conditional model's signature takes a ``label`` column and
    a ``guidance_scale`` param (default: the scale it was evaluated with). ``data``: the prepared data and a latent
    model's latents."""
    unet, snapshot_uri, conditioning = model.unet, model.snapshot_uri, evaluate.protocol.conditioning
    prepare, latent = data  # a latent model's latents: the pyfunc decodes with their autoencoder
    verify_committed(snapshot_uri, context.store.options)  # never register a corrupt snapshot
    mlflow.set_tracking_uri(context.tracking_uri)
    params = {**SAMPLING_PARAMS, **sampler_defaults(evaluate.protocol.sampler)}
    example = pd.DataFrame({"index": [0, 1]})
    # Rows the pyfunc samples at once (pipelines/registry/serving.py's default); logged so that a loader may set it
    # (load_model(uri, model_config={"batch_size": N}): MLflow takes no model_config where none was logged).
    model_config: dict[str, Any] = {"batch_size": 64}
    if model.autoguidance is not None:
        params["autoguidance_weight"] = model.autoguidance.weight
    if unet.num_classes is not None and conditioning is not None:
        guidance = conditioning.guidance_scale
        params["guidance_scale"] = guidance
        example["label"] = [0, unet.num_classes - 1]
        interval = None if conditioning.interval is None else list(conditioning.interval)
        model_config.update(guidance_scale=guidance, guidance_interval=interval)
        model_config.update(class_names=list(prepare.class_names or ()))
    with tempfile.TemporaryDirectory() as directory:
        artifacts = copied_artifacts(directory, snapshot_uri, latent, context.store.options)
        output = np.zeros((2, *image_shape(unet, latent)), np.uint8)
        signature = infer_signature(example, output, params=params)
        with mlflow.start_run(run_id=context.mlflow_run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PACKAGE_ROOT / "pipelines" / "registry" / "serving.py"),
                artifacts=artifacts,
                code_paths=[str(PACKAGE_ROOT / "ddpm_core")],
                signature=signature,
                model_config=model_config,
                registered_model_name=name,
                pip_requirements=[
                    f"torch=={torch.__version__.split('+')[0]}",
                    "numpy",
                    "pandas",
                    "safetensors",
                    "fsspec",
                    "pillow",
                    f"mlflow=={mlflow.__version__}",
                ],
            )
    return str(info.registered_model_version), info.model_id


def copied_artifacts(
    directory: str, snapshot_uri: str, latent: LatentOutputs | None, options: dict[str, Any]
) -> dict[str, str]:
    """The pyfunc's artifacts, copied into ``directory``: the snapshot, and a latent model's autoencoder folder (its
    decoder turns the samples into images), so that the registered model needs nothing outside itself."""
    sources = {"snapshot": snapshot_uri}
    if latent is not None:
        sources["autoencoder"] = latent.space.autoencoder_uri
    artifacts = {}
    for name, uri in sources.items():
        artifacts[name] = os.path.join(directory, name)
        fs, path = filesystem(uri, options)
        fs.get(f"{path.rstrip('/')}/", artifacts[name], recursive=True)
    return artifacts


def image_shape(unet: UNetConfig, latent: LatentOutputs | None) -> tuple[int, int, int]:
    """``[H, W, C]`` of the images the pyfunc returns: the U-Net's, or a latent model's decoded images."""
    if latent is None:
        return (unet.image_size, unet.image_size, unet.in_channels)
    return latent.image_shape


def sampler_defaults(sampler: SamplerConfig) -> dict[str, Any]:
    """The pyfunc's sampling defaults: the sampler its scores were measured with (a caller's params override them)."""
    return {
        "method": sampler.method.value,
        "num_steps": sampler.num_steps or 0,  # 0: every one of the T steps
        "eta": sampler.eta,
        "spacing": sampler.timestep_spacing.value,
    }


def stage_run_links(context: StageContext, scores_run_id: str = "") -> dict[str, str]:
    """UI links (relative to the MLflow UI's root) to this pipeline run's parent, train and evaluate runs (the
    evaluate run ``scores_run_id`` when given, else the latest of the pipeline run)."""
    run = context.client.get_run(context.mlflow_run_id)
    experiment, run_id = run.info.experiment_id, context.store.run_id
    view = "?workflowType=machine_learning"  # MLflow 3's UI: the model-training view, not GenAI's
    links = {"pipeline": f"#/experiments/{experiment}/runs/{run.data.tags['mlflow.parentRunId']}{view}"}
    if scores_run_id:
        links["evaluate"] = f"#/experiments/{experiment}/runs/{scores_run_id}{view}"
    for stage in ("train", "evaluate")[: 1 if scores_run_id else 2]:
        found = context.client.search_runs(
            [experiment],
            f"tags.`ddpm.run_id` = '{run_id}' and tags.`ddpm.stage` = '{stage}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if found:
            tab = "/model-metrics" if stage == "train" else ""  # the training curves, or the scores and protocol
            links[stage] = f"#/experiments/{experiment}/runs/{found[0].info.run_id}{tab}{view}"
    return links


def version_description(context: StageContext, upstream: Upstream, decision: str) -> str:
    """Markdown for the model version page: data, architecture, sampler, the headline scores with their
    uncertainty and floor, the decision, and links to the runs that hold the curves and the scores."""
    prepare, train, evaluate = upstream
    diffusion = train.config.diffusion
    fid = score_lines(evaluate)[0]
    lines = [
        f"{fid.label} {fid.text}",  # plain text: the versions table shows a description's first line unrendered
        "",
        f"DDPM on `{prepare.source_uri}` (fingerprint `{prepare.fingerprint[:12]}`, {prepare.num_train:,} training "
        f"images): U-Net preset `{train.config.preset}`"
        + (f", class-conditional ({train.num_classes} classes)" if train.num_classes else "")
        + f", {diffusion.num_timesteps} steps {diffusion.schedule.value} schedule, "
        f"{train.images_seen:,} training images.",
        "",
        *as_markdown(score_lines(evaluate)[1:]),  # the FID is the first line
    ]
    found = stage_run_links(context, evaluate.scores_run_id)
    links = " · ".join(f"[{name} run]({url})" for name, url in found.items())
    if "evaluate" in found:
        lines += [
            "",
            f"Every score, with its interval and protocol, is a metric of the [evaluate run]({found['evaluate']}).",
        ]
    lines += ["", f"Registry: {decision}", "", f"Runs: {links}"]
    return "\n".join(lines)


def describe_version(
    context: StageContext, registered: tuple[str, str, str], upstream: Upstream, decision: str
) -> None:
    """Descriptions on the version and (once) the registered model; the scores' one home, the evaluate run, named on
    the version and this run (tag ``ddpm.scores_run_id``, a link in their descriptions) and linked to the logged
    model (:func:`link_model_scores`); the sampling protocol as the logged model's params; the training data as this
    run's dataset input. ``registered``: (model name, version, model id)."""
    (name, version, model_id), client = registered, context.client
    prepare, _, evaluate = upstream
    client.update_model_version(name, version, version_description(context, upstream, decision))
    if not client.get_registered_model(name).description:
        client.update_registered_model(
            name,
            f"DDPM image diffusion models trained by ddpm-pipeline on `{prepare.source_uri}`. Alias `champion`: "
            "the version to serve; `challenger`: the latest. Each version's description has its scores, their "
            "uncertainty and links to its runs.",
        )
    home = scores_run(context, evaluate)
    link_model_scores(client, home, model_id, training_dataset(prepare))
    link_scores(client, context.mlflow_run_id, home, evaluate)
    client.set_model_version_tag(name, version, SCORES_RUN_TAG, home)
    log_training_data(client, context.mlflow_run_id, prepare)  # what the registered model was trained on
    mlflow.set_tracking_uri(context.tracking_uri)
    protocol = {f"protocol.{key}": str(value) for key, value in evaluate.protocol.flat().items()}
    mlflow.log_model_params({**protocol, "protocol_hash": evaluate.protocol_hash}, model_id=model_id)


def scores_run(context: StageContext, evaluate: EvaluateOutputs) -> str:
    """The evaluate run that holds the scores (the latest evaluate run of this pipeline run for outputs committed
    before they named it)."""
    if evaluate.scores_run_id:
        return evaluate.scores_run_id
    url = stage_run_links(context)["evaluate"]
    return url.split("/runs/", 1)[1].split("/", 1)[0].split("?", 1)[0]


def link_model_scores(client: MlflowClient, home: str, model_id: str, dataset: Dataset) -> None:
    """The logged model's metrics, without a second copy of any score: each of the evaluate run's score entries is
    logged again with the same key, value, timestamp and step, now naming the model (and the data its FID is
    measured against). MLflow keeps one entry per (key, value, timestamp, step) in a run, so the evaluate run's
    history is unchanged, while the model's page lists the scores with the evaluate run as their source."""
    entries = []
    for key in client.get_run(home).data.metrics:
        last = client.get_metric_history(home, key)[-1]
        entries.append(Metric(key, last.value, last.timestamp, last.step, model_id, dataset.name, dataset.digest))
    client.log_batch(home, metrics=entries)


@dataclass(frozen=True)
class Challenger:
    """What the promotion rule knows of this run's model (from the evaluate stage)."""

    fid: float
    fid_stderr: float | None  # jackknife standard error
    protocol_hash: str
    rescored: tuple[ChampionRef, float] | None = None  # the champion re-scored under this protocol, and its FID
    difference_stderr: float | None = None  # paired jackknife stderr of fid minus the re-scored champion's
    data_source: str | None = None  # the data set it was trained on (PrepareOutputs.data_source)
    copy_rate: CopyRate | None = None  # its copy rate in the extractor's feature space (None: not scored)

    @classmethod
    def of(cls, evaluate: EvaluateOutputs, data_source: str) -> Challenger:
        scores = evaluate.scores
        rescored = None
        if evaluate.rescored_champion is not None and scores.fid_champion is not None:
            rescored = (evaluate.rescored_champion, scores.fid_champion)
        stderr = scores.fid_minus_champion_stderr
        copies = evaluate.memorization.copy_rate if evaluate.memorization is not None else None
        return cls(scores.fid, scores.fid_stderr, evaluate.protocol_hash, rescored, stderr, data_source, copies)


@dataclass(frozen=True)
class Evidence:
    """The champion's FID the challenger is compared with, and the standard error of their difference."""

    champion_fid: float
    basis: str  # how the champion's FID was obtained
    stderr: float | None  # of challenger FID - champion FID (None: unknown)
    stderr_basis: str


def evidence(challenger: Challenger, champion: Champion) -> Evidence | None:
    """The champion re-scored in this run (paired with the challenger's samples), else its recorded FID when the
    protocol hash matches (independent sets: the standard errors add in quadrature); None when not comparable."""
    if challenger.rescored is not None and challenger.rescored[0] == ChampionRef(champion.model_name, champion.version):
        return Evidence(
            challenger.rescored[1],
            "re-scored under this run's protocol",
            challenger.difference_stderr,
            "paired jackknife on shared sample indices",
        )
    if champion.protocol_hash != challenger.protocol_hash or champion.fid is None:
        return None
    if challenger.fid_stderr is None:
        return Evidence(champion.fid, "recorded under the same protocol", None, "no interval recorded")
    if champion.fid_stderr is None:
        basis = "the challenger's alone: the champion has no recorded stderr"
        return Evidence(champion.fid, "recorded under the same protocol", challenger.fid_stderr, basis)
    combined = (challenger.fid_stderr**2 + champion.fid_stderr**2) ** 0.5
    return Evidence(champion.fid, "recorded under the same protocol", combined, "independent sets, in quadrature")


def other_data(challenger: Challenger, champion: Champion) -> bool:
    """Whether the two models were trained on different data sets (a champion that records none is compared)."""
    known = champion.data_source is not None and challenger.data_source is not None
    return known and champion.data_source != challenger.data_source


def copy_gate(challenger: Challenger, rule: RegisterSection, champion: Champion | None) -> str | None:
    """Why the challenger may not be promoted whatever its FID (None: the gate passes): its copy rate (Carlini et al.
    2023) is above ``register.max_copy_rate``, or significantly above the champion's (its 95% Wilson interval's lower
    end above the champion's upper end; compared only under the same protocol, on the same data, and with a champion
    that records a copy rate: an older champion is held to the ceiling alone)."""
    copies = challenger.copy_rate
    if copies is None:
        return None
    rate = (
        f"copy rate {copies.rate:.3f} (95% interval {copies.low:.3f} to {copies.high:.3f}, {copies.count} of "
        f"{copies.total} samples)"
    )
    if rule.max_copy_rate is not None and copies.rate > rule.max_copy_rate:
        return f"{rate} is above register.max_copy_rate {rule.max_copy_rate:g}: not promoted whatever its FID"
    theirs = champion.copy_rate if champion is not None else None
    if champion is None or theirs is None or other_data(challenger, champion):
        return None
    if champion.protocol_hash == challenger.protocol_hash and copies.low > theirs.high:
        return (
            f"{rate} is significantly above champion v{champion.version}'s {theirs.rate:.3f} (interval "
            f"{theirs.low:.3f} to {theirs.high:.3f}): not promoted whatever its FID"
        )
    return None


def decide(challenger: Challenger, rule: RegisterSection, champion: Champion | None) -> tuple[bool, str]:
    """(promote?, reason). A challenger that copies its training images (:func:`copy_gate`) is never promoted.
    Otherwise it must lower the champion's FID, under the same protocol, by more than ``rule.promotion_margin``
    *and* by more than ``rule.promotion_z`` standard errors of the difference (a one-sided test at z; 1.96: 2.5%
    chance of promoting an equal model by noise). The reason states both numbers."""
    refused = copy_gate(challenger, rule, champion)
    if refused is not None:
        return False, refused
    if champion is None:
        return True, "no champion yet"
    if other_data(challenger, champion):
        return False, (
            f"champion v{champion.version} was trained on other data ({champion.data_source}; this model: "
            f"{challenger.data_source}): a model of another data set is registered, never compared or promoted"
        )
    found = evidence(challenger, champion)
    if found is None:
        return (
            False,
            f"champion v{champion.version} was scored under another protocol ({champion.protocol_hash}); not compared",
        )
    improvement = found.champion_fid - challenger.fid
    noise = rule.promotion_z * found.stderr if found.stderr is not None else 0.0
    beats_margin, beats_noise = improvement > rule.promotion_margin, improvement > noise
    verdict = "<" if beats_margin and beats_noise else ">="
    noise_text = (
        f"{rule.promotion_z:g} x stderr {found.stderr:.4f} = {noise:.4f} ({found.stderr_basis})"
        if found.stderr is not None
        else f"no stderr ({found.stderr_basis})"
    )
    return beats_margin and beats_noise, (
        f"FID {challenger.fid:.4f} {verdict} champion v{champion.version}'s {found.champion_fid:.4f} ({found.basis}): "
        f"improvement {improvement:.4f} {'>' if beats_margin else '<='} margin {rule.promotion_margin:g} and "
        f"{'>' if beats_noise else '<='} {noise_text}"
    )
