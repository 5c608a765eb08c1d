"""Every use-case of piaa-dist as one function with typed arguments and a typed result.

``synth`` → ``ingest`` → ``train`` / ``tune`` → ``register`` → ``evaluate`` → ``personalize``:
the ``piaa-dist`` commands, the ``jobs/*.py`` Ray job scripts, the demo and a notebook
(:mod:`piaa_dist.api`) all call these functions and nothing else, so what a use-case does
(which config it runs, what it writes, what it logs to MLflow, which registered version an
alias points to) is decided here once. Commands parse flags and print; these functions print
nothing (they log) and return frozen dataclasses.

Model references (:func:`resolve_model_ref`): every use-case that reads a meta-learner takes a
model folder, the folder ``train --out`` wrote (its ``model/``), the folder ``tune --out`` wrote
(its ``best-model/``), ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/RUN/PATH``.

Aliases (champion/challenger, :mod:`piaa_dist.orchestration.promotion`): ``train``, ``tune`` and
``register`` asked to move an alias first score the new version and the version holding the
alias on the same validation users with the same protocol, and move it only when the new one
is better (``force_alias`` overrides); otherwise the new version is registered as a challenger.
Every version registered here carries its validation score and what it was measured on in its
tags and description. The outcome's ``promotion`` says what happened, in one line.

GIAA baselines (:mod:`piaa_dist.orchestration.baselines`): ``evaluate`` trains one GIAA model
per dataset version, training users and GIAA budget, registers it as ``piaa-giaa`` with that
identity in its tags, and reuses it for every meta-learner evaluated on the same data.

This module is orchestration: Ray, MLflow and torch are imported inside the functions that use
them, so importing it (or :mod:`piaa_dist.api`) is cheap. Nothing below this layer imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from piaa_dist.config import ConfigError, JobConfig, load_config, with_overrides
from piaa_dist.errors import UserError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from piaa_dist.data.scaleworld import ScaleSummary
    from piaa_dist.data.synth import WorldSummary
    from piaa_dist.orchestration.promotion import Promotion, ValidationSet
    from piaa_dist.orchestration.tracking import RunLogger
    from piaa_dist.results import EvaluationResult, FinetuneChoice

log = logging.getLogger(__name__)

#: Where ``train --out DIR`` writes the meta-learner, and ``tune --out DIR`` the best one.
TRAIN_MODEL_DIR = "model"
TUNE_MODEL_DIR = "best-model"
#: Where ``tune --out DIR`` trains the winning configuration to full length.
REFIT_DIR = "refit"
#: The sweep's files beside ``best-model/``.
SWEEP_FILE = "sweep.json"
BEST_CONFIG_FILE = "best.yaml"
#: The sweep table's columns (``SweepOutcome.trials_table``).
TRIAL_COLUMNS = ("trial_id", "status", "val_srocc", "step", "meta.inner_lr", "meta.inner_steps",
                 "data.shots", "meta.meta_lr")


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class TrainOutcome:
    """What :func:`train` produced.

    Attributes:
        model_dir: the meta-learner's folder (``<out>/model``: weights, config, info): the best
            validation checkpoint's model when the run validated (``best_step``), else the last.
        step: meta-updates applied (where training ended: ``meta.meta_steps`` or the step early
            stopping fired at).
        workers: Ray Train workers used (0 = in this process).
        data: the dataset URL trained on.
        checkpoint: the last training checkpoint (path or URL), if any.
        metrics: rank 0's last reported numeric metrics (``query_loss``, ``val_srocc``...).
        metrics_file: every report as JSON lines (``<out>/metrics.jsonl``).
        mlflow_run_id / mlflow_uri: the MLflow run (None without MLflow).
        registered: ``models:/NAME/VERSION`` of the registered version (None if not registered).
        alias: ``models:/NAME@ALIAS`` when the alias now points at it (None without an alias,
            or when the alias stayed with a better version: see ``promotion``).
        promotion: how the alias was decided (None when no alias was asked for).
        registered_val_srocc: the registered version's validation SROCC as recorded in the
            registry (None when it was not scored).
        best_step: the step of the model in ``model_dir`` (the best validation checkpoint's;
            ``step`` when the run did not validate).
        best_val_srocc: its validation SROCC (None without validation).
        stopped_early: early stopping ended the run before ``meta.meta_steps``.
        best_checkpoint: the best validation checkpoint's folder (None without validation).
    """

    model_dir: Path
    step: int
    workers: int
    data: str
    checkpoint: str | None
    metrics: Mapping[str, float]
    metrics_file: Path
    mlflow_run_id: str | None = None
    mlflow_uri: str | None = None
    registered: str | None = None
    alias: str | None = None
    promotion: Promotion | None = None
    registered_val_srocc: float | None = None
    best_step: int = 0
    best_val_srocc: float | None = None
    stopped_early: bool = False
    best_checkpoint: str | None = None

    @property
    def val_srocc(self) -> float | None:
        """The validation SROCC (held-out training users) of the written model: the best one
        measured, else the last reported (None if the run measured none)."""
        if self.best_val_srocc is not None:
            return float(self.best_val_srocc)
        value = self.metrics.get("val_srocc")
        return None if value is None else float(value)

    def summary_lines(self) -> list[str]:
        """What ``piaa-dist train`` prints: the model, its validation SROCC, the registry."""
        if self.best_val_srocc is not None:
            ended = (f"early stopping at step {self.step}" if self.stopped_early
                     else f"trained {self.step} steps")
            lines = [f"meta-learner of step {self.best_step} (best validation SROCC "
                     f"{self.best_val_srocc:.3f}; {ended}) written to {self.model_dir}"]
        else:
            lines = [f"meta-learner at step {self.step} written to {self.model_dir}"]
            if self.val_srocc is not None:
                lines.append(f"validation SROCC {self.val_srocc:.3f} at step {self.step}")
        lines += _registry_lines(self.registered, self.registered_val_srocc, self.promotion)
        return lines

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (paths as strings; the promotion as :meth:`Promotion.to_dict`)."""
        return _plain(self)


@dataclass(frozen=True)
class SweepOutcome:
    """What :func:`tune` produced.

    Attributes:
        model_dir: the best trial's meta-learner (``<out>/best-model``).
        best_score: its best validation SROCC.
        best_params: the searched hyperparameters of the best trial.
        checkpoint: the best trial's checkpoint the model was loaded from.
        trials: one row per trial (``trial_id``, ``status``, ``val_srocc``, ``step``, params).
        best_config_file: the full job config of the model in ``best-model/`` (``<out>/best.yaml``).
        summary_file: the sweep as JSON (``<out>/sweep.json``).
        best_trial: the winning trial's id; ``best_score`` is its short-run score.
        trial_steps: meta-steps of the trials.
        refit: the winning configuration was trained again to full length, and that model is
            the one in ``best-model/`` (else it is the winning trial's own).
        steps: meta-steps of the run behind ``best-model/`` (the refit's, else the trial's).
        refit_val_srocc: the refit's best validation SROCC (None without a refit).
        best_step: the meta-step of the model in ``best-model/`` (the refit's best validation
            checkpoint; the winning trial's best one without a refit).
        winner_is_trained: the refit would have repeated the run the caller already trained
            (``trained``: the winner is the config's own values, see
            :func:`piaa_dist.orchestration.tune.training_differences`), so there was none:
            ``best-model/`` is that run's model, and when that run was registered (under the
            sweep's ``run.register_name``) ``registered`` / ``alias`` / ``promotion`` are its
            existing registration (nothing new registered, the alias where it was left;
            ``registration_reused``).
        mlflow_run_id / mlflow_uri / registered / alias / promotion / registered_val_srocc:
            as in :class:`TrainOutcome`.
    """

    model_dir: Path
    best_score: float
    best_params: Mapping[str, Any]
    checkpoint: str
    trials: tuple[Mapping[str, Any], ...]
    best_config_file: Path
    summary_file: Path
    mlflow_run_id: str | None = None
    mlflow_uri: str | None = None
    registered: str | None = None
    alias: str | None = None
    best_trial: str = ""
    trial_steps: int = 0
    refit: bool = False
    steps: int = 0
    refit_val_srocc: float | None = None
    promotion: Promotion | None = None
    registered_val_srocc: float | None = None
    best_step: int = 0
    winner_is_trained: bool = False
    registration_reused: bool = False

    def summary_lines(self) -> list[str]:
        """What ``piaa-dist tune`` prints after the trials: the winner, the refit, the registry."""
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in self.best_params.items())
        lines = [f"best trial {self.best_trial or '?'}: val SROCC {self.best_score:.3f} after "
                 f"{self.trial_steps} steps ({params})"]
        if self.refit:
            reached = "" if self.refit_val_srocc is None else \
                f": val SROCC {self.refit_val_srocc:.3f} (best, at step {self.best_step})"
            lines.append(f"refit of its configuration to {self.steps} steps{reached} -> {self.model_dir}")
        elif self.winner_is_trained:
            lines.append(f"no refit: its configuration is the one already trained ({self.steps} steps, best "
                         f"validation checkpoint at step {self.best_step}); that run's model is the winner "
                         f"-> {self.model_dir}")
            if self.registration_reused:
                lines.append(f"already registered as {self.registered}: nothing new registered"
                             + ("" if self.promotion is None else f"; {self.promotion.message}"))
                return lines
        else:
            lines.append(f"no refit: {self.model_dir} is the trial's own {self.steps}-step model")
        lines += _registry_lines(self.registered, self.registered_val_srocc, self.promotion)
        return lines

    def trials_table(self) -> str:
        """The trials as a plain-text table, best first."""

        def cell(v: Any) -> str:
            if isinstance(v, float):
                return f"{v:.4g}"
            return "-" if v is None else str(v)

        ordered = sorted(self.trials, key=lambda r: -(r.get("val_srocc") or -9))
        table = [list(TRIAL_COLUMNS)] + [[cell(r.get(c)) for c in TRIAL_COLUMNS] for r in ordered]
        widths = [max(len(row[i]) for row in table) for i in range(len(TRIAL_COLUMNS))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table)

    def to_dict(self, *, trials: bool = True) -> dict[str, Any]:
        """A JSON-ready dict (paths as strings); ``trials=False`` leaves the trial rows out."""
        out = _plain(self)
        if not trials:
            out.pop("trials")
        return out


