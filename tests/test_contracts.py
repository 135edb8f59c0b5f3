"""The pipeline's shape holds: stages receive exactly their settings (what their ``settings`` function builds) and
their upstream stages' typed outputs, every contract survives its trip through ``stage.json``, no source spells the
old string-keyed way of reading another stage's outputs (a lint), and no function grows long."""

import ast
import dataclasses
import json
import typing
from pathlib import Path

import pytest

from ddpm_core.diffusion import DiffusionConfig
from ddpm_core.precision import Precision
from ddpm_core.samplers import Method, SamplerConfig
from ddpm_core.training import OptimConfig
from ddpm_core.unet import unet_preset
from pipelines.config import ConfigError, PipelineConfig
from pipelines.config_file import load_config
from pipelines.contracts import (
    ChampionRef,
    Conditioning,
    DistillOutputs,
    DistillRound,
    EvaluateOutputs,
    FidProtocol,
    GuidancePoint,
    NetworkExecution,
    NfePoint,
    NllProtocol,
    PrepareOutputs,
    ReferenceSet,
    RegisterOutputs,
    SampleOutputs,
    ScoreProtocol,
    Scores,
    StageManifest,
    TrainedWith,
    TrainOutputs,
    TrialResult,
    TuneOutputs,
)
from pipelines.dag import STAGES
from pipelines.execution import Device
from pipelines.runs import read_manifest
from pipelines.typed import SchemaError, from_plain, to_plain

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "ddpm_core").rglob("*.py"), *(REPO / "pipelines").rglob("*.py")])

EXAMPLES = [
    PrepareOutputs(
        "f" * 64,
        1617,
        180,
        "runs/q/prepare/0123456789abcdef/shards",
        "runs/q/prepare/0123456789abcdef/holdout",
        10,
        None,
        "x",
        "classifier-1",
        0.9,
    ),
    TuneOutputs(
        {"train.lr": 0.002},
        {"bpd": 3.5},
        "t1",
        None,
        4,
        1,
        (
            TrialResult("t1", {"train.lr": 0.002}, 4096, 3.5, None),
            TrialResult("t2", {"train.lr": 1e-5}, 2048, 5.0, 9.1),
        ),
    ),
    TrainOutputs(
        "s",
        "i",
        2048,
        Device.CPU,
        12.5,
        None,
        TrainedWith(DiffusionConfig(num_timesteps=100), OptimConfig(lr=1e-3), unet_preset("digits"), "digits"),
    ),
    DistillOutputs(
        "runs/q/distill/0123456789abcdef/round_1_2steps/snapshot",
        2,
        "progressive",
        "runs/q/train/0123456789abcdef/snapshot",
        tuple(
            DistillRound(
                steps, teacher, f"runs/q/distill/0123456789abcdef/round_{i}_{steps}steps/snapshot", 512, 9.5, "r"
            )
            for i, (steps, teacher) in enumerate([(4, "runs/q/train/0123456789abcdef/snapshot"), (2, "round_0")])
        ),
        1024,
        19.0,
        TrainedWith(
            DiffusionConfig(num_timesteps=100, prediction="v"), OptimConfig(lr=8e-4), unet_preset("digits"), "digits"
        ),
    ),
    SampleOutputs(
        ("a", "b"),
        200,
        100,
        2,
        SamplerConfig(method=Method.DDIM, num_steps=10),
        1,
        NetworkExecution(Precision.BF16, compile=False),
        3.0,
    ),
    EvaluateOutputs(
        Scores(0.5, fid_untrained=30.0, precision=0.6),
        FidProtocol(
            200,
            SamplerConfig(method=Method.DDIM, num_steps=10),
            1,
            Precision.FP32,
            "classifier-1",
            None,
            ReferenceSet("training split", reference_count=1617),
        ),
        "0123456789abcdef",
        NllProtocol("holdout", 40, 20, None, 1),
        "grid.png",
        "ref",
        None,
        ScoreProtocol(10, 180, 200, 10, inception_score_splits=10, precision_recall_k=3),
    ),
    RegisterOutputs("ddpm-digits", "2", False, "champion kept", "1", 0.5, 0.4, "models:/ddpm-digits/2"),
    # A class-conditional run's outputs
    PrepareOutputs(
        "f" * 64,
        12,
        2,
        "s",
        "h",
        3,
        class_names=("cat", "dog", "emu"),
        class_counts=(4, 4, 4),
        source_uri="s3://bucket/pets",
        source_split="train",
        holdout_fraction=0.1,
    ),
    SampleOutputs(
        ("a",),
        20,
        20,
        1,
        SamplerConfig(),
        1,
        NetworkExecution(Precision.FP32, compile=False),
        1.0,
        Conditioning((2, 0), 1.5, null_class=3),
    ),
    EvaluateOutputs(
        Scores(0.5, fid_champion=0.6, conditional_accuracy=0.97),
        FidProtocol(
            20,
            SamplerConfig(),
            1,
            Precision.FP32,
            "classifier-1",
            None,
            ReferenceSet("published", reference_sha256="0" * 64),
            Conditioning((0, 1, 2), 0.0, null_class=3),
        ),
        "0123456789abcdef",
        None,
        "grid.png",
        "ref",
        ChampionRef("ddpm-digits-cond", "3"),
        ScoreProtocol(10, 2, 20, 10),
        (GuidancePoint(0.0, 10, 2.5, 0.7), GuidancePoint(4.0, 10, 3.5, 0.99)),
    ),
]


