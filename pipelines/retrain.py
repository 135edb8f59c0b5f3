"""Scheduled retraining: one run per schedule time, skipped when the data did not change since the champion was
trained, otherwise trained (warm-started from the champion when configured), evaluated under one protocol with
the champion re-scored beside it, and promoted only when better by ``register.promotion_margin``."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ddpm_core.data import source_identity
from ddpm_core.storage import commit, read_committed
from pipelines.config import ConfigError, PipelineConfig
from pipelines.config_file import with_overrides
from pipelines.contracts import PrepareOutputs, RegisterOutputs
from pipelines.registry.champion import Champion
from pipelines.runs import RunStore
from pipelines.tracking import Tracker
from pipelines.typed import from_plain, to_plain

if TYPE_CHECKING:
    from pipelines.dag import Results

DECISION_DIR, DECISION_FILE = "retrain", "decision.json"  # {run root}/retrain/decision.json, committed


@dataclass(frozen=True)
class RetrainOutcome:
    run_id: str
    decision: str  # skipped | promoted | kept
    reason: str
    challenger_fid: float | None = None
    champion_fid: float | None = None


@dataclass(frozen=True)
class RetrainDecision(RetrainOutcome):
    """The outcome as committed in the run root (``retrain/decision.json``): what ``status`` shows."""

    scheduled_at: str = ""  # ISO 8601
    data_fingerprint: str = ""
    model_version: str | None = None  # the version registered by this run (none when skipped)


def scheduled_run_id(base: str, scheduled_at: dt.datetime) -> str:
    """``<run_id>-<UTC schedule time to the minute>``: a schedule tick maps to one run root, so a second job for the
    same tick finds the first one's lease (or its finished stages) instead of starting over."""
    return f"{base}-{scheduled_at.astimezone(dt.timezone.utc):%Y%m%dT%H%MZ}"


def parse_schedule_time(value: str | None) -> dt.datetime:
    if not value:
        return dt.datetime.now(dt.timezone.utc)
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--schedule-time {value!r} is not an ISO 8601 time such as 2026-11-23T02:00Z") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def record_decision(store: RunStore, decision: RetrainDecision) -> None:
    commit(
        f"{store.root}/{DECISION_DIR}",
        {DECISION_FILE: json.dumps(to_plain(decision), indent=2).encode()},
        {"kind": "retrain_decision"},
        store.options,
    )


def read_decision(store: RunStore) -> RetrainDecision | None:
    try:
        data = json.loads(
            read_committed(f"{store.root}/{DECISION_DIR}", [DECISION_FILE], store.options)[0][DECISION_FILE]
        )
    except FileNotFoundError:
        return None
    return from_plain(RetrainDecision, data, DECISION_FILE)


def retrain(config: PipelineConfig, scheduled_at: dt.datetime, log: Callable[[str], None] = print) -> RetrainOutcome:
    """Run one scheduled retraining of ``config`` (whose run_id is the base name) under a lease on its run root."""
    from pipelines.preflight import hold_run_root

    if not config.register.enabled:
        raise ConfigError("retrain needs register.enabled: the decision is a promotion in the model registry")
    config = with_overrides(config, {"run_id": scheduled_run_id(config.run_id, scheduled_at)})
    store = RunStore.of(config)
    with hold_run_root(store, config, log):
        recorded = read_decision(store)
        if recorded is not None:  # this tick already ran to a decision: report it, change nothing
            log(f"retrain: {config.run_id} already decided: {recorded.decision}: {recorded.reason}")
            return RetrainOutcome(
                recorded.run_id, recorded.decision, recorded.reason, recorded.challenger_fid, recorded.champion_fid
            )
        return decide_and_run(config, store, scheduled_at, log)


