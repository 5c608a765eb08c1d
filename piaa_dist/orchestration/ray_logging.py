"""How much of Ray's own logging reaches the terminal of a train / tune / demo run.

By default a run shows piaa-dist's progress (rank 0's ``step N/M query_loss ...`` lines, the
stage banners, the results) and every warning and error; what Ray prints for itself at INFO
level stays in Ray's log files:

* Ray Train's ``Reporting training result N: TrainingReport(...)`` line, which every rank prints
  at every report with the whole metrics dict (Ray 2.60 logs it on a logger named after its
  source *file*, so Ray Train's own ``LoggingConfig`` does not reach it);
* the ``PreemptionWatcher ... has constructor arguments in the object store`` error that
  Ray Train's controller logs from C++ at every start of a worker group (ray-project/ray#53727).
  The watcher only polls for node drains (spot preemption on a cluster); a Ray this process
  starts for itself on one machine is never drained, so there it is switched off
  (``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``); on a cluster it runs as Ray decides;
* Ray Tune's experiment box and TensorBoard hint (the new output engine prints them even at
  ``verbose=0``; the legacy engine at ``verbose=0`` prints nothing).

``piaa-dist -v`` (or ``PIAA_DIST_RAY_LOGS=full`` in the environment) leaves Ray exactly as it
is: all of the above is printed again. Either way Ray's files keep everything:
``/tmp/ray/session_latest/logs/`` (Ray Train's own at DEBUG level under ``logs/train/``).

How: :func:`ray_output` is a context manager around the code that starts or joins Ray
(``run_distributed``, ``run_sweep``); it sets environment variables only for its duration.
The worker-side part goes through Ray's documented ``RAY_RUNTIME_ENV_HOOK``, which lets this
module add a ``worker_process_setup_hook`` (:func:`setup_worker`) to the job's runtime
environment; any setup hook already there still runs first.

Ray Train's own start-up lines (``Requesting resources``, ``Started training worker group``,
``Checkpoint successfully created``) are ``ray.train`` INFO logs that only the trainer's
``RunConfig(logging_config=...)`` controls: :func:`train_logging_config` is that setting.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from typing import Any, Iterator

log = logging.getLogger(__name__)

#: ``full`` shows Ray's own logs as Ray prints them; anything else (default) is quiet.
RAY_LOGS_ENV = "PIAA_DIST_RAY_LOGS"
#: Ray's runtime-env hook variable (``ray._private.ray_constants.RAY_RUNTIME_ENV_HOOK``).
RUNTIME_ENV_HOOK_ENV = "RAY_RUNTIME_ENV_HOOK"
#: the setup hook that was in the runtime environment before ours (run first by ours)
_CHAINED_SETUP_HOOK_ENV = "PIAA_DIST_CHAINED_SETUP_HOOK"
_WORKER_SETUP_HOOK = f"{__name__}.setup_worker"
#: Ray 2.60 names the logger of ``ray/train/v2/_internal/execution/context.py`` after the
#: file (``logging.getLogger(__file__)``): its INFO records are the per-report lines.
_REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"
#: Libraries whose INFO lines are about themselves, not the user's work (botocore's "Found
#: credentials in environment variables" at every client, in every worker that reads S3;
#: MLflow's "Creating initial MLflow database tables"; alembic's migration steps): WARNING and
#: above only, in the command's process and in Ray's workers, unless Ray's logs are wanted in
#: full (``-v``).
CHATTY_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "mlflow", "alembic")


def quiet_libraries() -> None:
    """Set :data:`CHATTY_LOGGERS` to WARNING in this process."""
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def ray_logs_full() -> bool:
    """True when Ray's own logs should be shown in full (``-v`` or ``PIAA_DIST_RAY_LOGS=full``)."""
    return os.environ.get(RAY_LOGS_ENV, "").strip().lower() in ("full", "1", "true", "yes")


def set_ray_logs_full(full: bool) -> None:
    """Remember the choice in the environment, so that Ray jobs and workers started later see it."""
    os.environ[RAY_LOGS_ENV] = "full" if full else "quiet"


def train_logging_config() -> Any:
    """Ray Train's ``LoggingConfig`` for ``RunConfig(logging_config=...)``.

    ``WARNING`` on the terminal unless Ray's logs are wanted in full; Ray Train's system log
    files keep every level either way.
    """
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if ray_logs_full() else "WARNING")


def add_setup_hook(runtime_env: dict | None) -> dict:
    """``RAY_RUNTIME_ENV_HOOK`` target: the job's runtime environment with :func:`setup_worker`.

    Ray calls it in ``ray.init`` with the (merged) runtime environment of the job; a setup hook
    that was already there (e.g. ``ensure_ray``'s) is kept and run first by ours.
    """
    env = dict(runtime_env or {})
    previous = env.get("worker_process_setup_hook")
    if previous == _WORKER_SETUP_HOOK:
        return env
    if previous is not None and not isinstance(previous, str):
        # A callable hook cannot be named in an environment variable: leave Ray's setup alone.
        log.debug("runtime_env has a callable worker_process_setup_hook; Ray logs stay as they are")
        return env
    env["worker_process_setup_hook"] = _WORKER_SETUP_HOOK
    if previous:
        env["env_vars"] = {**(env.get("env_vars") or {}), _CHAINED_SETUP_HOOK_ENV: previous}
    return env


def setup_worker() -> None:
    """``worker_process_setup_hook``: quiet Ray Train's per-report lines (and the libraries'
    INFO chatter, :data:`CHATTY_LOGGERS`) in this worker process.

    Runs in every Ray worker process of the job before any task; the logger's level survives
    Ray Train's later ``logging.config.dictConfig`` (it is not a ``ray.train`` child).
    """
    chained = os.environ.get(_CHAINED_SETUP_HOOK_ENV, "")
    if chained:
        module, _, name = chained.rpartition(".")
        getattr(importlib.import_module(module), name)()
    quiet_libraries()
    try:
        path = importlib.import_module(_REPORT_LOGGER_MODULE).__file__
    except ImportError:  # another Ray version: nothing to quiet
        return
    logging.getLogger(path).setLevel(logging.WARNING)


def _ray_will_be_local(address: str | None) -> bool:
    if address or os.environ.get("RAY_ADDRESS"):
        return False
    try:
        import ray
    except ImportError:
        return True
    return not ray.is_initialized()


@contextlib.contextmanager
def ray_output(address: str | None = None) -> Iterator[None]:
    """Quiet Ray's own INFO output for the Ray started or joined inside the block.

    Args:
        address: the Ray cluster the block will join (None: ``$RAY_ADDRESS``, else a local Ray
            that the block starts).

    Does nothing when Ray's logs are wanted in full, when Ray is already running in this
    process (its workers exist already), or when a ``RAY_RUNTIME_ENV_HOOK`` of the user's is set.
    The environment is restored when the block ends.
    """
    if ray_logs_full():
        yield
        return
    values: dict[str, str] = {
        # Tune's legacy output engine at verbose=0 prints no experiment box.
        "RAY_AIR_NEW_OUTPUT": "0",
    }
    if RUNTIME_ENV_HOOK_ENV not in os.environ:
        values[RUNTIME_ENV_HOOK_ENV] = f"{__name__}.add_setup_hook"
    if _ray_will_be_local(address):
        values["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        # An operator's explicit setting wins.
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


__all__ = [
    "CHATTY_LOGGERS",
    "RAY_LOGS_ENV",
    "add_setup_hook",
    "ray_logs_full",
    "quiet_libraries",
    "ray_output",
    "set_ray_logs_full",
    "setup_worker",
    "train_logging_config",
]
