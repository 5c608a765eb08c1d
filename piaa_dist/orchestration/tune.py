"""Ray Tune sweeps over the bilevel hyperparameters (V2 API), without a start-up tax per trial.

A trial is a plain function run by Tune in its trial actor. Two ways to run its meta-training
(``tune.trial_runner``):

* ``in-trial`` (``auto`` picks it for 1-worker CPU trials): the trial actor runs the training
  loop itself (:func:`~piaa_dist.orchestration.in_process.run_in_process`: the same loop,
  step hook, checkpoint and best-checkpoint rules as ``piaa-dist train --workers 0``) and
  reports to Tune with ``tune.report``. No Ray Train worker group is started per trial (a
  controller actor, a worker process importing torch, a process group: tens of seconds each
  on a busy 2-core machine), the trial actors are reused from one trial to the next
  (``reuse_actors``), and each keeps the opened dataset warm across the trials it runs
  (:func:`warm_dataset`: manifest and users' shard ranges read once per actor). Trials run
  ``tune.max_concurrent`` at a time, one CPU each: 2 at once on a 2-CPU machine.
* ``ray-train``: the trial builds the same ``TorchTrainer`` that ``piaa-dist train`` uses
  (:func:`piaa_dist.orchestration.ray_train.build_trainer`) with the trial's hyperparameters
  and fits it; ``TuneReportCallback`` forwards rank 0's reports to Tune. Needed for trials of
  several workers, or on GPUs.

Either way the metric is ``val_srocc``: the meta-learner fine-tuned on held-out *training* users
(``data.validation_users``), never on test users. ASHA stops weak trials at validation
milestones (``time_attr="step"``), and a trial's model is its best validation checkpoint (its
``BEST``), not its last step.

Sizing: an in-trial trial reserves ``run.cpus_per_worker`` CPUs (it does the work). A
``ray-train`` trial function reserves a token 0.01 CPU (it only waits on its trainer; the Train
controller is a zero-CPU actor too), and each trial's Train workers reserve
``run.cpus_per_worker`` each. With ``tune.max_concurrent`` trials of ``workers_per_trial``
workers the sweep needs ``max_concurrent * workers_per_trial * cpus_per_worker`` CPUs; 1 or 2
trials × 1 worker × 1 CPU run to the end on a 2-CPU laptop, and a cluster raises
``tune.max_concurrent`` / ``--workers-per-trial``.

Trial length: trials are short runs that rank the hyperparameters (``tune.trial_steps``
meta-steps; 0 = ``meta.meta_steps``); ASHA stops weak ones earlier still. Their meta-learners
are not what users should get: the caller refits the winning configuration to the full
``meta.meta_steps`` of the base config (:func:`refit_config`) before registering it, unless
that refit would repeat a run already trained (:func:`training_differences` is empty: the
winner is the config's own values).

Search: seeded by ``run.seed`` (the same config samples the same trials), and with
``tune.start_from_config`` the first trial runs the config's own values of the searched
hyperparameters, so the winner is never worse at trial length than the starting point.

MLflow: the sweep is one parent run; every trial is a nested run (params + per-step metrics,
logged from the Train controller on the driver's node), and the best trial's meta-learner is
written as a model folder and registered by the caller.

Secrets: Tune stores what it is given (trial configs in ``params.json``/``result.json``, the run
config with its callbacks and storage filesystem in ``tuner.pkl``), in the storage path, which
may be the bucket. So the trial config holds the job config with URI passwords redacted
(:func:`piaa_dist.redact.redact_value`), the connection settings a trial needs (tracking URI, S3
endpoint) reach it through Ray's object store (``tune.with_parameters``: in memory, never in
Tune's files), the driver-side callbacks pickle without them, and the storage filesystem holds
no keys (:class:`~piaa_dist.orchestration.checkpoint_store.RunStorage`). Ray Tune would also
copy the driver's AWS keys into every trial actor's ``runtime_env``, which Ray logs in plain
text (``runtime_env_agent.log``); the sweep opts out (:func:`credentials_kept_out_of_runtime_env`)
and trials take credentials from their environment like every other process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Mapping

from piaa_dist.config import JobConfig, config_from_dict, config_to_dict, flat_params, with_overrides
from piaa_dist.redact import redact_uri, redact_value

log = logging.getLogger(__name__)

METRIC = "val_srocc"
#: CPU reserved by a trial's driver function (it only waits on its Train workers)
TRIAL_DRIVER_CPU = 0.01
#: the hyperparameters a sweep searches (flat ``section.key`` names of JobConfig)
SEARCHED = ("meta.inner_lr", "meta.inner_steps", "data.shots", "meta.meta_lr")
#: credential variables Ray Tune copies from the driver into every trial actor's runtime_env
CREDENTIAL_ENV_VARS = frozenset(
    {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"}
)


@contextlib.contextmanager
def credentials_kept_out_of_runtime_env() -> Iterator[None]:
    """While active, Ray Tune does not put the driver's AWS credentials into trial runtime_envs.

    Why: Ray Tune (``ray.tune.execution.class_cache``, Ray 2.60) copies ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` and ``AWS_SECURITY_TOKEN`` from the
    driver's environment into the ``runtime_env`` of every trial actor, and Ray's runtime-env
    agent logs each runtime_env in full, at INFO, in the session's ``runtime_env_agent.log``
    (it is also kept in the GCS). Trials do not need it: a local Ray started by
    :func:`~piaa_dist.orchestration.ray_train.ensure_ray` hands the driver's environment to
    every worker, and a cluster's workers have their own (instance roles, or the job's
    ``runtime_env`` that the operator controls). With another Ray version whose Tune has no
    such list this does nothing (the secret-scan test would show a new leak).
    """
    try:
        from ray.tune.execution import class_cache

        propagated = class_cache.ENV_VARS_TO_PROPAGATE
    except (ImportError, AttributeError):
        log.debug("Ray Tune has no ENV_VARS_TO_PROPAGATE list; nothing to keep out")
        yield
        return
    removed = propagated & CREDENTIAL_ENV_VARS
    propagated -= removed  # in place: the set Tune reads when it creates trial actors
    try:
        yield
    finally:
        propagated |= removed


@dataclasses.dataclass
class SweepResult:
    """What a finished sweep hands back.

    Attributes:
        best_config: the full job config of the best trial (with the trials' length).
        best_score: its best validation SROCC.
        best_checkpoint: path/URL of the best trial's last checkpoint.
        model: the best trial's meta-learner (loaded from that checkpoint).
        trials: one row per trial: ``{"trial_id", "status", "val_srocc", "step", <searched>}``.
        best_trial: the best trial's id.
        best_step: the meta-step of the checkpoint its model was loaded from (its best
            validation checkpoint; the last one when it kept none).
        trial_length: the meta-steps the best trial ran.
        runner: how the trials ran (``"in-trial"`` or ``"ray-train"``).
    """

    best_config: JobConfig
    best_score: float
    best_checkpoint: str
    model: Any
    trials: list[dict]
    best_trial: str = ""
    best_step: int = 0
    trial_length: int = 0
    runner: str = "ray-train"


def search_space(cfg: JobConfig) -> dict[str, Any]:
    """The Tune search space from ``cfg.tune`` (flat ``section.key`` names)."""
    from ray import tune

    t = cfg.tune
    return {
        "meta.inner_lr": tune.loguniform(*t.inner_lr),
        "meta.inner_steps": tune.choice(list(t.inner_steps)),
        "data.shots": tune.choice(list(t.shots)),
        "meta.meta_lr": tune.loguniform(*t.meta_lr),
    }


def searched_values(params: Mapping[str, Any]) -> dict[str, Any]:
    """The searched hyperparameters of a trial config, as plain Python numbers.

    Tune samples numpy scalars; the typed config (and JSON) want plain numbers.
    """
    return {k: (params[k].item() if hasattr(params[k], "item") else params[k])
            for k in SEARCHED if k in params}


def trial_config(base: JobConfig, params: Mapping[str, Any]) -> JobConfig:
    """The job config of one trial: ``base`` with the searched values applied (validated)."""
    return with_overrides(base, searched_values(params))


def trial_steps(cfg: JobConfig) -> int:
    """Meta-steps of each trial: ``tune.trial_steps`` capped at ``meta.meta_steps`` (0 = the latter)."""
    steps = cfg.tune.trial_steps
    return cfg.meta.meta_steps if steps <= 0 else min(steps, cfg.meta.meta_steps)


def trial_base(cfg: JobConfig) -> JobConfig:
    """The base config of the trials: ``cfg`` shortened to :func:`trial_steps`."""
    steps = trial_steps(cfg)
    return cfg if steps == cfg.meta.meta_steps else with_overrides(cfg, {"meta.meta_steps": steps})


def refit_config(cfg: JobConfig, params: Mapping[str, Any]) -> JobConfig:
    """The winning hyperparameters at full length: ``cfg`` (its own ``meta.meta_steps``, not the
    trials') with the searched values of ``params`` (a trial's config or the best params)."""
    return trial_config(cfg, params)


#: Settings that change neither the weights a meta-training run reaches at any step nor the
#: data it sees: where and how it runs (workers, threads, connections), how often it is
#: checkpointed, logged or validated (validation runs in a forked RNG: the weights at a step do
#: not depend on the cadence; only which steps are observed does), what it is registered as,
#: the sweep's own settings (``tune.*``) and the GIAA baseline (``giaa.*``).
NOT_TRAINED = frozenset({
    "data.s3_endpoint", "data.cache_users",
    "run.workers", "run.cpus_per_worker", "run.use_gpu", "run.threads_per_worker",
    "run.checkpoint_every", "run.keep_checkpoints", "run.storage_path", "run.max_failures",
    "run.log_every", "run.validate_every", "run.mlflow_uri", "run.experiment",
    "run.register_name", "run.alias",
})
NOT_TRAINED_SECTIONS = ("tune.", "giaa.")


def training_differences(trained: JobConfig, refit: JobConfig) -> dict[str, tuple[Any, Any]]:
    """The settings in which a refit would train differently from a run already trained.

    Compares every setting but :data:`NOT_TRAINED` and the ``tune``/``giaa`` sections: the
    model, the meta-learning hyperparameters (the searched ones among them), the length
    (``meta.meta_steps``), the task sampling, the seed, early stopping and the validation
    protocol. Empty: the refit would repeat the trained run (the caller can skip it).

    Args:
        trained: the config of the run already trained.
        refit: the config the refit would run (:func:`refit_config`).

    Returns:
        ``{"section.key": (trained's value, refit's value)}`` for each setting that differs.
    """
    a, b = flat_params(trained), flat_params(refit)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if k not in NOT_TRAINED and not k.startswith(NOT_TRAINED_SECTIONS) and a.get(k) != b.get(k)}


def start_point(cfg: JobConfig) -> dict[str, Any]:
    """The config's own values of the searched hyperparameters (the first trial's, when
    ``tune.start_from_config``), those inside the search space only: a value the ranges
    exclude is sampled like any other trial's (a sweep stays within its configured ranges)."""
    flat, t = flat_params(cfg), cfg.tune
    inside = {
        "meta.inner_lr": t.inner_lr[0] <= cfg.meta.inner_lr <= t.inner_lr[1],
        "meta.inner_steps": cfg.meta.inner_steps in t.inner_steps,
        "data.shots": cfg.data.shots in t.shots,
        "meta.meta_lr": t.meta_lr[0] <= cfg.meta.meta_lr <= t.meta_lr[1],
    }
    return {k: flat[k] for k in SEARCHED if inside[k]}


def _live_placement_groups() -> dict[str, dict]:
    """Placement groups that still hold (or wait for) resources, by id."""
    from ray.util import placement_group_table

    return {pg_id: info for pg_id, info in placement_group_table().items()
            if info.get("state") in ("PENDING", "CREATED", "RESCHEDULING")}


def _is_train_worker_group(info: dict, worker_bundle: dict[str, float]) -> bool:
    """True for a placement group shaped like a trial's Train worker group."""
    bundles = list((info.get("bundles") or {}).values())
    return bool(bundles) and all(
        {k: float(v) for k, v in b.items() if k in ("CPU", "GPU")} == worker_bundle for b in bundles
    )


def _make_reclaim_callback(worker_bundle: dict[str, float]):
    """A Tune callback that frees Train worker placement groups a finished trial left behind.

    Why: when ASHA stops a trial, Tune kills the trial actor while ``TorchTrainer.fit()`` is
    running; the Train controller dies without removing its worker placement group (Ray 2.60
    keeps it until the job ends), and on a 2-CPU machine that reserved CPU starves every later
    trial forever. The callback runs in the sweep's driver (it survives the kill) after each
    trial ends. It is only installed when trials run one at a time on a Ray this sweep
    started itself, so every worker-shaped group still alive then is a leftover.
    """
    from ray import tune
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    class _Reclaim(tune.Callback):
        def _reclaim(self, trial) -> None:
            leftover = [pg_id for pg_id, info in _live_placement_groups().items()
                        if _is_train_worker_group(info, worker_bundle)]
            for pg_id in leftover:
                try:
                    remove_placement_group(PlacementGroup(ray_id_from_hex(pg_id)))
                except Exception:  # noqa: BLE001 - already being removed by Ray itself
                    log.debug("placement group %s already gone", pg_id, exc_info=True)
            if leftover:
                log.info("trial %s: freed %d Train placement group(s) it left reserved",
                         trial.trial_id, len(leftover))

        def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: D401 - Tune API
            self._reclaim(trial)

        def on_trial_error(self, iteration, trials, trial, **info):  # noqa: D401 - Tune API
            self._reclaim(trial)

    return _Reclaim()


def ray_id_from_hex(pg_id: str):
    """A ``PlacementGroupID`` from the hex id ``placement_group_table`` reports."""
    from ray._raylet import PlacementGroupID

    return PlacementGroupID(bytes.fromhex(pg_id))


def _make_end_runs_callback(uri: str, experiment: str):
    """A Tune callback (in the driver) that closes the MLflow runs of trials Tune stopped.

    A trial ASHA stops is killed mid-run, so it cannot end its own MLflow run; without this
    it would stay RUNNING forever. Stopped trials end as KILLED with a tag saying why.
    """
    from ray import tune

    class _EndRuns(tune.Callback):
        # The URI is an attribute, not a closure variable: Tune pickles its callbacks (class
        # and closure included) into tuner.pkl in the storage, and __getstate__ redacts the
        # attribute there. The callback only runs in the driver that created it, which keeps
        # the real URI.
        def __init__(self, tracking: str) -> None:
            self.uri = tracking

        def __getstate__(self) -> dict:
            return {**self.__dict__, "uri": redact_uri(self.uri)}

        def _end(self, trial, status: str, reason: str) -> None:
            from piaa_dist.orchestration.tracking import client, get_or_create_experiment

            mlflow_client = client(self.uri)
            exp_id = get_or_create_experiment(experiment, self.uri)
            runs = mlflow_client.search_runs(
                [exp_id], filter_string=f"tags.`piaa_dist.trial_id` = '{trial.trial_id}'"
            )
            for run in runs:
                if run.info.status == "RUNNING":
                    mlflow_client.set_tag(run.info.run_id, "piaa_dist.ended_by", reason)
                    mlflow_client.set_terminated(run.info.run_id, status=status)

        def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: D401 - Tune API
            self._end(trial, "KILLED", "stopped early by the scheduler")

        def on_trial_error(self, iteration, trials, trial, **info):  # noqa: D401 - Tune API
            self._end(trial, "FAILED", "trial error")

    return _EndRuns(uri)


#: ``tune.trial_runner`` values (``auto`` resolves to one of these, :func:`trial_runner`)
IN_TRIAL = "in-trial"
RAY_TRAIN = "ray-train"


def trial_runner(cfg: JobConfig, workers_per_trial: int, gpu: bool) -> str:
    """How the trials run: ``tune.trial_runner``, with ``auto`` = in-trial for 1-worker CPU trials.

    In-trial runs the training loop in the trial actor itself (no Train worker group per
    trial); a trial of several workers, or one on a GPU, needs Ray Train.

    Raises:
        ValueError: ``in-trial`` asked for trials of several workers.
    """
    choice = cfg.tune.trial_runner
    if choice == IN_TRIAL and workers_per_trial != 1:
        raise ValueError(f"tune.trial_runner=in-trial runs one worker per trial; got --workers-per-trial "
                         f"{workers_per_trial} (use tune.trial_runner=ray-train)")
    if choice == "auto":
        return IN_TRIAL if workers_per_trial == 1 and not gpu else RAY_TRAIN
    return choice


#: Datasets this process opened, by (URL, endpoint): kept warm from one trial to the next
#: (trial actors are reused), so a later trial does not open the manifest and read the users'
#: shard ranges again.
_WARM_DATASETS: dict[tuple[str, str], Any] = {}


def warm_dataset(data_url: str, s3_endpoint: str | None = None) -> Any:
    """The dataset at ``data_url``, opened once per process and reused by every trial it runs.

    A dataset version is immutable, so a process may keep it (and its LRU cache of users'
    ratings) for as long as it lives; the version is resolved at the first open.
    """
    from piaa_dist.data.stream import Dataset

    key = (data_url, s3_endpoint or "")
    if key not in _WARM_DATASETS:
        _WARM_DATASETS[key] = Dataset.open(data_url, endpoint_url=s3_endpoint or None)
    return _WARM_DATASETS[key]


def _trial_run(cfg: JobConfig, config: Mapping[str, Any], trial_id: str, mlflow_uri: str):
    """The trial's nested MLflow run and its metrics callback, or ``(None, None)`` without MLflow."""
    if not mlflow_uri:
        return None, None
    from piaa_dist.config import flat_params
    from piaa_dist.orchestration.tracking import RunLogger, RunMetricsCallback

    run = RunLogger(
        cfg.run.experiment, uri=mlflow_uri, run_name=f"trial-{trial_id}",
        rank=0, parent_run_id=config.get("parent_run_id"),
        tags={"piaa_dist.kind": "tune-trial", "piaa_dist.trial_id": trial_id},
    ).start()
    run.log_params(flat_params(cfg))
    return run, RunMetricsCallback(run.uri, run.run_id)


def _report_to_tune(step: int, metrics: dict) -> None:
    """A metrics callback that hands a report to Tune (ASHA reads ``step`` and ``val_srocc``).

    Tune may decide here to stop the trial: ``tune.report`` then ends the training thread
    (``SystemExit``, which no metrics sink swallows)."""
    import ray.tune

    ray.tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))} | {"step": step})


def _trial_in_process(config: dict, connections: Mapping[str, str] | None = None) -> None:
    """Tune trial that runs the meta-training loop itself, in the trial actor (no Ray Train).

    The same loop as ``piaa-dist train --workers 0``: checkpoints (and the best validation
    checkpoint) in ``<storage>/trial-<id>/local``, reports at the same steps. The dataset is
    the actor's warm one (:func:`warm_dataset`).
    """
    import ray.tune

    from piaa_dist.orchestration.checkpoint_store import RunStorage
    from piaa_dist.orchestration.in_process import run_in_process
    from piaa_dist.orchestration.run_records import Fanout

    connections = dict(connections or {})
    mlflow_uri = connections.get("mlflow_uri") or ""
    s3_endpoint = connections.get("s3_endpoint") or None
    cfg = trial_config(config_from_dict(config["base"]), config)
    trial_id = ray.tune.get_context().get_trial_id()
    _run, metrics_callback = _trial_run(cfg, config, trial_id, mlflow_uri)
    # MLflow first: once Tune sees a report it may stop the trial, and a metric not yet logged
    # would be lost from the trial's MLflow run.
    sinks = Fanout([metrics_callback] if metrics_callback is not None else [])
    storage = RunStorage.from_url(config["storage_path"], f"trial-{trial_id}", s3_endpoint)

    def report(step: int, metrics: dict) -> None:
        sinks(step, metrics)
        _report_to_tune(step, metrics)

    try:
        run_in_process(cfg, config["data_url"], storage, s3_endpoint=s3_endpoint, metrics_callback=report,
                       dataset=warm_dataset(config["data_url"], s3_endpoint))
    except SystemExit:
        raise  # stopped by the scheduler: the driver-side callback closes the MLflow run
    except BaseException:
        _end_trial_run(mlflow_uri, metrics_callback, "FAILED")
        raise
    _end_trial_run(mlflow_uri, metrics_callback, "FINISHED")


def _trial(config: dict, connections: Mapping[str, str] | None = None) -> None:
    """Tune trial (runs in a Ray actor): one Ray Train meta-training run with these params.

    ``connections`` (``mlflow_uri``, ``s3_endpoint``) comes through ``tune.with_parameters``,
    not the trial config that Tune stores.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from piaa_dist.orchestration.ray_train import build_trainer

    connections = dict(connections or {})
    mlflow_uri = connections.get("mlflow_uri") or ""
    base = config_from_dict(config["base"])
    cfg = trial_config(base, config)
    trial_id = ray.tune.get_context().get_trial_id()
    _run, metrics_callback = _trial_run(cfg, config, trial_id, mlflow_uri)
    trainer = build_trainer(
        cfg, config["data_url"],
        workers=config["workers_per_trial"],
        storage_path=config["storage_path"],
        name=f"trial-{trial_id}",
        s3_endpoint=connections.get("s3_endpoint") or None,
        callbacks=[TuneReportCallback()],
        metrics_callback=metrics_callback,
    )
    try:
        trainer.fit()
    except BaseException:
        _end_trial_run(mlflow_uri, metrics_callback, "FAILED")
        raise
    _end_trial_run(mlflow_uri, metrics_callback, "FINISHED")


def _end_trial_run(uri: str, metrics_callback: Any, status: str) -> None:
    """Terminate a trial's MLflow run without reopening it first.

    Reopening (``RunLogger(run_id=...).start()``) marks the run RUNNING again; when Tune has
    already seen the trial's last report, its driver callback may have closed the run and may
    kill this actor at any moment, which would leave the run RUNNING forever.
    """
    if metrics_callback is None:
        return
    from piaa_dist.orchestration.tracking import client

    client(uri).set_terminated(metrics_callback.run_id, status=status)


def _best_checkpoint(result: Any) -> str | None:
    """The last checkpoint path a trial reported (ASHA may stop it between checkpoints)."""
    df = result.metrics_dataframe
    if df is None or "checkpoint_path" not in df:
        return result.metrics.get("checkpoint_path")
    paths = [p for p in df["checkpoint_path"].tolist() if isinstance(p, str) and p]
    return paths[-1] if paths else None


def _load_checkpoint_model(cfg: JobConfig, path: str, storage: str, s3_endpoint: str | None) -> Any:
    """Load the meta-learner from a trial's checkpoint folder; ``(model, state)``.

    ``path`` is what Ray reported: a local path, or ``bucket/key`` inside the S3 filesystem
    when the storage path is ``s3://``.
    """
    from piaa_dist.orchestration.checkpoint_store import RunStorage, load_checkpoint, model_from_state

    run_storage = RunStorage.from_url(storage, endpoint_url=s3_endpoint)
    state = load_checkpoint(run_storage, path[len("s3://"):] if path.startswith("s3://") else path)
    return model_from_state(cfg, state), state


def _trial_model(cfg: JobConfig, trial_id: str, runner: str, result: Any, storage: str,
                 s3_endpoint: str | None) -> tuple[Any, str, int, int]:
    """A finished trial's model: its best validation checkpoint (``BEST``), else its last one.

    Returns:
        ``(model, checkpoint URL, the checkpoint's step, the trial's last step)``.

    Raises:
        RuntimeError: the trial left no checkpoint at all.
    """
    from piaa_dist.orchestration.checkpoint_store import (
        IN_PROCESS_DIR,
        RunStorage,
        model_from_state,
        newest_loadable,
        read_best,
    )

    run_storage = RunStorage.from_url(storage, f"trial-{trial_id}", s3_endpoint)
    under = (IN_PROCESS_DIR,) if runner == IN_TRIAL else ()
    last_step = int((result.metrics or {}).get("step") or 0)
    best = read_best(run_storage, *under)
    if best is not None:
        return model_from_state(cfg, best.state), best.url, best.step, last_step
    if runner == IN_TRIAL:
        point = newest_loadable(run_storage, *under)
        if point.state is None:
            where = run_storage.url_of(run_storage.run_path())
            raise RuntimeError(f"best trial {trial_id} left no checkpoint in {where}")
        return model_from_state(cfg, point.state), str(point.url), point.step, last_step
    ckpt = _best_checkpoint(result)
    if ckpt is None:
        raise RuntimeError(f"best trial {result.path} reported no checkpoint")
    model, state = _load_checkpoint_model(cfg, ckpt, storage, s3_endpoint)
    return model, ckpt, int(state["step"]), last_step


def build_tuner(
    cfg: JobConfig,
    data_url: str,
    *,
    samples: int,
    workers_per_trial: int,
    storage: str,
    s3_endpoint: str = "",
    mlflow_uri: str = "",
    parent_run_id: str = "",
    name: str = "tune",
    callbacks: list[Any] | None = None,
    runner: str = RAY_TRAIN,
):
    """The ``tune.Tuner`` of a sweep (not fitted). Constructing it writes ``tuner.pkl`` to storage.

    Args:
        cfg: base job config (``cfg.tune``: ranges, scheduler, concurrency).
        data_url: dataset root (local folder or ``s3://``).
        samples: number of trials.
        workers_per_trial: Ray Train workers in each trial.
        storage: root of Tune's and the trials' storage (local folder or ``s3://``).
        s3_endpoint: S3 endpoint for data and storage ("" = ``$AWS_ENDPOINT_URL``, else AWS).
        mlflow_uri: log every trial as a nested MLflow run ("" = no MLflow); trials that Tune
            stops or that fail get their MLflow runs closed by a driver-side callback.
        parent_run_id: the sweep's MLflow run (trials nest under it).
        name: experiment name under the storage path.
        callbacks: more Tune callbacks (run in the driver).
        runner: ``"in-trial"`` (the trial actor runs the loop: 1 CPU per trial, actors reused)
            or ``"ray-train"`` (a TorchTrainer per trial; see :func:`trial_runner`).
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from piaa_dist.orchestration.checkpoint_store import RunStorage, absolute_url

    tune_storage, tune_fs = RunStorage.from_url(storage, name, s3_endpoint or None).ray_storage()
    param_space: dict[str, Any] = dict(search_space(cfg))
    param_space.update(
        # Tune writes every trial's config to storage: the job config goes with URI passwords
        # redacted (a trial takes its connection settings from `connections`, never from here).
        base=redact_value(config_to_dict(cfg)),
        data_url=absolute_url(data_url),
        workers_per_trial=workers_per_trial,
        storage_path=storage,
        parent_run_id=parent_run_id or "",
    )
    connections = {"mlflow_uri": mlflow_uri or "", "s3_endpoint": s3_endpoint or ""}
    steps = cfg.meta.meta_steps
    scheduler = ASHAScheduler(
        time_attr="step",
        max_t=steps,
        # a trial always gets `grace_period` validation rounds before it can be stopped
        grace_period=min(steps, max(1, cfg.tune.grace_period) * cfg.run.validate_every),
        reduction_factor=cfg.tune.reduction_factor,
        # a trial that reaches max_t ends by itself (cleanly) instead of being killed
        stop_last_trials=False,
    )
    if runner == IN_TRIAL:
        # The trial actor does the work: one worker's CPUs. Actors are reused across trials
        # (same resources), which keeps each actor's torch import and warm dataset.
        trainable = tune.with_resources(
            tune.with_parameters(_trial_in_process, connections=connections),
            tune.PlacementGroupFactory([{"CPU": float(cfg.run.cpus_per_worker)}]),
        )
    else:
        # The trial driver only waits on its TorchTrainer: reserve (almost) no CPU for it, or
        # a 2-CPU machine deadlocks with the driver holding the CPU its workers need. Ray
        # rejects an all-zero request, hence a token 0.01 CPU.
        trainable = tune.with_resources(
            tune.with_parameters(_trial, connections=connections),
            tune.PlacementGroupFactory([{"CPU": TRIAL_DRIVER_CPU}]),
        )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", scheduler=scheduler, num_samples=samples,
            reuse_actors=runner == IN_TRIAL,
            # Seeded: the same config samples the same trials. The config's own values
            # first: a sweep never ranks below where it started. (The concurrency limit is
            # the generator's: Tune ignores max_concurrent_trials beside a given generator.)
            search_alg=BasicVariantGenerator(
                points_to_evaluate=[start] if (start := start_point(cfg)) and cfg.tune.start_from_config
                else None,
                max_concurrent=cfg.tune.max_concurrent,
                random_state=cfg.run.seed,
            ),
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=tune_storage, storage_filesystem=tune_fs,
            verbose=0,
            callbacks=([_make_end_runs_callback(mlflow_uri, cfg.run.experiment)] if mlflow_uri else [])
            + list(callbacks or []),
        ),
    )


def run_sweep(
    cfg: JobConfig,
    data_url: str,
    out_dir: str | Path,
    *,
    samples: int | None = None,
    workers_per_trial: int = 1,
    storage_path: str | None = None,
    s3_endpoint: str | None = None,
    mlflow_uri: str | None = None,
    parent_run_id: str | None = None,
    ray_address: str | None = None,
    name: str = "tune",
) -> SweepResult:
    """Run a Tune sweep of Ray Train meta-training trials and return the best trial.

    Args:
        cfg: base job config; ``cfg.tune`` holds the ranges, scheduler, concurrency and the
            trials' length (``tune.trial_steps``).
        data_url: dataset root (local folder or ``s3://``).
        out_dir: sweep output folder; trial checkpoints default to ``<out_dir>/checkpoints``.
        samples: number of trials (default ``cfg.tune.samples``).
        workers_per_trial: Ray Train workers in each trial.
        storage_path: root for Tune's and the trials' storage (local or ``s3://``).
        s3_endpoint: S3 endpoint for data and storage.
        mlflow_uri: log every trial as a nested MLflow run (``None`` = no MLflow).
        parent_run_id: the sweep's MLflow run (trials nest under it).
        ray_address: Ray cluster to connect to (default ``$RAY_ADDRESS``, else a local Ray).
        name: experiment name under the storage path.

    Raises:
        RuntimeError: no trial reported a validation SROCC (all failed, or
            ``run.validate_every`` never fired: it must divide into ``meta.meta_steps``).
    """
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Validation (the metric) runs every `run.validate_every` steps, loss reports more often;
    # Tune's strict check would reject the reports without val_srocc (ASHA skips them itself).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Each trial starts a fresh worker group; on a busy 2-core machine importing torch in a new
    # worker can take longer than Ray's 60 s default, which would fail the trial spuriously.
    # (Read by the Train controller; a local Ray started below inherits this environment.)
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    import ray

    from piaa_dist.orchestration.ray_train import ensure_ray, use_gpu

    if cfg.run.validate_every <= 0:
        raise ValueError("tune needs run.validate_every > 0: validation SROCC is the metric")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = samples or cfg.tune.samples
    storage = storage_path or cfg.run.storage_path or str((out_dir / "checkpoints").resolve())
    s3_endpoint = s3_endpoint or cfg.data.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL") or ""
    if mlflow_uri:
        from piaa_dist.orchestration.tracking import tracking_uri

        # An HTTP password moves to the environment before a local Ray starts (its workers
        # inherit it); see tracking.credentials_to_environment.
        mlflow_uri = tracking_uri(mlflow_uri)
    full = cfg
    cfg = trial_base(cfg)
    if cfg is not full:
        log.info("trials run %d of the config's %d meta-steps (tune.trial_steps)",
                 cfg.meta.meta_steps, full.meta.meta_steps)
    started = ensure_ray(ray_address)
    callbacks = []
    try:
        gpu = use_gpu(cfg)
        runner = trial_runner(cfg, workers_per_trial, gpu)
        log.info("trials run %s (%d at a time)", "inside their trial actors" if runner == IN_TRIAL
                 else f"as Ray Train runs of {workers_per_trial} worker(s)", cfg.tune.max_concurrent)
        if runner == RAY_TRAIN and started and cfg.tune.max_concurrent == 1:
            bundle = {"CPU": float(cfg.run.cpus_per_worker)}
            if gpu:
                bundle["GPU"] = 1.0
            callbacks.append(_make_reclaim_callback(bundle))
        tuner = build_tuner(
            cfg, data_url, samples=samples, workers_per_trial=workers_per_trial, storage=storage,
            s3_endpoint=s3_endpoint, mlflow_uri=mlflow_uri or "", parent_run_id=parent_run_id or "",
            name=name, callbacks=callbacks, runner=runner,
        )
        with credentials_kept_out_of_runtime_env():
            grid = tuner.fit()
        rows, best = [], None
        for result in grid:
            df = result.metrics_dataframe
            scores = [] if df is None or METRIC not in df else [
                s for s in df[METRIC].tolist() if isinstance(s, float) and not math.isnan(s)
            ]
            row = {
                "trial_id": (result.metrics or {}).get("trial_id", ""),
                "status": "ERROR" if result.error else "TERMINATED",
                METRIC: max(scores) if scores else None,
                "step": (result.metrics or {}).get("step"),
                **searched_values(result.config or {}),  # None when the trial failed to start
            }
            rows.append(row)
            if scores and (best is None or max(scores) > best[0]):
                best = (max(scores), result)
        if best is None:
            errors = [str(r.error) for r in grid if r.error]
            raise RuntimeError(
                "no Tune trial reported val_srocc"
                + (f"; trial errors: {errors[:3]}" if errors else "")
            )
        score, result = best
        best_cfg = trial_config(cfg, result.config)
        trial_id = (result.metrics or {}).get("trial_id", "")
        # The winning trial's best validation checkpoint (its BEST), else its last one.
        model, ckpt, step, length = _trial_model(best_cfg, str(trial_id), runner, result, storage,
                                                 s3_endpoint or None)
        log.info("best trial %s: val_srocc=%.4f (its checkpoint of step %d of %d) %s", trial_id, score,
                 step, length, searched_values(result.config))
        return SweepResult(best_cfg, float(score), ckpt, model, rows, best_trial=str(trial_id),
                           best_step=int(step), trial_length=int(length), runner=runner)
    finally:
        if started:
            ray.shutdown()


__all__ = [
    "CREDENTIAL_ENV_VARS",
    "IN_TRIAL",
    "RAY_TRAIN",
    "METRIC",
    "NOT_TRAINED",
    "NOT_TRAINED_SECTIONS",
    "SEARCHED",
    "SweepResult",
    "build_tuner",
    "credentials_kept_out_of_runtime_env",
    "refit_config",
    "run_sweep",
    "search_space",
    "start_point",
    "trial_base",
    "trial_config",
    "trial_runner",
    "trial_steps",
    "training_differences",
    "warm_dataset",
]
