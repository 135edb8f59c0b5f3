"""A stage's fingerprint covers what it reads, by construction, and this proves it for every leaf key of the config.

For several base configs (the quickstart, tuned, class-conditional, both, streamed with Inception and no registry), each
stage's settings function runs under a read trace (tests/config_trace.py): the keys it reads, and the config sections
its settings hold whole, are the keys the stage *reads*. Then every leaf key is changed to each valid value of a
small family, and:

- the stages whose fingerprints change are exactly those whose settings changed and those downstream of them;
- only stages that read the key can change;
- every key a stage reads changes that stage's settings for some value (nothing is read and then dropped);
- every key is read by some stage in some base config, or declared ``metadata=EXECUTION`` (how and where a run
  runs: it changes no fingerprint), or names where the run lives (run id, storage root, MLflow).

The test that stage code reads nothing beyond its settings while it runs is tests/test_reuse.py (a traced run).
"""

from __future__ import annotations

import enum
import types
import typing
from functools import cache
from typing import Any

import pytest

from pipelines.config import ConfigError, PipelineConfig
from pipelines.config_file import load_config, with_overrides
from pipelines.contracts import ChampionRef
from pipelines.dag import STAGES, downstream
from pipelines.plan import leaf_fields, plan
from tests.config_trace import ReadTrace

LOCATION = ("run_id", "storage.root", "mlflow.tracking_uri", "mlflow.experiment")  # where the run lives
BASES = {
    "quickstart": (),
    "ddim": ("sample.method=ddim", "sample.num_steps=50"),  # sample.eta applies to DDIM only
    "tuned": ("tune.enabled=true", "tune.space={train.lr: {choice: [0.001, 0.002]}}", "tune.warm_start=true"),
    "tuned-conditional": (
        "tune.enabled=true",
        "tune.space={train.lr: {choice: [0.001, 0.002]}}",
        "model.conditional=true",
    ),
    "conditional": ("model.conditional=true", "evaluate.guidance_scales=[0.0, 2.0]", "sample.classes=[0, 1]"),
    "tuned-posthoc-ema": (
        "tune.enabled=true",
        "tune.space={train.lr: {choice: [0.001, 0.002]}}",
        "train.ema_profiles=[0.05, 0.1]",
        "train.ema_snapshot_every_images=25000",
    ),
    "streamed-inception": (
        "data.loader=stream",
        "evaluate.extractor=inception",
        "evaluate.inception_weights_uri=/weights/pt_inception.pth",
        "register.enabled=false",
        "train.init_from=/runs/champion/snapshot",
        "evaluate.reference_stats_uri=/stats/cifar10.npz",
        "evaluate.nll_split=test",
    ),
    "distilled": (
        "distill.enabled=true",
        "diffusion.prediction=v",
        "sample.method=ddim",
        "sample.num_steps=50",
        "sample.autoguidance_weight=1",  # a student is not autoguided (the quickstart's model is)
    ),
    "latent": (
        "autoencoder.weights_uri=/weights/vae",
        "autoencoder.weights_sha256=0123456789abcdef",
        "evaluate.nll=false",  # each refused with a latent model (pipelines.config.check_latent)
        "train.ema_sigma_rel=0.05",
        "sample.clip_denoised=false",
    ),
    "latent-trained": (
        "autoencoder.train=true",
        "evaluate.nll=false",
        "train.ema_sigma_rel=0.05",
        "sample.clip_denoised=false",
    ),
}
SPECIAL = {  # values for keys whose type alone does not give a valid different value
    "model.preset": ["cifar10", "image64"],
    "model.overrides": [{"dropout": 0.2}, {"base_channels": 32}, {"image_size": 4, "in_channels": 4}],
    "tune.space": [{"train.lr": {"choice": [0.001, 0.003]}}, {"diffusion.schedule": {"choice": ["linear", "cosine"]}}],
    "diffusion.schedule_params": [{"beta_start": 0.0002}, {"logsnr_shift": 0.5}],  # a linear, a cosine parameter
    "evaluate.guidance_scales": [(0.5,), (0.0, 3.0)],
    "train.ema_profiles": [(0.05,), (0.1, 0.2), ()],
    "train.stf_reference": [1024, 64],  # at least a share's micro-batch (train.batch_size / train.num_workers)
    "sample.classes": [(0,), (1, 2), None],
    "sample.guidance_interval": [(0.0, 1.0), (0.5, 80.0)],  # two noise levels; refused on an unconditional model
    "evaluate.inception_weights_sha256": ["6726825d6726825d"],
    "data.uri": ["/data/images", "s3://bucket/images"],
    "autoencoder.block_out_channels": [(32, 32), (32, 64, 64, 64)],
    "distill.steps": [2, 8],  # distill.teacher_steps (32) over a power of two
    "distill.teacher_steps": [8, 64],
    "distill.batch_size": [64, 256],  # a multiple of train.num_workers
    "distill.prediction": ["x0"],  # an eps student is refused
    "autoencoder.weights_sha256": ["fedcba9876543210"],
}


