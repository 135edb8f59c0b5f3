"""Class-conditional generation (docs/conditional.md): labels from every reader into prepare's shards, label-aware
batches and label dropout, classifier-free guidance in one batched forward pass that equals the two-pass formula,
per-index classes that do not depend on how indices are split over workers, and the bad inputs that fail before Ray
starts (exit code 2, naming the key or file; what the later stages ask of the prepared data is checked right after
the prepare stage, so only prepare may have finished then). The pipeline end to end is in
tests/test_pipeline_e2e.py."""

import time

import numpy as np
import pytest
import ray
import torch

from ddpm_core.checkpoint import save_snapshot
from ddpm_core.data import load_dataset, random_batch
from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion
from ddpm_core.images import rows_by_class
from ddpm_core.samplers import (
    PerIndexNoise,
    SamplerConfig,
    balanced_classes,
    classifier_free_guidance,
    limited_classifier_free_guidance,
    null_conditioned,
    sample,
)
from ddpm_core.training import drop_labels
from ddpm_core.unet import UNet, unet_preset
from pipelines.__main__ import main
from pipelines.config import ConfigError
from pipelines.dag import STAGES
from pipelines.data.shards import read_split, write_split
from pipelines.evaluation.classes import ClassHits
from pipelines.generation.classes import sample_labels
from tests.run_files import completed
from tests.test_data import random_images, write_cifar, write_png
from tests.test_sampling import tiny_model


@pytest.mark.parametrize("w", [0.0, 1.0, 3.5])
def test_one_pass_guidance_equals_the_two_pass_formula(w):
    model = tiny_model(num_classes=10)
    x, t, labels = torch.randn(4, 1, 8, 8), torch.tensor([5, 50, 500, 900]), torch.tensor([0, 3, 7, 9])
    calls = []

    def counted(x, t, class_labels):  # the network, counting its calls and their batch sizes
        calls.append(x.shape[0])
        return model(x, t, class_labels=class_labels)

    with torch.no_grad():
        conditional = model(x, t, class_labels=labels)  # [4, 1, 8, 8]
        unconditional = model(x, t, class_labels=torch.full_like(labels, 10))
        guided = classifier_free_guidance(counted, w, null_class=10, channels=1)(x, t, labels)
    # Ho & Salimans (2022), Eq. 6: (1 + w) eps(x, y) - w eps(x); w = 0 is the conditional model itself.
    torch.testing.assert_close(guided, (1 + w) * conditional - w * unconditional, rtol=1e-5, atol=1e-5)
    assert calls == ([4] if w == 0 else [8])  # one network call: the null half rides in the same batch
    assert (conditional - unconditional).abs().max() > 0  # the label changes the prediction


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.5, 50.0)])
def test_guidance_in_an_interval_guides_only_at_its_noise_levels(interval):
    """Kynkaanniemi et al. (2024): guided (w = 2) where sigma_t = sqrt((1 - abar_t) / abar_t) lies in (low, high],
    the conditional model unguided (w = 0, one pass of B images) elsewhere, image by image in a batch of mixed
    timesteps; no interval: guided at every step."""
    model = tiny_model(num_classes=10)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=1000, schedule="cosine"))
    x, labels = torch.randn(5, 1, 8, 8), torch.tensor([0, 3, 7, 9, 1])
    t = torch.tensor([10, 300, 480, 700, 999])  # sigma 0.03, 0.52, 0.95, 1.99, 2e4
    abar = diffusion.alphas_cumprod.double()[t]
    inside = ((1 - abar) / abar).sqrt().gt(interval[0]) & ((1 - abar) / abar).sqrt().le(interval[1])  # [5]
    assert 0 < int(inside.sum()) < 5
    calls = []

    def counted(x, t, class_labels):  # the network, counting the images of each call
        calls.append(x.shape[0])
        return model(x, t, class_labels=class_labels)

    with torch.no_grad():
        guided = classifier_free_guidance(model, 2.0, null_class=10, channels=1)(x, t, labels)  # [5, 1, 8, 8]
        plain = model(x, t, class_labels=labels)
        abar_all = diffusion.alphas_cumprod
        limited = limited_classifier_free_guidance(counted, 2.0, 10, 1, abar_all, interval)
        torch.testing.assert_close(
            limited(x, t, class_labels=labels), torch.where(inside[:, None, None, None], guided, plain)
        )
        assert (guided - plain).abs().amax((1, 2, 3)).min() > 0  # the two differ at every timestep
        outside = int((~inside).nonzero()[0])
        calls.clear()
        one = slice(outside, outside + 1)
        torch.testing.assert_close(limited(x[one], t[one], class_labels=labels[one]), plain[one])
        assert calls == [1]  # outside the interval: one pass of the batch, no null half
        everywhere = limited_classifier_free_guidance(model, 2.0, 10, 1, abar_all, None)(x, t, class_labels=labels)
        torch.testing.assert_close(everywhere, guided)


