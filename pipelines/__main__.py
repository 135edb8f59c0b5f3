"""ddpm-pipeline command line: ``python -m pipelines run|retrain|dag|status|gc`` (also the ``ray job submit``
entrypoint).

  run      [--config FILE] [--from STAGE] [--allow-changes] [key=value ...]
                                                          run the DAG; a stage whose inputs have a committed result
                                                          is reused; an existing run id re-run with a config that
                                                          changes results is refused unless --allow-changes
  retrain  [--config FILE] [--schedule-time ISO] [key=value ...]
                                                          one scheduled retraining: run id <run_id>-<schedule time>;
                                                          skipped when the data equals the champion's, else trained
                                                          (warm start from the champion), evaluated, promoted if better
  dag                                                     print the stage graph (text and Mermaid)
  status   RUN_ID [--config FILE] [key=value ...]          per stage: a result that matches the run's config (or the
                                                          config given), the results of other configs kept, and a
                                                          retrain decision
  gc       RUN_ID [--delete] [--config FILE] [key=value ...]
                                                          the results no manifest of the run's config references,
                                                          with sizes (a dry run), or --delete them
  interpolate RUN_ID [--pair I J] [--timesteps T ...] [--out PNG]
                                                          latent interpolation of two held-out images (paper Fig. 9)
  progressive RUN_ID [--samples N] [--frames F] [--out PNG]
                                                          predicted x_0 along the reverse chain (paper Fig. 6)

Exit codes: 0 done (or skipped), 2 bad config / data / storage / weights, or more resources than the cluster has,
3 another run holds the run root's lease, 4 a stage stopped on purpose (e.g. training diverged; the message says what
to change), 5 storage failed mid-run, is full, or held a corrupt file (run the same command again when it is back:
committed work that is intact is skipped).

Without --config the embedded default runs: builtin:digits, local Ray, MLflow in ./mlflow.db, storage in ./runs.
Environment: RAY_ADDRESS (set by `ray job submit`; unset: a local Ray of the job's own; `auto`: the cluster this
host runs), RAY_AUTH_MODE=token with ~/.ray/auth_token on clusters with
token authentication, MLFLOW_TRACKING_URI / MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL for s3:// storage. Secrets are read from the environment only.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from ddpm_core.data import DataError
from ddpm_core.storage import StorageUnavailableError, StorageUnreachableError
from pipelines.config import ConfigError, PipelineConfig
from pipelines.config_file import load_config
from pipelines.context import StageStopped
from pipelines.contracts import (
    EvaluateOutputs,
    RegisterOutputs,
    TrainOutputs,
)
from pipelines.execution import ClusterTooSmallError
from pipelines.interruption import STOP, Interrupted
from pipelines.lease import LeaseHeldError
from pipelines.preflight import PreflightError
from pipelines.runs import RunStore


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the pipeline DAG")
    run.add_argument("--config", help="YAML config (default: the embedded digits quickstart)")
    run.add_argument("--from", dest="from_stage", help="re-run from this stage even if it is up to date")
    run.add_argument(
        "--allow-changes",
        action="store_true",
        help="re-run an existing run id with a config that changes its results (the earlier results are kept)",
    )
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
    collect = commands.add_parser("gc", help="list (or --delete) results no manifest of the run's config references")
    collect.add_argument("run_id")
    collect.add_argument("--config")
    collect.add_argument("--delete", action="store_true", help="remove them (default: a dry run that lists them)")
    collect.add_argument("overrides", nargs="*")
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

    config = load_config(args.config, [*args.overrides, f"run_id={args.run_id}"])
    check_figure_options(args)
    if args.out:
        check_writable(args.out, "--out")
    name = "interpolation" if args.command == "interpolate" else "progressive"
    out = args.out or f"{RunStore.of(config).root}/{name}.png"
    if args.command == "interpolate":
        images = interpolation_figure(config, (args.pair[0], args.pair[1]), args.timesteps, args.columns, args.seed)
        columns = args.columns + 2
    else:
        images, columns = progressive_figure(config, args.samples, args.frames, args.seed), args.frames
    write_figure(images, columns, out, config)
    print(f"wrote {out}")
    return 0


def check_figure_options(args: argparse.Namespace) -> None:
    """The options of ``interpolate`` / ``progressive`` that can be checked before the snapshot is read."""
    if args.command == "interpolate":
        if args.columns < 2:
            raise ConfigError("--columns must be >= 2 (w = 0 and w = 1)")
        negative = [index for index in args.pair if index < 0]
        if negative:
            raise ConfigError(
                f"--pair takes two hold-out image indices counted from 0, got {args.pair[0]} {args.pair[1]} "
                f"({negative[0]} is negative)"
            )
    elif args.samples < 1 or args.frames < 2:
        raise ConfigError("--samples must be >= 1 and --frames >= 2")


def check_writable(uri: str, option: str) -> None:
    """A local output file can be written: its folder exists (made when missing and makeable) and takes a new file,
    and the file, if there, is a file that can be replaced; else a :class:`ConfigError` naming ``option``. Other
    URIs are written as they are (their storage is checked when written)."""
    if "://" in uri and not uri.startswith("file://"):
        return
    path = Path(uri.removeprefix("file://")).expanduser()
    if path.is_dir():
        raise ConfigError(f"{option} {uri!r} is a folder: give a file name, e.g. {str(path / 'figure.png')!r}")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        there = next((p for p in (folder, *folder.parents) if p.exists()), None)  # a file in the way?
        why = f"{there} is a file" if there is not None and not there.is_dir() else error.strerror or str(error)
        raise ConfigError(f"{option} {uri!r}: its folder {str(folder)!r} cannot be made ({why})") from None
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".probe"):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is read-only")
    except OSError as error:
        raise ConfigError(
            f"{option} {uri!r} cannot be written ({error.strerror or error}): give a path in a folder you can write to"
        ) from None


def _status(args: argparse.Namespace) -> int:
    from pipelines.dag import STAGES, external_for
    from pipelines.inspection import stage_lines
    from pipelines.plan import config_changes, plan
    from pipelines.retrain import read_decision

    given = load_config(args.config, [*args.overrides, f"run_id={args.run_id}"])
    store = RunStore.of(given)
    saved, decision = store.read_config(), read_decision(store)
    if saved is None and decision is None:
        raise ConfigError(no_run(args.run_id, store))
    config = given if saved is None or asks_another_config(args) else saved
    print(f"run {store.run_id} at {store.root}")
    if saved is not None and config is not saved:
        changes = [change for change in config_changes(saved, config) if not change.execution]
        shown = "; ".join(map(str, changes)) if changes else "none"
        print(f"  compared with the config given; its differences from the run's saved config: {shown}")
    if saved is not None:
        external = external_for(config, given)
        for line in stage_lines(store, plan(STAGES, config, external), store.read_head()):
            print(line)
    if decision is not None:
        scores = "".join(
            f", {label} FID {fid:.4f}"
            for label, fid in (("challenger", decision.challenger_fid), ("champion", decision.champion_fid))
            if fid is not None
        )
        print(f"  retrain   {decision.decision}: {decision.reason}{scores}")
    return 0


def no_run(run_id: str, store: RunStore) -> str:
    return (
        f"there is no run {run_id!r} at {store.root}: check the run id and storage.root (give --config or "
        "storage.root=... as for the run)"
    )


def run_config(args: argparse.Namespace) -> tuple[PipelineConfig, RunStore, PipelineConfig]:
    """(the config the command line gives, where it places the run, the config the run was made with)."""
    given = load_config(args.config, [*args.overrides, f"run_id={args.run_id}"])
    store = RunStore.of(given)
    saved = store.read_config()
    if saved is None:
        raise ConfigError(no_run(args.run_id, store))
    return given, store, saved


def asks_another_config(args: argparse.Namespace) -> bool:
    """Whether the command line names a config to compare (a file, or overrides beyond where the run lives)."""
    return bool(args.config) or any(not override.startswith(("storage.", "mlflow.")) for override in args.overrides)


def _gc(args: argparse.Namespace) -> int:
    from pipelines.dag import STAGES, external_for
    from pipelines.inspection import garbage, remove, size_text
    from pipelines.plan import plan
    from pipelines.preflight import hold_run_root

    given, store, saved = run_config(args)
    external = external_for(saved, given)
    items = garbage(store, plan(STAGES, saved, external), store.read_head())
    print(f"run {store.run_id} at {store.root}: {len(items)} result(s) no manifest of its config references")
    for item in items:
        print(f"  {item.stage}/{item.folder}  {size_text(item.bytes)}")
    total = size_text(sum(item.bytes for item in items))
    if not args.delete:
        print(f"{total} in all; a dry run: add --delete to remove them")
        return 0
    with hold_run_root(store, saved):
        remove(store, items)
    print(f"removed {total}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from pipelines.dag import check_config, check_from_stage, check_run_config, external_for, run_pipeline
    from pipelines.nodes import join_cluster
    from pipelines.preflight import hold_run_root

    config = load_config(args.config, args.overrides)
    check_config(config)
    check_from_stage(args.from_stage, config)
    join_cluster(config)  # a cluster RAY_ADDRESS names, checked against the config before anything is written
    external = external_for(config)
    check_run_config(config, args.allow_changes, external)
    started = time.time()
    with hold_run_root(RunStore.of(config), config):
        results = run_pipeline(config, args.from_stage, external=external)
    print("\n== Done in %.0f s ==" % (time.time() - started))
    print(f"Run root:     {config.storage.resolved_root()}/{config.run_id}")
    trained = results.outputs(TrainOutputs)
    if trained is not None:
        print(f"Sampled:      the {trained.ema_described()}")
    evaluation = results.outputs(EvaluateOutputs)
    if evaluation is not None:
        print_scores(evaluation)
    registered = results.outputs(RegisterOutputs)
    if registered is not None:
        print(f"Model:        {registered.model_uri} ({registered.reason})")
    print_mlflow_ui(config)
    return 0


def print_mlflow_ui(config: PipelineConfig) -> None:
    """Where the runs are: the runs view in MLflow's model-training mode (a local store needs ``mlflow ui`` first)."""
    from pipelines.redaction import redact
    from pipelines.tracking import Tracker

    uri = redact(config.mlflow.resolved_tracking_uri())
    url = Tracker(config).runs_view_url()
    if uri.startswith(("http://", "https://")):
        print(f"MLflow UI:    {url}")
    else:
        print(f"MLflow UI:    mlflow ui --backend-store-uri {uri}, then open {url}")


