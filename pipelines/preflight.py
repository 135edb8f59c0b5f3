"""Before any stage runs: the run root answers and is writable (taking the run's lease, writing the resolved config),
the Inception weights and ``train.init_from`` are usable, and the tracking server answers. Each waits a bounded
time, so a server that accepts connections and never answers is a named failure, not a silent hang."""

from __future__ import annotations

import os
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, TypeVar

from ddpm_core.checkpoint import CheckpointError, read_snapshot_config
from ddpm_core.storage import StorageUnreachableError, protocol_names, reach
from pipelines.config import ConfigError, Extractor, PipelineConfig
from pipelines.lease import Lease, LeaseHeldError, acquire
from pipelines.redaction import redact
from pipelines.runs import RunStore
from pipelines.tracking import Tracker
from pipelines.training.state import init_from_mismatch

T = TypeVar("T")
STORAGE_DEADLINE_S = 30.0  # the run's first storage operations (lease, resolved config) answer within this
MLFLOW_DEADLINE_S = 20.0  # the tracking server answers within this, else the run fails before any stage


class PreflightError(RuntimeError):
    """Storage or tracking that cannot be used, found before any stage runs."""


def storage_error(store: RunStore, error: Exception) -> PreflightError:
    return PreflightError(
        f"storage.root {redact(store.storage_root)!r} is not writable ({type(error).__name__}: {redact(str(error))}). "
        "Check storage.root, storage.endpoint_url and the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment "
        "variables."
    )


def refusal(error: Exception) -> str:
    """Why a tracking server could not be used, in words: an authentication failure said as such."""
    text = redact(str(error))
    status = getattr(getattr(error, "response", None), "status_code", None) or getattr(
        error, "get_http_status_code", None
    )
    code = status() if callable(status) else status
    if code in (401, 403) or any(marker in text for marker in ("401", "403", "Unauthorized", "Forbidden")):
        return f"authentication failed (the server answered {code or 'unauthorized'}: {text[:300]})"
    return f"{type(error).__name__}: {text}"


def reach_named(key: str, uri: str, options: dict[str, Any], log: Callable[[str], None] = print) -> None:
    """The first contact with the host of the URL ``uri`` that config key ``key`` gives
    (:func:`ddpm_core.storage.reach`: each wait announced, a bounded total); a host that never answers is a
    :class:`PreflightError` naming the key, the URL and the host."""
    try:
        reach(uri, options, log)
    except StorageUnreachableError as error:
        endpoint = " and storage.endpoint_url (or AWS_ENDPOINT_URL)" if "s3" in protocol_names(uri) else ""
        raise PreflightError(
            f"{key} {redact(uri)!r}: {redact(str(error))}. Check {key}{endpoint}, and that {error.host} is up and "
            "reachable from here"
        ) from None


def hold_run_root(store: RunStore, config: PipelineConfig, log: Callable[[str], None] = print) -> Lease:
    """The lease on the run root (see :mod:`pipelines.lease`), renewed in the background until released; an
    unusable storage fails here as a :class:`PreflightError`, a live holder as ``LeaseHeldError``."""
    retrain = config.retrain

    def take() -> Lease:
        reach(store.root, store.options, log)  # each wait announced; it ends before the deadline below
        return acquire(store.root, store.options, retrain.lease_ttl_s, retrain.lease_wait_s, log=log)

    try:
        lease = within(STORAGE_DEADLINE_S + retrain.lease_wait_s, take)
    except LeaseHeldError:
        raise
    except Exception as error:
        raise storage_error(store, error) from error
    return lease.keep_alive()


def check_init_from(config: PipelineConfig, log: Callable[[str], None] = print) -> None:
    """``train.init_from`` names a committed snapshot of this run's U-Net (read before any worker starts); its host's
    first answer is waited for as :func:`reach_named` says."""
    uri = config.train.init_from or ""
    options = config.storage.options()
    reach_named("train.init_from", uri, options, log)
    try:
        unet, _ = within(STORAGE_DEADLINE_S, lambda: read_snapshot_config(uri, options))
    except (CheckpointError, TimeoutError) as error:
        raise PreflightError(f"train.init_from {uri!r} is not a usable snapshot: {error}") from error
    model = config.model
    if model.conditional and model.num_classes is None:  # the data's class count: compared by the prepare stage
        if unet.num_classes is None:
            raise PreflightError(
                f"train.init_from {uri!r} holds an unconditional U-Net, but model.conditional is true: warm-start "
                "only from a model of the same classes"
            )
        expected = model.unet(unet.num_classes)
    else:
        expected = model.unet()
    if unet != expected:
        raise PreflightError(init_from_mismatch(uri, unet, expected))


