"""ddpm-pipeline command line: ``python -m pipelines run|retrain|dag|status`` (also the ``ray job submit`` entrypoint).

  run      [--config FILE] [--from STAGE] [key=value ...]   run the DAG; finished stages are skipped
  retrain  [--config FILE] [--schedule-time ISO] [key=value ...]
                                                          one scheduled retraining: run id <run_id>-<schedule time>;
                                                          skipped when the data equals the champion's, else trained
                                                          (warm start from the champion), evaluated, promoted if better
  dag                                                     print the stage graph (text and Mermaid)
  status   RUN_ID [--config FILE] [key=value ...]          each stage's state from its manifest, and a retrain decision
  interpolate RUN_ID [--pair I J] [--timesteps T ...] [--out PNG]
                                                          latent interpolation of two held-out images (paper Fig. 9)
  progressive RUN_ID [--samples N] [--frames F] [--out PNG]
                                                          predicted x_0 along the reverse chain (paper Fig. 6)

Exit codes: 0 done (or skipped), 2 bad config / data / storage / weights, or more resources than the cluster has,
3 another run holds the run root's lease, 4 a stage stopped on purpose (e.g. training diverged; the message says what
to change), 5 storage failed mid-run, is full, or held a corrupt file (run the same command again when it is back:
committed work that is intact is skipped).

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
from pipelines.config import ConfigError, PipelineConfig, load_config
from pipelines.context import StageStopped
from pipelines.contracts import (
    EvaluateOutputs,
    PrepareOutputs,
    RegisterOutputs,
    SampleOutputs,
    StageOutputs,
    TrainOutputs,
    TuneOutputs,
)
from pipelines.execution import ClusterTooSmallError
from pipelines.lease import LeaseHeldError
from pipelines.preflight import PreflightError
from pipelines.typed import SchemaError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    interpolation = commands.add_parser("interpolate", help="latent interpolation of two held-out images (Fig. 9)")
    interpolation.add_argument("run_id")
    interpolation.add_argument("--config")
    interpolation.add_argument("--pair", nargs=2, type=int, default=[0, 1], help="two hold-out image indices")
    interpolation.add_argument("--timesteps", nargs="+", type=int, default=[0, 250, 500, 750, 999])
    interpolation.add_argument("--columns", type=int, default=9, help="mixtures per row, w from 0 to 1")
    interpolation.add_argument("--seed", type=int, default=0)
    interpolation.add_argument("--out", help="PNG URI (default: <run root>/interpolation.png)")
    interpolation.add_argument("overrides", nargs="*")
    progressive = commands.add_parser("progressive", help="x_0 predicted along the reverse chain (Fig. 6)")
    progressive.add_argument("run_id")
    progressive.add_argument("--config")
    progressive.add_argument("--samples", type=int, default=6)
    progressive.add_argument("--frames", type=int, default=11)
    progressive.add_argument("--seed", type=int, default=0)
    progressive.add_argument("--out", help="PNG URI (default: <run root>/progressive.png)")
    progressive.add_argument("overrides", nargs="*")
    return parser


def _figure(args: argparse.Namespace) -> int:
    from pipelines.generation.figures import interpolation_figure, progressive_figure, write_figure
    from pipelines.runs import RunStore

    config = load_config(args.config, [*args.overrides, f"run_id={args.run_id}"])
    if args.command == "interpolate":
        if args.columns < 2:
            raise ConfigError("--columns must be >= 2 (w = 0 and w = 1)")
        images = interpolation_figure(config, (args.pair[0], args.pair[1]), args.timesteps, args.columns, args.seed)
        columns = args.columns + 2
    else:
        if args.samples < 1 or args.frames < 2:
            raise ConfigError("--samples must be >= 1 and --frames >= 2")
        images, columns = progressive_figure(config, args.samples, args.frames, args.seed), args.frames
    out = (
        args.out or f"{RunStore(config).root}/{'interpolation' if args.command == 'interpolate' else 'progressive'}.png"
    )
    write_figure(images, columns, out, config)
    print(f"wrote {out}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from pipelines.dag import STAGES
    from pipelines.retrain import read_decision
    from pipelines.runs import RunStore

    config = load_config(args.config, [*args.overrides, f"run_id={args.run_id}"])
    store = RunStore(config)
    print(f"run {config.run_id} at {store.root}")
    for stage in STAGES:
        try:
            manifest = store.read_manifest(stage.name, stage.outputs)
        except SchemaError as error:
            print(f"  {stage.name:<9} unreadable manifest: {error}; the next run executes this stage again")
            continue
        if manifest is None:
            print(f"  {stage.name:<9} {'not finished' if stage.enabled(config) else 'disabled'}")
            continue
        finished = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.finished_at))
        print(f"  {stage.name:<9} complete {finished}  {stage_detail(manifest.outputs)}")
    decision = read_decision(store)
    if decision is not None:
        scores = "".join(
            f", {label} FID {fid:.4f}"
            for label, fid in (("challenger", decision.challenger_fid), ("champion", decision.champion_fid))
            if fid is not None
        )
        print(f"  retrain   {decision.decision}: {decision.reason}{scores}")
    return 0


def stage_detail(outputs: StageOutputs) -> str:
    """One line on what a finished stage produced."""
    if isinstance(outputs, PrepareOutputs):
        return f"{outputs.num_train} train images, fingerprint {outputs.fingerprint[:12]}"
    if isinstance(outputs, TuneOutputs):
        return f"best of {outputs.trials} trials: {outputs.best_params}"
    if isinstance(outputs, TrainOutputs):
        return f"{outputs.images_seen} images seen"
    if isinstance(outputs, SampleOutputs):
        return f"{outputs.num_samples} samples in {len(outputs.shard_uris)} shards"
    if isinstance(outputs, EvaluateOutputs):
        scores = outputs.scores
        stderr = f" +- {scores.fid_stderr:.3f}" if scores.fid_stderr is not None else ""
        floor = f", real-data floor {scores.fid_floor:.3f}" if scores.fid_floor is not None else ""
        untrained = f", untrained {scores.fid_untrained:.3f}" if scores.fid_untrained is not None else ""
        return f"FID {scores.fid:.3f}{stderr}{floor}{untrained}"
    return f"{outputs.model_name} v{outputs.version}; {outputs.reason}"


def _run(args: argparse.Namespace) -> int:
    from pipelines.dag import check_config, check_from_stage, run_pipeline
    from pipelines.preflight import hold_run_root
    from pipelines.runs import RunStore

    config = load_config(args.config, args.overrides)
    check_config(config)
    check_from_stage(args.from_stage, config)
    started = time.time()
    with hold_run_root(RunStore(config), config):
        results = run_pipeline(config, args.from_stage)
    print("\n== Done in %.0f s ==" % (time.time() - started))
    print(f"Run root:     {config.storage.resolved_root()}/{config.run_id}")
    evaluation, prepared = results.outputs(EvaluateOutputs), results.outputs(PrepareOutputs)
    if evaluation is not None and prepared is not None:
        print_scores(evaluation, prepared, config)
    registered = results.outputs(RegisterOutputs)
    if registered is not None:
        print(f"Model:        {registered.model_uri} ({registered.reason})")
    print_mlflow_ui(config)
    return 0


def print_mlflow_ui(config: PipelineConfig) -> None:
    """Where the runs are: the runs view in MLflow's model-training mode (a local store needs ``mlflow ui`` first)."""
    from pipelines.tracking import Tracker

    uri = config.mlflow.resolved_tracking_uri()
    url = Tracker(config).runs_view_url()
    if uri.startswith(("http://", "https://")):
        print(f"MLflow UI:    {url}")
    else:
        print(f"MLflow UI:    mlflow ui --backend-store-uri {uri}, then open {url}")