def print_scores(evaluation: EvaluateOutputs) -> None:
    from pipelines.evaluation.report import as_summary, score_lines

    print(f"Sample grid:  {evaluation.grid_uri}")
    print(as_summary(score_lines(evaluation)))


def _retrain(args: argparse.Namespace) -> int:
    from pipelines.dag import check_config
    from pipelines.nodes import join_cluster
    from pipelines.retrain import parse_schedule_time, retrain

    config = load_config(args.config, args.overrides)
    check_config(config)
    join_cluster(config)
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
    if threading.current_thread() is threading.main_thread():
        STOP.install()  # Ctrl-C and SIGTERM stop cleanly, resumably (pipelines.interruption)
    try:
        if args.command == "dag":
            from pipelines.dag import describe

            print(describe())
            return 0
        commands = {
            "status": _status,
            "gc": _gc,
            "run": _run,
            "retrain": _retrain,
            "interpolate": _figure,
            "progressive": _figure,
        }
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
    except StorageUnreachableError as error:  # a host that never answered its first contact: as the preflight says
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StorageUnavailableError as error:  # also when raised in a Ray task (RayTaskError subclasses it)
        print(f"error: {error}", file=sys.stderr)
        return 5
    except Interrupted as stopped:
        stop_ray_work()
        print(f"{stopped}: exit {stopped.exit_code}; run the same command to resume", file=sys.stderr)
        return stopped.exit_code


def stop_ray_work() -> None:
    """End what this process started on Ray: its local instance, or on a cluster its job's actors and tasks (Ray
    ends a driver's non-detached actors when it disconnects)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def exit_with(code: int) -> None:
    """Exit with ``code``, the objects torch, Ray and MLflow left frozen first: the atexit handlers still run (Ray's
    shutdown, MLflow's, temporary folders' removal), but the interpreter's final garbage collections no longer
    traverse them (measured with py-spy: 2.5 of a tiny run's 3 s after its last atexit handler, on 2 cores)."""
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    exit_with(main())