class StubRegistry:
    """The outside world's answers, fixed: every model's champion is version 3; a data URI's listing, its name's."""

    def champion(self, model_name: str) -> ChampionRef:
        return ChampionRef(model_name, "3")

    def data_listing(self, uri: str) -> str:
        return f"listing of {uri}"


@cache
def base(name: str) -> PipelineConfig:
    return load_config("configs/digits.yaml", list(BASES[name]))


def planned(config: PipelineConfig) -> tuple[dict[str, str], dict[str, Any]]:
    """(fingerprint, hashed settings) of each enabled stage."""
    stages = plan(STAGES, config, StubRegistry())
    return {name: s.fingerprint for name, s in stages.items()}, {name: s.hashed for name, s in stages.items()}


@cache
def readers(name: str) -> dict[str, frozenset[str]]:
    return readers_of(base(name))


def readers_of(config: PipelineConfig) -> dict[str, frozenset[str]]:
    """Stage -> the non-execution keys its settings function reads (or holds whole) under ``config``."""
    trace = ReadTrace(config)
    held: dict[str, set[str]] = {}
    with trace.installed():
        for stage in STAGES:
            trace.phase = f"switch of {stage.name}"
            if not stage.enabled(config):
                continue
            trace.phase = stage.name
            held[stage.name] = trace.embedded_leaves(stage.settings(config, StubRegistry()))
    found = {}
    for stage in STAGES:
        if stage.name in held:
            switch = trace.read_in(f"switch of {stage.name}")  # the keys its switch reads (a key, or a property's)
            keys = trace.read_in(stage.name) | held[stage.name] | switch
            found[stage.name] = frozenset(keys - trace.execution)
    return found


