"""Checkpoints: round trips through memory:// and S3 (moto server), commit semantics, safe loading, and which one a
restarted worker group resumes from."""

import io
import os
import pickle
import uuid

import fsspec
import pytest
import ray.train
import torch

from ddpm_core.checkpoint import CheckpointError, load_snapshot, load_training_state, save_snapshot, save_training_state
from ddpm_core.diffusion import DiffusionConfig, GaussianDiffusion, Variance
from ddpm_core.ema import EMA
from ddpm_core.storage import IncompleteError, commit, is_committed, read_committed
from ddpm_core.training import OptimConfig, make_optimizer, train_step
from ddpm_core.unet import UNet, unet_preset
from pipelines.config import TrainSection
from pipelines.execution import Device
from pipelines.training.hooks import checkpoint_name
from pipelines.training.job import TrainJob
from pipelines.training.state import Worker, newest_checkpoint_state


def trained_state(steps=2):
    torch.manual_seed(0)
    config = unet_preset("digits")
    model = UNet(config)
    diffusion_config = DiffusionConfig(num_timesteps=100)
    diffusion = GaussianDiffusion.from_config(diffusion_config)
    optim = OptimConfig(warmup_images=0)
    optimizer, ema = make_optimizer(model, optim), EMA(model, 0.9)
    for _ in range(steps):
        train_step(model, diffusion, optimizer, torch.randn(4, 1, 8, 8), optim, 0, ema)
    state = {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": steps,
        "images_seen": 4 * steps,
        "rng": torch.get_rng_state(),
        "config": {"unet": config.to_dict(), "diffusion": diffusion_config.to_dict()},
    }
    return model, ema, optimizer, state, config, diffusion_config


def assert_state_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_state_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_state_equal(x, y)
    else:
        assert a == b


@pytest.fixture(params=["memory", "s3"])
def root(request):
    if request.param == "memory":
        return f"memory://ckpt-{uuid.uuid4().hex}", None
    bucket, options = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs/r1", options


def test_training_state_round_trip(root):
    uri, options = root
    _, _, optimizer, state, *_ = trained_state()
    save_training_state(f"{uri}/step-2", state, options)
    loaded = load_training_state(f"{uri}/step-2", options)
    assert_state_equal(state, loaded)
    # Loaded state resumes: same model, EMA and optimizer after load_state_dict.
    fresh_model, fresh_ema = UNet(unet_preset("digits")), EMA(UNet(unet_preset("digits")), 0.5)
    fresh_model.load_state_dict(loaded["model"])
    fresh_ema.load_state_dict(loaded["ema"])
    fresh_optimizer = make_optimizer(fresh_model, OptimConfig())
    fresh_optimizer.load_state_dict(loaded["optimizer"])
    assert fresh_ema.num_updates == 2 and fresh_ema.decay == 0.9
    assert_state_equal(fresh_optimizer.state_dict(), optimizer.state_dict())


def test_snapshot_round_trip_rebuilds_the_same_network(root):
    uri, options = root
    _, ema, _, _, config, diffusion_config = trained_state()
    save_snapshot(f"{uri}/snapshot", ema.model, config, diffusion_config, {"images_seen": 8}, options)
    snapshot = load_snapshot(f"{uri}/snapshot", options)
    assert snapshot.unet == config and snapshot.diffusion == diffusion_config
    assert snapshot.metadata == {"images_seen": 8}
    rebuilt = snapshot.build_model()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 70])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t), ema.model(x, t), rtol=0, atol=0)


def test_uncommitted_or_corrupt_checkpoints_are_refused():
    uri = f"memory://ckpt-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    # Payload written, manifest never written (a crash before commit): not a checkpoint.
    fs.pipe_file(f"{uri}/partial/training_state.pt", b"half")
    assert not is_committed(f"{uri}/partial")
    with pytest.raises(CheckpointError, match="never committed"):
        load_training_state(f"{uri}/partial")
    # Committed, then a file is damaged: the checksum catches it.
    commit(f"{uri}/good", {"a.bin": b"0123456789"})
    fs.pipe_file(f"{uri}/good/a.bin", b"0123456780")
    with pytest.raises(IncompleteError, match="SHA-256"):
        read_committed(f"{uri}/good")
    # Re-committing over an old directory removes the old manifest before writing new files.
    commit(f"{uri}/good", {"a.bin": b"new"})
    assert read_committed(f"{uri}/good")[0] == {"a.bin": b"new"}