def test_every_stage_receives_its_settings_and_upstream_outputs_and_returns_its_own():
    kinds = {stage.name: stage.outputs for stage in STAGES}
    optional = {stage.name for stage in STAGES if stage.switch is not None}
    for stage in STAGES:
        hints = typing.get_type_hints(stage.run)
        settings = typing.get_type_hints(stage.settings)["return"]  # what the stage's settings function builds
        assert hints[list(hints)[1]] is settings, stage.name  # after the context: the settings, never the config
        assert dataclasses.is_dataclass(settings) and settings.__dataclass_params__.frozen, stage.name
        parameters = list(hints)[2:-1]  # after the context and the settings, before "return"
        expected = [kinds[name] | None if name in optional else kinds[name] for name in stage.upstream]
        assert [hints[name] for name in parameters] == expected, stage.name
        assert hints["return"] is stage.outputs, stage.name
        assert all(name in kinds and list(kinds).index(name) < list(kinds).index(stage.name) for name in stage.upstream)


@pytest.mark.parametrize("outputs", EXAMPLES, ids=lambda outputs: type(outputs).__name__)
def test_stage_outputs_survive_stage_json(outputs, tmp_path):
    settings, upstream = {"train": {"lr": 0.001, "seed": 0}, "classes": [0, 1]}, {"prepare": "a" * 64}
    manifest = StageManifest("s", "complete", "fp", settings, upstream, 1.0, 2.0, "run", outputs)
    (tmp_path / "stage.json").write_text(json.dumps(to_plain(manifest)))
    assert read_manifest(str(tmp_path), type(outputs)) == manifest


def test_a_manifest_that_does_not_fit_is_named():
    plain = to_plain(EXAMPLES[0])
    with pytest.raises(
        SchemaError, match="unknown key 'outputs.shard_uri'; allowed keys under outputs: class_counts, class_names, "
    ):
        from_plain(PrepareOutputs, {**plain, "shard_uri": "x"}, "outputs")
    with pytest.raises(SchemaError, match="outputs.num_train: expected an integer, got '1617'"):
        from_plain(PrepareOutputs, {**plain, "num_train": "1617"}, "outputs")
    with pytest.raises(SchemaError, match="outputs.device: 'tpu' is not one of cpu, gpu"):
        from_plain(TrainOutputs, {**to_plain(EXAMPLES[2]), "device": "tpu"}, "outputs")


def test_the_config_is_plain_data_with_the_keys_users_write():
    config = load_config(REPO / "configs" / "digits.yaml", ["train.lr=2e-4", "sample.method=ancestral"])
    plain = config.to_dict()
    assert plain["train"]["lr"] == 2e-4 and "optim" not in plain["train"]  # OptimConfig is inline under train
    assert plain["sample"]["method"] == "ancestral" and "sampler" not in plain["sample"]
    assert from_plain(PipelineConfig, plain) == config
    assert config.train.optim == OptimConfig(lr=2e-4, warmup_images=10_000, ema_decay=0.999, ema_warmup=True)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.overrides.chanels=64",
            "unknown config key 'model.overrides.chanels'; allowed keys under model.overrides: ",
        ),
        ("model.overrides={channel_mult: 3}", "model.overrides.channel_mult: expected a list, got 3"),
        (
            "model.overrides={norm_groups: 7}",
            "model.overrides.base_channels * 1 = 32 is not divisible by norm_groups = 7",
        ),
        ("model.overrides.num_classes=10", "model.overrides.num_classes: set model.conditional=true instead"),
        ("train.seed=-1", "train.seed must be >= 0, got -1"),
        ("tune.search_alg=bayes", "tune.search_alg 'bayes' is not one of: random, grid, optuna, hyperopt"),
    ],
)
def test_model_and_section_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)


def test_a_config_file_that_is_not_a_mapping_is_named(tmp_path):
    (tmp_path / "list.yaml").write_text("- train\n- sample\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(tmp_path / "list.yaml", ["train.lr=0.001"])


def functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text())
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_is_longer_than_80_lines():
    long = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in SOURCES
        for node in functions(path)
        if node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, long


def test_the_training_loop_reads_in_a_screen():
    loop = next(node for node in functions(REPO / "pipelines/training/loop.py") if node.name == "train_loop")
    body = loop.end_lineno - loop.body[1].lineno + 1  # after the docstring
    assert body <= 60, body


def test_lint_no_source_uses_the_string_keyed_stage_outputs_api():
    """A lint rule, not a check of behaviour: no line of ddpm_core/ or pipelines/ spells one of the ways the
    pre-redesign code (before commit 1e260f8) handed stages each other's outputs by string key: a manifest's
    ``["outputs"]`` dict, the context's ``upstream[stage]`` manifests, or ``output_of(stage, key)``. It catches
    those spellings returning (comments and strings included), nothing else: a stage that read another's typed
    ``stage.json`` through ``context.store`` would pass it. That every stage's ``run`` takes its upstream stages'
    typed outputs as parameters is checked by
    test_every_stage_receives_its_settings_and_upstream_outputs_and_returns_its_own."""
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in SOURCES
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if '["outputs"]' in line or "upstream[" in line or "output_of(" in line
    ]
    assert not offenders, offenders


def test_contracts_are_frozen():
    for kind in (
        *(type(outputs) for outputs in EXAMPLES),
        StageManifest,
        Scores,
        FidProtocol,
        TrainedWith,
        NllProtocol,
        ChampionRef,
        ScoreProtocol,
        DistillRound,
        NfePoint,
    ):
        assert dataclasses.fields(kind) and kind.__dataclass_params__.frozen, kind
