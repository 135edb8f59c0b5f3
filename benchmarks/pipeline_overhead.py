"""Pipeline overhead of an end-to-end run: how much of the wall time is not model compute.

Starts a Ray head (``ray start --head``, timed: a quickstart's in-process Ray start-up costs the same), runs the
pipeline once from scratch against it (fresh run root, fresh MLflow SQLite store: what `make quickstart` does, as
`ray job submit` users run it), and splits the wall time (Ray's start-up + the run) using the stage manifests and
Ray's own task records (the state API's execution start and end of every task):

- each stage's wall time (``finished_at - started_at``), and the time before the first stage (interpreter start,
  imports, MLflow store creation) and between stages (MLflow runs);
- compute: the training loop (rank 0's loop time, checkpoints included), the sampling actors' time inside the
  sampler (summed over shards / actors), and inside the evaluate stage the time during which at least one of its Ray
  tasks or actor methods was executing (feature extraction, sampling the baselines, the NLL bound). Everything else
  (Ray start-up, actor and worker-group start-up, scheduling, MLflow, storage) is overhead.

    python benchmarks/pipeline_overhead.py --config configs/digits.yaml \\
        --out benchmarks/results/pipeline_overhead_digits.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import cpu_name, write_result

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.services import BIN, ray_head  # noqa: E402  (the same Ray head the end-to-end tests start)

STAGES = ("prepare", "tune", "train", "sample", "evaluate", "register")


def run_pipeline(
    config: str, workdir: Path, overrides: list[str], address: str, env: dict[str, str]
) -> tuple[Path, float, float]:
    """(run root, submission time, wall seconds) of one fresh run submitted with ``ray job submit``."""
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "-m",
        "pipelines",
        "run",
        "--config",
        config,
        "run_id=overhead",
        f"storage.root={workdir / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        *overrides,
    ]
    started = time.time()
    with open(workdir / "run.log", "w") as log:
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=REPO)
    return workdir / "runs" / "overhead", started, time.time() - started


def executed_intervals(address: str, env: dict[str, str]) -> list[tuple[str, float, float]]:
    """(name, start, end) in Unix seconds of every finished task and actor method on the cluster at ``address`` (its
    dashboard), from Ray's state API; not actor creations: loading a model into an actor is start-up, counted as
    overhead. ``env`` holds the cluster's ``RAY_AUTH_TOKEN``."""
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    limit = 10_000  # the state API's maximum
    client = StateApiClient(
        address, headers={"Content-Type": "application/json", "authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
    )
    tasks = client.list(
        StateResource.TASKS, options=ListApiOptions(limit=limit, detail=True), raise_on_missing_output=False
    )
    if len(tasks) >= limit:
        raise RuntimeError(f"the run has more than {limit} Ray tasks: the state API cannot list them all")
    return [
        (task.name, task.start_time_ms / 1000, ended_ms(task) / 1000)
        for task in tasks
        if task.type in ("NORMAL_TASK", "ACTOR_TASK") and task.start_time_ms and task.end_time_ms
    ]


def ended_ms(task: Any) -> float:
    """When ``task`` (a state API ``TaskState`` with its events) returned: its FINISHED event where Ray has one.
    The state API's ``end_time_ms`` is the FAILED time where both exist, and the GCS stamps FAILED, at the worker's
    death, on every call of a stopped actor whose FINISHED event (sent by the caller once a second) has not arrived
    within a second; on a loaded machine the last call of an actor stopped right after it gets both."""
    finished = [event["created_ms"] for event in task.events or () if event["state"] == "FINISHED"]
    return finished[0] if finished else task.end_time_ms


def covered_seconds(intervals: list[tuple[float, float]], window: tuple[float, float]) -> float:
    """Length of the union of ``intervals`` clipped to ``window``: the time during which at least one was running."""
    clipped = sorted((max(start, window[0]), min(end, window[1])) for start, end in intervals)
    covered, reach = 0.0, window[0]
    for start, end in clipped:
        if end > max(start, reach):
            covered += end - max(start, reach)
            reach = end
    return covered


def split(
    run_root: Path, started: float, wall: float, ray_startup: float, intervals: list[tuple[str, float, float]]
) -> dict:
    head = json.loads((run_root / "run.json").read_text())["stages"]  # the results this run used, by stage
    manifests = {
        stage: json.loads((run_root / stage / head[stage][:16] / "stage.json").read_text())
        for stage in STAGES
        if stage in head
    }
    stage_seconds = {stage: m["finished_at"] - m["started_at"] for stage, m in manifests.items()}
    evaluate = manifests["evaluate"]
    compute = {
        "train_loop": manifests["train"]["outputs"]["loop_seconds"],
        "sampling": manifests["sample"]["outputs"]["sampling_seconds"],
        "evaluate_tasks": covered_seconds(
            [(a, b) for _, a, b in intervals], (evaluate["started_at"], evaluate["finished_at"])
        ),
    }
    ordered = sorted(manifests.values(), key=lambda m: m["started_at"])
    total = ray_startup + wall
    return {
        "wall_s": total,
        "ray_startup_s": ray_startup,
        "before_first_stage_s": ordered[0]["started_at"] - started,
        "between_stages_s": sum(b["started_at"] - a["finished_at"] for a, b in itertools.pairwise(ordered)),
        "after_last_stage_s": started + wall - ordered[-1]["finished_at"],
        "stage_s": stage_seconds,
        "compute_s": compute,
        "overhead_s": total - sum(compute.values()),
        "overhead_fraction": 1 - sum(compute.values()) / total,
    }


def markdown(result: dict) -> str:
    s = result["split"]
    lines = [
        f"Device: {result['device_name']}; config {result['config']}; wall {s['wall_s']:.1f} s (Ray start-up + run).",
        "",
        "| part | seconds | share of wall |",
        "|---|---|---|",
    ]
    rows = [
        ("Ray head start-up (`ray start --head`)", s["ray_startup_s"]),
        ("before the first stage (job submission, imports, MLflow store)", s["before_first_stage_s"]),
    ]
    rows += [(f"stage {stage}", seconds) for stage, seconds in s["stage_s"].items()]
    rows += [
        ("between stages (MLflow runs)", s["between_stages_s"]),
        ("after the last stage (summary, job end)", s["after_last_stage_s"]),
        ("compute: training loop", s["compute_s"]["train_loop"]),
        ("compute: sampling", s["compute_s"]["sampling"]),
        ("compute: evaluate's Ray tasks and actor methods (time any was running)", s["compute_s"]["evaluate_tasks"]),
        ("**overhead** (wall - compute)", s["overhead_s"]),
    ]
    lines += [f"| {name} | {seconds:.1f} | {100 * seconds / s['wall_s']:.1f}% |" for name, seconds in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ddpm-overhead-") as directory:
        workdir = Path(directory)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        head_started = time.time()
        with ray_head(workdir, env, num_cpus=os.cpu_count()) as (address, ray_env):
            ray_startup = time.time() - head_started
            run_root, started, wall = run_pipeline(args.config, workdir, args.overrides, address, ray_env)
            intervals = executed_intervals(address, ray_env)
            result = {
                "benchmark": "pipeline_overhead",
                "config": args.config,
                "overrides": args.overrides,
                "device_name": cpu_name(),
                "cpus": os.cpu_count(),
                "split": split(run_root, started, wall, ray_startup, intervals),
            }
    write_result(args.out, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
