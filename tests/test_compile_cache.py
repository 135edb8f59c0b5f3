"""torch.compile's artifacts kept in storage (ddpm_core.compile_cache): a fresh process that loads them compiles
nothing again (inductor and AOTAutograd cache hits only), gives the same outputs, and a broken file is skipped."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm_core.compile_cache import cache_file_uri, load_compiled

REPO = Path(__file__).resolve().parents[1]

# One compiled forward + backward of a small conv/GroupNorm/SiLU network in a fresh process with its own inductor
# cache folder; ``load`` or ``save`` the mega-cache at URI; prints the cache counters and the output's sum.
PROGRAM = """
import json, sys, torch
from torch._dynamo.utils import counters
from ddpm_core.compile_cache import load_compiled, save_compiled
mode, uri = sys.argv[1], sys.argv[2]
loaded = load_compiled(uri) if mode == "load" else 0
torch.manual_seed(0)
net = torch.nn.Sequential(
    torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.GroupNorm(4, 8), torch.nn.SiLU(), torch.nn.Conv2d(8, 1, 3, padding=1)
)
out = torch.compile(net)(torch.ones(2, 1, 8, 8))
out.square().mean().backward()
saved = save_compiled(uri) if mode == "save" else 0
print(json.dumps({"loaded": loaded, "saved": saved, "sum": out.sum().item(),
                  "inductor": dict(counters["inductor"]), "aot": dict(counters["aot_autograd"])}))
"""


def compile_in_fresh_process(mode: str, uri: str, cache_dir: Path) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode, uri],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_fresh_process_loads_the_compiled_artifacts_instead_of_compiling(tmp_path):
    uri = f"file://{tmp_path}/cache/artifacts.bin"
    first = compile_in_fresh_process("save", uri, tmp_path / "inductor-a")
    assert first["saved"] > 0 and first["inductor"].get("fxgraph_cache_miss", 0) >= 1
    second = compile_in_fresh_process("load", uri, tmp_path / "inductor-b")  # an empty local cache: a new machine
    assert second["loaded"] == first["saved"]
    assert second["inductor"].get("fxgraph_cache_hit", 0) == first["inductor"]["fxgraph_cache_miss"]
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0 and second["aot"].get("autograd_cache_miss", 0) == 0
    assert second["sum"] == first["sum"]


def test_a_missing_or_unreadable_cache_is_a_miss_not_an_error(tmp_path):
    assert load_compiled(str(tmp_path / "none.bin")) == 0
    (tmp_path / "broken.bin").write_bytes(b"not a cache")
    with pytest.warns(UserWarning, match="not loaded"):
        assert load_compiled(str(tmp_path / "broken.bin")) == 0


def test_the_cache_file_is_keyed_by_torch_the_device_and_the_job():
    cpu = torch.device("cpu")
    one = cache_file_uri("s3://bucket/_cache/compile/train", cpu, {"unet": {"base_channels": 32}, "batch": 64})
    assert one.startswith("s3://bucket/_cache/compile/train/torch-") and one.endswith(".bin")
    assert torch.__version__.replace("+", "_") in one
    assert one == cache_file_uri("s3://bucket/_cache/compile/train", cpu, {"batch": 64, "unet": {"base_channels": 32}})
    assert one != cache_file_uri("s3://bucket/_cache/compile/train", cpu, {"unet": {"base_channels": 32}, "batch": 32})


# two whole compiled runs, minutes of inductor on 2 cores (in make test-all); the load path is tested above in seconds
@pytest.mark.slow
def test_a_second_run_of_a_compiled_job_loads_what_the_first_compiled(tmp_path):
    """The whole DAG twice with train.compile_on_cpu (2,560 images): the first run's rank 0 saves the compiled
    artifacts under {storage.root}/_cache/compile/train/, the second run's workers load them, and the training is the
    same (loss and FID)."""
    overrides = [
        "train.compile_on_cpu=true",
        "train.total_images=2560",
        "sample.num_samples=200",
        "evaluate.nll_images=20",
        "train.ema_choice_images=64",  # the post-hoc EMA choice on a small budget
        "train.ema_choice_timesteps=4",
    ]
    logs = []
    for run_id in ("first", "second"):
        run = subprocess.run(
            [sys.executable, "-m", "pipelines", "run", *overrides, f"run_id={run_id}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert run.returncode == 0, run.stderr[-3000:]
        logs.append(run.stdout + run.stderr)
    first, second = logs
    assert "compile cache: saved" in first and "compile cache: loaded" not in first
    assert "compile cache: loaded" in second and "compile cache: saved" not in second
    assert list((tmp_path / "runs" / "_cache" / "compile" / "train").glob("torch-*.bin"))

    def last(pattern: str, log: str) -> str:
        return [line for line in log.splitlines() if pattern in line][-1].split(pattern, 1)[1]

    assert last("2560/2560 images, loss ", first).split(",")[0] == last("2560/2560 images, loss ", second).split(",")[0]
    fids = [re.search(r"^FID: +([0-9.]+)", log, re.MULTILINE) for log in logs]  # the summary's first line
    assert fids[0] and fids[1] and fids[0][1] == fids[1][1]