def check_autoencoder(config: PipelineConfig, options: dict[str, Any], log: Callable[[str], None] = print) -> None:
    """A latent model's autoencoder loads: its folder read with deadlines, its weights verified by SHA-256 and
    against its config (``load_autoencoder``; the weights stay cached for the stages)."""
    from ddpm_core.autoencoder_weights import load_autoencoder
    from ddpm_core.weights import WeightsError

    autoencoder = config.autoencoder
    assert autoencoder.weights_uri is not None and autoencoder.weights_sha256 is not None
    try:
        load_autoencoder(autoencoder.weights_uri, autoencoder.weights_sha256, options, log=log)
    except WeightsError as error:
        raise PreflightError(f"autoencoder.weights_uri: {redact(str(error))}") from error


def within(seconds: float, action: Callable[[], T]) -> T:
    """``action()``, or ``TimeoutError`` when it has not returned after ``seconds`` (it goes on in a daemon thread,
    which ends with the process): for the first calls to a storage or tracking server, which may accept a
    connection and never answer."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(action())
        except BaseException as error:
            future.set_exception(error)

    threading.Thread(target=run, name="deadline", daemon=True).start()
    try:
        return future.result(timeout=seconds)
    except FutureTimeout:
        raise TimeoutError(f"no answer within {seconds:g} s") from None


def probe_mlflow(uri: str, log: Callable[[str], None]) -> None:
    """An HTTP tracking server answers (with any status) within ``MLFLOW_DEADLINE_S``; until then the attempts are
    logged, and then a :class:`PreflightError` names the setting."""
    if not uri.startswith(("http://", "https://")):
        return
    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true"
    context = ssl._create_unverified_context() if insecure else None
    deadline = time.time() + MLFLOW_DEADLINE_S
    while True:
        try:
            urllib.request.urlopen(f"{without_userinfo(uri).rstrip('/')}/health", timeout=5, context=context).close()
            return
        except urllib.error.HTTPError:  # it answered
            return
        except OSError as error:  # refused, unreachable, timed out
            reason = getattr(error, "reason", error)
            left = deadline - time.time()
            if left <= 0:
                raise PreflightError(
                    f"MLflow at {redact(uri)!r} does not answer ({reason}) after {MLFLOW_DEADLINE_S:g} s of attempts: "
                    "check mlflow.tracking_uri (or MLFLOW_TRACKING_URI) and that the tracking server runs"
                ) from None
            log(f"MLflow at {redact(uri)} does not answer ({reason}); trying again for up to {left:.0f} s")
            time.sleep(min(5.0, left))


def check_tracking_store(config: PipelineConfig) -> None:
    """A SQLite tracking URI names a database file, not a folder (SQLite cannot open a folder, and MLflow retries the
    open until the tracking deadline, which read as a server that does not answer); checked before anything runs."""
    uri = config.mlflow.resolved_tracking_uri()
    path = sqlite_path(uri)
    if path is None or not path.is_dir():
        return
    key = "mlflow.tracking_uri" if config.mlflow.tracking_uri else "MLFLOW_TRACKING_URI"
    raise ConfigError(
        f"{key} {redact(uri)!r} names a folder, {str(path)!r}, not a SQLite database file: name a file, e.g. "
        f"sqlite:///{path.absolute() / 'mlflow.db'} (MLflow creates it), or a tracking server's http(s):// URI"
    )


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory unless the path after the
    third slash is absolute); None for other URIs and an in-memory database."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def without_userinfo(uri: str) -> str:
    """``uri`` without ``user:password@`` (the health endpoint needs no credentials, and urllib takes none there)."""
    parts = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


def preflight(store: RunStore, config: PipelineConfig, log: Callable[[str], None] = print) -> Tracker:
    """Before any stage: the run root is writable (the resolved config is written there), the Inception weights and a
    latent model's autoencoder, when configured, are readable, verified and loadable, and MLflow answers."""
    try:
        within(STORAGE_DEADLINE_S, lambda: store.save_config(config))
    except Exception as error:  # botocore / OS errors, an endpoint that does not answer: name the setting to fix
        raise storage_error(store, error) from error
    if config.evaluate.extractor is Extractor.INCEPTION:
        from ddpm_core.inception import HOW_TO_PROVIDE, feature_extractor_class, tensors_only_copy
        from ddpm_core.weights import WeightsError, fetch_verified

        try:
            feature_extractor_class()
            path, _ = fetch_verified(
                config.evaluate.inception_weights_uri or "",
                config.evaluate.inception_weights_sha256,
                HOW_TO_PROVIDE,
                store.options,
                log=log,
            )
            tensors_only_copy(path)
        except (WeightsError, ImportError) as error:
            raise PreflightError(f"evaluate.extractor=inception: {redact(str(error))}") from error
    if config.train.init_from:
        check_init_from(config, log)
    if config.autoencoder.weights_uri is not None:
        check_autoencoder(config, store.options, log)
    probe_mlflow(config.mlflow.resolved_tracking_uri(), log)
    try:
        return within(MLFLOW_DEADLINE_S, lambda: Tracker(config))
    except Exception as error:
        raise PreflightError(
            f"MLflow at {redact(config.mlflow.resolved_tracking_uri())!r} cannot be used: {refusal(error)}. Check "
            "mlflow.tracking_uri and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."
        ) from error
