"""What a run holds, for ``python -m pipelines status`` and ``gc``: per stage, whether a committed result matches the
config (and which settings differ when not), the results of earlier configs kept until ``gc``, and what ``gc``
would remove."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ddpm_core.storage import filesystem
from pipelines.contracts import StageOutputs
from pipelines.dag import STAGES, committed
from pipelines.plan import PlannedStage
from pipelines.runs import FINGERPRINT_FOLDER, RunStore
from pipelines.tracking import flatten


def setting_differences(kept: dict[str, Any], planned: PlannedStage) -> str:
    """How a kept result's inputs differ from the planned stage's, in words: the settings that differ, else the
    upstream results it read."""
    old, new = flatten(kept.get("settings", {})), flatten(planned.hashed)
    keys = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    if keys:
        shown = ", ".join(f"{key} {old.get(key, '-')} (now {new.get(key, '-')})" for key in keys[:4])
        return shown + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
    upstream = kept.get("upstream", {})
    changed = [name for name, value in planned.upstream.items() if upstream.get(name) != value]
    return f"computed from other {', '.join(changed)} results" if changed else "same inputs"


def stage_lines(store: RunStore, planned: dict[str, PlannedStage], head: dict[str, str]) -> Iterator[str]:
    """One line per stage, each followed by a line per result of another config kept in the run."""
    for stage in STAGES:
        found = planned.get(stage.name)
        if found is None:
            yield f"  {stage.name:<9} disabled"
            continue
        manifest = committed(store, found)
        if manifest is None:
            yield f"  {stage.name:<9} not computed for this config (result {found.fingerprint[:FINGERPRINT_FOLDER]})"
        else:
            finished = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.finished_at))
            yield f"  {stage.name:<9} complete {finished}, matches this config  {stage_detail(manifest.outputs)}"
        for folder, kept in store.results(stage.name).items():
            if folder == found.fingerprint[:FINGERPRINT_FOLDER]:
                continue
            current = " (the run's head)" if head.get(stage.name, "")[:FINGERPRINT_FOLDER] == folder else ""
            state = "partial or unreadable" if kept is None else setting_differences(kept, found)
            yield f"      kept {folder}{current}: {state}"


@dataclass(frozen=True)
class Garbage:
    stage: str
    folder: str  # a result folder (or a file) under the stage's folder
    uri: str
    bytes: int


def garbage(store: RunStore, planned: dict[str, PlannedStage], head: dict[str, str]) -> list[Garbage]:
    """What no manifest of the run's current config or head references: results of other configs, partial results
    of them, and files of older layouts."""
    live = {(name, stage.fingerprint[:FINGERPRINT_FOLDER]) for name, stage in planned.items()}
    live |= {(name, fingerprint[:FINGERPRINT_FOLDER]) for name, fingerprint in head.items()}
    found = []
    for stage in STAGES:
        fs, root = filesystem(store.stage_uri(stage.name), store.options)
        if not fs.exists(root):
            continue
        for entry in sorted(fs.ls(root, detail=False)):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if (stage.name, name) not in live:
                uri = f"{store.stage_uri(stage.name)}/{name}"
                found.append(Garbage(stage.name, name, uri, int(fs.du(entry))))
    return found


def remove(store: RunStore, items: list[Garbage]) -> None:
    for item in items:
        fs, path = filesystem(item.uri, store.options)
        fs.rm(path, recursive=True)


def size_text(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def stage_detail(outputs: StageOutputs) -> str:
    """One line on what a finished stage produced."""
    from pipelines.contracts import (
        AutoencoderOutputs,
        DistillOutputs,
        EvaluateOutputs,
        PrepareOutputs,
        SampleOutputs,
        TrainOutputs,
        TuneOutputs,
    )

    if isinstance(outputs, PrepareOutputs):
        return f"{outputs.num_train} train images, fingerprint {outputs.fingerprint[:12]}"
    if isinstance(outputs, AutoencoderOutputs):
        made = f"trained on {outputs.images_seen} images" if outputs.trained else "loaded"
        rfid = f", rFID {outputs.rfid:.3f}" if outputs.rfid is not None else ""
        return f"autoencoder {made}, {outputs.latent.count} latents {outputs.latent.shape}{rfid}"
    if isinstance(outputs, TuneOutputs):
        return f"best of {outputs.trials} trials: {outputs.best_params}"
    if isinstance(outputs, TrainOutputs):
        return f"{outputs.images_seen} images seen"
    if isinstance(outputs, DistillOutputs):
        return f"a {outputs.steps}-step student from {outputs.images_seen} images ({len(outputs.rounds)} rounds)"
    if isinstance(outputs, SampleOutputs):
        return f"{outputs.num_samples} samples in {len(outputs.shard_uris)} shards"
    if isinstance(outputs, EvaluateOutputs):
        scores = outputs.scores
        stderr = f" +- {scores.fid_stderr:.3f}" if scores.fid_stderr is not None else ""
        floor = f", real-data floor {scores.fid_floor:.3f}" if scores.fid_floor is not None else ""
        untrained = f", untrained {scores.fid_untrained:.3f}" if scores.fid_untrained is not None else ""
        return f"FID {scores.fid:.3f}{stderr}{floor}{untrained}"
    return f"{outputs.model_name} v{outputs.version}; {outputs.reason}"