def print_scores(evaluation: EvaluateOutputs, prepared: PrepareOutputs, config: PipelineConfig) -> None:
    scores = evaluation.scores
    print(f"Sample grid:  {evaluation.grid_uri}")
    print_fid(evaluation, prepared, config)
    if scores.kid is not None and scores.kid_std is not None:
        settings = config.evaluate
        compared = min(evaluation.protocol.num_samples, prepared.num_train, settings.first_feature_images)
        subset = settings.kid_subset(compared)
        print(
            f"KID:          {scores.kid:.5f} +- {scores.kid_std:.5f} "
            f"(std over {settings.kid_subsets} subsets of {subset} images each; unbiased at any N)"
        )
    if scores.inception_score is not None and scores.inception_score_std is not None:
        print(
            f"Inception Score: {scores.inception_score:.3f} +- {scores.inception_score_std:.3f} "
            f"(std over {config.evaluate.inception_score_splits} splits)"
        )
    if scores.precision is not None and scores.recall is not None:
        print(
            f"Precision / recall (k={config.evaluate.precision_recall_k}): {scores.precision:.3f} / {scores.recall:.3f}"
        )
    nll = evaluation.nll_protocol
    if scores.nll_bpd is not None and scores.nll_bpd_stderr is not None and nll is not None:
        timesteps = "all" if nll.timesteps is None else nll.timesteps
        print(
            f"NLL bound:    {scores.nll_bpd:.3f} +- {scores.nll_bpd_stderr:.3f} bits/dim "
            f"({nll.num_images} {nll.split} images, timesteps: {timesteps})"
        )


