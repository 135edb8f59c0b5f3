"""Pipeline overhead of an end-to-end run: how much of the wall time is not model compute.

Runs the pipeline once from scratch (fresh run root, fresh MLflow SQLite store, a local Ray instance started by the
run itself: what `make quickstart` does) and splits its wall time using the stage manifests:

- each stage's wall time (``finished_at - started_at``), and the time before the first stage (interpreter start,
  imports, MLflow store creation) and between stages (Ray start-up, MLflow runs);
- compute: the training loop (rank 0's loop time, checkpoints included), the sampling actors' time inside the
  sampler (summed over shards / actors), and the whole evaluate stage (its Ray task start-up and MLflow logging
  are counted as compute here, so the overhead below is a lower bound).

    python benchmarks/pipeline_overhead.py --config configs/digits.yaml --out benchmarks/results/pipeline_overhead_digits.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_name, write_result

STAGES = ("prepare", "tune", "train", "sample", "evaluate", "register")


def run_pipeline(config: str, workdir: Path, overrides: list[str]) -> tuple[Path, float, float]:
    """(run root, process start time, wall seconds) of one fresh run."""
    command = [sys.executable, "-m", "pipelines", "run", "--config", config, "run_id=overhead",
               f"storage.root={workdir / 'runs'}", f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.time()
    with open(workdir / "run.log", "w") as log:
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return workdir / "runs" / "overhead", started, time.time() - started


def split(run_root: Path, started: float, wall: float) -> dict:
    manifests = {stage: json.loads((run_root / stage / "stage.json").read_text())
                 for stage in STAGES if (run_root / stage / "stage.json").exists()}
    stage_seconds = {stage: m["finished_at"] - m["started_at"] for stage, m in manifests.items()}
    compute = {"train_loop": manifests["train"]["outputs"]["loop_seconds"],
               "sampling": manifests["sample"]["outputs"]["sampling_seconds"],
               "evaluate_stage": stage_seconds["evaluate"]}
    ordered = sorted(manifests.values(), key=lambda m: m["started_at"])
    return {"wall_s": wall, "before_first_stage_s": ordered[0]["started_at"] - started,
            "between_stages_s": sum(b["started_at"] - a["finished_at"] for a, b in zip(ordered, ordered[1:])),
            "after_last_stage_s": started + wall - ordered[-1]["finished_at"], "stage_s": stage_seconds, "compute_s": compute,
            "overhead_s": wall - sum(compute.values()), "overhead_fraction": 1 - sum(compute.values()) / wall}


def markdown(result: dict) -> str:
    s = result["split"]
    lines = [f"Device: {result['device_name']}; config {result['config']}; wall {s['wall_s']:.1f} s.", "",
             "| part | seconds | share of wall |", "|---|---|---|"]
    rows = [("before the first stage (start-up, imports, MLflow store)", s["before_first_stage_s"])]
    rows += [(f"stage {stage}", seconds) for stage, seconds in s["stage_s"].items()]
    rows += [("between stages (Ray start-up, MLflow runs)", s["between_stages_s"]),
             ("after the last stage (summary, shutdown)", s["after_last_stage_s"]),
             ("compute: training loop", s["compute_s"]["train_loop"]), ("compute: sampling", s["compute_s"]["sampling"]),
             ("compute: evaluate stage (all of it)", s["compute_s"]["evaluate_stage"]),
             ("**overhead** (wall - compute, a lower bound)", s["overhead_s"])]
    lines += [f"| {name} | {seconds:.1f} | {100 * seconds / s['wall_s']:.1f}% |" for name, seconds in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits.yaml")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ddpm-overhead-") as directory:
        run_root, started, wall = run_pipeline(args.config, Path(directory), args.overrides)
        result = {"benchmark": "pipeline_overhead", "config": args.config, "overrides": args.overrides,
                  "device_name": cpu_name(), "cpus": os.cpu_count(),
                  "split": split(run_root, started, wall)}
    write_result(args.out, result)
    print(markdown(result))


if __name__ == "__main__":
    main()