def decide_and_run(
    config: PipelineConfig, store: RunStore, scheduled_at: dt.datetime, log: Callable[[str], None]
) -> RetrainOutcome:
    """Skip when the data did not change since the champion was trained, else run the pipeline (warm-started from the
    champion when configured) and record what the register stage decided. Whether the data changed is read from a
    listing of its files (names, sizes, versions) and compared with the champion's; a changed listing runs prepare,
    whose content fingerprint decides. No image is read on the driver either way."""
    from pipelines.dag import run_pipeline
    from pipelines.preflight import reach_named
    from pipelines.registry.champion import champion_snapshot_uri, current_champion

    tracker = Tracker(config)
    champion = current_champion(tracker.client, config.register.model_name)
    reach_named("data.uri", config.data.uri, config.storage.options(), log)
    listing = source_identity(config.data.uri, config.storage.options())
    schedule = Schedule(config, store, tracker, scheduled_at.isoformat(), log)
    tags = {
        "ddpm.retrain.scheduled_at": schedule.when,
        "ddpm.data_listing": listing,
        "ddpm.retrain.champion_version": champion.version if champion else "none",
    }
    checks = champion is not None and config.retrain.if_data_changed
    if champion is not None and checks and champion.data_listing == listing:
        return schedule.skip(champion, f"the same files, sizes and versions (listing {listing[:12]}); none was read")
    if champion is not None and config.retrain.warm_start:
        snapshot = champion_snapshot_uri(store, tracker.tracking_uri, config.register.model_name, champion.version)
        config = with_overrides(config, {"train.init_from": snapshot})
        log(f"retrain: warm start from champion v{champion.version}")
    if champion is not None and checks:
        prepared = run_pipeline(config, log=log, parent_tags=tags, until="prepare").outputs(PrepareOutputs)
        if prepared is not None and prepared.fingerprint == champion.data_fingerprint:
            return schedule.skip(
                champion, f"its files changed but hold the same images (fingerprint {prepared.fingerprint[:12]})"
            )
    results = run_pipeline(config, log=log, parent_tags=tags)
    return schedule.record(results, tags)


@dataclass(frozen=True)
class Schedule:
    """One schedule tick's run: where it records its decision."""

    config: PipelineConfig
    store: RunStore
    tracker: Tracker
    when: str  # the tick, ISO 8601
    log: Callable[[str], None]

    def skip(self, champion: Champion, why: str) -> RetrainOutcome:
        """Nothing trained: the data is the champion's."""
        reason = f"data unchanged since champion v{champion.version}: {why}; nothing trained"
        name, run_id = self.config.register.model_name, self.config.run_id
        parent = self.tracker.parent_run(
            {"ddpm.retrain.scheduled_at": self.when, "ddpm.retrain.decision": f"skipped: {reason}"},
            f"Scheduled retrain `{run_id}` of `{name}`: skipped, {reason}.",
        )
        self.tracker.client.set_tag(parent, "ddpm.retrain.decision", f"skipped: {reason}")
        self.tracker.finish(parent, ok=True)
        decision = RetrainDecision(
            run_id, "skipped", reason, None, champion.fid, self.when, champion.data_fingerprint or ""
        )
        record_decision(self.store, decision)
        self.log(f"retrain: skipped: {reason}")
        return RetrainOutcome(run_id, "skipped", reason, champion_fid=champion.fid)

    def record(self, results: Results, tags: dict[str, str]) -> RetrainOutcome:
        """What the register stage decided, on the register and parent runs and in the run root."""
        register, prepared = results.manifest(RegisterOutputs), results.outputs(PrepareOutputs)
        if register is None or prepared is None:
            raise RuntimeError("retrain: the register stage did not run")
        registered = register.outputs
        decision = RetrainDecision(
            self.config.run_id,
            "promoted" if registered.promoted else "kept",
            registered.reason,
            registered.challenger_fid,
            registered.champion_fid,
            self.when,
            prepared.fingerprint,
            registered.version,
        )
        said = f"{decision.decision}: {decision.reason}"
        self.tracker.client.set_tag(register.mlflow_run_id, "ddpm.retrain.decision", said)
        parent = self.tracker.parent_run(tags)
        self.tracker.client.set_tag(parent, "ddpm.retrain.decision", said)
        self.tracker.finish(parent, ok=True)
        record_decision(self.store, decision)
        self.log(f"retrain: {said}")
        return RetrainOutcome(
            decision.run_id, decision.decision, decision.reason, decision.challenger_fid, decision.champion_fid
        )