def print_fid(evaluation: EvaluateOutputs, prepared: PrepareOutputs, config: PipelineConfig) -> None:
    """The FID with its interval, the real-data floor at the same N and their ratio, FID_inf, and the ceiling."""
    scores, count, pad = evaluation.scores, evaluation.protocol.num_samples, " " * 14
    interval = ""
    if scores.fid_stderr is not None:
        low, high = scores.fid - 1.96 * scores.fid_stderr, scores.fid + 1.96 * scores.fid_stderr
        interval = f" +- {scores.fid_stderr:.3f} (95%: {low:.3f}-{high:.3f}, jackknife)"
    print(f"FID:          {scores.fid:.3f}{interval}  {count} samples, extractor {evaluation.protocol.extractor_id}")
    if scores.fid_floor is not None:
        ratio = f": model/floor {scores.fid_over_floor:.2f}x" if scores.fid_over_floor is not None else ""
        print(
            f"{pad}{scores.fid_floor:.3f}  real-data floor at {count} images (from {prepared.num_holdout} held-out "
            f"images, whose FID is {scores.fid_holdout_vs_train:.3f} at N={prepared.num_holdout}){ratio}"
        )
    if scores.fid_inf is not None:
        floor = f" (held-out real images: {scores.fid_holdout_inf:.3f})" if scores.fid_holdout_inf is not None else ""
        print(f"{pad}{scores.fid_inf:.3f}  FID_inf, the jackknife's bias-corrected FID{floor}")
    if scores.fid_untrained is not None:
        print(f"{pad}{scores.fid_untrained:.3f}  untrained model, same protocol (the ceiling)")


def _retrain(args: argparse.Namespace) -> int:
    from pipelines.dag import check_config
    from pipelines.retrain import parse_schedule_time, retrain

    config = load_config(args.config, args.overrides)
    check_config(config)
    try:
        scheduled_at = parse_schedule_time(args.schedule_time)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    outcome = retrain(config, scheduled_at)
    print(f"\n== retrain {outcome.run_id}: {outcome.decision} ==\n{outcome.reason}")
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; ``key=value`` overrides may also follow an option (``status RUN --config F key=value``),
    which argparse alone does not take after a positional."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    strays = [token for token in extra if token.startswith("-") or "=" not in token or not hasattr(args, "overrides")]
    if strays:
        parser.error(f"unrecognized arguments: {' '.join(strays)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.command == "dag":
            from pipelines.dag import describe

            print(describe())
            return 0
        commands = {"status": _status, "run": _run, "retrain": _retrain, "interpolate": _figure, "progressive": _figure}
        return commands[args.command](args)
    except (ConfigError, DataError, PreflightError, ClusterTooSmallError) as error:
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
