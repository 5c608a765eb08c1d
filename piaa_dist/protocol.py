"""How a prior adapts to one person: the fine-tuning half of the meta-testing protocol.

One source of truth for every place a model is adapted to a user's rated images and then
scores images:

* ``evaluate`` (every fine-tuned method, on every seeded split of every test user),
* meta-training validation (``evaluate.validation_srocc``, Tune's metric, called from the Ray
  runner), which *is* ``evaluate`` on validation users,
* ``personalize`` (the product path: one person's ratings, new images to rank).

All three build the budget with :func:`finetune_budget` and score through :class:`Scorer`, so
the same model, ratings, images and seed give the same predictions bit for bit wherever they
are computed (``tests/test_protocol.py`` checks ``personalize`` against ``evaluate``).

The budget (:class:`FinetuneBudget`) comes from the config: ``eval.finetune_steps`` steps of
``eval.finetune_optimizer`` at ``eval.finetune_lr`` on minibatches of ``eval.batch_size``,
BatchNorm as ``eval.finetune_bn`` says, and the parameters and per-parameter rates of the
meta-learner's inner loop (``meta.inner_params``, ``meta.inner_head_lr_scale``; the rule is
:func:`piaa_dist.meta.adaptation_lrs`, which the inner loop's ``meta_kwargs`` uses too).

Plain PyTorch: no Ray, MLflow or boto3.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from piaa_dist.config import BN_MODES, ConfigError, JobConfig  # names validated at config load
from piaa_dist.meta import OPTIMIZERS, adaptation_lrs

log = logging.getLogger(__name__)


# Shortcut for head-only adaptation: run the (unchanged) backbone once instead of every step,
# and predict from cached backbone features. A switch so tests can compare with the plain path.
_FIXED_FEATURES = True


@dataclass(frozen=True)
class FinetuneBudget:
    """What fine-tuning on a user's shots may spend, and how (the same for every method).

    Attributes:
        steps: optimizer steps (0: predict with the prior as is).
        lr: learning rate, or parameter name → learning rate.
        optimizer: ``"sgd"`` or ``"adam"``.
        batch_size: minibatch size (``>= k`` means full-batch steps); also the chunk size of
            predictions.
        bn: BatchNorm mode while fine-tuning, ``"batch"`` or ``"running"`` (see :func:`finetune`).
        adapt_names: parameter names to adapt; None adapts all.

    Raises:
        ConfigError: an unknown optimizer or BatchNorm mode, negative steps, a batch size < 1.
    """

    steps: int
    lr: float | Mapping[str, float]
    optimizer: str = "sgd"
    batch_size: int = 100
    bn: str = "batch"
    adapt_names: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"eval.finetune_optimizer: unknown {self.optimizer!r}; use one of {OPTIMIZERS}")
        if self.bn not in BN_MODES:
            raise ConfigError(f"eval.finetune_bn: unknown {self.bn!r}; use one of {BN_MODES}")
        if int(self.steps) < 0:
            raise ConfigError(f"eval.finetune_steps must be >= 0, got {self.steps}")
        if int(self.batch_size) < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.adapt_names is not None and not isinstance(self.adapt_names, frozenset):
            object.__setattr__(self, "adapt_names", frozenset(self.adapt_names))

    def lr_of(self, name: str) -> float:
        """The learning rate of parameter `name`."""
        return float(self.lr[name]) if isinstance(self.lr, Mapping) else float(self.lr)

    def head_only(self, model: nn.Module) -> bool:
        """True when only `model`'s head adapts (its backbone output is then fixed)."""
        return (
            self.adapt_names is not None
            and hasattr(model, "backbone")
            and hasattr(model, "head")
            and all(n.startswith("head.") for n in self.adapt_names)
        )


