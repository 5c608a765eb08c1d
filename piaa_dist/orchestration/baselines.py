"""One GIAA baseline per dataset: what the ``giaa-finetune`` comparison trains, and its identity.

``evaluate`` compares a meta-learner with a generic (GIAA) model fine-tuned on the same shots.
For two meta-learners evaluated on the same data to be compared with the *same* GIAA model, the
GIAA model must not depend on whatever config each meta-learner happens to carry (a tuned model
carries the sweep's config with its own ``giaa`` section, a trained one the training config's).
A :class:`GiaaRecipe` says what the GIAA model is trained from:

* the data: the dataset version (``Dataset.version_id``; the URL too when the dataset has no
  version) and the training users whose ratings are pooled (those the meta-learner's config
  trains on: the training users minus its validation users), identified by count and the
  SHA-256 of their sorted IDs;
* the training budget: the ``giaa`` section (steps, batch size, learning rate) and ``run.seed``
  of the *evaluation's* config: ``evaluate --config FILE`` when given, else the built-in
  defaults, with the command's ``giaa.*`` / ``run.seed`` overrides on top; never the
  meta-learner's saved config;
* the network and its input: the meta-learner's architecture (``model``) and input pipeline
  (``data.image_size``, ``data.augment``). A prior comparison needs the same network, so
  meta-learners of different architectures get different GIAA models.

Its :attr:`GiaaRecipe.key` (a hash of all of that) names the model: ``evaluate`` looks for a
version of the registered model :data:`GIAA_MODEL_NAME` tagged with the key, uses it when there
is one, and otherwise trains the model once and registers it with the key (and the recipe) in
its tags. The registry was chosen over a cache folder because it is where models already live
for everyone who shares a tracking server (a folder beside a SQLite store would exist only on
one machine), its files are hash-checked on download like every registered model's, and the UI
shows the baseline next to the meta-learners it was compared with.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from piaa_dist.config import JobConfig, config_from_dict, config_to_dict

log = logging.getLogger(__name__)

#: The registered model that holds the GIAA baselines (one version per recipe).
GIAA_MODEL_NAME = "piaa-giaa"
#: Version tags of a GIAA baseline.
TAG_GIAA_KEY = "piaa_dist.giaa_key"
TAG_GIAA_RECIPE = "piaa_dist.giaa_recipe"
TAG_KIND = "piaa_dist.kind"


def _sha256(users: list[str] | tuple[str, ...]) -> str:
    return hashlib.sha256("\n".join(sorted(users)).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class GiaaRecipe:
    """What a GIAA baseline is trained from (see the module docstring).

    Attributes:
        dataset: the dataset URL.
        dataset_version: its version (empty for an unversioned dataset).
        users: the training users whose ratings are pooled (sorted).
        giaa: the ``giaa`` section (steps, batch_size, lr).
        seed: ``run.seed`` of the training.
        model: the ``model`` section (the meta-learner's architecture).
        image_size / augment: the input pipeline (the meta-learner's).
    """

    dataset: str
    dataset_version: str
    users: tuple[str, ...]
    giaa: Mapping[str, Any]
    seed: int
    model: Mapping[str, Any]
    image_size: int
    augment: bool

    @property
    def users_sha256(self) -> str:
        """The training users' identity: SHA-256 of their sorted IDs."""
        return _sha256(self.users)

    def identity(self) -> dict[str, Any]:
        """Everything the key covers, JSON-ready (the users by count and hash)."""
        return {
            # a version ID is unique to one ingest; an unversioned dataset is known by its URL
            "data": self.dataset_version or self.dataset,
            "users": len(self.users),
            "users_sha256": self.users_sha256,
            "giaa": dict(self.giaa),
            "seed": self.seed,
            "model": dict(self.model),
            "image_size": self.image_size,
            "augment": self.augment,
        }

    @property
    def key(self) -> str:
        """Equal keys, the same GIAA model."""
        text = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def training_config(self, base: JobConfig) -> JobConfig:
        """``base`` (the meta-learner's config) with this recipe's budget and seed: what
        :func:`piaa_dist.giaa.train_giaa` is given."""
        d = config_to_dict(base)
        d["giaa"] = dict(self.giaa)
        d["model"] = dict(self.model)
        d["data"] = {**d["data"], "image_size": self.image_size, "augment": self.augment}
        d["run"] = {**d["run"], "seed": self.seed}
        return config_from_dict(d, "<giaa recipe>")

    def tags(self) -> dict[str, str]:
        """The registry tags of the baseline trained from this recipe."""
        return {TAG_GIAA_KEY: self.key, TAG_KIND: "giaa",
                TAG_GIAA_RECIPE: json.dumps({"dataset": self.dataset, **self.identity()}, sort_keys=True)}

    def describe(self) -> str:
        """One line for logs and the version's description."""
        g = self.giaa
        version = f"@{self.dataset_version}" if self.dataset_version else ""
        return (f"GIAA baseline: {g.get('steps')} steps (batch {g.get('batch_size')}, lr {g.get('lr')}), "
                f"seed {self.seed}, on {len(self.users)} training users (sha256 {self.users_sha256[:12]}) "
                f"of {self.dataset}{version}; key {self.key[:12]}")


def giaa_recipe(meta_cfg: JobConfig, eval_cfg: JobConfig, dataset: Any) -> GiaaRecipe:
    """The recipe of the GIAA baseline for a meta-learner (its config) under an evaluation config.

    Args:
        meta_cfg: the meta-learner's own config: its architecture, input pipeline and the
            training users it was meta-trained on (its validation split).
        eval_cfg: the evaluation's config: the ``giaa`` budget and ``run.seed``.
        dataset: the opened dataset.
    """
    from piaa_dist.train import meta_training_users

    users = meta_training_users(meta_cfg, dataset)
    return GiaaRecipe(
        dataset=str(getattr(dataset, "url", meta_cfg.data.url)),
        dataset_version=str(getattr(dataset, "version_id", "") or ""),
        users=tuple(sorted(users)),
        giaa=config_to_dict(eval_cfg)["giaa"],
        seed=int(eval_cfg.run.seed),
        model=config_to_dict(meta_cfg)["model"],
        image_size=int(meta_cfg.data.image_size),
        augment=bool(meta_cfg.data.augment),
    )


__all__ = ["GIAA_MODEL_NAME", "TAG_GIAA_KEY", "TAG_GIAA_RECIPE", "GiaaRecipe", "giaa_recipe"]
