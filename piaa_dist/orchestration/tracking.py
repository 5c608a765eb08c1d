"""MLflow 3 runs, the model registry and ``models:/NAME@ALIAS`` resolution, without pickles.

* :func:`tracking_uri` picks the tracking URI: a flag, else ``$MLFLOW_TRACKING_URI``, else a
  SQLite file in the working directory (MLflow 3's default backend). A password in an HTTP(S)
  URI (``http://user:pass@host``) moves to ``MLFLOW_TRACKING_USERNAME`` /
  ``MLFLOW_TRACKING_PASSWORD`` in this process's environment (where MLflow reads basic-auth
  credentials, and where a local Ray's workers inherit them from) and the URI goes on without
  it, so no log line, param, Tune config or printed summary can carry it. Anything else this
  module logs, stores as a param, tag or artifact, or puts in an error goes through
  :mod:`piaa_dist.redact` (``http://user:***@host``).
* :class:`RunLogger` is a context manager over one MLflow run: flat config params, per-step
  metrics, dict/text/figure artifacts; the run ends FAILED when the block raises. It does
  nothing on non-zero ranks, so every Ray Train worker can hold one and only rank 0 logs.
* :func:`register_model` uploads a model folder (``checkpoint.save_model``'s three plain files)
  as run artifacts and registers exactly those files as a model version with
  ``MlflowClient.create_model_version(source=<run artifact URI>)``; ``mlflow.pytorch.log_model``
  is deliberately not used, because it serializes the model (pickle or ``pt2``) and loading it
  back executes code. Aliases replace the deprecated stages.
* :func:`resolve_model` turns ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
  ``runs:/RUN/PATH`` or a local folder into a local folder holding those files, and
  :func:`load_model_uri` loads it with ``checkpoint.load_model`` (weights only).

All MLflow calls go through an explicit ``MlflowClient(tracking_uri)``, never the global
"active run" of ``mlflow.start_run``: Ray Tune runs several trials in one process and Ray Train
V2 workers have had bugs with the fluent API. ``mlflow``, ``matplotlib`` and torch (via
``piaa_dist.checkpoint``) are imported lazily, so a rank that never logs never pays for them.

This module is MLflow only: the figures it logs are drawn by :mod:`piaa_dist.presentation`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from piaa_dist.config import JobConfig, flat_params
from piaa_dist.errors import UserError
from piaa_dist.redact import (
    MASK,
    redact_text,
    redact_uri,
    redact_value,
    split_credentials,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.figure import Figure
    from mlflow import MlflowClient
    from torch import nn

    from piaa_dist.results import EvaluationResult

log = logging.getLogger(__name__)

#: Registered model version tags written by :func:`register_model`.
TAG_FORMAT = "piaa_dist.format"
TAG_SHA256 = "piaa_dist.weights_sha256"
#: JSON ``{file name: SHA-256}`` of every registered model file (weights, config, info)
TAG_FILES_SHA256 = "piaa_dist.files_sha256"
#: Artifact folder (inside the run) that holds a registered model's files.
MODEL_ARTIFACT_PATH = "model"

_PARAM_VALUE_LIMIT = 6000  # MLflow's maximum param value length
_BATCH = 100  # MLflow's maximum params per log_batch call
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


class TrackingError(UserError):
    """A tracking/registry operation failed in a way the user can fix (bad URI, unknown model)."""


def _configure_environment() -> None:
    """Environment that keeps MLflow off the network (set before importing mlflow).

    ``setdefault`` so an operator can still opt back in.
    """
    # The pip requirements check and telemetry are the two network calls MLflow 3 makes by itself.
    os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


_configure_environment()  # before anything in this process imports mlflow through us


def tracking_uri(flag: str = "") -> str:
    """The tracking URI to use.

    Args:
        flag: an explicit URI (``--mlflow-uri`` / ``run.mlflow_uri``). A bare path ending in
            ``.db`` is taken as a SQLite file.

    Returns:
        ``flag``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``. A relative
        SQLite path (``sqlite:///mlflow.db``) is made absolute against the current directory,
        because Ray workers and job drivers run in other directories than the caller. An
        HTTP(S) URI's user name and password are moved to the environment (see
        :func:`credentials_to_environment`); the URI returned carries none.
    """
    uri = (flag or "").strip() or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    uri = credentials_to_environment(uri)
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if "://" not in uri and uri.endswith(".db"):
        return f"sqlite:///{Path(uri).resolve()}"
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = uri[len(prefix):]
        if path and path != ":memory:" and not path.startswith("/"):
            return f"{prefix}{Path(path).resolve()}"
    return uri


def credentials_to_environment(uri: str) -> str:
    """Move an HTTP(S) tracking URI's user name and password into MLflow's environment variables.

    MLflow's REST client sends ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` as
    basic auth to whatever HTTP tracking server it talks to, so ``http://user:pass@host`` and
    ``http://host`` with those variables are the same server and account. Keeping the password
    in the environment means it never rides along with the URI into logs, params, Tune's stored
    trial configs or printed summaries; processes started afterwards (a local Ray's workers)
    inherit it, and on a cluster the job's ``runtime_env`` env vars carry it.

    A redacted password (``user:***@host``, e.g. from a saved ``config.yaml``) leaves the
    password variable as it is. Other schemes (``postgresql://user:pass@db``) are returned
    unchanged: their drivers need the credentials in the URI, and everything this module shows
    or stores of them is redacted instead.

    Returns:
        The URI without user-info (or ``uri`` unchanged).
    """
    bare, user, password = split_credentials(uri)
    if (user is None and password is None) or not uri.lower().startswith(("http://", "https://")):
        return uri
    from urllib.parse import unquote

    if user is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    if password is not None and password != MASK:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    log.debug("MLflow credentials for %s taken from the URI into the environment", bare)
    return bare


_READY_SQLITE: set[str] = set()  # SQLite stores this process has already initialized


def client(uri: str = "") -> "MlflowClient":
    """An ``MlflowClient`` for the tracking URI ``uri`` (see :func:`tracking_uri`).

    A new SQLite store gets its schema created once per process, under an inter-process lock.
    """
    _configure_environment()
    from mlflow import MlflowClient

    resolved = tracking_uri(uri)
    if resolved.startswith("sqlite:///") and resolved not in _READY_SQLITE:
        _init_sqlite_store(resolved)
    return MlflowClient(tracking_uri=resolved)


def _init_sqlite_store(uri: str) -> None:
    """Create/migrate a SQLite store under an inter-process lock.

    MLflow creates the schema on first use; two processes doing that at once on a new file
    (Tune trials, Train restarts) fail with "duplicate column" errors. A file lock (in the temp
    dir, keyed by the DB path, so nothing is written beside the DB) serializes the first touch.
    """
    from mlflow import MlflowClient

    path = uri[len("sqlite:///"):]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux/macOS: no lock, best effort
        fcntl = None
    digest = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"piaa-dist-mlflow-{digest}.lock"
    with open(lock_path, "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)  # tracking tables
            client.search_registered_models(max_results=1)  # registry tables (same file)
        finally:
            if fcntl is not None:
                fcntl.flock(fh, fcntl.LOCK_UN)
    _READY_SQLITE.add(uri)


def _sqlite_artifact_root(uri: str) -> str | None:
    """Artifact root beside a SQLite tracking DB (``<db dir>/mlruns``), else None.

    Without this MLflow puts artifacts under ``./mlruns`` of whatever the cwd is when the
    experiment is created, which scatters one store over several folders.
    """
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):]
    if not path or path == ":memory:":
        return None
    return (Path(path).parent / "mlruns").as_uri() if Path(path).is_absolute() else None


def _is_already_exists(err: Exception) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_ALREADY_EXISTS"


def get_or_create_experiment(name: str, uri: str = "") -> str:
    """Experiment id for ``name``, creating it (artifacts beside a SQLite DB) when missing."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(uri)
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = _sqlite_artifact_root(tracking_uri(uri))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"
    try:
        return mlflow_client.create_experiment(name, artifact_location=f"{root}/{slug}" if root else None)
    except MlflowException as err:
        if _is_already_exists(err):  # another process (a Tune trial) created it meanwhile
            return mlflow_client.get_experiment_by_name(name).experiment_id
        raise


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return redact_text(text)[:_PARAM_VALUE_LIMIT]


def _rank_from_env() -> int:
    # Ray Train (and torchrun) set RANK in every worker; absent means a single process.
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class RunLogger:
    """One MLflow run as a context manager; a no-op on non-zero ranks.

    Example::

        with RunLogger("piaa-dist", uri=cfg.run.mlflow_uri, run_name="train") as run:
            run.log_params(cfg)
            run.log_metrics({"query_loss": 0.1}, step=3)
            run.log_figure(presentation.plot_srocc_vs_shots(result), "srocc_vs_shots.png")
        register_model(run.run_id, model_dir, "blg-piaa", alias="champion")

    Args:
        experiment: experiment name (created when missing).
        uri: tracking URI flag (see :func:`tracking_uri`).
        run_name: display name of the run.
        tags: run tags.
        rank: this process's rank; default ``$RANK`` (0 when unset). Only rank 0 logs.
        run_id: continue an existing run instead of creating one (a resumed training job).
        parent_run_id: make this a nested run (a Tune trial under its sweep's run).
    """

    def __init__(
        self,
        experiment: str = "piaa-dist",
        *,
        uri: str = "",
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        rank: int | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> None:
        self.experiment = experiment
        self.uri = tracking_uri(uri)
        self.run_name = run_name
        self.tags = {k: redact_text(str(v)) for k, v in (tags or {}).items()}
        self.rank = _rank_from_env() if rank is None else int(rank)
        self.run_id: str | None = run_id
        self.parent_run_id = parent_run_id
        self._client: MlflowClient | None = None
        self._ended = False

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True when this logger writes (rank 0 and started)."""
        return self.rank == 0 and self._client is not None and not self._ended

    def start(self) -> "RunLogger":
        """Create (or reopen) the run. Idempotent; does nothing on non-zero ranks."""
        if self.rank != 0 or self._client is not None:
            return self
        check_server(self.uri)  # seconds, not MLflow's minutes of retries, for a server that is down
        self._client = client(self.uri)
        if self.run_id:
            # Reopening a run (resume after a failure): mark it running again.
            self._client.update_run(self.run_id, status="RUNNING")
            if self.tags:
                self.set_tags(self.tags)
        else:
            tags = dict(self.tags)
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            exp_id = get_or_create_experiment(self.experiment, self.uri)
            run = self._client.create_run(exp_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
        log.info("MLflow run %s in experiment %r at %s", self.run_id, self.experiment, redact_uri(self.uri))
        return self

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the run with ``status`` (FINISHED, FAILED or KILLED). Idempotent."""
        if self.active:
            self._client.set_terminated(self.run_id, status=status)
            self._ended = True

    def __enter__(self) -> "RunLogger":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.end("FINISHED")
        else:
            if self.active:
                try:  # keep the reason next to the status; never mask the original error
                    self._client.set_tag(self.run_id, "error", redact_text(f"{exc_type.__name__}: {exc}")[:5000])
                except Exception:  # noqa: BLE001
                    log.warning("could not record the error on run %s", self.run_id, exc_info=True)
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        return False

    # -- logging ---------------------------------------------------------------------------

    def log_params(self, params: JobConfig | Mapping[str, Any]) -> None:
        """Log a JobConfig (as ``config.flat_params``) or a flat mapping as run params."""
        if not self.active:
            return
        from mlflow.entities import Param

        flat = flat_params(params) if isinstance(params, JobConfig) else dict(params)
        items = [Param(str(k), _param_value(v)) for k, v in flat.items()]
        for i in range(0, len(items), _BATCH):
            self._client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics at ``step``; non-numeric values are skipped."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            try:
                items.append(Metric(str(key), float(value), now, int(step or 0)))
            except (TypeError, ValueError):
                log.debug("metric %s=%r is not numeric; not logged", key, value)
        for i in range(0, len(items), 1000):  # MLflow's per-call metric limit
            self._client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        """Log one metric."""
        self.log_metrics({key: value}, step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags."""
        if not self.active:
            return
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, redact_text(str(value)))

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Log a dict as a JSON (``.json``) or YAML (``.yaml``/``.yml``) artifact."""
        if self.active:
            self._client.log_dict(self.run_id, redact_value(dict(data)), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log a text artifact."""
        if self.active:
            self._client.log_text(self.run_id, redact_text(text), artifact_file)

    def log_figure(self, figure: "Figure", artifact_file: str) -> None:
        """Log a matplotlib figure (PNG when ``artifact_file`` ends in .png)."""
        if self.active:
            self._client.log_figure(self.run_id, figure, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a local file or folder."""
        if not self.active:
            return
        p = Path(path)
        if p.is_dir():
            self._client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(p), artifact_path)

    def log_evaluation(self, result: EvaluationResult, prefix: str = "eval") -> None:
        """Log an evaluate result: summary metrics, its JSON and the SROCC-vs-shots plot.

        Metrics are ``{prefix}.{method}.k{shots}.srocc_mean`` (and ``srocc_std``,
        ``plcc_mean``), ``{prefix}.paired.{other}.k{shots}.diff_mean`` (``blg-piaa`` − other)
        and ``{prefix}.ceiling.oracle`` / ``.average_user``; artifacts
        ``{prefix}/evaluate.json`` (:meth:`EvaluationResult.to_json`) and
        ``{prefix}/srocc_vs_shots.png`` (drawn by :mod:`piaa_dist.presentation`).
        """
        if not self.active:
            return
        from piaa_dist.presentation import plot_srocc_vs_shots

        metrics: dict[str, float] = {}
        for method, by_shots in result.methods.items():
            for shots, cell in by_shots.items():
                metrics[f"{prefix}.{method}.k{shots}.srocc_mean"] = cell.srocc_mean
                metrics[f"{prefix}.{method}.k{shots}.srocc_std"] = cell.srocc_std
                metrics[f"{prefix}.{method}.k{shots}.plcc_mean"] = cell.plcc_mean
        for other, by_shots in result.paired.items():
            for shots, diff in by_shots.items():
                metrics[f"{prefix}.paired.{other}.k{shots}.diff_mean"] = diff.diff_mean
        if result.ceilings is not None:
            for name in ("oracle", "average_user"):
                value = getattr(result.ceilings, name)
                if value is not None:
                    metrics[f"{prefix}.ceiling.{name}"] = value
        self.log_metrics(metrics)
        self.log_text(result.to_json(), f"{prefix}/evaluate.json")
        self.log_figure(plot_srocc_vs_shots(result), f"{prefix}/srocc_vs_shots.png")

    def register_model(self, model_dir: str | Path, name: str, alias: str = "", *,
                       description: str = "", tags: Mapping[str, Any] | None = None) -> int | None:
        """:func:`register_model` for this run (None on non-zero ranks)."""
        if self.rank != 0 or self.run_id is None:
            return None
        return register_model(self.run_id, model_dir, name, alias, uri=self.uri,
                              description=description, tags=tags)


class RunMetricsCallback:
    """Picklable ``fn(step, metrics)`` that logs numeric metrics to an existing MLflow run.

    Ray Train calls it in the Train controller (on the driver's node, so a local SQLite store
    is reachable); the client is created lazily there, and pickling drops it.
    """

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id
        self._run: RunLogger | None = None

    def __call__(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._run is None:
            self._run = RunLogger(uri=self.uri, run_id=self.run_id, rank=0).start()
        self._run.log_metrics(
            {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))},
            step=step,
        )

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "run_id": self.run_id, "_run": None}


# ---------------------------------------------------------------------------------------------
# Registry


def register_model(
    run_id: str,
    model_dir: str | Path,
    name: str,
    alias: str = "",
    *,
    uri: str = "",
    description: str = "",
    tags: Mapping[str, Any] | None = None,
) -> int:
    """Upload a model folder to a run and register it as a new version of ``name``.

    Only the files of :data:`piaa_dist.checkpoint.MODEL_FILES` are uploaded (weights as
    safetensors, config.yaml, info.json); anything else in the folder stays behind. The version's
    source is the run's artifact URI of those files, so ``models:/NAME/VERSION`` downloads
    plain files: no MLmodel, no pickled flavor. The SHA-256 of every uploaded file is kept in
    the version's tags (:data:`TAG_FILES_SHA256`), in the tracking store rather than the
    artifact store, so :func:`resolve_model` refuses a file changed in the artifact store.

    Args:
        run_id: the MLflow run that produced the model.
        model_dir: a folder written by ``checkpoint.save_model``.
        name: registered model name (created when missing).
        alias: when set, moved to the new version (``models:/NAME@ALIAS`` then resolves to it).
        uri: tracking URI flag (see :func:`tracking_uri`); the registry uses the same store.
        description: version description.
        tags: more version tags (e.g. the validation score that decided its alias).

    Returns:
        The new version number.

    Raises:
        CheckpointError: ``model_dir`` is not a model folder, or a file does not match the
            hashes recorded when it was saved (a changed folder is not registered).
    """
    from mlflow.exceptions import MlflowException

    from piaa_dist import checkpoint

    folder = Path(model_dir)
    if not checkpoint.is_model_dir(folder):
        raise checkpoint.CheckpointError(
            f"{folder}: not a model folder (needs {checkpoint.WEIGHTS_FILE} and {checkpoint.CONFIG_FILE})"
        )
    checkpoint.verify_model_folder(folder)
    files_sha256 = checkpoint.model_file_hashes(folder)
    mlflow_client = client(uri)
    for fname in checkpoint.MODEL_FILES:
        if (folder / fname).is_file():
            mlflow_client.log_artifact(run_id, str(folder / fname), MODEL_ARTIFACT_PATH)
    run = mlflow_client.get_run(run_id)
    # The concrete artifact location (file:, s3:, mlflow-artifacts:), as MLflow's own docs do
    # with RunsArtifactRepository.get_underlying_uri: the version stays downloadable even
    # without resolving the run.
    source = f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as err:
        if not _is_already_exists(err):
            raise
    mv = mlflow_client.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags={
            **{str(k): str(v) for k, v in (tags or {}).items()},
            TAG_FORMAT: checkpoint.MODEL_FORMAT,
            TAG_SHA256: files_sha256[checkpoint.WEIGHTS_FILE],
            TAG_FILES_SHA256: json.dumps(files_sha256, sort_keys=True),
        },
        description=description or None,
    )
    version = int(mv.version)
    if alias:
        # Re-pointing an existing alias is how "promote to champion" works in MLflow 3.
        mlflow_client.set_registered_model_alias(name, alias, str(version))
    mlflow_client.set_tag(run_id, "piaa_dist.registered_model", f"{name}/{version}")
    log.info(
        "registered %s version %d%s from run %s", name, version, f" (@{alias})" if alias else "", run_id
    )
    return version


def alias_version(name: str, alias: str, *, uri: str = "") -> Any | None:
    """The model version ``models:/NAME@ALIAS`` points at, or None (no such model or alias).

    Returns:
        MLflow's ``ModelVersion`` (``.version``, ``.tags``, ``.run_id``...).
    """
    from mlflow.exceptions import MlflowException

    try:
        return client(uri).get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def set_alias(name: str, alias: str, version: int, *, uri: str = "") -> None:
    """Point ``models:/NAME@ALIAS`` at ``version`` (creating or moving the alias)."""
    client(uri).set_registered_model_alias(name, alias, str(version))
    log.info("%s@%s -> version %s", name, alias, version)


def set_version_tags(name: str, version: int, tags: Mapping[str, Any], *, uri: str = "") -> None:
    """Set tags on a model version."""
    mlflow_client = client(uri)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, str(version), key, str(value))


