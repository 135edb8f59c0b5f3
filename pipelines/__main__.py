"""ddpm-pipeline command line: ``python -m pipelines run|retrain|dag|status`` (also the ``ray job submit`` entrypoint).

  run      [--config FILE] [--from STAGE] [key=value ...]   run the DAG; finished stages are skipped
  retrain  [--config FILE] [--schedule-time ISO] [key=value ...]
                                                          one scheduled retraining: run id <run_id>-<schedule time>;
                                                          skipped when the data equals the champion's, else trained
                                                          (warm start from the champion), evaluated, promoted if better
  dag                                                     print the stage graph (text and Mermaid)
  status   RUN_ID [--config FILE] [key=value ...]          each stage's state from its manifest, and a retrain decision

Exit codes: 0 done (or skipped), 2 bad config / data / storage / weights, 3 another run holds the run root's lease,
4 a stage stopped on purpose (e.g. training diverged; the message says what to change), 5 storage failed mid-run
(re-run when it is back: committed work is skipped).

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
from ddpm_core.storage import StorageUnavailableError
from pipelines.config import ConfigError, load_config
from pipelines.dag import PreflightError
from pipelines.lease import LeaseHeldError
from pipelines.stages.context import StageStopped


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the pipeline DAG")
    run.add_argument("--config", help="YAML config (default: the embedded digits quickstart)")
    run.add_argument("--from", dest="from_stage", help="re-run from this stage even if it is up to date")
    run.add_argument("overrides", nargs="*", help="section.key=value overrides")
    retrain = commands.add_parser("retrain", help="one scheduled retraining with champion/challenger promotion")
    retrain.add_argument("--config", help="YAML config (its run_id is the base of the scheduled run ids)")
    retrain.add_argument("--schedule-time", help="the schedule tick, ISO 8601 (default: now, UTC)")
    retrain.add_argument("overrides", nargs="*", help="section.key=value overrides")
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
    from pipelines.retrain import read_decision

    decision = read_decision(store)
    if decision is not None:
        scores = "".join(f", {label} FID {decision[key]:.4f}" for key, label in (("challenger_fid", "challenger"), ("champion_fid", "champion"))
                         if decision.get(key) is not None)
        print(f"  retrain   {decision['decision']}: {decision['reason']}{scores}")
    return 0


def _run(args) -> int:
    from pipelines.dag import hold_run_root, run_pipeline
    from pipelines.runs import RunStore

    config = load_config(args.config, args.overrides)
    started = time.time()
    with hold_run_root(RunStore(config), config):
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
        if evaluation.get("inception_score") is not None:
            print(f"Inception Score: {evaluation['inception_score']:.3f} +- {evaluation['inception_score_std']:.3f} "
                  f"(std over {config.evaluate.inception_score_splits} splits)")
        if evaluation.get("precision") is not None:
            print(f"Precision / recall (k={config.evaluate.precision_recall_k}): {evaluation['precision']:.3f} / {evaluation['recall']:.3f}")
        if evaluation.get("nll_bpd") is not None:
            nll = evaluation["nll_protocol"]
            print(f"NLL bound:    {evaluation['nll_bpd']:.3f} +- {evaluation['nll_bpd_stderr']:.3f} bits/dim "
                  f"({nll['nll.num_images']} {nll['nll.split']} images, timesteps: {nll['nll.timesteps']})")
    if "register" in manifests:
        registered = manifests["register"]["outputs"]
        print(f"Model:        {registered['model_uri']} ({registered['reason']})")
    print(f"MLflow UI:    mlflow ui --backend-store-uri {config.mlflow.resolved_tracking_uri()}")
    return 0


def _retrain(args) -> int:
    from pipelines.retrain import parse_schedule_time, retrain

    config = load_config(args.config, args.overrides)
    try:
        scheduled_at = parse_schedule_time(args.schedule_time)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    outcome = retrain(config, scheduled_at)
    print(f"\n== retrain {outcome.run_id}: {outcome.decision} ==\n{outcome.reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "dag":
            from pipelines.dag import describe

            print(describe())
            return 0
        return {"status": _status, "run": _run, "retrain": _retrain}[args.command](args)
    except (ConfigError, DataError, PreflightError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except LeaseHeldError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except StageStopped as error:
        print(f"error: {error}", file=sys.stderr)
        return 4
    except StorageUnavailableError as error:  # also when raised in a Ray task (RayTaskError subclasses it)
        print(f"error: {error}", file=sys.stderr)
        return 5


if __name__ == "__main__":
    sys.exit(main())
