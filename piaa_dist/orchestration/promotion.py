"""Champion/challenger: which registered version an alias should point to, and why.

An alias such as ``champion`` is what users pull (``models:/blg-piaa@champion``), so a command
asked to move it first measures the new version and the version that holds the alias now on
the **same validation users with the same protocol**, and moves the alias only when the new
version is better. This module is that measurement and that decision; the registry calls
(register, tag, move) are made by :mod:`piaa_dist.orchestration.usecases`.

The validation set (:class:`ValidationSet`) is fixed by the *new* version's job config and the
dataset it names:

* the users: the dataset's held-out training users (``data.validation_users`` chosen by
  ``run.seed``, :func:`piaa_dist.train.validation_users`: never test users, never users the new
  version was meta-trained on), identified by their count and the SHA-256 of their sorted IDs;
* the dataset version those users were read from (``Dataset.version_id``);
* the protocol: ``min(eval.shots)`` shots, ``eval.repeats`` seeded splits (``run.seed``), and
  the fine-tuning budget ``eval.finetune_steps`` / ``finetune_lr`` / ``finetune_optimizer`` /
  ``finetune_bn`` / ``batch_size``: what meta-training's own validation measures
  (:func:`piaa_dist.evaluate.validation_srocc`).

Both versions are scored by that one function with that one budget, the champion included;
each keeps its own architecture and adapts the parameters its own meta-training adapted
(``meta.inner_params``), as ``evaluate`` does, since that is part of what the meta-learner
learned. The score is deterministic (seeded splits, seeded fine-tuning, the config's thread
count), so scoring a version twice on the same set gives the same number; a champion whose
tags record a score on the very same set (:attr:`ValidationSet.key`) is therefore not scored
again, and one scored on any other set (another dataset or version, other users, another
protocol) is re-scored on this one. Numbers from different user sets are never compared.

Decision (:func:`decide`): the alias moves when no version holds it, or the new version scores
strictly higher (a tie keeps the champion: a move must be earned), or the caller forces it
(``--force-alias``).

Every scored version carries in its registry tags (:data:`TAG_VAL_SROCC` and the others below)
and description its score, the validation users' count and hash, the dataset and its version
and the protocol, so the registry UI shows why a version is or is not the champion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from piaa_dist.config import JobConfig, config_from_dict, config_to_dict

log = logging.getLogger(__name__)

#: Model-version tags of a scored version.
TAG_VAL_SROCC = "piaa_dist.val_srocc"
TAG_VAL_USERS = "piaa_dist.val_users"
TAG_VAL_USERS_SHA256 = "piaa_dist.val_users_sha256"
TAG_DATASET = "piaa_dist.dataset"
TAG_DATASET_VERSION = "piaa_dist.dataset_version"
TAG_PROTOCOL = "piaa_dist.val_protocol"
#: hash of (dataset version, users, protocol): equal keys, comparable scores
TAG_VAL_KEY = "piaa_dist.val_key"
#: "champion" (the alias moved to it) or "challenger" (registered, the alias stayed)
TAG_ROLE = "piaa_dist.role"
#: the alias the role refers to
TAG_ROLE_ALIAS = "piaa_dist.role_alias"

ROLE_CHAMPION = "champion"
ROLE_CHALLENGER = "challenger"

#: The ``eval`` settings that make up the fine-tuning budget of the protocol.
BUDGET_KEYS = ("finetune_steps", "finetune_lr", "finetune_optimizer", "finetune_bn", "batch_size")


def users_sha256(users: Sequence[str]) -> str:
    """SHA-256 (hex) of the sorted user IDs, one per line: the users' identity."""
    return hashlib.sha256("\n".join(sorted(users)).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ValidationSet:
    """The users and protocol a validation score is measured on.

    Attributes:
        dataset: the dataset URL.
        dataset_version: the version read (``Dataset.version_id``; empty for an unversioned one).
        users: the validation users (sorted).
        shots: fine-tuning shots per split.
        repeats: seeded random splits per user.
        seed: the split and fine-tuning seed.
        budget: the fine-tuning budget (:data:`BUDGET_KEYS` of the ``eval`` section).
    """

    dataset: str
    dataset_version: str
    users: tuple[str, ...]
    shots: int
    repeats: int
    seed: int
    budget: Mapping[str, Any]

    @property
    def users_sha256(self) -> str:
        """The users' identity: SHA-256 of their sorted IDs."""
        return users_sha256(self.users)

    @property
    def protocol(self) -> dict[str, Any]:
        """Shots, repeats, seed and budget as one JSON-ready dict."""
        return {"shots": self.shots, "repeats": self.repeats, "seed": self.seed, **dict(self.budget)}

    @property
    def key(self) -> str:
        """Scores with equal keys were measured on the same users of the same data the same way."""
        text = json.dumps({"dataset_version": self.dataset_version, "users": self.users_sha256,
                           "protocol": self.protocol}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def describe(self) -> str:
        """One line: ``8 validation users (sha256 1a2b3c4d5e6f) of URL@VERSION; 10 shots x 10 repeats ...``."""
        b = self.budget
        version = f"@{self.dataset_version}" if self.dataset_version else ""
        return (f"{len(self.users)} validation users (sha256 {self.users_sha256[:12]}) of "
                f"{self.dataset}{version}; {self.shots} shots x {self.repeats} repeats, seed {self.seed}, "
                f"{b['finetune_steps']} {b['finetune_optimizer']} steps at lr {b['finetune_lr']:g}")

    def tags(self, score: float) -> dict[str, str]:
        """The model-version tags that record ``score`` on this set."""
        return {
            TAG_VAL_SROCC: repr(float(score)),  # full precision: a recorded score ties as measured
            TAG_VAL_USERS: str(len(self.users)),
            TAG_VAL_USERS_SHA256: self.users_sha256,
            TAG_DATASET: self.dataset,
            TAG_DATASET_VERSION: self.dataset_version,
            TAG_PROTOCOL: json.dumps(self.protocol, sort_keys=True),
            TAG_VAL_KEY: self.key,
        }


def validation_set(cfg: JobConfig, dataset: Any) -> ValidationSet:
    """The validation set of a job config on an opened dataset.

    Raises:
        ValueError: the config holds no validation users out (``data.validation_users`` 0) or
            the dataset has none to hold out.
    """
    from piaa_dist.train import validation_users

    users = validation_users(cfg, dataset)
    if not users:
        raise ValueError(f"no validation users: data.validation_users is {cfg.data.validation_users} "
                         f"and {dataset.url} has {len(dataset.users('train'))} training users")
    ev = cfg.eval
    return ValidationSet(
        dataset=str(getattr(dataset, "url", cfg.data.url)),
        dataset_version=str(getattr(dataset, "version_id", "") or ""),
        users=tuple(sorted(users)),
        shots=int(min(ev.shots)),
        repeats=int(ev.repeats),
        seed=int(cfg.run.seed),
        budget={k: getattr(ev, k) for k in BUDGET_KEYS},
    )


def scoring_config(model_cfg: JobConfig, validation: ValidationSet) -> JobConfig:
    """``model_cfg`` with the protocol's budget and seed: its architecture, input size and
    adapted parameters stay its own."""
    d = config_to_dict(model_cfg)
    d["eval"] = {**d["eval"], **dict(validation.budget), "shots": [validation.shots],
                 "repeats": validation.repeats}
    d["run"] = {**d["run"], "seed": validation.seed}
    return config_from_dict(d, "<validation protocol>")


def score(validation: ValidationSet, dataset: Any, model: Any, model_cfg: JobConfig, *,
          threads: int = 1, device: Any = None) -> float:
    """Validation SROCC of a meta-learner on ``validation`` (:func:`piaa_dist.evaluate.validation_srocc`).

    Args:
        validation: the users and protocol.
        dataset: the opened dataset the users are in.
        model: the meta-learner (left untouched).
        model_cfg: its own config (architecture, input size, adapted parameters).
        threads: torch intra-op threads while scoring (restored afterwards): the same count
            gives the same number bit for bit.
        device: where to fine-tune (default CPU).
    """
    import torch

    from piaa_dist.evaluate import validation_srocc

    cfg = scoring_config(model_cfg, validation)
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        model = model.to(device) if device is not None else model
        return float(validation_srocc(cfg, dataset, model, list(validation.users),
                                      shots=validation.shots, repeats=validation.repeats))
    finally:
        torch.set_num_threads(before)


def recorded_score(tags: Mapping[str, str], validation: ValidationSet) -> float | None:
    """The score a version's tags record on exactly this validation set, else None."""
    if tags.get(TAG_VAL_KEY) != validation.key or TAG_VAL_SROCC not in tags:
        return None
    try:
        return float(tags[TAG_VAL_SROCC])
    except ValueError:
        return None


def decide(score_new: float, score_champion: float | None, *, force: bool = False) -> bool:
    """True when the alias should move to the new version: none holds it, the new one is
    strictly better (ties keep the champion), or the move is forced."""
    return force or score_champion is None or score_new > score_champion


@dataclass(frozen=True)
class Promotion:
    """What happened to an alias when a new version was registered.

    Attributes:
        name: registered model name.
        alias: the alias (e.g. ``champion``).
        version: the new version.
        promoted: the alias now points at the new version.
        forced: it was moved regardless of the scores (``--force-alias``).
        val_srocc: the new version's validation SROCC.
        champion_version / champion_val_srocc: the version that held the alias before and its
            score on the same set (None when no version held it).
        rescored: the champion was scored here (its tags recorded no score on this set).
        validation: the users and protocol both were scored on.
    """

    name: str
    alias: str
    version: int
    promoted: bool
    forced: bool
    val_srocc: float
    champion_version: int | None
    champion_val_srocc: float | None
    rescored: bool
    validation: ValidationSet

    @property
    def holder(self) -> int:
        """The version the alias points at now."""
        return self.version if self.promoted or self.champion_version is None else self.champion_version

    @property
    def message(self) -> str:
        """One line saying where the alias is and why (what the commands print)."""
        on = f"{len(self.validation.users)} validation users, {self.validation.shots} shots"
        new, old = self.val_srocc, self.champion_val_srocc
        if self.champion_version is None:
            return (f"{self.alias} -> version {self.version}: val SROCC {new:.3f} ({on}); "
                    f"no version held @{self.alias} before")
        if self.promoted:
            why = "forced (--force-alias)" if self.forced and not new > old else "better"
            return (f"{self.alias} moves to version {self.version}: val SROCC {new:.3f} vs {old:.3f} "
                    f"for version {self.champion_version} ({on}; {why})")
        tie = "a tie keeps the champion; " if new == old else ""
        return (f"{self.alias} stays at version {self.champion_version}: val SROCC {old:.3f} vs "
                f"{new:.3f} for version {self.version} ({on}; {tie}version {self.version} registered "
                f"as a challenger; --force-alias moves it)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the fields, the validation set's identity (not its user list), the message."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "validation"}
        v = self.validation
        out["validation"] = {"dataset": v.dataset, "dataset_version": v.dataset_version,
                             "users": len(v.users), "users_sha256": v.users_sha256, **v.protocol}
        out["message"] = self.message
        return out


def description(validation: ValidationSet, score_new: float, role: str, alias: str,
                champion: tuple[int, float] | None) -> str:
    """The model-version description: its score, on what, and its role (``""``: none)."""
    text = f"val SROCC {score_new:.4f} on {validation.describe()}."
    if not role:
        return text
    if role == ROLE_CHAMPION:
        text += f" @{alias}" + (f" (version {champion[0]} scored {champion[1]:.4f} on the same users)."
                                if champion else " (no version held it before).")
    else:
        text += (f" Challenger: @{alias} stayed at version {champion[0]}, which scored {champion[1]:.4f} "
                 "on the same users." if champion else " Challenger.")
    return text


__all__ = [
    "BUDGET_KEYS",
    "ROLE_CHALLENGER",
    "ROLE_CHAMPION",
    "TAG_DATASET",
    "TAG_DATASET_VERSION",
    "TAG_PROTOCOL",
    "TAG_ROLE",
    "TAG_ROLE_ALIAS",
    "TAG_VAL_KEY",
    "TAG_VAL_SROCC",
    "TAG_VAL_USERS",
    "TAG_VAL_USERS_SHA256",
    "Promotion",
    "ValidationSet",
    "decide",
    "description",
    "recorded_score",
    "score",
    "scoring_config",
    "users_sha256",
    "validation_set",
]