def find_versions(name: str, tags: Mapping[str, str], *, uri: str = "") -> list[Any]:
    """Versions of ``name`` whose tags hold all of ``tags``, oldest first ([] when none or no model)."""
    from mlflow.exceptions import MlflowException

    # Names, keys and values go into a filter string: plain tokens only (our keys are hashes).
    plain = re.compile(r"[\w.\-]+")
    if not all(plain.fullmatch(str(t)) for t in (name, *tags, *tags.values())):
        raise ValueError(f"find_versions: {name!r} {dict(tags)} must be letters, digits, '.', '_', '-'")
    clauses = [f"name = '{name}'"] + [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    try:
        found = client(uri).search_model_versions(" and ".join(clauses))
    except MlflowException as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    return sorted(found, key=lambda mv: int(mv.version))


def require_store(uri: str = "") -> str:
    """The resolved tracking URI, after checking that a store exists behind it.

    Resolving a model reference only reads the registry, so it must not create a store: a
    SQLite URI whose file does not exist (or a ``file:`` store whose folder does not exist)
    means the user points at the wrong place, and MLflow would otherwise create an empty
    database there (``mlflow.db`` in the working folder) and then report the model as unknown.
    An ``http(s)://`` server is probed (:func:`check_server`), so an unreachable one is said
    to be unreachable, not that a model is missing from it.

    Raises:
        TrackingError: ``no MLflow store at ...; set --mlflow-uri or MLFLOW_TRACKING_URI``, or
            ``the MLflow server at ... is unreachable``.
    """
    resolved = tracking_uri(uri)
    check_server(resolved)
    path = None
    if resolved.startswith("sqlite:///"):
        path = resolved[len("sqlite:///"):]
        if not path or path == ":memory:":
            path = None
    elif resolved.startswith("file:"):
        path = resolved[len("file://"):] if resolved.startswith("file://") else resolved[len("file:"):]
    if path is not None and not Path(path).exists():
        raise TrackingError(f"no MLflow store at {resolved}; set --mlflow-uri or MLFLOW_TRACKING_URI "
                            "to the store that holds the registry")
    return resolved


def check_server(uri: str, timeout: float | None = None) -> None:
    """Refuse an ``http(s)://`` tracking URI whose server does not answer, in seconds.

    MLflow's client retries a refused connection for minutes (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``
    with backoff) and then reports an error about whatever it was asked (an experiment, a
    model "not found"), so a server that is down or a mistyped port looks like a missing
    model or a crash. One ``GET /health`` (any HTTP answer counts as reachable: the server
    may want credentials for the API) tells the cases apart before any work starts. Other
    schemes (SQLite, files, databricks) are not probed.

    Args:
        uri: a resolved tracking URI (no password in it: :func:`tracking_uri`).
        timeout: seconds for the probe (default ``$PIAA_MLFLOW_PROBE_TIMEOUT`` or 10).

    Raises:
        TrackingError: names the URI, the reason and what to do.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    wait = timeout if timeout is not None else float(os.environ.get("PIAA_MLFLOW_PROBE_TIMEOUT", "10"))
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=wait):  # noqa: S310 (http(s) only)
            return
    except urllib.error.HTTPError:
        return  # the server answered (401, 403, 404...): it is there
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(redact_text(
            f"the MLflow server at {redact_uri(uri)} is unreachable ({reason}); start it, or point "
            "--mlflow-uri / MLFLOW_TRACKING_URI at a running one")) from None


def _download(mlflow_client: "MlflowClient", source: str, dst: Path, uri: str) -> None:
    """Download exactly the model files from an artifact URI into ``dst``."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from piaa_dist import checkpoint

    for fname in checkpoint.MODEL_FILES:
        try:
            download_artifacts(
                artifact_uri=f"{source.rstrip('/')}/{fname}", dst_path=str(dst), tracking_uri=uri
            )
        except (MlflowException, OSError) as err:
            raise TrackingError(redact_text(f"cannot download {fname} from {source}: {err}")) from None


def resolve_model(ref: str | Path, *, uri: str = "", dst: str | Path | None = None) -> Path:
    """A local model folder for ``ref``.

    Args:
        ref: a local folder (or ``file://`` URI), ``models:/NAME@ALIAS``,
            ``models:/NAME/VERSION`` or ``runs:/RUN_ID/PATH``.
        uri: tracking URI flag (see :func:`tracking_uri`).
        dst: where to download registry/run models (default: a new temporary folder).

    Returns:
        The folder; for registry models it holds only the model files (weights, config, info).

    Raises:
        TrackingError: unknown model, alias or version, an unsupported URI, a SQLite or file
            store that does not exist (:func:`require_store`), or a downloaded file that does
            not match the hash recorded at registration (names the file).
        CheckpointError: a local path that is not a model folder.
    """
    from piaa_dist import checkpoint

    text = str(ref)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", text):
        folder = Path(text)
        if not checkpoint.is_model_dir(folder):
            raise checkpoint.CheckpointError(
                f"{folder}: not a model folder (needs {checkpoint.WEIGHTS_FILE} and {checkpoint.CONFIG_FILE})"
            )
        return folder

    from mlflow.exceptions import MlflowException

    require_store(uri)  # resolving reads the registry: never create an empty store for it
    mlflow_client = client(uri)
    expected: dict[str, str] = {}
    m = _MODELS_URI.match(text)
    if m:
        name = m["name"]
        try:
            mv = (
                mlflow_client.get_model_version_by_alias(name, m["alias"])
                if m["alias"]
                else mlflow_client.get_model_version(name, m["version"])
            )
        except MlflowException as err:
            # Only a "does not exist" answer means the model is not there; anything else (a
            # server error, a refused request) is said as what it is.
            missing = getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
            what = "not found in the registry at" if missing else "cannot be read from the registry at"
            raise TrackingError(redact_text(f"{text}: {what} {tracking_uri(uri)}: {err.message}")) from None
        source = mlflow_client.get_model_version_download_uri(name, mv.version)
        expected = _registered_hashes(text, mv.tags or {})
        label = f"{name}-v{mv.version}"
        log.info("%s -> %s version %s (%s)", text, name, mv.version, redact_uri(source))
    elif text.startswith("runs:/"):
        source, label = text, "run"
    elif text.startswith("models:/"):
        raise TrackingError(f"{text}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    else:
        raise TrackingError(
            f"{text}: unsupported model reference (use a folder, models:/NAME@ALIAS, "
            "models:/NAME/VERSION or runs:/RUN_ID/PATH)"
        )

    out = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix=f"piaa-{label}-"))
    out.mkdir(parents=True, exist_ok=True)
    _download(mlflow_client, source, out, tracking_uri(uri))
    for fname, digest in expected.items():
        actual = checkpoint.sha256_file(out / fname)
        if actual != digest:
            raise TrackingError(
                f"{text}: downloaded {fname} has SHA-256 {actual[:12]}…, the registry recorded "
                f"{digest[:12]}…; the artifact was modified after registration"
            )
    return out


