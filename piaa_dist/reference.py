"""A faithful sequential re-implementation of the released BLG-PIAA training loop.

What the public code (``zhuhancheng/BLG-PIAA``) does per meta-batch (BACKGROUND.md, "What the
public code actually does"), written here over piaa-dist's own data path and model so that
``benchmarks/time_to_quality.py`` can compare the two algorithms on equal terms:

* **one persistent Adam** over the whole model, never reset: learning rate 1e-4 for the
  backbone and 1e-3 for the head, each multiplied by 0.9 after every epoch (an epoch is one
  pass over the meta-training users: ``len(users) // meta_batch`` meta-batches);
* for each task of the meta-batch, **in turn**: remember the current (meta) weights; take 5
  Adam steps on the task's support batch, then 5 on its query batch (all parameters, train
  mode, MSE on ``score / 5``); then set the weights to ``meta + (adapted − meta) / meta_batch``.
  The next task starts from the weights the previous one moved (a sequential, first-order,
  Reptile-like update: task ``i`` of 4 is weighted by ``(1/4)(3/4)^(3-i)``).

Kept from piaa-dist, so that only the algorithm differs: the tasks (:class:`~piaa_dist.data.
stream.TaskStream`: the same users, support/query split and decoding, as a pure function of
``(seed, step, user)``), the model (``cfg.model``), the meta-training users (validation users
held out). One of the reference's quirks is not copied (BACKGROUND.md): BatchNorm running
statistics move with the weights (``meta + (adapted − meta) / meta_batch``) instead of being
left where the last task's steps put them.

This is the training layer: plain PyTorch, no Ray, no MLflow; one process, its torch threads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from piaa_dist.config import JobConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceSettings:
    """The released code's hyperparameters (BACKGROUND.md).

    Attributes:
        backbone_lr: Adam learning rate of the backbone's parameters.
        head_lr: Adam learning rate of the head's parameters.
        support_steps: Adam steps on a task's support batch.
        query_steps: Adam steps on its query batch, after the support steps.
        epoch_decay: learning rates are multiplied by this after every epoch.
    """

    backbone_lr: float = 1e-4
    head_lr: float = 1e-3
    support_steps: int = 5
    query_steps: int = 5
    epoch_decay: float = 0.9


class ReferenceTrainer:
    """The reference's meta-learner and its one persistent Adam.

    Args:
        cfg: the job config (``meta.meta_batch``; the model is built by the caller from
            ``cfg.model``).
        model: the meta-learner.
        steps_per_epoch: meta-batches per epoch (the learning rates decay after each).
        settings: the reference's hyperparameters.
    """

    def __init__(self, cfg: JobConfig, model: nn.Module, *, steps_per_epoch: int,
                 settings: ReferenceSettings = ReferenceSettings()):
        from piaa_dist.model import head_names

        self.cfg = cfg
        self.settings = settings
        self.model = model
        self.model.train()
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.step_count = 0
        heads = head_names(model)  # type: ignore[arg-type]
        named = list(model.named_parameters())
        self.optimizer = torch.optim.Adam([
            {"params": [p for n, p in named if n not in heads], "lr": settings.backbone_lr,
             "base_lr": settings.backbone_lr},
            {"params": [p for n, p in named if n in heads], "lr": settings.head_lr, "base_lr": settings.head_lr},
        ])

    def current_scale(self) -> float:
        """The learning-rate factor of the current epoch: ``epoch_decay ** epoch``."""
        return self.settings.epoch_decay ** (self.step_count // self.steps_per_epoch)

    def _adam_steps(self, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> float:
        """``steps`` Adam steps on one batch; returns the loss before the first of them."""
        images, targets = batch
        first = float("nan")
        for i in range(steps):
            loss = F.mse_loss(self.model(images), targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if i == 0:
                first = float(loss.detach())
        return first

    def step(self, tasks: Sequence[Any]) -> dict[str, float]:
        """One meta-batch: each task in turn adapts from the current weights and moves them
        ``1 / meta_batch`` of the way to its adapted weights.

        Returns:
            ``support_loss`` / ``query_loss``: the mean over tasks of the first support step's
            loss and of the query loss after the support steps (before the query steps).
        """
        scale = self.current_scale()
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale
        state = self.model.state_dict()
        floating = [k for k, v in state.items() if torch.is_floating_point(v)]
        n = len(tasks)
        support_loss = query_loss = 0.0
        for task in tasks:
            meta = {k: state[k].detach().clone() for k in floating}
            # The losses are those of the first Adam step of each phase: no extra forward pass
            # (in train mode one would also move BatchNorm's running statistics).
            support_loss += self._adam_steps(task.support, self.settings.support_steps)
            query_loss += self._adam_steps(task.query, self.settings.query_steps)
            with torch.no_grad():
                # meta + (adapted - meta) / n, written into the model's own tensors.
                for k in floating:
                    adapted = state[k]
                    adapted.copy_(meta[k] + (adapted - meta[k]) / n)
        self.step_count += 1
        return {"support_loss": support_loss / n, "query_loss": query_loss / n, "lr_scale": scale,
                "tasks": float(n)}

    def state_dict(self) -> dict:
        """``{"model", "optimizer", "step"}``."""
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "step": int(self.step_count)}


#: ``on_step(step, metrics, trainer)`` after every meta-batch; return True to stop.
OnStep = Callable[[int, Mapping[str, float], ReferenceTrainer], bool | None]


def reference_train(
    cfg: JobConfig,
    dataset: Any,
    *,
    max_steps: int | None = None,
    settings: ReferenceSettings = ReferenceSettings(),
    on_step: OnStep | None = None,
) -> ReferenceTrainer:
    """Meta-train with the reference loop on the meta-training users of ``cfg``.

    Args:
        cfg: job config: ``data.*`` (tasks), ``model.*``, ``meta.meta_batch``, ``run.seed``
            (initialisation and the task stream); ``meta.meta_steps`` unless ``max_steps``.
        dataset: an opened :class:`piaa_dist.data.stream.Dataset`.
        max_steps: meta-batches to run (default ``meta.meta_steps``).
        settings: the reference's hyperparameters.
        on_step: called after every meta-batch; returning True stops (a time budget).

    Returns:
        The trainer (``.model`` is the meta-learner).
    """
    from piaa_dist.data.stream import TaskStream
    from piaa_dist.model import build_model
    from piaa_dist.train import meta_training_users

    torch.manual_seed(cfg.run.seed)
    users = meta_training_users(cfg, dataset)
    trainer = ReferenceTrainer(cfg, build_model(cfg.model),
                               steps_per_epoch=len(users) // cfg.meta.meta_batch, settings=settings)
    steps = cfg.meta.meta_steps if max_steps is None else int(max_steps)
    stream = TaskStream(dataset, users, rank=0, world_size=1, meta_batch=cfg.meta.meta_batch,
                        shots=cfg.data.shots, query_size=cfg.data.query_size, image_size=cfg.data.image_size,
                        augment=cfg.data.augment, seed=cfg.run.seed, num_steps=steps)
    batches = iter(stream)
    try:
        for step, tasks in batches:
            t0 = time.perf_counter()
            # Dropout masks drawn from a seed of (seed, step): a run is reproducible.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.run.seed * 1_000_003 + step)
                metrics = trainer.step(tasks)
            metrics["step_s"] = time.perf_counter() - t0
            if on_step is not None and on_step(trainer.step_count, metrics, trainer):
                break
    finally:
        batches.close()
    return trainer


__all__ = ["ReferenceSettings", "ReferenceTrainer", "reference_train"]