def test_local_commit_leaves_no_temporary_files(tmp_path):
    commit(str(tmp_path / "ckpt"), {"a.bin": b"x" * 1000, "b.json": b"{}"})
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["a.bin", "b.json", "manifest.json"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ddpm-pwned-marker",))


def test_opening_a_checkpoint_runs_no_code_from_it():
    marker = "/tmp/ddpm-pwned-marker"
    if os.path.exists(marker):
        os.remove(marker)
    uri = f"memory://ckpt-{uuid.uuid4().hex}/evil"
    buffer = io.BytesIO()
    torch.save({"step": 1, "payload": _Exploit()}, buffer, pickle_module=pickle)
    commit(uri, {"training_state.pt": buffer.getvalue()})  # a correctly committed, malicious file
    with pytest.raises(CheckpointError, match="not a loadable training state"):
        load_training_state(uri)
    assert not os.path.exists(marker)


def test_snapshot_from_an_incompatible_config_is_refused():
    _, ema, _, _, config, _ = trained_state(steps=1)
    uri = f"memory://ckpt-{uuid.uuid4().hex}/snap"
    # Weights of a fixed-variance model declared as learned-range: the output layer does not fit.
    save_snapshot(
        uri, ema.model, config, DiffusionConfig(num_timesteps=100, variance=Variance.LEARNED_RANGE, loss="hybrid")
    )
    with pytest.raises(CheckpointError, match="do not fit"):
        load_snapshot(uri).build_model()


def test_a_writer_killed_mid_commit_leaves_nothing_that_reads_as_complete(tmp_path):
    """A process SIGKILLed while committing a large file: readers see no complete object, the next commit of the same
    directory succeeds and removes the half-written debris."""
    import signal
    import subprocess
    import sys
    import time

    uri = str(tmp_path / "ckpt")
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from ddpm_core.storage import commit; "
            f"commit({uri!r}, {{'state.bin': b'x' * (1 << 28), 'b.json': b'{{}}'}})",
        ]
    )
    deadline = time.time() + 60
    while not list((tmp_path / "ckpt").glob("*.tmp-*")):  # the payload is being written
        assert writer.poll() is None and time.time() < deadline, (
            "the writer finished or failed before it could be killed"
        )
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    assert not is_committed(uri)
    with pytest.raises(IncompleteError, match="never committed"):
        read_committed(uri)
    assert list((tmp_path / "ckpt").glob("*.tmp-*")), "debris of the killed writer"
    commit(uri, {"state.bin": b"ok"})
    assert read_committed(uri)[0] == {"state.bin": b"ok"}
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["manifest.json", "state.bin"]


def committed_steps(tmp_path, steps):
    """A job whose trainer folder holds a committed training state for each of ``steps`` (Ray Train's layout,
    ``hooks.checkpoint_name``), and the folder of each."""
    job = TrainJob(
        *(unet_preset("digits"), DiffusionConfig(num_timesteps=100), TrainSection(), Device.CPU, "", None),
        *(str(tmp_path), {}, "", ""),
    )
    folders = {}
    for step in steps:
        folders[step] = tmp_path / "ray" / "trainer" / checkpoint_name(step)
        save_training_state(str(folders[step]), {"model": {}, "step": step, "images_seen": 128 * step})
    return job, folders


def test_a_restarted_group_resumes_from_the_newest_committed_checkpoint_even_one_ray_train_never_registered(
    tmp_path, capsys
):
    """A worker uploads its checkpoint before Ray Train's controller takes the report, so a group that goes in
    between (a preempted node past its last call) leaves a newer checkpoint than Ray Train's latest: the restart
    takes it, the run being deterministic; an unreadable newer one is passed over, and Ray Train's latest is used
    when nothing newer is there."""
    job, folders = committed_steps(tmp_path, [16, 128, 256])
    worker = Worker(0, 1, torch.device("cpu"), None, 1, (0,))
    registered = ray.train.Checkpoint(str(folders[128]))
    state, how = newest_checkpoint_state(job, worker, registered)
    assert state["step"] == 256 and how == f", the newest committed one (Ray Train's latest is {folders[128].name})"
    (folders[256] / "training_state.pt").write_bytes(b"torn")
    state, _ = newest_checkpoint_state(job, worker, registered)
    assert state["step"] == 128 and "the latest checkpoint cannot be read" in capsys.readouterr().out
    assert newest_checkpoint_state(job, worker, ray.train.Checkpoint(str(folders[256])))[0]["step"] == 128
    assert newest_checkpoint_state(job, worker, None)[0]["step"] == 128  # Ray Train's record set aside
    assert newest_checkpoint_state(committed_steps(tmp_path / "fresh", [])[0], worker, None) is None
