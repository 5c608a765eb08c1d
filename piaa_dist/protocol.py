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
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from piaa_dist.config import (  # names validated at config load
    BN_MODES,
    ConfigError,
    JobConfig,
)
from piaa_dist.meta import OPTIMIZERS, adaptation_lrs

log = logging.getLogger(__name__)


# Shortcut for head-only adaptation: run the (unchanged) backbone once instead of every step,
# and predict from cached backbone features. A switch so tests can compare with the plain path.
_FIXED_FEATURES = True

# Convolutional models run on channels-last (NHWC) tensors on CPU: oneDNN's convolution,
# max-pooling and BatchNorm kernels are several times faster on them than on NCHW for the
# small convnets of the CPU configs (one all-parameter step on 100 images at 32 px: 50 -> 24 ms;
# an eval forward: 21 -> 7 ms, one thread; benchmarks/meta_test.py). Same math, another
# summation order: numbers equal the NCHW ones to float tolerance (tests/test_evaluate.py).
# A switch so tests can compare with the plain path.
_CHANNELS_LAST = True


def _channels_last(model: nn.Module, device: torch.device) -> bool:
    """Whether `model` runs on channels-last tensors here (a CPU convnet, see _CHANNELS_LAST)."""
    return (_CHANNELS_LAST and torch.device(device).type == "cpu"
            and any(isinstance(m, nn.Conv2d) for m in model.modules()))


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """`x` in channels-last memory layout when asked (images only: 4-d tensors)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


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
        ridge: when set, no gradient steps: a ridge regression on the prior's frozen
            backbone features of the shots, with this relative penalty (:func:`ridge_fit`),
            replaces the head (the ``giaa-ridge`` baseline).

    Raises:
        ConfigError: an unknown optimizer or BatchNorm mode, negative steps, a batch size < 1.
    """

    steps: int
    lr: float | Mapping[str, float]
    optimizer: str = "sgd"
    batch_size: int = 100
    bn: str = "batch"
    adapt_names: frozenset[str] | None = None
    ridge: float | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"eval.finetune_optimizer: unknown {self.optimizer!r}; use one of {OPTIMIZERS}")
        if self.bn not in BN_MODES:
            raise ConfigError(f"eval.finetune_bn: unknown {self.bn!r}; use one of {BN_MODES}")
        if int(self.steps) < 0:
            raise ConfigError(f"eval.finetune_steps must be >= 0, got {self.steps}")
        if int(self.batch_size) < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.ridge is not None and not (math.isfinite(float(self.ridge)) and float(self.ridge) > 0):
            raise ConfigError(f"ridge penalty must be > 0, got {self.ridge}")
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


#: ``giaa-ridge``'s relative penalty when nothing chose one (no validation search, no setting).
DEFAULT_RIDGE_PENALTY = 1.0

#: Methods that are a ridge regression on the prior's frozen features, not fine-tuned.
RIDGE_METHODS = frozenset({"giaa-ridge"})


def finetune_budget(cfg: JobConfig, model: nn.Module, method: str | None = None,
                    shots: int | None = None) -> FinetuneBudget:
    """The fine-tuning budget of a config for `model`: the one function every caller uses.

    The shared budget (``method`` None, ``eval.protocol: shared``, or a method with no
    ``eval.finetune`` setting): ``eval.finetune_steps`` / ``finetune_lr`` /
    ``finetune_optimizer`` / ``finetune_bn`` and ``eval.batch_size``; the parameters adapted and
    their per-parameter rates follow the inner loop (:func:`piaa_dist.meta.adaptation_lrs` with
    base rate ``eval.finetune_lr``), so ``meta.inner_params`` and ``meta.inner_head_lr_scale``
    apply to every method alike.

    Under ``eval.protocol: per-method``, a setting in ``eval.finetune`` for ``method@shots``
    (else for ``method``) gives the optimizer, rate (one rate for every adapted parameter),
    steps and parameters (``head`` or ``all``) instead; BatchNorm mode and minibatch size stay
    ``eval.finetune_bn`` / ``eval.batch_size``. ``giaa-ridge`` gets its ``penalty`` setting
    under either protocol (else :data:`DEFAULT_RIDGE_PENALTY`).

    Raises:
        ConfigError: an invalid ``eval`` or ``meta.inner_params`` setting.
    """
    from piaa_dist.config import parse_finetune_setting

    ev = cfg.eval
    setting = None
    if method is not None:
        found: dict[int | None, dict] = {}
        for text in ev.finetune:
            name, k, values = parse_finetune_setting(text)
            if name == method:
                found[k] = values
        setting = found.get(None if shots is None else int(shots), found.get(None))
    if method in RIDGE_METHODS:
        penalty = float(setting["penalty"]) if setting else DEFAULT_RIDGE_PENALTY
        return FinetuneBudget(steps=0, lr=0.0, batch_size=int(ev.batch_size), bn=ev.finetune_bn, ridge=penalty)
    if setting is not None and ev.protocol == "per-method":
        return budget_of_setting(cfg, model, setting)
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