def _registered_hashes(ref: str, tags: Mapping[str, str]) -> dict[str, str]:
    """``{file: SHA-256}`` a model version's tags record, weights first.

    Versions registered before per-file hashes record the weights only.
    """
    from piaa_dist import checkpoint

    raw = tags.get(TAG_FILES_SHA256)
    if raw is None:
        if tags.get(TAG_SHA256):
            log.warning("%s was registered with a hash of its weights only; %s and %s are not "
                        "verified against the registry", ref, checkpoint.CONFIG_FILE, checkpoint.INFO_FILE)
            return {checkpoint.WEIGHTS_FILE: tags[TAG_SHA256]}
        return {}
    try:
        recorded = json.loads(raw)
    except ValueError as err:
        raise TrackingError(f"{ref}: the registry tag {TAG_FILES_SHA256} is unreadable ({err})") from None
    if not isinstance(recorded, dict):
        raise TrackingError(f"{ref}: the registry tag {TAG_FILES_SHA256} is not a JSON object")
    missing = [f for f in checkpoint.MODEL_FILES if f not in recorded]
    if missing:
        raise TrackingError(f"{ref}: the registry records no SHA-256 for {', '.join(missing)}")
    return {f: str(recorded[f]) for f in checkpoint.MODEL_FILES}


def load_model_uri(
    ref: str | Path,
    map_location: Any = "cpu",
    *,
    uri: str = "",
    build: Callable[[Any], "nn.Module"] | None = None,
) -> tuple["nn.Module", JobConfig, dict[str, Any]]:
    """:func:`resolve_model` then ``checkpoint.load_model``: ``(model, cfg, info)``, weights only."""
    from piaa_dist import checkpoint

    return checkpoint.load_model(resolve_model(ref, uri=uri), map_location, build=build)


__all__ = [
    "MODEL_ARTIFACT_PATH",
    "TAG_FILES_SHA256",
    "TAG_SHA256",
    "RunLogger",
    "TrackingError",
    "alias_version",
    "client",
    "credentials_to_environment",
    "find_versions",
    "get_or_create_experiment",
    "load_model_uri",
    "register_model",
    "require_store",
    "check_server",
    "resolve_model",
    "set_alias",
    "set_version_tags",
    "tracking_uri",
]