def candidates(hint: Any, value: Any) -> list[Any]:
    """Values of a field's type that differ from ``value``."""
    options = [option for option in typing.get_args(hint) if option is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [None] if value is not None and type(None) in typing.get_args(hint) else []
        return found + [c for option in options for c in candidates(option, value if value is not None else None)]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return [member.value for member in hint if member != value]
    if hint is bool:
        return [not value] if value is not None else [True, False]
    if hint is int:
        start = value if isinstance(value, int) else 0
        return [v for v in (start + 1, start * 2, 0, 1, 2, 10, 64) if v != value]
    if hint is float:
        start = value if isinstance(value, float) else 0.0
        return [v for v in (start * 2, start / 2, start + 0.05, 0.0, 0.5) if v != value]
    if hint is str:
        return [f"{value}x" if value else "x"]
    return []


def mutations(config: PipelineConfig, key: str, hint: Any) -> list[PipelineConfig]:
    """``config`` with ``key`` changed, for each value the config accepts."""
    current: Any = config.to_dict()
    for part in key.split("."):
        current = current[part]
    valid = []
    for candidate in SPECIAL.get(key, []) + candidates(hint, current):
        if candidate == current:
            continue
        try:
            valid.append(with_overrides(config, {key: candidate}))
        except ConfigError:
            continue
    return valid


def closure(stages: set[str]) -> set[str]:
    return stages | {after for name in stages for after in downstream(name)}


LEAVES = [(key, hint) for key, _, hint in leaf_fields(PipelineConfig)]


@cache
def effects(name: str) -> tuple[frozenset[tuple[str, str]], frozenset[tuple[str, str]]]:
    """Under base config ``name``: the (stage, key) pairs where the stage reads the key, and those where some value
    of the key changes the stage's settings. Asserts on the way, for every key and value, that the fingerprints
    that change are exactly those of the stages whose settings changed and downstream, and that only stages that
    read the key (under either config) change."""
    config = base(name)
    fingerprints, settings = planned(config)
    read = readers(name)
    changed_pairs = set()
    for key, hint in LEAVES:
        for mutated in mutations(config, key, hint):
            new_fingerprints, new_settings = planned(mutated)
            stages = fingerprints.keys() | new_fingerprints.keys()
            changed_settings = {s for s in stages if settings.get(s) != new_settings.get(s)}
            changed = {s for s in stages if fingerprints.get(s) != new_fingerprints.get(s)}
            assert changed == closure(changed_settings) & stages, (name, key, changed, changed_settings)
            readers_of_key = {s for s, keys in read.items() if key in keys} | {
                s for s, keys in readers_of(mutated).items() if key in keys
            }
            assert changed_settings <= readers_of_key, f"{name}: {key} changed {changed_settings - readers_of_key}"
            changed_pairs |= {(stage, key) for stage in changed_settings}
    read_pairs = {(stage, key) for stage, keys in read.items() for key in keys}
    return frozenset(read_pairs), frozenset(changed_pairs)


@pytest.mark.parametrize("name", list(BASES))
def test_changing_a_key_changes_exactly_the_fingerprints_of_the_stages_that_read_it(name):
    effects(name)


def test_every_key_a_stage_reads_changes_its_settings_for_some_value():
    """Nothing is read and then dropped: for each stage and key it reads (in any base config), some base config and
    some value of the key change the stage's settings."""
    read = set().union(*(effects(name)[0] for name in BASES))
    changed = set().union(*(effects(name)[1] for name in BASES))
    assert not read - changed, f"read, never hashed: {sorted(read - changed)}"


def test_every_key_is_read_by_a_stage_or_says_how_or_where_the_run_runs():
    read = set().union(*(keys for name in BASES for keys in readers(name).values()))
    execution = ReadTrace(base("quickstart")).execution
    unaccounted = [key for key, _ in LEAVES if key not in read | execution | set(LOCATION)]
    assert not unaccounted, f"keys no stage reads, not declared metadata=EXECUTION: {unaccounted}"
    assert not read & execution, "an execution field is hashed"
    assert not read & set(LOCATION)


@pytest.mark.parametrize("name", ["quickstart", "tuned"])
def test_execution_and_location_keys_change_no_fingerprint(name):
    config = base(name)
    fingerprints, _ = planned(config)
    execution = ReadTrace(config).execution
    for key, hint in LEAVES:
        if key in execution or key in LOCATION:
            for mutated in mutations(config, key, hint):
                assert planned(mutated)[0] == fingerprints, key


def test_what_the_data_uri_holds_is_an_input_of_prepare_and_all_after_it():
    class Rewritten(StubRegistry):
        def data_listing(self, uri: str) -> str:
            return "a file was rewritten"

    config = base("quickstart")
    before, after = plan(STAGES, config, StubRegistry()), plan(STAGES, config, Rewritten())
    assert {name for name in before if before[name].fingerprint != after[name].fingerprint} == set(before)


def test_the_champion_is_an_input_of_the_stages_that_compare_against_it():
    class Moved(StubRegistry):
        def champion(self, model_name: str) -> ChampionRef:
            return ChampionRef(model_name, "4")

    config = base("quickstart")
    before, after = plan(STAGES, config, StubRegistry()), plan(STAGES, config, Moved())
    assert {name for name in before if before[name].fingerprint != after[name].fingerprint} == {"evaluate", "register"}
    renamed = plan(STAGES, with_overrides(config, {"register.model_name": "other"}), StubRegistry())
    assert renamed["evaluate"].settings.champion == ChampionRef("other", "3")
    no_rescore = with_overrides(config, {"evaluate.rescore_champion": False})
    assert (
        plan(STAGES, no_rescore, Moved())["evaluate"].fingerprint
        == plan(STAGES, no_rescore, StubRegistry())["evaluate"].fingerprint
    )