def finetune_budget(cfg: JobConfig, model: nn.Module) -> FinetuneBudget:
    """The fine-tuning budget of a config for `model`: the one function every caller uses.

    ``eval.finetune_steps`` / ``finetune_lr`` / ``finetune_optimizer`` / ``finetune_bn`` and
    ``eval.batch_size``; the parameters adapted and their per-parameter rates follow the inner
    loop (:func:`piaa_dist.meta.adaptation_lrs` with base rate ``eval.finetune_lr``), so
    ``meta.inner_params`` and ``meta.inner_head_lr_scale`` apply to every method alike.

    Raises:
        ConfigError: an invalid ``eval`` or ``meta.inner_params`` setting.
    """
    ev = cfg.eval
    try:
        lr, adapt_names = adaptation_lrs(model, cfg.meta, ev.finetune_lr)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return FinetuneBudget(
        steps=int(ev.finetune_steps),
        lr=lr,
        optimizer=ev.finetune_optimizer,
        batch_size=int(ev.batch_size),
        bn=ev.finetune_bn,
        adapt_names=adapt_names,
    )


def score_targets(scores: Sequence[float] | np.ndarray) -> torch.Tensor:
    """Training targets of ratings on the 1-5 scale: ``score / 5`` as float32 (computed in
    float64, so every caller gets the same bits whatever dtype its scores come in)."""
    return torch.as_tensor(np.asarray(scores, dtype=np.float64) / 5.0, dtype=torch.float32)