def budget_of_setting(cfg: JobConfig, model: nn.Module, setting: Mapping[str, object]) -> FinetuneBudget:
    """The budget of one per-method setting (``{"optimizer", "lr", "steps", "params"}``, as
    :func:`piaa_dist.config.parse_finetune_setting` returns it): one rate for every adapted
    parameter, ``params`` ``head`` (the head's parameters) or ``all``; BatchNorm mode and
    minibatch size from ``cfg.eval``."""
    from piaa_dist.model import head_names

    adapt = frozenset(head_names(model)) if setting["params"] == "head" else None
    return FinetuneBudget(steps=int(setting["steps"]), lr=float(setting["lr"]),
                          optimizer=str(setting.get("optimizer", "sgd")), batch_size=int(cfg.eval.batch_size),
                          bn=cfg.eval.finetune_bn, adapt_names=adapt)


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
    stops: Collection[int] = (),
    at_stop: Callable[[int, nn.Module], None] | None = None,
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
        stops: step counts (<= ``budget.steps``) after which ``at_stop`` sees the model.
        at_stop: called as ``at_stop(steps_done, model)`` with the model in eval mode, exactly as
            a call with ``budget.steps = steps_done`` would return it (the random stream is
            drawn step by step, so a run's first s steps *are* the s-step run): the search
            over step counts costs one run of the longest.

    Returns:
        The fine-tuned copy, in eval mode.
    """
    tuned = copy.deepcopy(model)
    device = next(tuned.parameters()).device
    images, targets = (t.to(device) for t in support)
    nhwc = _channels_last(tuned, device)
    if nhwc:
        tuned = tuned.to(memory_format=torch.channels_last)
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
                feats = tuned.backbone(_layout(images, nhwc))
            forward, inputs = tuned.head, feats
        else:
            forward, inputs = tuned, images
            if nhwc:
                def forward(x: torch.Tensor, _model: nn.Module = tuned) -> torch.Tensor:
                    return _model(_layout(x, True))
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
            done = _ + 1
            if at_stop is not None and done in stops and done < int(budget.steps):
                tuned.eval()
                with torch.random.fork_rng(devices=[]):  # whatever at_stop draws stays out of the stream
                    at_stop(done, tuned)
                tuned.train()
                _freeze_bn_stats(tuned, running=(budget.bn == "running"))
    for p in tuned.parameters():
        p.requires_grad_(True)
    tuned.eval()
    if at_stop is not None and int(budget.steps) in stops:
        at_stop(int(budget.steps), tuned)
    return tuned


def ridge_fit(features: np.ndarray, targets: np.ndarray, penalty: float) -> tuple[np.ndarray, float]:
    """Ridge regression with an unpenalized intercept, in closed form (float64).

    With ``Xc = X - mean(X)`` and ``yc = y - mean(y)`` over the k rows, the penalty is relative
    to the features' spread so that one grid fits any feature scale:
    ``lambda = penalty * ||Xc||_F^2 / k`` (the mean squared distance of a shot's features from
    their mean), and ``w = (Xc^T Xc + lambda I)^-1 Xc^T yc``, ``b = mean(y) - mean(X) . w``.

    Args:
        features: ``[k, d]`` the shots' features.
        targets: ``[k]`` their targets (``score / 5``).
        penalty: relative penalty, > 0.

    Returns:
        ``(w [d], b)``; predictions are ``features @ w + b``.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    mx, my = x.mean(axis=0), float(y.mean())
    xc, yc = x - mx, y - my
    lam = float(penalty) * float((xc * xc).sum()) / max(1, x.shape[0])
    if lam <= 0.0:  # every shot has the same features: nothing to regress on
        return np.zeros(x.shape[1]), my
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ yc)
    return w, my - float(mx @ w)


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
        nhwc = _channels_last(model, device)
        out = [
            model(_layout(images[i : i + batch_size].to(device), nhwc)).float().cpu()
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
        nhwc = _channels_last(model, device)
        out = [model.backbone(_layout(images[i : i + batch_size].to(device), nhwc)).cpu()
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

    When the budget adapts the head only (or is a ridge regression on the backbone's
    features), the backbone's eval-mode features of the images are computed once (on first
    use) and every fine-tuned model is scored from them: the backbone is the same for every
    split, and it holds almost all of the compute. :meth:`with_budget` gives a scorer of the
    same prior and images under another budget that shares these caches (the search over
    fine-tuning settings, a budget per shot count).

    Args:
        model: the prior (left untouched).
        budget: the fine-tuning budget (:func:`finetune_budget`).
        images: ``[N,3,S,S]`` normalized images to score.
    """

    def __init__(self, model: nn.Module, budget: FinetuneBudget, images: torch.Tensor):
        self.model = model
        self.budget = budget
        self.images = images
        # Shared with every with_budget() copy: predictions of the prior as is, and the
        # backbone's features of the images (both independent of the budget).
        self._cache: dict[str, object] = {}

    def with_budget(self, budget: FinetuneBudget) -> Scorer:
        """A scorer of the same prior and images under `budget`, sharing the cached prior
        predictions and backbone features."""
        other = Scorer(self.model, budget, self.images)
        other._cache = self._cache
        return other

    def _features(self) -> torch.Tensor:
        if "features" not in self._cache:
            self._cache["features"] = _backbone_features(self.model, self.images, self.budget.batch_size)
        return self._cache["features"]  # type: ignore[return-value]

    def _predict_tuned(self, tuned: nn.Module) -> np.ndarray:
        if _FIXED_FEATURES and self.budget.head_only(self.model):
            return _predict_head(tuned, self._features())
        return predict(tuned, self.images, self.budget.batch_size)

    def _ridge(self, support: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
        # The shots' features are computed from their images (eval mode, as the features of
        # the images scored), so the fit sees exactly what a caller with only the shots has.
        x = _backbone_features(self.model, support[0], self.budget.batch_size).double().numpy()
        w, b = ridge_fit(x, support[1].double().numpy(), float(self.budget.ridge))
        return self._features().double().numpy() @ w + b

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
            if "static" not in self._cache:
                self._cache["static"] = predict(self.model, self.images, self.budget.batch_size)
            return self._cache["static"]  # type: ignore[return-value]
        if self.budget.ridge is not None:
            return self._ridge(support)
        tuned = finetune(self.model, support, self.budget, seed=seed)
        return self._predict_tuned(tuned)

    def score_steps(
        self, support: tuple[torch.Tensor, torch.Tensor], steps: Sequence[int], *, seed: int = 0
    ) -> dict[int, np.ndarray]:
        """:meth:`score` after each of `steps` fine-tuning steps, from one run of the longest.

        Equal, bit for bit, to ``with_budget(replace(budget, steps=s)).score(support, seed=seed)``
        for every s (see :func:`finetune`'s ``stops``).

        Returns:
            step count → float64 array ``[N]``.
        """
        wanted = sorted({int(s) for s in steps})
        out: dict[int, np.ndarray] = {}
        if wanted and wanted[0] <= 0:
            raise ValueError(f"score_steps: step counts must be >= 1, got {wanted}")
        run = FinetuneBudget(steps=wanted[-1], lr=self.budget.lr, optimizer=self.budget.optimizer,
                             batch_size=self.budget.batch_size, bn=self.budget.bn,
                             adapt_names=self.budget.adapt_names)
        scorer = self.with_budget(run)

        def keep(done: int, tuned: nn.Module) -> None:
            out[done] = scorer._predict_tuned(tuned)

        finetune(self.model, support, run, seed=seed, stops=set(wanted), at_stop=keep)
        return out


__all__ = [
    "BN_MODES",
    "DEFAULT_RIDGE_PENALTY",
    "RIDGE_METHODS",
    "FinetuneBudget",
    "Scorer",
    "budget_of_setting",
    "finetune",
    "finetune_budget",
    "predict",
    "ridge_fit",
    "score_targets",
]