def test_guidance_mixes_the_mean_and_keeps_the_conditional_learned_variance():
    torch.manual_seed(0)
    config = tiny_model(num_classes=3).config
    model = UNet(config, learn_variance=True).eval()
    for module in model.modules():
        if getattr(module, "zero_init", False):
            torch.nn.init.normal_(module.weight, std=0.05)
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([10, 700]), torch.tensor([0, 2])
    with torch.no_grad():
        conditional, unconditional = (
            model(x, t, class_labels=labels),
            model(x, t, class_labels=torch.full_like(labels, 3)),
        )
        guided = classifier_free_guidance(model, 2.0, null_class=3, channels=1)(x, t, labels)  # [2, 2, 8, 8]
    torch.testing.assert_close(guided[:, :1], 3 * conditional[:, :1] - 2 * unconditional[:, :1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided[:, 1:], conditional[:, 1:], rtol=1e-5, atol=1e-5)


def test_a_sample_index_gets_the_same_class_and_image_however_indices_are_split():
    classes = (7, 1, 4)
    whole = balanced_classes(range(10), classes)
    split = torch.cat([balanced_classes(range(0, 3), classes), balanced_classes(range(3, 10), classes)])
    assert whole.tolist() == [7, 1, 4, 7, 1, 4, 7, 1, 4, 7] and torch.equal(whole, split)

    model, diffusion = tiny_model(num_classes=10), GaussianDiffusion.from_config(DiffusionConfig(num_timesteps=100))
    guided = classifier_free_guidance(model, 1.5, null_class=10, channels=1)
    config = SamplerConfig(method="ddim", num_steps=5)

    def draw(indices):  # one worker's shard of sample indices
        kwargs = {"class_labels": balanced_classes(indices, classes)}
        return sample(guided, diffusion, (1, 8, 8), PerIndexNoise(3, indices), config, kwargs).samples

    one_worker = draw(range(6))
    two_workers = torch.cat([draw(range(0, 2)), draw(range(2, 6))])
    torch.testing.assert_close(one_worker, two_workers, rtol=1e-5, atol=1e-5)


def test_null_conditioned_is_the_unconditional_term_of_guidance_and_no_real_class():
    """What a label-free score (the NLL bound, a proxy FID) measures of a conditional model is the unconditional model
    that guidance subtracts: Eq. 6 at w = -1, ``0 eps(x, y) + eps(x)``, leaves it alone whatever the labels. The null
    class is a class of its own (label ``num_classes``): its prediction is none of the real classes'."""
    model, x, t = tiny_model(num_classes=4), torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    with torch.no_grad():
        unconditional = null_conditioned(model, 4)(x, t)  # [3, 1, 8, 8]
        for labels in (torch.tensor([0, 2, 3]), torch.tensor([1, 1, 1])):
            guided = classifier_free_guidance(model, -1.0, null_class=4, channels=1)(x, t, labels)
            torch.testing.assert_close(guided, unconditional, rtol=1e-5, atol=1e-5)
        for real in range(4):
            conditional = model(x, t, class_labels=torch.full((3,), real))
            assert (conditional - unconditional).abs().max() > 1e-3, real  # far above the tolerance above


def test_batches_keep_each_image_with_its_label_and_dropout_uses_the_null_class():
    images = torch.arange(50, dtype=torch.float32).reshape(50, 1, 1, 1).expand(50, 1, 2, 2).contiguous()
    labels = torch.arange(50) % 7
    generator = torch.Generator().manual_seed(0)
    batch, drawn = random_batch(images, 200, generator, flip=False, labels=labels)
    assert torch.equal(drawn, batch[:, 0, 0, 0].long() % 7)  # the label of the very image drawn
    unlabelled, none = random_batch(images, 8, torch.Generator().manual_seed(0), flip=False)
    assert none is None and torch.equal(unlabelled, batch[:8])  # labels do not change the images drawn
    dropped = drop_labels(drawn, null_class=7, probability=0.25, generator=torch.Generator().manual_seed(1))
    assert 0.15 < (dropped == 7).float().mean().item() < 0.35
    assert torch.equal(dropped[dropped != 7], drawn[dropped != 7])
    assert torch.equal(drop_labels(drawn, 7, 0.0, generator), drawn)


def test_rows_by_class_puts_each_class_on_its_own_row():
    images = np.arange(12, dtype=np.uint8).reshape(12, 1, 1, 1)
    labels = np.array([2, 0, 1] * 4)
    rows = rows_by_class(images, labels, columns=3)
    assert rows[:, 0, 0, 0].tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]  # class 2's first three, then 0's, then 1's
    short = rows_by_class(images[:4], labels[:4], columns=2)  # class 0 and 1 have one image: the row ends blank
    assert short[:, 0, 0, 0].tolist() == [0, 3, 1, 255, 2, 255]