def _freeze_bn_stats(model: nn.Module, running: bool = False) -> None:
    """Stop BatchNorm layers from updating their running statistics; with `running`, also make
    them normalize with those statistics (eval mode) instead of the batch's."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
            if running:
                m.eval()


def finetune(
    model: nn.Module,
    support: tuple[torch.Tensor, torch.Tensor],
    budget: FinetuneBudget,
    *,
    seed: int = 0,
) -> nn.Module:
    """Fine-tune a copy of `model` on one user's shots (MSE on ``score / 5``).

    BatchNorm running statistics are never updated: predictions (:func:`predict`, eval mode)
    use the prior's population statistics, not ones estimated from k images (noisy at k = 10).
    How BatchNorm normalizes *during* fine-tuning is ``budget.bn``:

    * ``"batch"``: like the meta-learner's inner loop (:mod:`piaa_dist.meta`), each step
      normalizes with the statistics of the current batch. Exactly what ``blg-piaa`` was
      meta-trained to adapt with; but what is optimized (train-mode outputs) is not what is
      predicted with (eval mode), and large moves of the layers before a BatchNorm (many steps,
      Adam, all parameters) can make the two drift apart.
    * ``"running"``: BatchNorm uses the running statistics throughout (a fixed affine map), so
      fine-tuning minimizes the loss of the very predictor that is then evaluated.

    Dropout stays active during fine-tuning in both modes.

    Args:
        model: the prior; left untouched.
        support: ``(images [k,3,S,S], targets [k])`` with targets = score / 5
            (:func:`score_targets`).
        budget: steps, rates, optimizer, minibatch size, BatchNorm mode, parameters to adapt.
        seed: seeds the minibatch order and dropout masks, so the same call gives the same model.

    Returns:
        The fine-tuned copy, in eval mode.
    """
    tuned = copy.deepcopy(model)
    device = next(tuned.parameters()).device
    images, targets = (t.to(device) for t in support)
    names = budget.adapt_names
    named = [(n, p) for n, p in tuned.named_parameters() if names is None or n in names]
    for n, p in tuned.named_parameters():
        p.requires_grad_(names is None or n in names)
    if budget.steps <= 0 or not named:
        for p in tuned.parameters():
            p.requires_grad_(True)
        tuned.eval()
        return tuned
    # One parameter group per distinct learning rate.
    groups: dict[float, list[torch.Tensor]] = {}
    for n, p in named:
        groups.setdefault(budget.lr_of(n), []).append(p)
    param_groups = [{"params": ps, "lr": g_lr} for g_lr, ps in groups.items()]
    if budget.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(param_groups)
    else:
        opt = torch.optim.Adam(param_groups)
    k = int(images.shape[0])
    batch = max(1, min(int(budget.batch_size), k))
    gen = torch.Generator().manual_seed(int(seed))
    tuned.train()
    _freeze_bn_stats(tuned, running=(budget.bn == "running"))
    # Head-only, full-batch fine-tuning of a backbone+head model: the backbone is fixed and
    # sees the same batch every step, so its train-mode output (batch statistics) is the same
    # every step. Computing it once gives the plain loop's results at a fraction of the cost
    # (the backbone holds almost all the compute).
    fixed_features = _FIXED_FEATURES and batch >= k and budget.head_only(tuned)
    # fork_rng: dropout draws from the global RNG; seeding a fork keeps calls reproducible without
    # disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        order = torch.randperm(k, generator=gen)
        if batch >= k:
            # Full batch: the same (permuted once) batch every step.
            images, targets = images[order], targets[order]
        if fixed_features:
            with torch.no_grad():
                feats = tuned.backbone(images)
            forward, inputs = tuned.head, feats
        else:
            forward, inputs = tuned, images
        pos = 0
        for _ in range(int(budget.steps)):
            if batch >= k:
                idx = slice(None)
            else:
                if pos + batch > k:
                    order = torch.randperm(k, generator=gen)
                    pos = 0
                idx = order[pos : pos + batch]
                pos += batch
            loss = F.mse_loss(forward(inputs[idx]), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p in tuned.parameters():
        p.requires_grad_(True)
    tuned.eval()
    return tuned


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Predict ``score / 5`` for each image with the model in eval mode.

    Args:
        model: an aesthetic model; its train/eval mode is restored afterwards.
        images: ``[N,3,S,S]`` normalized images.
        batch_size: images per forward pass.

    Returns:
        float64 array ``[N]``.
    """
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = [
            model(images[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, images.shape[0], max(1, batch_size))
        ]
    finally:
        model.train(was_training)
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


@torch.no_grad()
def _backbone_features(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Eval-mode backbone output (what the head sees at prediction time)."""
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = [model.backbone(images[i : i + batch_size].to(device)).cpu()
               for i in range(0, images.shape[0], max(1, batch_size))]
    finally:
        model.train(was)
    return torch.cat(out)


@torch.no_grad()
def _predict_head(model: nn.Module, feats: torch.Tensor) -> np.ndarray:
    """Eval-mode head on precomputed backbone features: what :func:`predict` gives on the
    images when only the head was adapted."""
    model.eval()
    device = next(model.parameters()).device
    return model.head(feats.to(device)).float().cpu().numpy().astype(np.float64)


class Scorer:
    """One prior and one fixed set of images to score, as is or after fine-tuning on shots.

    ``evaluate`` makes one per (method, user) over all of the user's images and indexes each
    split's test images out of :meth:`score`; ``personalize`` makes one over the images to
    rank. Both therefore run the very same computation on the same tensors.

    When the budget adapts the head only, the backbone's eval-mode features of the images are
    computed once (on first use) and every fine-tuned model is scored from them: the backbone
    is the same for every split, and it holds almost all of the compute.

    Args:
        model: the prior (left untouched).
        budget: the fine-tuning budget (:func:`finetune_budget`).
        images: ``[N,3,S,S]`` normalized images to score.
    """

    def __init__(self, model: nn.Module, budget: FinetuneBudget, images: torch.Tensor):
        self.model = model
        self.budget = budget
        self.images = images
        self._static: np.ndarray | None = None
        self._features: torch.Tensor | None = None

    def score(
        self, support: tuple[torch.Tensor, torch.Tensor] | None = None, *, seed: int = 0
    ) -> np.ndarray:
        """Predicted ``score / 5`` of every image.

        Args:
            support: ``(images [k,3,S,S], targets [k])`` to fine-tune on first; None scores
                with the prior as is (computed once, then reused).
            seed: the fine-tuning stream's seed (minibatch order, dropout masks).

        Returns:
            float64 array ``[N]``.
        """
        if support is None:
            if self._static is None:
                self._static = predict(self.model, self.images, self.budget.batch_size)
            return self._static
        tuned = finetune(self.model, support, self.budget, seed=seed)
        if _FIXED_FEATURES and self.budget.head_only(self.model):
            if self._features is None:
                self._features = _backbone_features(self.model, self.images, self.budget.batch_size)
            return _predict_head(tuned, self._features)
        return predict(tuned, self.images, self.budget.batch_size)


__all__ = [
    "BN_MODES",
    "FinetuneBudget",
    "Scorer",
    "finetune",
    "finetune_budget",
    "predict",
    "score_targets",
]
