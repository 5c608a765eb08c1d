"""When meta-training moves, and when it stops: the meta-learning-rate schedule and early stopping.

Both are small pure pieces of the training state, kept apart from the trainer so that the
rules are read (and tested) on their own:

* :func:`meta_lr_at` is the meta learning rate as a pure function of the step (no scheduler
  state), so a resumed run uses the rate an uninterrupted one would.
* :class:`EarlyStopping` watches the validation SROCC measured every ``run.validate_every``
  steps and says when it has stopped improving (``run.patience`` validations in a row without
  a rise of more than ``run.min_delta`` over the best so far). Its state (best score, its
  step, validations since) is part of the trainer's ``state_dict``: a run resumed from a
  checkpoint stops exactly where an uninterrupted one would, and the best step it names is
  the checkpoint a run registers.

The validation users are training users held out of meta-training (``data.validation_users``),
never test users: nothing here sees a score of a test user, so no test score can influence
when training stops or which checkpoint is kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from piaa_dist.config import MetaConfig, RunConfig


def meta_lr_at(meta: MetaConfig, step: int) -> float:
    """The meta learning rate of the update after ``step`` updates.

    ``meta.lr_schedule``:

    * ``"step"``: ``meta_lr * lr_decay ** (step // decay_every)`` (the reference code's
      per-epoch decay when ``decay_every`` is an epoch's steps);
    * ``"cosine"``: from ``meta_lr`` down to ``lr_floor * meta_lr`` along half a cosine over
      ``meta_steps`` updates (after the warm-up).

    ``meta.warmup_steps`` > 0 first ramps the rate up linearly: update ``s < warmup_steps``
    uses ``(s + 1) / warmup_steps`` of it (a first Adam step at the full rate, taken on one
    meta-batch's noisy gradient, can throw a freshly initialised network far off).

    Args:
        meta: the meta config.
        step: meta-updates applied so far (0 for the first update).
    """
    base = meta.meta_lr
    if meta.lr_schedule == "cosine":
        span = max(1, meta.meta_steps - meta.warmup_steps)
        t = min(1.0, max(0.0, (step - meta.warmup_steps) / span))
        lr = base * (meta.lr_floor + (1.0 - meta.lr_floor) * 0.5 * (1.0 + math.cos(math.pi * t)))
    else:
        lr = base * meta.lr_decay ** (step // max(1, meta.decay_every))
    if meta.warmup_steps > 0 and step < meta.warmup_steps:
        lr *= (step + 1) / meta.warmup_steps
    return lr


@dataclass
class EarlyStopping:
    """The early-stopping rule and its state (part of the training state).

    A validation score ``s`` at step ``t`` *improves* when there is no best yet or
    ``s > best_score + min_delta``; then ``best_score, best_step = s, t`` and the count of
    validations since the best restarts. Otherwise the count goes up by one, and when it
    reaches ``patience`` (> 0) training stops at ``t``. With ``patience == 0`` it never stops
    (training runs to ``meta.meta_steps``) but still tracks the best validation step: that is
    the checkpoint a run keeps and registers.

    Attributes:
        patience: validations in a row without an improvement before stopping (0 = never).
        min_delta: the rise over the best score that counts as an improvement.
        best_score: best validation SROCC so far (None before the first validation).
        best_step: the step it was measured at (0 before the first validation).
        since_best: validations since the best one.
        stopped_at: the step training stopped at (None while it runs).
        validations: validation scores seen so far.
    """

    patience: int = 0
    min_delta: float = 0.0
    best_score: float | None = None
    best_step: int = 0
    since_best: int = 0
    stopped_at: int | None = None
    validations: int = 0

    @classmethod
    def from_config(cls, run: RunConfig) -> EarlyStopping:
        """A fresh rule from ``run.patience`` and ``run.min_delta``."""
        return cls(patience=int(run.patience), min_delta=float(run.min_delta))

    @property
    def stopped(self) -> bool:
        """True once the rule has fired."""
        return self.stopped_at is not None

    def update(self, step: int, score: float) -> bool:
        """Record the validation SROCC measured after ``step`` updates.

        Returns:
            True when ``score`` is a new best (the checkpoint at ``step`` is the one to keep).

        Raises:
            ValueError: a score that is not a finite number (a NaN would never improve and
                silently stop training), or an update after the rule fired.
        """
        if self.stopped:
            raise ValueError(f"early stopping fired at step {self.stopped_at}; no update at step {step}")
        score = float(score)
        if not math.isfinite(score):
            raise ValueError(f"validation SROCC at step {step} is {score}: not a finite number")
        self.validations += 1
        if self.best_score is None or score > self.best_score + self.min_delta:
            self.best_score, self.best_step, self.since_best = score, int(step), 0
            return True
        self.since_best += 1
        if self.patience > 0 and self.since_best >= self.patience:
            self.stopped_at = int(step)
        return False

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers (JSON-ready, for the training state)."""
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counters of a :meth:`state_dict`; patience and min_delta stay this
        run's (a resumed run may be given more patience)."""
        self.best_score = None if state.get("best_score") is None else float(state["best_score"])
        self.best_step = int(state.get("best_step", 0))
        self.since_best = int(state.get("since_best", 0))
        self.validations = int(state.get("validations", 0))
        stopped = state.get("stopped_at")
        self.stopped_at = None if stopped is None else int(stopped)
        # Patience raised on resume: a stop decided under the old patience no longer holds.
        if self.stopped_at is not None and (self.patience == 0 or self.since_best < self.patience):
            self.stopped_at = None

    def describe(self) -> str:
        """One line: the best validation and, once stopped, why."""
        if self.best_score is None:
            return "no validation yet"
        line = f"best validation SROCC {self.best_score:.4f} at step {self.best_step}"
        if self.stopped:
            line += (f"; stopped at step {self.stopped_at}: no improvement of more than "
                     f"{self.min_delta:g} in {self.since_best} validations")
        return line


__all__ = ["EarlyStopping", "meta_lr_at"]