@dataclass(frozen=True)
class Registration:
    """A model version :func:`register` created.

    Attributes:
        name: registered model name.
        version: the new version.
        uri: ``models:/NAME/VERSION``.
        alias: ``models:/NAME@ALIAS`` when the alias now points at it (None without an alias,
            or when it stayed with a better version: see ``promotion``).
        mlflow_run_id / mlflow_uri: the run that holds the model files.
        promotion: how the alias was decided (None when no alias was asked for).
        val_srocc: the version's validation SROCC as recorded in the registry (None when it
            was not scored).
    """

    name: str
    version: int
    uri: str
    alias: str | None
    mlflow_run_id: str
    mlflow_uri: str
    promotion: Promotion | None = None
    val_srocc: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the promotion as :meth:`Promotion.to_dict`)."""
        return _plain(self)


@dataclass(frozen=True)
class Ranking:
    """What :func:`personalize` produced: one person's images, best first.

    Attributes:
        ranked: ``(image, predicted score on the person's scale)``, highest first.
        model: the model reference it adapted.
        ratings_used: ratings the adaptation used.
        skipped: ``{reason: count}`` of rating rows not used (every row is used or counted).
        out: the ranking CSV (``rank,image,predicted_score``), when one was written.
        unreadable: ``(image, why)`` of images to score that did not decode (not ranked).
        score_range: the person's rating scale (``ranked``'s scores are on it).
        finetune: the fine-tuning setting the adaptation used and where it came from (the
            setting chosen for ``blg-piaa`` on validation users and recorded with the registered
            model, else the shared ``eval.finetune_*`` budget).
    """

    ranked: tuple[tuple[Path, float], ...]
    model: str
    ratings_used: int
    skipped: Mapping[str, int] = field(default_factory=dict)
    out: Path | None = None
    unreadable: tuple[tuple[Path, str], ...] = ()
    score_range: tuple[float, float] = (1.0, 5.0)
    finetune: str = ""

    def top(self, n: int = 5) -> list[tuple[Path, float]]:
        """The ``n`` best images."""
        return list(self.ranked[:n])

    def __len__(self) -> int:
        return len(self.ranked)


def _plain(obj: Any) -> dict[str, Any]:
    promotion = getattr(obj, "promotion", None)
    if promotion is not None:  # its identity and message, not the validation users' list
        obj = dataclasses.replace(obj, promotion=None)
    out = json.loads(json.dumps(dataclasses.asdict(obj), default=str))
    if promotion is not None:
        out["promotion"] = json.loads(json.dumps(promotion.to_dict(), default=str))
    return out


def _registry_lines(registered: str | None, val_srocc: float | None,
                    promotion: Promotion | None) -> list[str]:
    """The registry part of a command's summary: what was registered, and where the alias is."""
    if registered is None:
        return []
    lines = [f"registered {registered}" + ("" if val_srocc is None else f" (val SROCC {val_srocc:.3f})")]
    if promotion is not None:
        lines.append(promotion.message)
    return lines


# ---------------------------------------------------------------------------------------------
# Shared pieces


def job_config(
    config: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    data: str | None = None,
    s3_endpoint: str | None = None,
    updates: Mapping[str, Any] | None = None,
) -> JobConfig:
    """The YAML config with ``key=value`` overrides, then the caller's arguments on top.

    Arguments win over the file because they are what the user typed last; ``None`` arguments
    leave the file's value alone.

    Raises:
        ConfigError: bad config or overrides, or no dataset URL from either source.
    """
    cfg = load_config(config, overrides)
    flags: dict[str, Any] = {k: v for k, v in (updates or {}).items() if v is not None}
    if data:
        flags["data.url"] = str(data)
    if s3_endpoint:
        flags["data.s3_endpoint"] = s3_endpoint
    if flags:
        cfg = with_overrides(cfg, flags)
    if not cfg.data.url:
        raise ConfigError("no dataset: pass --data URL (or set data.url in the config)")
    return cfg


def _check_alias(cfg: JobConfig, mlflow: bool, force: bool = False) -> None:
    """An alias can only move when a version is registered, and (unless forced) only after the
    new version was compared with the current holder on validation users: say so before any
    work starts instead of ignoring the alias."""
    if not cfg.run.alias:
        return
    if not mlflow:
        raise UserError(f"alias {cfg.run.alias!r}: the registry is MLflow's; drop --no-mlflow or the alias")
    if not cfg.run.register_name:
        raise UserError(f"alias {cfg.run.alias!r}: nothing is registered (run.register_name is empty); "
                        "set run.register_name=NAME")
    if not force and cfg.data.validation_users <= 0:
        raise UserError(f"alias {cfg.run.alias!r}: moving it compares the new version with the one that "
                        "holds it on validation users, and data.validation_users is 0; set "
                        "data.validation_users=N or pass --force-alias")


def _check_dataset(cfg: JobConfig) -> None:
    """Open the dataset here, before any run starts: a missing bucket or dataset, missing S3
    credentials or an unreachable endpoint is then one clear line (the data plane's message,
    which says what to set) instead of a failure inside a Ray worker or a Tune trial, and no
    MLflow run is left FAILED for it."""
    from piaa_dist.data.stream import Dataset

    Dataset.open(cfg.data.url, endpoint_url=cfg.data.s3_endpoint or None)


def _open_run(cfg: JobConfig, mlflow_uri: str | None, kind: str, **tags: str) -> RunLogger:
    from piaa_dist.orchestration import tracking

    run = tracking.RunLogger(
        cfg.run.experiment, uri=tracking.tracking_uri(mlflow_uri or cfg.run.mlflow_uri),
        run_name=kind, rank=0,
        tags={"piaa_dist.kind": kind, "piaa_dist.data": cfg.data.url, **tags},
    ).start()
    run.log_params(cfg)
    return run


@dataclass(frozen=True)
class _Registered:
    """What :func:`_register` did: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` when the alias
    points at it, the decision, and the score recorded in the registry."""

    uri: str | None = None
    alias: str | None = None
    promotion: Promotion | None = None
    val_srocc: float | None = None
    version: int | None = None


def _open_validation(cfg: JobConfig) -> tuple[ValidationSet, Any] | None:
    """The validation set of ``cfg`` on its dataset, or None when it holds no users out."""
    from piaa_dist.data.stream import Dataset
    from piaa_dist.orchestration.promotion import validation_set

    if cfg.data.validation_users <= 0 or not cfg.data.url:
        return None
    dataset = Dataset.open(cfg.data.url, endpoint_url=cfg.data.s3_endpoint or None)
    try:
        return validation_set(cfg, dataset), dataset
    except ValueError as err:
        log.warning("not scored on validation users: %s", err)
        return None


def _score_folder(folder: Path, validation: ValidationSet, dataset: Any, cfg: JobConfig) -> float:
    """A model folder's validation SROCC on ``validation`` (the protocol's threads and device)."""
    from piaa_dist.checkpoint import load_model
    from piaa_dist.model import select_device
    from piaa_dist.orchestration.promotion import score

    model, model_cfg, _info = load_model(folder)
    return score(validation, dataset, model, model_cfg, threads=cfg.run.threads_per_worker,
                 device=select_device(cfg.run.use_gpu))


def _champion_score(name: str, holder: Any, validation: ValidationSet, dataset: Any, cfg: JobConfig,
                    uri: str) -> tuple[float, bool]:
    """The alias holder's score on ``validation``: the one its tags record on this very set, else
    measured now (a score on other users, data or protocol is never compared). ``(score, rescored)``."""
    import tempfile

    from piaa_dist.orchestration.promotion import TAG_VAL_SROCC, recorded_score
    from piaa_dist.orchestration.tracking import resolve_model

    recorded = recorded_score(holder.tags or {}, validation)
    if recorded is not None:
        return recorded, False
    if TAG_VAL_SROCC in (holder.tags or {}):
        log.info("%s version %s was scored on other validation users or another protocol; "
                 "scoring it on these (%s)", name, holder.version, validation.describe())
    with tempfile.TemporaryDirectory(prefix="piaa-champion-") as tmp:
        folder = resolve_model(f"models:/{name}/{holder.version}", uri=uri, dst=tmp)
        return _score_folder(folder, validation, dataset, cfg), True


