"""ddpm-pipeline command line: ``python -m pipelines run|dag|status`` (also the ``ray job submit`` entrypoint).

  run     [--config FILE] [--from STAGE] [key=value ...]   run the DAG; finished stages are skipped
  dag                                                     print the stage graph (text and Mermaid)
  status  RUN_ID [--config FILE] [key=value ...]          each stage's state from its manifest

Without --config the embedded default runs: builtin:digits, local Ray, MLflow in ./mlflow.db, storage in ./runs.
Environment: RAY_ADDRESS (set by `ray job submit`), RAY_AUTH_MODE=token with ~/.ray/auth_token on clusters with
token authentication, MLFLOW_TRACKING_URI / MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL for s3:// storage. Secrets are read from the environment only.
"""

from __future__ import annotations

import argparse
import sys
import time

from ddpm_core.data import DataError
from pipelines.config import ConfigError, load_config
from pipelines.dag import PreflightError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the pipeline DAG")
    run.add_argument("--config", help="YAML config (default: the embedded digits quickstart)")
    run.add_argument("--from", dest="from_stage", help="re-run from this stage even if it is up to date")
    run.add_argument("overrides", nargs="*", help="section.key=value overrides")
    commands.add_parser("dag", help="print the stage graph")
    status = commands.add_parser("status", help="show each stage's state")
    status.add_argument("run_id")
    status.add_argument("--config")
    status.add_argument("overrides", nargs="*")
    return parser


def _status(args) -> int:
    from pipelines.dag import STAGES
    from pipelines.runs import RunStore

    config = load_config(args.config, [*args.overrides, f"run_id={args.run_id}"])
    store = RunStore(config)
    print(f"run {config.run_id} at {store.root}")
    for stage in STAGES:
        manifest = store.read_manifest(stage.name)
        if manifest is None:
            print(f"  {stage.name:<9} not finished")
            continue
        outputs = manifest["outputs"]
        detail = {"prepare": lambda: f"{outputs['num_train']} train images, fingerprint {outputs['fingerprint'][:12]}",
                  "train": lambda: f"{outputs['images_seen']} images seen",
                  "sample": lambda: f"{outputs['num_samples']} samples in {len(outputs['shard_uris'])} shards",
                  "evaluate": lambda: f"FID {outputs['fid']:.3f}" + (f" (untrained {outputs['fid_untrained']:.3f})" if outputs.get("fid_untrained") else ""),
                  "register": lambda: f"{outputs['model_name']} v{outputs['version']}; {outputs['reason']}"}[stage.name]()
        finished = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest["finished_at"]))
        print(f"  {stage.name:<9} complete {finished}  {detail}")
    return 0


def _run(args) -> int:
    from pipelines.dag import run_pipeline

    config = load_config(args.config, args.overrides)
    started = time.time()
    manifests = run_pipeline(config, args.from_stage)
    evaluation = manifests.get("evaluate", {}).get("outputs", {})
    print("\n== Done in %.0f s ==" % (time.time() - started))
    print(f"Run root:     {config.storage.resolved_root()}/{config.run_id}")
    if evaluation:
        print(f"Sample grid:  {evaluation['grid_uri']}")
        print(f"FID ({evaluation['protocol']['extractor_id']}): {evaluation['fid']:.3f}  trained model")
        if evaluation.get("fid_untrained") is not None:
            print(f"{'':36}{evaluation['fid_untrained']:.3f}  untrained model, same protocol")
        if evaluation.get("fid_holdout_vs_train") is not None:
            held_out = manifests["prepare"]["outputs"]["num_holdout"]
            print(f"{'':36}{evaluation['fid_holdout_vs_train']:.3f}  {held_out} held-out real images "
                  f"(a floor; FID is biased upward when fewer images are scored)")
    if "register" in manifests:
        registered = manifests["register"]["outputs"]
        print(f"Model:        {registered['model_uri']} ({registered['reason']})")
    print(f"MLflow UI:    mlflow ui --backend-store-uri {config.mlflow.resolved_tracking_uri()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "dag":
            from pipelines.dag import describe

            print(describe())
            return 0
        return _status(args) if args.command == "status" else _run(args)
    except (ConfigError, DataError, PreflightError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
