"""On a real (local) Ray cluster: sampling actors that the cluster cannot hold fail in seconds with the numbers
instead of waiting forever (training workers: test_reliability_inputs, through the CLI); a sampling plan that
would take days says so; a corrupt snapshot is found before any sampling actor starts."""

import time
from pathlib import Path

import pytest
import torch

import pipelines.generation.sampling as sampling
from ddpm_core.checkpoint import WEIGHTS, save_snapshot
from ddpm_core.diffusion import DiffusionConfig
from ddpm_core.samplers import Method, SamplerConfig
from ddpm_core.storage import IncompleteError
from ddpm_core.unet import UNet, unet_preset
from pipelines.contracts import NetworkExecution
from pipelines.execution import ClusterTooSmallError, Demand, Device, Execution, check_fits
from pipelines.generation.sampling import SampleRequest, sample_to_shards


@pytest.fixture
def snapshot(tmp_path):
    unet = unet_preset("digits")
    torch.manual_seed(0)
    save_snapshot(str(tmp_path / "snapshot"), UNet(unet), unet, DiffusionConfig(num_timesteps=50))
    return str(tmp_path / "snapshot")


def request(snapshot: str, out: Path, num_workers: int, num_samples: int = 4) -> SampleRequest:
    return SampleRequest(
        snapshot,
        str(out),
        num_samples,
        2,
        num_workers,
        SamplerConfig(method=Method.DDIM, num_steps=2),
        0,
        NetworkExecution("fp32", compile=False),
    )


def test_more_sampling_actors_than_the_cluster_has_fail_at_once(local_ray, snapshot, tmp_path):
    started = time.time()
    with pytest.raises(
        ClusterTooSmallError,
        match=r"2 sampling actors need more than this cluster has \(2 GPU asked, the cluster has 0\)",
    ):
        sample_to_shards(request(snapshot, tmp_path / "a", 2, 4), Execution({}, {}, Device.GPU), print)  # 2 GPUs, none
    with pytest.raises(
        ClusterTooSmallError, match=r"8 sampling actors .*\(8 CPU asked, the cluster has 2\): lower sample"
    ):
        sample_to_shards(request(snapshot, tmp_path / "b", 8, 16), Execution({}, {}, Device.CPU), print)
    assert time.time() - started < 30
    # On a cluster that adds nodes on demand the same demand waits for them, and says so.
    said: list[str] = []
    check_fits(Demand("3 things", {"CPU": 3.0}, "k"), Execution({}, {}, Device.CPU, autoscaling=True), said.append)
    assert said == [
        "3 things: 3 CPU asked, the cluster has 2; waiting for the autoscaler to add nodes (cluster.autoscaling=true)"
    ]


def test_a_sampling_plan_that_would_take_long_is_announced(local_ray, snapshot, tmp_path, monkeypatch):
    monkeypatch.setattr(sampling, "LONG_SAMPLING_S", 0.0)
    lines: list[str] = []
    uris, _ = sample_to_shards(request(snapshot, tmp_path / "s", 2, 4), Execution({}, {}, Device.CPU), lines.append)
    assert len(uris) == 2 and sum("warning: at this rate the remaining" in line for line in lines) == 1, lines
    assert "add actors (sample.num_workers)" in next(line for line in lines if "warning" in line)


def test_a_corrupt_snapshot_is_found_before_sampling(local_ray, snapshot, tmp_path):
    weights = Path(snapshot) / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size
    weights.write_bytes(bytes(data))
    with pytest.raises(IncompleteError, match="model.safetensors: size or SHA-256 does not match") as caught:
        sample_to_shards(request(snapshot, tmp_path / "x", 2, 4), Execution({}, {}, Device.CPU), print)
    assert caught.value.uri == snapshot and caught.value.corrupt
    assert not list((tmp_path / "x").glob("*/manifest.json")), "nothing sampled from it"
