"""The Inception FID path, offline: weights of the right architecture with random values (built from pytorch-fid's
independent definition of the FID Inception network) go through the configured-URI loader (S3 on a moto server),
the checksum, the local cache and the tensors-only guard, and our features and statistics are checked against
torch-fidelity and torchmetrics on the same weights."""

import os
import pickle

import numpy as np
import pytest
import torch
from pytorch_fid import inception as pytorch_fid_inception
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torchmetrics.image.fid import FrechetInceptionDistance

from ddpm_core.data import load_dataset
from ddpm_core.inception import WEIGHTS_FILE, InceptionExtractor, load_inception, tensors_only_copy
from ddpm_core.metrics import FeatureStatistics
from ddpm_core.weights import WeightsError, fetch_verified, file_sha256


def random_fid_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """pytorch-fid's ``fid_inception_v3`` architecture without its download, He-initialised so that activations
    keep their scale through the 94 convolutions (PyTorch's default init makes the pool3 features vanish)."""
    torch.manual_seed(seed)
    network = pytorch_fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    network.Mixed_5b = pytorch_fid_inception.FIDInceptionA(192, pool_features=32)
    network.Mixed_5c = pytorch_fid_inception.FIDInceptionA(256, pool_features=64)
    network.Mixed_5d = pytorch_fid_inception.FIDInceptionA(288, pool_features=64)
    network.Mixed_6b = pytorch_fid_inception.FIDInceptionC(768, channels_7x7=128)
    network.Mixed_6c = pytorch_fid_inception.FIDInceptionC(768, channels_7x7=160)
    network.Mixed_6d = pytorch_fid_inception.FIDInceptionC(768, channels_7x7=160)
    network.Mixed_6e = pytorch_fid_inception.FIDInceptionC(768, channels_7x7=192)
    network.Mixed_7b = pytorch_fid_inception.FIDInceptionE_1(1280)
    network.Mixed_7c = pytorch_fid_inception.FIDInceptionE_2(2048)
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return network.state_dict()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / WEIGHTS_FILE
    torch.save(random_fid_inception_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def digits_rgb():
    images = load_dataset("builtin:digits").images[:24]  # [24, 8, 8, 1] uint8
    return images


def test_loads_through_s3_verifies_and_caches(weights_file, digits_rgb, s3_bucket, tmp_path):
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    uri = f"s3://{bucket}/models/{WEIGHTS_FILE}"
    fs.put(str(weights_file), uri)
    digest = file_sha256(weights_file)
    cache = tmp_path / "cache"
    extractor = load_inception(uri, digest[:8], options, cache_dir=cache)
    assert extractor.id == f"inception-v3-compat-{digest[:16]}"
    features, logits = extractor(digits_rgb[:6])
    assert features.shape == (6, 2048) and logits.shape == (6, 1008)
    assert features.std() > 1e-3, "He-initialised weights must give informative features"

    # the same network straight from torch-fidelity on the same weights: identical outputs
    reference = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights_file)
    )
    x = torch.from_numpy(digits_rgb[:6]).permute(0, 3, 1, 2).expand(-1, 3, -1, -1).contiguous()
    expected_features, expected_logits = reference.eval()(x)
    torch.testing.assert_close(features, expected_features, rtol=0, atol=0)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)

    fs.rm(uri)  # the cached, verified copy is reused without the remote file
    assert load_inception(uri, digest, options, cache_dir=cache).id == extractor.id


def test_wrong_checksum_is_refused_and_leaves_nothing(weights_file, tmp_path):
    with pytest.raises(WeightsError, match="expected one starting with deadbeef"):
        fetch_verified(str(weights_file), "deadbeef", "how", cache_dir=tmp_path)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_missing_weights_say_how_to_provide_them(tmp_path):
    with pytest.raises(WeightsError) as error:
        load_inception(str(tmp_path / "nowhere" / WEIGHTS_FILE), "6726825d", cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert (
        "does not exist" in message and "evaluate.inception_weights_uri" in message and "docs/evaluation.md" in message
    )


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ddpm-pipeline-inception-pwned",))


def test_pickled_code_in_weights_is_never_run(tmp_path):
    marker = "/tmp/ddpm-pipeline-inception-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / WEIGHTS_FILE
    with open(path, "wb") as handle:
        pickle.dump({"conv.weight": _RunsCode()}, handle)
    with pytest.raises(WeightsError, match="not a tensors-only"):
        tensors_only_copy(path)
    assert not os.path.exists(marker)


def test_features_and_statistics_match_torchmetrics(weights_file, digits_rgb):
    """resize + features + float64 statistics + distance, against torchmetrics' FID on the same network."""
    clean = tensors_only_copy(weights_file)
    extractor = InceptionExtractor(clean, file_sha256(weights_file), batch_size=8)
    real, fake = digits_rgb[:12], digits_rgb[12:24][:, ::-1].copy()  # fake: the same digits mirrored vertically
    ours_real = FeatureStatistics.from_features(extractor(real)[0])
    ours_fake = FeatureStatistics.from_features(extractor(fake)[0])

    # antialias=False: the TF1-compatible resize of the published protocol (torchmetrics defaults to antialiasing)
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(clean), antialias=False)
    to_nchw = lambda images: (
        torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).expand(-1, 3, -1, -1).contiguous()
    )
    metric.update(to_nchw(real), real=True)
    metric.update(to_nchw(fake), real=False)
    assert int(metric.real_features_num_samples) == ours_real.count == 12
    torch.testing.assert_close(metric.real_features_sum.double(), ours_real.sum, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(metric.fake_features_cov_sum.double(), ours_fake.sum_outer, rtol=1e-6, atol=1e-6)
    from ddpm_core.metrics import frechet_distance_from_stats

    # 12 samples in 2048 dimensions: singular covariances, where matrix square roots are least stable
    assert frechet_distance_from_stats(ours_real, ours_fake) == pytest.approx(float(metric.compute()), rel=1e-3)