def _register(run: RunLogger, model_dir: Path, cfg: JobConfig, *, name: str, alias: str = "",
              force: bool = False) -> _Registered:
    """Register ``model_dir`` from ``run`` as a new version of ``name``; decide ``alias``.

    The new version is scored on ``cfg``'s validation users (when it holds some out) and the
    score goes into its tags and description. With an alias, the version holding it is scored
    on the same users with the same protocol and the alias moves only when the new version is
    better, or when ``force`` (:mod:`piaa_dist.orchestration.promotion`); otherwise the new
    version is tagged as a challenger.
    """
    from piaa_dist.orchestration import tracking
    from piaa_dist.orchestration.promotion import (
        ROLE_CHALLENGER,
        ROLE_CHAMPION,
        TAG_ROLE,
        TAG_ROLE_ALIAS,
        Promotion,
        decide,
        description,
    )

    if not name:
        return _Registered()
    found = _open_validation(cfg)
    if found is None:
        if alias and not force:  # _check_alias says so before training; a config can still end here
            raise UserError(f"alias {alias!r}: no validation users to compare the new version on "
                            f"(data.validation_users={cfg.data.validation_users}); pass --force-alias")
        version = int(run.register_model(model_dir, name, alias))
        return _Registered(f"models:/{name}/{version}", f"models:/{name}@{alias}" if alias else None,
                           version=version)
    validation, dataset = found
    new_score = _score_folder(model_dir, validation, dataset, cfg)
    log.info("%s scores val SROCC %.4f on %s", model_dir, new_score, validation.describe())
    tags = validation.tags(new_score)
    if not alias:
        version = int(run.register_model(model_dir, name, tags=tags,
                                         description=description(validation, new_score, "", "", None)))
        return _Registered(f"models:/{name}/{version}", None, None, new_score, version)

    holder = tracking.alias_version(name, alias, uri=run.uri)
    champion: tuple[int, float] | None = None
    rescored = False
    if holder is not None:
        champ_score, rescored = _champion_score(name, holder, validation, dataset, cfg, run.uri)
        champion = (int(holder.version), champ_score)
    promoted = decide(new_score, champion[1] if champion else None, force=force)
    role = ROLE_CHAMPION if promoted else ROLE_CHALLENGER
    version = int(run.register_model(
        model_dir, name, description=description(validation, new_score, role, alias, champion),
        tags={**tags, TAG_ROLE: role, TAG_ROLE_ALIAS: alias}))
    if promoted:
        tracking.set_alias(name, alias, version, uri=run.uri)
    promotion = Promotion(
        name=name, alias=alias, version=version, promoted=promoted, forced=force,
        val_srocc=new_score, champion_version=champion[0] if champion else None,
        champion_val_srocc=champion[1] if champion else None, rescored=rescored, validation=validation)
    log.info("%s", promotion.message)
    run.set_tags({"piaa_dist.promotion": promotion.message})
    return _Registered(f"models:/{name}/{version}", f"models:/{name}@{alias}" if promoted else None,
                       promotion, new_score, version)


def resolve_model_ref(ref: str | Path, *, mlflow_uri: str | None = None) -> Path:
    """The local model folder a model reference names.

    Args:
        ref: a model folder (``model.safetensors`` + ``config.yaml``); the folder that
            ``train --out`` wrote (its ``model/`` is used); the folder ``tune --out`` wrote (its
            ``best-model/``); or ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
            ``runs:/RUN_ID/PATH`` (downloaded from the registry at ``mlflow_uri``).
        mlflow_uri: tracking URI for registry references (default ``$MLFLOW_TRACKING_URI``,
            then ``sqlite:///mlflow.db``).

    Raises:
        CheckpointError: a folder that is none of the above (the message lists what was looked for).
        TrackingError: an unknown registered model, alias or version.
    """
    from piaa_dist import checkpoint

    text = str(ref)
    if "://" not in text and not text.startswith(("models:/", "runs:/")):
        folder = Path(text)
        if checkpoint.is_model_dir(folder):
            return folder
        found = [folder / sub for sub in (TRAIN_MODEL_DIR, TUNE_MODEL_DIR) if checkpoint.is_model_dir(folder / sub)]
        if len(found) == 1:
            log.info("model %s -> %s", folder, found[0])
            return found[0]
        if len(found) > 1:
            raise checkpoint.CheckpointError(
                f"{folder}: holds both a train model ({TRAIN_MODEL_DIR}/) and a sweep's best model "
                f"({TUNE_MODEL_DIR}/); name the one you mean")
        raise checkpoint.CheckpointError(
            f"{folder}: not a model folder: expected {checkpoint.WEIGHTS_FILE} and "
            f"{checkpoint.CONFIG_FILE} in it, or in {TRAIN_MODEL_DIR}/ (what `piaa-dist train --out` "
            f"writes) or {TUNE_MODEL_DIR}/ (what `piaa-dist tune --out` writes)")
    from piaa_dist.orchestration.tracking import resolve_model

    return resolve_model(text, uri=mlflow_uri or "")


def _is_registry_ref(ref: str | Path) -> bool:
    return str(ref).startswith(("models:/", "runs:/"))


# ---------------------------------------------------------------------------------------------
# Data


def synth(
    *,
    out: str | Path,
    users: int | None = None,
    images: int | None = None,
    seed: int | None = None,
    test_fraction: float | None = None,
    ratings_per_user: tuple[int, int] | None = None,
    image_size: int | None = None,
    progress: bool = False,
) -> WorldSummary:
    """Write a synthetic PIAA world in the FLICKR-AES layout (plus its truth sidecars).

    Arguments left as None keep :class:`piaa_dist.data.synth.WorldSpec`'s defaults (80 users,
    3000 images, ...).

    Raises:
        UserError: an impossible world (e.g. fewer than 2 users).
    """
    from piaa_dist.data.synth import WorldSpec, make_world

    given = {"users": users, "images": images, "seed": seed, "test_fraction": test_fraction,
             "ratings_per_user": tuple(ratings_per_user) if ratings_per_user else None,
             "image_size": image_size}
    try:
        spec = dataclasses.replace(WorldSpec(), **{k: v for k, v in given.items() if v is not None})
    except ValueError as err:
        raise UserError(f"synth: {err}") from None
    bar = None
    if progress:
        from tqdm import tqdm

        def bar(it):
            return tqdm(it, total=spec.images, desc="render", unit="img")
    return make_world(out, spec, progress=bar)


def scale_world(*, out: str | Path, seed: int = 0, render_images: bool = True, progress: bool = False,
                **spec: Any) -> "ScaleSummary":
    """Write a scale world (:class:`piaa_dist.data.scaleworld.ScaleSpec` fields as keywords).

    A long tail of ratings per user over a shared pool of small images, streamed in bounded
    memory: a ratings log (``layout="ratings"``) or the FLICKR-AES layout. ``render_images``
    False writes ratings and truth only (``images`` is the pool size, a spec field).

    Raises:
        UserError: an impossible spec.
    """
    from piaa_dist.data.scaleworld import ScaleSpec, write_scale_world

    try:
        scale_spec = ScaleSpec(seed=seed, **spec)
    except (TypeError, ValueError) as err:
        raise UserError(f"synth: {err}") from None
    bar = None
    if progress:
        from tqdm import tqdm

        def bar(it, total, desc):
            return tqdm(it, total=total, desc=desc)
    return write_scale_world(out, scale_spec, images=render_images, progress=bar)