def test_labels_flow_from_every_reader_into_the_shards(tmp_path):
    for i, image in enumerate(random_images(6)):
        write_png(str(tmp_path / "folder" / ("cat" if i % 3 else "dog") / f"{i}.png"), image)
    np.savez(tmp_path / "set.npz", images=random_images(5, channels=1), y=np.array([3, 0, 3, 1, 0]))
    batches = write_cifar(tmp_path / "cifar")
    cifar_labels = np.concatenate([batches[f"data_batch_{k}"][b"labels"] for k in range(1, 6)])
    expected = {
        "builtin:digits": (load_dataset("builtin:digits").labels, [str(i) for i in range(10)]),
        str(tmp_path / "folder"): (np.array([0, 0, 0, 0, 1, 1]), ["cat", "dog"]),
        str(tmp_path / "set.npz"): (np.array([3, 0, 3, 1, 0]), ["0", "1", "2", "3"]),
        str(tmp_path / "cifar"): (cifar_labels, ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog"]),
    }
    for number, (uri, (labels, names)) in enumerate(expected.items()):
        dataset = load_dataset(uri)
        np.testing.assert_array_equal(dataset.labels, labels)
        assert dataset.class_names_or_labels()[: len(names)] == names
        assert dataset.class_counts(np.arange(len(labels))) == np.bincount(labels, minlength=len(names)).tolist()
        every_other = np.arange(0, len(labels), 2)
        write_split(str(tmp_path / f"split{number}"), dataset, every_other, {})
        images, written = read_split(str(tmp_path / f"split{number}"), {})
        np.testing.assert_array_equal(written, labels[every_other])
        np.testing.assert_array_equal(images, dataset.images[every_other])


def test_sample_classes_by_name_or_label():
    names = ["airplane", "automobile", "bird"]
    assert sample_labels(None, names, 3) == (0, 1, 2)
    assert sample_labels(("bird", 0), names, 3) == (2, 0)
    with pytest.raises(ConfigError, match="sample.classes names 'cow', which the data does not have"):
        sample_labels(("cow",), names, 3)
    with pytest.raises(ConfigError, match="sample.classes names 3"):
        sample_labels((3,), names, 3)


def test_class_hits_count_per_requested_class():
    requested = np.array([0] * 10 + [2] * 10)  # [20]: class 1 never asked for
    predicted = np.array([0] * 9 + [1] + [2] * 6 + [0] * 4)  # [20]: 9 of the 0s, 6 of the 2s recognised
    hits = ClassHits.of(requested, predicted, 3)
    assert hits.requested.tolist() == [10, 0, 10] and hits.recognised.tolist() == [9, 0, 6]
    assert hits.accuracy == pytest.approx(15 / 20)
    assert hits.per_class(["a", "b", "c"]) == {"a": 0.9, "c": 0.6}  # b was never asked for
    assert ClassHits.of(requested, requested, 3).accuracy == 1.0


@pytest.fixture
def local(tmp_path):
    return [
        f"storage.root={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "model.conditional=true",
        "evaluate.classifier_epochs=1",
        "train.ema_choice_images=64",  # the post-hoc EMA choice on a small budget
        "train.ema_choice_timesteps=4",
    ]


def bad_conditional_inputs(tmp_path):
    np.save(tmp_path / "unlabelled.npy", np.zeros((40, 8, 8, 1), np.uint8))
    images = np.zeros((40, 8, 8, 1), np.uint8)
    np.savez(tmp_path / "float.npz", images=images, labels=np.linspace(0, 9, 40))
    np.savez(tmp_path / "short.npz", images=images, labels=np.arange(39) % 10)
    np.savez(tmp_path / "twelve.npz", images=images, labels=np.arange(40) % 12)
    other = unet_preset("digits", num_classes=5)
    save_snapshot(str(tmp_path / "five"), UNet(other), other, DiffusionConfig())
    plain = unet_preset("digits")
    save_snapshot(str(tmp_path / "plain"), UNet(plain), plain, DiffusionConfig())


NOTHING, PREPARED = (), ("prepare",)  # the stages that may have finished when the run stops


@pytest.mark.parametrize(
    "overrides, message, may_finish",
    [
        (
            ["data.uri={tmp}/unlabelled.npy"],
            "model.conditional needs class labels, and data.uri '{tmp}/unlabelled.npy'",
            NOTHING,
        ),
        (["data.uri={tmp}/float.npz"], "float.npz: 'labels' must be a 1-D integer array", NOTHING),
        (["data.uri={tmp}/short.npz"], "short.npz: labels must have shape [40] to match the images", NOTHING),
        (
            ["data.uri={tmp}/twelve.npz", "model.num_classes=10"],
            "has 12 classes (labels 0..11), more than model.num",
            NOTHING,
        ),
        (["sample.classes=[seven]"], "sample.classes names 'seven', which the data does not have", PREPARED),
        (["sample.classes=[10]"], "sample.classes names 10, which the data does not have: use labels 0..9", PREPARED),
        (["sample.guidance_scale=-1"], "sample.guidance_scale must be >= 0, got -1.0", NOTHING),
        (["evaluate.guidance_scales=[0, -2]"], "evaluate.guidance_scales must all be >= 0", NOTHING),
        (
            ["train.init_from={tmp}/five"],
            "train.init_from '{tmp}/five' is a model of 5 classes, but this run's model",
            PREPARED,
        ),
        (["train.init_from={tmp}/plain"], "train.init_from '{tmp}/plain' holds an unconditional U-Net", NOTHING),
        (
            ["model.overrides.num_classes=10"],
            "model.overrides.num_classes: set model.conditional=true instead",
            NOTHING,
        ),
        (
            ["model.conditional=false", "evaluate.guidance_scales=[1]"],
            "evaluate.guidance_scales needs a class-cond",
            NOTHING,
        ),
        (
            ["model.conditional=false", "sample.guidance_interval=[0, 1]"],
            "sample.guidance_interval needs a class-conditional model: set model.conditional=true (autoguidance's "
            "interval is sample.autoguidance_interval)",
            NOTHING,
        ),
        (["sample.guidance_interval=[2, 1]"], "sample.guidance_interval [2.0, 1.0] must be two noise levels", NOTHING),
        (["sample.guidance_interval=[-1, 1]"], "sample.guidance_interval [-1.0, 1.0] must be two noise", NOTHING),
        (["sample.guidance_interval=[1]"], "sample.guidance_interval [1.0] must be two noise levels", NOTHING),
    ],
)
def test_bad_conditional_input_fails_before_ray_starts(tmp_path, local, capsys, overrides, message, may_finish):
    bad_conditional_inputs(tmp_path)
    started = time.time()
    code = main(["run", *local, *(item.format(tmp=tmp_path) for item in overrides)])
    err = capsys.readouterr().err
    assert code == 2 and message.format(tmp=tmp_path) in err and "Traceback" not in err, err
    assert not ray.is_initialized() and time.time() - started < 60
    run_root = tmp_path / "runs" / "quickstart"
    assert {stage.name for stage in STAGES if completed(run_root, stage.name)} <= set(may_finish)