def ingest(
    *,
    format: str,
    out: str,
    root: str | Path | None = None,
    ratings_file: str | Path | None = None,
    images_dir: str | Path | None = None,
    test_users: str | Path | None = None,
    test_fraction: float | None = None,
    score_range: tuple[float, float] | None = None,
    s3_endpoint: str | None = None,
    strict: bool = False,
    progress: bool = False,
    workers: int = 0,
    threads: int | None = None,
    ray_address: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Ingest rating files and images into a new, atomically published dataset version at ``out``.

    Args:
        format: a registered reader (``flickr-aes``, ``aadb``, ``para``, ``ratings``; see
            :data:`piaa_dist.data.readers.READERS`).
        out: a local folder or ``s3://bucket/prefix``.
        root: the dataset folder (``flickr-aes``, ``aadb``, ``para``).
        ratings_file / images_dir: the ratings file and image folder (or ``s3://`` prefix);
            default the published locations under ``root``.
        test_users: the test-user list (default: the one published in ``root``, if any).
        test_fraction: or this fraction of users, chosen by a seeded hash of the user ID.
        score_range: the file's score scale, mapped onto 1-5.
        s3_endpoint: S3 endpoint (default ``$AWS_ENDPOINT_URL``).
        strict: fail on the first skipped record instead of counting it.
        progress: progress bars on stderr.
        workers: Ray workers (1 CPU each; users are partitioned over Ray tasks), as for
            ``train`` and ``evaluate``; 0 ingests in this process without Ray. The output bytes
            are the same whatever the number.
        threads: threads per worker (or in this process) for image work and uploads (default
            2 per Ray worker, ``min(8, CPUs)`` in process).
        ray_address: Ray cluster (default ``$RAY_ADDRESS``, else a local Ray).
        **options: the ingester's other knobs (``split_seed``, ``fold``, ``max_side``,
            ``quality``, ``shard_size``, ``max_pixels``, ``image_cache_mb``, ``partitions``;
            see :func:`piaa_dist.orchestration.ray_ingest.ingest_distributed`).

    Returns:
        The ingest report (``read == ingested + skipped``, per reason; ``dataset_version``).
    """
    from piaa_dist.orchestration.ray_ingest import ingest_distributed

    return ingest_distributed(format, root, out, workers=workers, threads=threads, ray_address=ray_address,
                              test_users=test_users, test_fraction=test_fraction, ratings_file=ratings_file,
                              images_dir=images_dir, score_range=tuple(score_range) if score_range else None,
                              endpoint_url=s3_endpoint, strict=strict, progress=progress, **options)


def verify(url: str, *, s3_endpoint: str | None = None, version: str | None = None,
           workers: int = 4) -> dict[str, Any]:
    """Read every user of a dataset version (default: the published one) and check it.

    Returns:
        ``{"users", "ratings", "bytes", "shards", "version", "url"}``.

    Raises:
        DataError: the first inconsistency (names the shard, user or object).
    """
    from piaa_dist.data.verify import verify_dataset

    return verify_dataset(url, s3_endpoint, version=version, workers=workers)


@dataclass(frozen=True)
class DatasetVersions:
    """A dataset's versions after an optional clean-up (``piaa-dist datasets``)."""

    url: str
    versions: list  #: :class:`piaa_dist.data.layout.VersionInfo`, oldest first
    removed: dict[str, int] = field(default_factory=dict)  #: version -> objects deleted


def dataset_versions(url: str, *, remove: Sequence[str] = (), prune: bool = False, keep: int = 0,
                     grace_hours: float = 24.0, s3_endpoint: str | None = None) -> DatasetVersions:
    """List a dataset's versions; remove the named ones and, with ``prune``, the old ones.

    The published version is never removed; old versions go only through this call.

    Raises:
        UserError: no versions at ``url``; removing the published or an unknown version.
    """
    from piaa_dist.data.layout import list_versions, remove_version, versions_to_prune
    from piaa_dist.storage import open_store

    store = open_store(url, s3_endpoint)
    versions = list_versions(store)
    doomed = list(remove)
    if prune:
        doomed += versions_to_prune(versions, keep=keep, grace_hours=grace_hours)
    if not versions and not doomed:
        raise UserError(f"no dataset versions at {store.url}")
    removed = {version: remove_version(store, version) for version in dict.fromkeys(doomed)}
    if removed:
        versions = list_versions(store)
    return DatasetVersions(store.url, versions, removed)


# ---------------------------------------------------------------------------------------------
# Training


def train(
    *,
    data: str | None = None,
    out: str | Path,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    workers: int | None = None,
    alias: str | None = None,
    force_alias: bool = False,
    s3_endpoint: str | None = None,
    mlflow_uri: str | None = None,
    mlflow: bool = True,
    ray_address: str | None = None,
    progress: bool = True,
) -> TrainOutcome:
    """Meta-train, write ``<out>/model``, log the run to MLflow and register the meta-learner.

    Running it again with the same ``out`` resumes from the latest checkpoint.

    Args:
        data: dataset root (folder or ``s3://``); default the config's ``data.url``.
        out: output folder (``model/``, ``checkpoints/``, ``metrics.jsonl``).
        config: job config YAML (``jobs/configs/NAME.yaml``); default the built-in defaults.
        overrides: ``section.key=value`` overrides of the config.
        workers: Ray Train workers (0 = in this process); default ``run.workers``.
        alias: alias to move to the registered version (e.g. ``champion``); default
            ``run.alias``. Registration happens when ``run.register_name`` is set. The alias
            moves only if the new version beats the one holding it on the validation users
            (see the module docstring); ``outcome.promotion`` says what happened.
        force_alias: move the alias whatever the scores.
        s3_endpoint: S3 endpoint for data and checkpoints (default ``$AWS_ENDPOINT_URL``).
        mlflow_uri: tracking URI (default ``run.mlflow_uri``, ``$MLFLOW_TRACKING_URI``, then
            ``sqlite:///mlflow.db``).
        mlflow: False trains without MLflow (no run, no registration).
        ray_address: Ray cluster (default ``$RAY_ADDRESS``, else a local Ray).
        progress: in-process runs show a progress bar (Ray runs log rank 0's progress lines).

    Raises:
        ConfigError: bad config or overrides, or no dataset URL.
        UserError: an alias that cannot move (no MLflow, nothing registered, no validation users).
    """
    from piaa_dist.checkpoint import save_model
    from piaa_dist.orchestration.ray_logging import ray_output
    from piaa_dist.orchestration.ray_train import run_distributed
    from piaa_dist.orchestration.run_lock import hold_run

    cfg = job_config(config, overrides, data=data, s3_endpoint=s3_endpoint,
                     updates={"run.workers": workers, "run.alias": alias})
    _check_alias(cfg, mlflow, force_alias)
    _check_dataset(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # One run per output for the whole use-case (training, then the model folder it writes),
    # taken before the MLflow run opens so a refused second run leaves no trace there.
    with hold_run(out), contextlib.ExitStack() as stack:
        run = _open_run(cfg, mlflow_uri, "train") if mlflow else None
        if run is not None:
            # The run ends FINISHED, or FAILED with the error recorded (RunLogger as a context manager).
            stack.enter_context(run)
        metrics_callback = None
        if run is not None:
            from piaa_dist.orchestration.tracking import RunMetricsCallback

            metrics_callback = RunMetricsCallback(run.uri, run.run_id)
        # An in-process run starts no Ray: nothing to quiet (and no `import ray` to pay for).
        with ray_output(ray_address) if cfg.run.workers > 0 else contextlib.nullcontext():
            result = run_distributed(
                cfg, cfg.data.url, out, workers=cfg.run.workers,
                s3_endpoint=cfg.data.s3_endpoint or None, metrics_callback=metrics_callback,
                progress=progress and cfg.run.workers == 0, ray_address=ray_address,
            )
        metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        info = {"kind": "blg-piaa-meta-learner", "workers": result.workers,
                "data": cfg.data.url, "checkpoint": result.checkpoint, "metrics": metrics,
                **_selection_info(result)}
        # The best validation checkpoint's model (held-out training users), never the last one.
        model_dir = save_model(out / TRAIN_MODEL_DIR, result.selected_model, cfg, info)
        reg = _Registered()
        if run is not None:
            run.log_metrics({f"final.{k}": v for k, v in metrics.items()}, step=result.step)
            if result.best is not None:
                run.log_metrics({"best.val_srocc": float(result.best.score or 0.0),
                                 "best.step": float(result.best.step)}, step=result.step)
            reg = _register(run, Path(model_dir), cfg, name=cfg.run.register_name, alias=cfg.run.alias,
                            force=force_alias)
    log.info("meta-learner (step %d of %d) written to %s", result.selected_step, result.step, model_dir)
    return TrainOutcome(
        model_dir=Path(model_dir), step=result.step, workers=result.workers, data=cfg.data.url,
        checkpoint=result.checkpoint, metrics=metrics, metrics_file=out / "metrics.jsonl",
        mlflow_run_id=run.run_id if run else None, mlflow_uri=run.uri if run else None,
        registered=reg.uri, alias=reg.alias, promotion=reg.promotion, registered_val_srocc=reg.val_srocc,
        **_selection_fields(result),
    )


def _selection_info(result: Any) -> dict[str, Any]:
    """What a model folder's ``info.json`` says about which checkpoint it is."""
    stopping = result.early_stopping
    info: dict[str, Any] = {"step": result.selected_step, "last_step": result.step}
    if result.best is not None:
        info.update(selected="best validation checkpoint", best_step=result.best.step,
                    best_val_srocc=result.best.score, best_checkpoint=result.best.url,
                    stopped_early=stopping.get("stopped_at") is not None)
    else:
        info["selected"] = "last checkpoint (no validation)"
    return info


def _selection_fields(result: Any) -> dict[str, Any]:
    """:class:`TrainOutcome`'s fields about the written checkpoint."""
    best = result.best
    return {"best_step": result.selected_step,
            "best_val_srocc": None if best is None else best.score,
            "stopped_early": result.early_stopping.get("stopped_at") is not None,
            "best_checkpoint": None if best is None else best.url}


def tune(
    *,
    data: str | None = None,
    out: str | Path,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    samples: int | None = None,
    workers_per_trial: int = 1,
    alias: str | None = None,
    force_alias: bool = False,
    refit: bool = True,
    trained: TrainOutcome | None = None,
    s3_endpoint: str | None = None,
    mlflow_uri: str | None = None,
    mlflow: bool = True,
    ray_address: str | None = None,
    progress: bool = True,
) -> SweepOutcome:
    """Run a Ray Tune sweep of meta-training trials, refit the winner, write, log and register it.

    Searches ``meta.inner_lr``, ``meta.inner_steps``, ``data.shots`` and ``meta.meta_lr`` (ranges
    in the config's ``tune`` section) with ASHA on the validation SROCC of held-out training
    users. Trials are short runs (``tune.trial_steps``); with ``refit`` (the default) the winning
    configuration is then meta-trained to the config's full ``meta.meta_steps`` (in
    ``<out>/refit/``, with ``run.workers`` workers) and that model is the one written and
    registered. Writes ``<out>/best-model/``, ``<out>/best.yaml`` (its config) and
    ``<out>/sweep.json``; with MLflow the sweep is one run with a nested run per trial (and one
    for the refit).

    Args:
        samples: trials (default ``tune.samples``).
        workers_per_trial: Ray Train workers per trial.
        refit: train the winning configuration to full length before registering it (False:
            register the winning trial's own model, as it stopped).
        trained: the run the caller already meta-trained (:func:`train`'s outcome, e.g. the
            demo's). When the refit would train what it trained (the winner is the config's own
            values: :func:`~piaa_dist.orchestration.tune.training_differences` empty) the refit
            is skipped and that run is the winner: its model is written to ``best-model/``
            and, when it was registered, it is not registered again (the sweep's outcome is its
            registration and promotion; the alias stays where that promotion left it).
        alias / force_alias: as in :func:`train` (the refit model is what is compared).
        progress: an in-process refit (``run.workers`` 0) shows a progress bar.
        Others: as in :func:`train`.

    Raises:
        ConfigError: bad config (e.g. ``run.validate_every`` 0: validation SROCC is the metric).
        UserError: an alias that cannot move.
        RuntimeError: no trial reported a validation SROCC.
    """
    from piaa_dist.checkpoint import save_model
    from piaa_dist.config import dump_config, flat_params
    from piaa_dist.orchestration.ray_logging import ray_output
    from piaa_dist.orchestration.tune import SEARCHED, refit_config, run_sweep, trial_steps

    cfg = job_config(config, overrides, data=data, s3_endpoint=s3_endpoint, updates={"run.alias": alias})
    _check_alias(cfg, mlflow, force_alias)
    _check_dataset(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = _open_run(cfg, mlflow_uri, "tune") if mlflow else None
    with run if run is not None else contextlib.nullcontext():
        with ray_output(ray_address):
            sweep = run_sweep(
                cfg, cfg.data.url, out, samples=samples, workers_per_trial=workers_per_trial,
                s3_endpoint=cfg.data.s3_endpoint or None, mlflow_uri=run.uri if run else None,
                parent_run_id=run.run_id if run else None, ray_address=ray_address,
            )
        best_params = {k: v for k, v in flat_params(sweep.best_config).items() if k in SEARCHED}
        short = trial_steps(cfg)
        info = {"kind": "blg-piaa-meta-learner", "source": "tune", "val_srocc": sweep.best_score,
                "best_params": best_params, "checkpoint": sweep.best_checkpoint,
                "trial": sweep.best_trial, "trial_steps": short}
        model, model_cfg, checkpoint, steps, refit_val = sweep.model, sweep.best_config, sweep.best_checkpoint, \
            sweep.trial_length or short, None
        best_step = sweep.best_step or steps
        reused = None
        if refit and short < cfg.meta.meta_steps:
            full = refit_config(cfg, best_params)
            reused = _trained_run_if_same(trained, full)
        if reused is not None:
            model, model_cfg, trained_info = reused
            checkpoint = trained_info.get("best_checkpoint") or trained_info.get("checkpoint") or ""
            steps, best_step = int(trained_info.get("last_step", trained.step)), int(trained.best_step)
            log.info("no refit: the winning configuration is the one already trained (%s, %d steps, best "
                     "validation checkpoint at step %d)%s", trained.model_dir, steps, best_step,
                     f"; it is already registered as {trained.registered}" if trained.registered else "")
            info.update(refit=False, winner_is_trained=True, trained_model=str(trained.model_dir),
                        trained_registered=trained.registered, checkpoint=checkpoint,
                        **{k: trained_info[k] for k in ("selected", "best_step", "best_val_srocc",
                                                        "stopped_early") if k in trained_info})
        elif refit and short < cfg.meta.meta_steps:
            result = _refit(full, out, run, ray_address=ray_address, progress=progress)
            # The refit's best validation checkpoint (held-out training users), not its last step.
            model, model_cfg, checkpoint, steps = result.selected_model, full, result.checkpoint, result.step
            best_step = result.selected_step
            if result.best is not None and result.best.score is not None:
                refit_val = float(result.best.score)
            elif result.metrics.get("val_srocc") is not None:
                refit_val = float(result.metrics["val_srocc"])
            info.update(refit=True, checkpoint=checkpoint, refit_val_srocc=refit_val, **_selection_info(result))
        elif refit:
            log.info("the trials ran the full %d meta-steps: the winning trial's model is full length, "
                     "no refit needed", cfg.meta.meta_steps)
        info.setdefault("step", int(best_step))
        info.setdefault("last_step", int(steps))
        model_dir = save_model(out / TUNE_MODEL_DIR, model, model_cfg, info)
        (out / BEST_CONFIG_FILE).write_text(dump_config(model_cfg))
        outcome = SweepOutcome(
            model_dir=Path(model_dir), best_score=float(sweep.best_score), best_params=best_params,
            checkpoint=str(checkpoint), trials=tuple(sweep.trials),
            best_config_file=out / BEST_CONFIG_FILE, summary_file=out / SWEEP_FILE,
            best_trial=sweep.best_trial, trial_steps=short,
            refit=reused is None and model is not sweep.model,
            steps=int(steps), refit_val_srocc=refit_val, best_step=int(best_step),
            winner_is_trained=reused is not None,
        )
        # Written before MLflow is touched, so that the sweep's record survives a registry error.
        outcome.summary_file.write_text(json.dumps(outcome.to_dict(), indent=2))
        if run is not None:
            run.log_metrics({"best.val_srocc": sweep.best_score,
                             **({"refit.val_srocc": refit_val} if refit_val is not None else {})})
            run.log_dict(outcome.to_dict(), SWEEP_FILE)
            run.log_text(outcome.trials_table(), "trials.txt")
            name = cfg.run.register_name if reused is not None else model_cfg.run.register_name
            if reused is not None and (trained.registered or "").startswith(f"models:/{name}/"):
                # The winner is a version the registry already holds, scored and decided
                # (champion or challenger) when it was registered: registering the same weights
                # again would only add a tied duplicate.
                run.set_tags({"piaa_dist.winner": "trained-run",
                              "piaa_dist.winner_registered": trained.registered})
                outcome = dataclasses.replace(outcome, mlflow_run_id=run.run_id, mlflow_uri=run.uri,
                                              registered=trained.registered, alias=trained.alias,
                                              promotion=trained.promotion,
                                              registered_val_srocc=trained.registered_val_srocc,
                                              registration_reused=True)
            else:
                reg = _register(run, Path(model_dir), model_cfg, name=name, alias=cfg.run.alias,
                                force=force_alias)
                outcome = dataclasses.replace(outcome, mlflow_run_id=run.run_id, mlflow_uri=run.uri,
                                              registered=reg.uri, alias=reg.alias, promotion=reg.promotion,
                                              registered_val_srocc=reg.val_srocc)
            outcome.summary_file.write_text(json.dumps(outcome.to_dict(), indent=2))
    return outcome


def _trained_run_if_same(trained: TrainOutcome | None,
                         full: JobConfig) -> tuple[Any, JobConfig, dict[str, Any]] | None:
    """The trained run's ``(model, config, info)`` when the refit (``full``) would repeat it,
    else None (no trained run, or the settings it trains differently, which are logged)."""
    from piaa_dist.checkpoint import load_model
    from piaa_dist.orchestration.tune import training_differences

    if trained is None:
        return None
    model, trained_cfg, trained_info = load_model(trained.model_dir)
    differ = training_differences(trained_cfg, full)
    if differ:
        log.info("refit: the winning configuration trains differently from %s (%s)", trained.model_dir,
                 ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differ.items()))
        return None
    return model, trained_cfg, dict(trained_info)


def _refit(cfg: JobConfig, out: Path, sweep_run: RunLogger | None, *, ray_address: str | None,
           progress: bool) -> Any:
    """Meta-train the winning configuration to full length in ``<out>/refit`` (a nested MLflow run).

    The checkpoints live under a name derived from the config, so re-running a sweep resumes a
    refit of the same configuration and never one of another.
    """
    import hashlib

    from piaa_dist.config import config_to_dict
    from piaa_dist.orchestration.ray_logging import ray_output
    from piaa_dist.orchestration.ray_train import run_distributed
    from piaa_dist.orchestration.tracking import RunLogger, RunMetricsCallback

    digest = hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]
    log.info("refit: training the winning configuration to %d meta-steps (%d workers)",
             cfg.meta.meta_steps, cfg.run.workers)
    with contextlib.ExitStack() as stack:
        metrics_callback = None
        if sweep_run is not None:
            child = stack.enter_context(RunLogger(
                cfg.run.experiment, uri=sweep_run.uri, run_name="refit", rank=0,
                parent_run_id=sweep_run.run_id, tags={"piaa_dist.kind": "tune-refit",
                                                      "piaa_dist.data": cfg.data.url}))
            child.log_params(cfg)
            metrics_callback = RunMetricsCallback(child.uri, child.run_id)
        with ray_output(ray_address) if cfg.run.workers > 0 else contextlib.nullcontext():
            return run_distributed(
                cfg, cfg.data.url, out / REFIT_DIR, workers=cfg.run.workers, name=f"refit-{digest}",
                s3_endpoint=cfg.data.s3_endpoint or None, metrics_callback=metrics_callback,
                progress=progress and cfg.run.workers == 0, ray_address=ray_address,
            )


def register(
    model: str | Path,
    *,
    name: str = "blg-piaa",
    alias: str | None = None,
    force_alias: bool = False,
    data: str | None = None,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    s3_endpoint: str | None = None,
    mlflow_uri: str | None = None,
    experiment: str = "piaa-dist",
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    run_name: str = "register",
) -> Registration:
    """Register a model folder as a new version of ``name``; move ``alias`` to it if it is better.

    The files are logged to a new MLflow run (``run_name``, with ``params`` and ``metrics``: why
    this model), so the version's lineage is recorded like a training run's. The version is
    scored on the validation users of the protocol config and, with an alias, compared with the
    version holding it (champion/challenger, as in :func:`train`).

    Args:
        model: a model folder, or a ``train --out`` / ``tune --out`` folder.
        name: registered model name (created when missing).
        alias: alias to point at the new version when it beats the current holder (e.g.
            ``champion``); ``.promotion`` says what happened.
        force_alias: move the alias whatever the scores.
        data: the dataset whose validation users score it (default: the protocol config's
            ``data.url``, i.e. the data the model was trained on).
        config / overrides: the protocol config (default: the model's own config).
        s3_endpoint: S3 endpoint of ``data``.
        mlflow_uri: tracking URI (default ``$MLFLOW_TRACKING_URI``, then ``sqlite:///mlflow.db``).

    Raises:
        UserError: an alias that cannot be decided (no validation users and not forced).
    """
    from piaa_dist.checkpoint import load_model
    from piaa_dist.orchestration import tracking

    folder = resolve_model_ref(model)
    _model, model_cfg, _info = load_model(folder)
    if config:
        cfg = load_config(config, overrides)
    else:
        cfg = with_overrides(model_cfg, _flat_overrides(overrides)) if overrides else model_cfg
    flags: dict[str, Any] = {"run.alias": alias or "", "run.register_name": name}
    if data:
        flags["data.url"] = str(data)
    if s3_endpoint:
        flags["data.s3_endpoint"] = s3_endpoint
    cfg = with_overrides(cfg, flags)
    _check_alias(cfg, True, force_alias)
    uri = tracking.tracking_uri(mlflow_uri or "")
    with tracking.RunLogger(experiment, uri=uri, run_name=run_name, rank=0,
                            tags={"piaa_dist.kind": "register"}) as run:
        run.log_params({"model_dir": str(folder), **(params or {})})
        if metrics:
            run.log_metrics(dict(metrics))
        reg = _register(run, folder, cfg, name=name, alias=alias or "", force=force_alias)
    return Registration(name=name, version=int(reg.version), uri=str(reg.uri), alias=reg.alias,
                        mlflow_run_id=str(run.run_id), mlflow_uri=uri, promotion=reg.promotion,
                        val_srocc=reg.val_srocc)


def _flat_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    from piaa_dist.config import parse_overrides

    return {f"{section}.{key}": value for section, values in parse_overrides(overrides).items()
            for key, value in values.items()}


# ---------------------------------------------------------------------------------------------
# Meta-testing and personalization


def evaluate(
    *,
    data: str,
    model: str | Path,
    giaa: str | Path | None = None,
    giaa_out: str | Path | None = None,
    shots: Sequence[int] | None = None,
    repeats: int | None = None,
    seed: int | None = None,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    s3_endpoint: str | None = None,
    mlflow_uri: str | None = None,
    mlflow: bool = True,
    json_out: str | Path | None = None,
    progress: bool = True,
    workers: int = 0,
    ray_address: str | None = None,
) -> EvaluationResult:
    """Run the meta-testing protocol on the test users.

    The GIAA baseline (``giaa-finetune``) is one per dataset: its training budget (``giaa.*``,
    ``run.seed``) comes from this evaluation's ``config`` (else the built-in defaults) and
    ``overrides``, never from the meta-learner's saved config, and it is trained on the training
    users the meta-learner saw, with its architecture (:mod:`piaa_dist.orchestration.baselines`).
    With MLflow it is looked up in the registry (``piaa-giaa``, by that identity) and trained
    and registered only when missing, so every meta-learner evaluated on the same data is
    compared with the same GIAA model; the result records its key and version.

    Args:
        data: dataset root (folder or ``s3://``).
        model: the meta-learner (see :func:`resolve_model_ref`).
        giaa: the GIAA baseline's folder. Default: a ``giaa/`` folder inside or beside a local
            meta-learner folder, else the registered baseline of this data (MLflow), else one
            is trained here on the users the meta-learner saw (and registered, with MLflow).
        giaa_out: save a GIAA model trained here to this folder.
        shots / repeats / seed: the protocol (default ``eval.shots``, ``eval.repeats``,
            ``run.seed``).
        config: job config YAML for the protocol and the GIAA budget (default: the model's own
            config for the protocol, the built-in defaults for the GIAA budget; the model's
            architecture always comes from the model).
        overrides: ``section.key=value`` overrides.
        s3_endpoint: S3 endpoint (default ``data.s3_endpoint``, then ``$AWS_ENDPOINT_URL``).
        mlflow_uri: tracking URI for registry references and the ``evaluate`` run.
        mlflow: False logs no ``evaluate`` run and neither looks up nor registers a GIAA
            baseline (registry references still resolve).
        json_out: also write the result JSON here.
        progress: progress bars.
        workers: Ray workers the test users are spread over (0 = in this process): the same
            numbers either way.
        ray_address: Ray cluster for ``workers`` (default ``$RAY_ADDRESS``, else a local Ray).

    Returns:
        The result; its ``model``, ``data``, ``dataset_version``, ``giaa``, ``giaa_key`` and
        ``giaa_model`` fields say where each came from.

    Raises:
        UserError: no method to run, a GIAA folder that is not a model.
    """
    import torch

    from piaa_dist.checkpoint import load_model
    from piaa_dist.config import config_from_dict, config_to_dict, parse_overrides
    from piaa_dist.data.stream import Dataset
    from piaa_dist.evaluate import METHODS, standard_models, with_choice
    from piaa_dist.evaluate import evaluate as evaluate_in_process
    from piaa_dist.model import select_device

    folder = resolve_model_ref(model, mlflow_uri=mlflow_uri)
    meta, model_cfg, _info = load_model(folder)
    # The model's own config defines the architecture and input size it was trained with;
    # a config file or overrides may change the protocol (eval.*), not silently the model.
    if config:
        base = config_to_dict(load_config(config, overrides))
        base["model"] = config_to_dict(model_cfg)["model"]
        cfg = config_from_dict(base, str(config))
    else:
        flat = {f"{section}.{key}": value
                for section, values in parse_overrides(overrides).items()
                for key, value in values.items()}
        cfg = with_overrides(model_cfg, flat)
    torch.set_num_threads(max(1, int(cfg.run.threads_per_worker)))
    device = select_device(cfg.run.use_gpu)
    meta = meta.to(device)
    dataset = Dataset.open(str(data), endpoint_url=s3_endpoint or cfg.data.s3_endpoint or None)

    prior = _GiaaPrior()
    if any(METHODS.get(m) and METHODS[m].prior == "giaa" for m in cfg.eval.methods):
        # The GIAA budget is the evaluation's own (its --config, else the defaults), not the
        # meta-learner's: two meta-learners on the same data get the same baseline.
        giaa_cfg = load_config(config or None, overrides)
        cache_uri = None
        if mlflow:
            from piaa_dist.orchestration.tracking import tracking_uri

            cache_uri = tracking_uri(mlflow_uri or cfg.run.mlflow_uri or "")
        prior = _giaa_prior(model_cfg, giaa_cfg, dataset, device,
                            folder=None if _is_registry_ref(model) else folder, giaa=giaa,
                            giaa_out=giaa_out, progress=progress, cache_uri=cache_uri)
    models = standard_models(meta, prior.model, cfg.eval.methods)
    if not models:
        raise UserError("evaluate: no method to run (check eval.methods)")
    cache_uri = None
    if mlflow:
        from piaa_dist.orchestration.tracking import tracking_uri

        cache_uri = tracking_uri(mlflow_uri or cfg.run.mlflow_uri or "")
    if workers > 0:
        from piaa_dist.orchestration.ray_evaluate import evaluation_workers

        # One group of Ray workers for the fine-tuning search and then the test users: Ray and
        # the workers (dataset, models) start once. The same numbers as in this process
        # (tested); the fine-tuning choice travels inside the config every worker receives.
        t0 = time.perf_counter()
        n_workers = min(int(workers), max(1, len(dataset.users("test"))))
        with evaluation_workers(cfg, dataset, models, workers=n_workers, ray_address=ray_address) as group:
            choice = _finetune_choice(cfg, model_cfg, dataset, models, shots=shots, seed=seed, data=str(data),
                                      cache_uri=cache_uri, progress=progress, search=group.search_finetuning)
            result = group.evaluate(with_choice(cfg, choice), shots=shots, repeats=repeats, seed=seed,
                                    progress=progress)
        result = dataclasses.replace(result, seconds=round(time.perf_counter() - t0, 2))
    else:
        choice = _finetune_choice(cfg, model_cfg, dataset, models, shots=shots, seed=seed, data=str(data),
                                  cache_uri=cache_uri, progress=progress)
        result = evaluate_in_process(with_choice(cfg, choice), dataset, models, shots=shots, repeats=repeats,
                                     seed=seed, progress=progress)
    result = result.with_finetune(choice)
    result = result.with_sources(model=str(model) if _is_registry_ref(model) else str(folder),
                                 data=str(data), giaa=prior.source,
                                 dataset_version=getattr(dataset, "version_id", None) or None,
                                 giaa_key=prior.key, giaa_model=prior.registered)
    if json_out:
        log.info("wrote %s", result.save(json_out))
    if mlflow:
        from piaa_dist.orchestration.tracking import RunLogger

        tags = {"piaa_dist.kind": "evaluate", "piaa_dist.model": str(model), "piaa_dist.data": str(data)}
        if prior.key:
            tags.update({"piaa_dist.giaa_key": prior.key, "piaa_dist.giaa_model": prior.registered or ""})
        tags.update({"piaa_dist.finetune_protocol": choice.protocol, "piaa_dist.finetune_source": choice.source,
                     "piaa_dist.finetune_key": choice.key or ""})
        with RunLogger(cfg.run.experiment, uri=mlflow_uri or cfg.run.mlflow_uri or "", run_name="evaluate",
                       rank=0, tags=tags) as run:
            run.log_params(with_choice(cfg, choice))
            run.log_params({f"finetune.{m}.k{k}": text.partition(": ")[2]
                            for m, by_k in choice.chosen.items() for k, text in by_k.items()})
            run.log_dict(choice.to_dict(), "eval/finetune_choice.json")
            run.log_evaluation(result)
            log.info("logged the evaluation to MLflow run %s (%s)", run.run_id, run.uri)
            _record_personal_setting(model, choice, data=str(data), uri=run.uri)
    return result


#: Tag of a registered meta-learner's version: the fine-tuning settings chosen for ``blg-piaa``
#: (JSON: ``settings`` k → ``eval.finetune`` entry, and where they were chosen), which
#: ``personalize`` adapts with. Set by ``evaluate`` of a ``models:/`` reference.
TAG_PERSONAL_SETTING = "piaa_dist.finetune.blg-piaa"

_MODELS_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def _registry_version(ref: str | Path, uri: str) -> tuple[str, Any] | None:
    """``(name, ModelVersion)`` of a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` reference,
    else None (a folder, a ``runs:/`` URI, an unknown alias)."""
    from piaa_dist.orchestration import tracking

    m = _MODELS_REF.match(str(ref))
    if not m:
        return None
    if m["alias"]:
        mv = tracking.alias_version(m["name"], m["alias"], uri=uri)
        return None if mv is None else (m["name"], mv)
    return m["name"], tracking.client(uri).get_model_version(m["name"], m["version"])


def _record_personal_setting(model: str | Path, choice: FinetuneChoice, *, data: str, uri: str) -> None:
    """Tag the registered version `model` names with the settings `choice` holds for
    ``blg-piaa`` (:data:`TAG_PERSONAL_SETTING`), so ``personalize`` adapts as ``evaluate``
    measured. Nothing for a model folder or a choice without ``blg-piaa`` settings."""
    from piaa_dist.evaluate import REFERENCE_METHOD
    from piaa_dist.orchestration import tracking

    chosen = choice.chosen.get(REFERENCE_METHOD)
    found = _registry_version(model, uri) if chosen else None
    if not chosen or found is None:
        return
    name, mv = found
    value = {"settings": {str(k): text for k, text in sorted(chosen.items())}, "source": choice.source,
             "protocol": choice.protocol, "validation_users": choice.validation_users,
             "search_key": choice.key or "", "data": data}
    tracking.set_version_tags(name, int(mv.version), {TAG_PERSONAL_SETTING: json.dumps(value, sort_keys=True)},
                              uri=uri)
    log.info("recorded the fine-tuning of %s with models:/%s/%s (personalize adapts with it)",
             REFERENCE_METHOD, name, mv.version)


def _personal_setting(model: str | Path, uri: str, ratings: int) -> tuple[str, str] | None:
    """``(eval.finetune entry, where it came from)`` recorded with the registered version
    `model` names, at the shot count closest to `ratings`; None when nothing is recorded."""
    from piaa_dist.personalize import closest_setting

    found = _registry_version(model, uri)
    if found is None:
        return None
    name, mv = found
    raw = (mv.tags or {}).get(TAG_PERSONAL_SETTING)
    if not raw:
        return None
    try:
        value = json.loads(raw)
        settings = {int(k): str(t) for k, t in value["settings"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"models:/{name}/{mv.version}: tag {TAG_PERSONAL_SETTING} is not a settings "
                        f"record: {raw[:200]!r}") from None
    picked = closest_setting(settings, ratings)
    if picked is None:
        return None
    k, text = picked
    how = "chosen on validation users" if value.get("source") in ("search", "cache") else "given in the config"
    return text, (f"the setting for blg-piaa at {k} shots ({how}, recorded with models:/{name}/{mv.version})")


#: Tag of the MLflow run that holds a fine-tuning search (its identity, ``search_key``).
TAG_FINETUNE_KEY = "piaa_dist.finetune_search_key"
_SEARCH_ARTIFACT = "finetune_search.json"


def _finetune_choice(cfg: JobConfig, model_cfg: JobConfig, dataset: Any, models: Mapping[str, Any], *,
                     shots: Sequence[int] | None, seed: int | None, data: str, cache_uri: str | None,
                     progress: bool, search: Callable[..., FinetuneChoice] | None = None) -> FinetuneChoice:
    """Each method's fine-tuning setting for this evaluation, chosen on validation users.

    The validation users are the meta-learner's held-out training users (its config's
    ``data.validation_users`` and ``run.seed``; the GIAA baseline is trained without them too),
    never test users. ``search(users, shots=, seed=, progress=)`` runs the search (default:
    :func:`~piaa_dist.evaluate.search_finetuning` in this process; the Ray workers' one
    gives the same choice). With MLflow (``cache_uri``) the search is cached: a run tagged with its
    :func:`~piaa_dist.evaluate.search_key` (priors, data version, users, grid, shots, seed)
    holds the choice, and a later evaluation with the same key reuses it. Without validation
    users nothing can be chosen honestly: the shared budget is used, and the result says so.
    """
    from piaa_dist.evaluate import protocol_of, search_finetuning, search_key, search_plan
    from piaa_dist.results import FinetuneChoice
    from piaa_dist.train import validation_users

    shots_l, _, seed_v = protocol_of(cfg, shots, None, seed)
    plan = search_plan(cfg, models, shots_l)
    if not plan:
        return search_finetuning(cfg, dataset, models, [], shots=shots_l, seed=seed_v)
    users = validation_users(model_cfg, dataset)
    if not users:
        note = ("no validation users (the meta-learner's data.validation_users is 0): every fine-tuned "
                "method gets the shared eval.finetune_* budget and giaa-ridge the default penalty")
        log.warning("evaluate: %s; nothing is chosen on test users", note)
        return FinetuneChoice(protocol=cfg.eval.protocol, source="none", note=note)
    version = getattr(dataset, "version_id", None) or str(getattr(dataset, "url", data))
    key = search_key(cfg, {m: models[m] for m in plan}, users, version, shots_l, seed_v)
    if cache_uri:
        found = _cached_search(cache_uri, cfg.run.experiment, key)
        if found is not None:
            log.info("fine-tuning settings from the cached search %s", key[:12])
            return dataclasses.replace(found, source="cache", key=key)
    log.info("choosing each method's fine-tuning on %d validation users (%s)", len(users),
             ", ".join(f"{m}@{ks}" for m, ks in plan.items()))
    t0 = time.perf_counter()
    if search is None:
        found = search_finetuning(cfg, dataset, models, users, shots=shots_l, seed=seed_v, progress=progress)
    else:
        found = search(users, shots=shots_l, seed=seed_v, progress=progress)
    log.info("fine-tuning search on %d validation users took %.1fs", len(users), time.perf_counter() - t0)
    choice = dataclasses.replace(found, key=key)
    if cache_uri:
        from piaa_dist.orchestration.tracking import RunLogger

        with RunLogger(cfg.run.experiment, uri=cache_uri, run_name="finetune-search", rank=0,
                       tags={"piaa_dist.kind": "finetune-search", TAG_FINETUNE_KEY: key,
                             "piaa_dist.data": data}) as run:
            run.log_dict(choice.to_dict(), _SEARCH_ARTIFACT)
    return choice


def _cached_search(uri: str, experiment: str, key: str) -> FinetuneChoice | None:
    """The choice of a finished search run tagged with `key`, or None."""
    import json
    import tempfile

    from piaa_dist.orchestration import tracking
    from piaa_dist.results import FinetuneChoice

    mlflow_client = tracking.client(uri)
    exp = mlflow_client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = mlflow_client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_FINETUNE_KEY}` = '{key}' "
                                     "and attributes.status = 'FINISHED'", max_results=1)
    if not runs:
        return None
    with tempfile.TemporaryDirectory(prefix="piaa-search-") as tmp:
        path = mlflow_client.download_artifacts(runs[0].info.run_id, _SEARCH_ARTIFACT, tmp)
        return FinetuneChoice.from_dict(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class _GiaaPrior:
    """The GIAA prior of an evaluation: the model, where it came from (``giaa`` of the result),
    its identity (None for a folder given by hand) and its registry version."""

    model: Any = None
    source: str | None = None
    key: str | None = None
    registered: str | None = None


def _giaa_prior(meta_cfg: JobConfig, giaa_cfg: JobConfig, dataset: Any, device: Any, *,
                folder: Path | None, giaa: str | Path | None, giaa_out: str | Path | None,
                progress: bool, cache_uri: str | None) -> _GiaaPrior:
    """The GIAA prior: ``giaa``, else a ``giaa/`` folder inside or beside a local meta-learner
    folder, else the registered baseline of this recipe (``cache_uri``), else trained now on the
    meta-training users (and registered when ``cache_uri``)."""
    import tempfile

    from piaa_dist.checkpoint import WEIGHTS_FILE, load_model, save_model
    from piaa_dist.orchestration.baselines import GIAA_MODEL_NAME, TAG_GIAA_KEY, giaa_recipe

    if giaa:
        if not Path(giaa, WEIGHTS_FILE).is_file():
            raise UserError(f"--giaa {giaa}: not a model folder (no {WEIGHTS_FILE})")
        log.info("GIAA model from %s", giaa)
        return _GiaaPrior(load_model(giaa, device)[0], str(giaa))
    if folder is not None:
        # `train --out DIR` writes the meta-learner to DIR/model; a GIAA baseline saved with it
        # lives in DIR/model/giaa or DIR/giaa.
        for candidate in (folder / "giaa", folder.parent / "giaa"):
            if (candidate / WEIGHTS_FILE).is_file():
                log.info("GIAA model from %s", candidate)
                return _GiaaPrior(load_model(candidate, device)[0], str(candidate))

    from piaa_dist.orchestration import tracking

    recipe = giaa_recipe(meta_cfg, giaa_cfg, dataset)
    if cache_uri:
        found = tracking.find_versions(GIAA_MODEL_NAME, {TAG_GIAA_KEY: recipe.key}, uri=cache_uri)
        if found:
            ref = f"models:/{GIAA_MODEL_NAME}/{found[0].version}"
            log.info("GIAA baseline %s (%s)", ref, recipe.describe())
            with tempfile.TemporaryDirectory(prefix="piaa-giaa-") as tmp:
                model = load_model(tracking.resolve_model(ref, uri=cache_uri, dst=tmp), device)[0]
            if giaa_out:
                save_model(giaa_out, model, recipe.training_config(meta_cfg),
                           {"kind": "giaa", "users": len(recipe.users), "giaa_key": recipe.key})
            return _GiaaPrior(model, ref, recipe.key, ref)

    from piaa_dist.giaa import train_giaa

    train_cfg = recipe.training_config(meta_cfg)
    log.info("no GIAA model for this data yet: training one (%s)", recipe.describe())
    model = train_giaa(train_cfg, dataset, list(recipe.users), progress=progress, device=device)
    info = {"kind": "giaa", "users": len(recipe.users), "giaa_key": recipe.key}
    source, registered = "trained by evaluate", None
    if giaa_out:
        save_model(giaa_out, model, train_cfg, info)
        log.info("saved the GIAA model to %s", giaa_out)
        source = str(giaa_out)
    if cache_uri:
        with tempfile.TemporaryDirectory(prefix="piaa-giaa-") as tmp:
            saved = save_model(Path(tmp) / "giaa", model, train_cfg, info)
            with tracking.RunLogger(meta_cfg.run.experiment, uri=cache_uri, run_name="giaa", rank=0,
                                    tags={"piaa_dist.kind": "giaa", "piaa_dist.data": recipe.dataset,
                                          "piaa_dist.giaa_key": recipe.key}) as run:
                run.log_params(train_cfg)
                version = run.register_model(saved, GIAA_MODEL_NAME, tags=recipe.tags(),
                                             description=recipe.describe())
        registered = f"models:/{GIAA_MODEL_NAME}/{version}"
        log.info("registered the GIAA baseline as %s: evaluations of this data reuse it", registered)
    return _GiaaPrior(model.to(device), source, recipe.key, registered)


def personalize(
    *,
    model: str | Path,
    ratings: str | Path,
    images: str | Path | None,
    score: str | Path | Sequence[str | Path],
    out: str | Path | None = None,
    mlflow_uri: str | None = None,
    seed: int = 0,
    score_range: tuple[float, float] | None = None,
    use_gpu: str | None = None,
) -> Ranking:
    """Adapt a meta-learner to one person's ratings and rank new images for them.

    Args:
        model: the meta-learner (see :func:`resolve_model_ref`).
        ratings: CSV of ``image,score`` rows (10 or more; see
            :data:`piaa_dist.personalize.RATINGS_FORMAT_HELP`).
        images: the folder holding the rated images (None: paths relative to the CSV).
        score: folder(s) or image files to rank.
        out: write the ranking here as CSV (``rank,image,predicted_score``).
        mlflow_uri: tracking URI for registry references.
        seed: fine-tuning seed.
        score_range: the person's rating scale (default 1–5); predictions come back on it.
        use_gpu: ``"auto"``, ``"yes"`` or ``"no"`` (default: the model's ``run.use_gpu``).

    Raises:
        DataError: unreadable ratings, too few usable ratings, nothing that decodes to score.
        GpuUnavailable: a GPU was required but is not usable here.
    """
    from piaa_dist.checkpoint import load_model
    from piaa_dist.model import select_device
    from piaa_dist.personalize import list_images, read_ratings, write_ranking
    from piaa_dist.personalize import personalize as adapt_and_score

    meta, cfg, _info = load_model(resolve_model_ref(model, mlflow_uri=mlflow_uri))
    rated = read_ratings(ratings, images, score_range=tuple(score_range) if score_range else None)
    targets = list_images([score] if isinstance(score, (str, Path)) else list(score))
    device = select_device(use_gpu or cfg.run.use_gpu, "personalize")
    # The fine-tuning setting evaluate chose for blg-piaa on validation users (recorded with the
    # registered version), at the shot count closest to this person's ratings: what the
    # protocol measured. Else the shared budget of the model's config.
    recorded = None
    if _is_registry_ref(model):
        from piaa_dist.orchestration.tracking import tracking_uri

        recorded = _personal_setting(model, tracking_uri(mlflow_uri or cfg.run.mlflow_uri or ""), len(rated.images))
    if recorded is None:
        log.info("personalize: no fine-tuning setting recorded with %s (run `piaa-dist evaluate` on a models:/ "
                 "reference to record one): the shared eval.finetune_* budget of its config", model)
    log.info("adapting %s to %d ratings (skipped %s); scoring %d images on %s",
             model, len(rated.images), rated.skipped or "none", len(targets), device)
    ranked = adapt_and_score(meta, cfg, rated, targets, seed=seed, device=device,
                             setting=recorded[0] if recorded else None)
    how = recorded[1] if recorded else "the shared eval.finetune_* budget: no setting recorded with the model"
    written = write_ranking(ranked, out) if out is not None else None
    return Ranking(ranked=tuple((Path(p), float(s)) for p, s in ranked), model=str(model),
                   ratings_used=ranked.ratings_used, skipped=dict(ranked.skipped), out=written,
                   unreadable=tuple((Path(p), str(why)) for p, why in ranked.unreadable),
                   score_range=tuple(ranked.score_range), finetune=f"{ranked.finetune}; {how}")


__all__ = [
    "DatasetVersions",
    "Ranking",
    "Registration",
    "SweepOutcome",
    "TrainOutcome",
    "dataset_versions",
    "evaluate",
    "ingest",
    "job_config",
    "personalize",
    "register",
    "resolve_model_ref",
    "scale_world",
    "synth",
    "train",
    "tune",
    "verify",
]
