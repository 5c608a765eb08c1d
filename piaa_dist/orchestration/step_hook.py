"""The per-step hook of a meta-training run: reports, checkpoints, validation, failure injection.

Shared by Ray Train workers and the in-process loop, and free of Ray: the runner passes in a
``report(step, metrics, trainer, with_checkpoint)`` function that does the Ray-specific (or
local) part.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from piaa_dist.config import JobConfig

log = logging.getLogger(__name__)

#: ``report(step, metrics, trainer, with_checkpoint)``
Report = Callable[[int, dict, Any, bool], None]


def due(step: int, every: int) -> bool:
    """True when ``step`` is a positive multiple of ``every`` (``every <= 0``: never)."""
    return every > 0 and step % every == 0


class StepHook:
    """``on_step`` for :func:`piaa_dist.train.meta_train`.

    Reports happen at the same steps on every rank (multiples of ``log_every``,
    ``checkpoint_every``, ``validate_every`` and the last step), because ``ray.train.report``
    is a barrier that every rank must reach equally often.

    Whenever rank 0 measures the validation SROCC it says so on the progress line: a
    ``step N/M val_srocc X (best Y at step S)`` log line (what a Ray run shows from rank 0) and,
    in-process, the tqdm bar's postfix (``val_srocc=X`` beside ``query_loss``).

    Early stopping and the best checkpoint: every measured score goes to the trainer's
    :class:`~piaa_dist.schedule.EarlyStopping` on *every* rank (rank 0 measures; ``reduce``
    carries its score to the others, where rank 0 adds it to zeros: exact), so all ranks
    agree on the best step and leave the training loop after the same step. A new best,
    and the step where the rule fires, are always checkpointed; the report then carries
    ``best_val_srocc``/``best_step`` and the runner keeps that checkpoint as the run's BEST
    (:func:`is_best_report`).

    Args:
        cfg: job config (``run.*_every``, ``meta.meta_steps``).
        rank: this process's rank (only rank 0 validates).
        report: the runner's report function.
        dataset: the opened dataset (validation users).
        inject_failure: testing hook ``{"step": N, "rank": R, "marker": PATH}``: rank R
            ``os._exit(1)`` s at step N once (the marker file records that it happened).
        progress: a tqdm bar to advance, or None.
        resumed_from: the step this attempt started at (0 = fresh); reported as
            ``resumed_from`` so the metrics show where a restart resumed.
        skipped_checkpoints: newer checkpoints this attempt could not load; reported as
            ``skipped_checkpoints`` (their locations are in the log).
        reduce: SUM over ranks of a flat tensor (what carries rank 0's validation score to the
            other ranks); None for a single rank.
    """

    def __init__(
        self,
        cfg: JobConfig,
        *,
        rank: int,
        report: Report,
        dataset: Any,
        inject_failure: dict | None = None,
        progress: Any = None,
        resumed_from: int = 0,
        skipped_checkpoints: int = 0,
        reduce: Any = None,
    ):
        self.cfg = cfg
        self.rank = rank
        self.report = report
        self.dataset = dataset
        self.inject_failure = inject_failure
        self.progress = progress
        self.resumed_from = resumed_from
        self.skipped_checkpoints = skipped_checkpoints
        self.reduce = reduce
        self.data_s = 0.0
        self.step_s = 0.0
        #: what the progress bar shows after the step count (the last measured val_srocc stays)
        self.postfix: dict[str, str] = {}
        #: (best validation SROCC, its step), once one was measured
        self.best: tuple[float, int] | None = None

    def __call__(self, step: int, metrics: dict, trainer: Any) -> None:
        run = self.cfg.run
        self._maybe_fail(step)
        self.data_s += metrics["data_s"]
        self.step_s += metrics["step_s"]
        if self.progress is not None:
            self.progress.update(1)
            self.postfix["query_loss"] = f"{metrics['query_loss']:.4f}"
            self.progress.set_postfix(self.postfix)
        last = step == self.cfg.meta.meta_steps
        checkpoint = due(step, run.checkpoint_every) or last
        validate = due(step, run.validate_every) or (last and run.validate_every > 0)
        if not (checkpoint or validate or due(step, run.log_every) or last):
            return
        out = dict(metrics, step=step, resumed_from=self.resumed_from,
                   skipped_checkpoints=self.skipped_checkpoints)
        # Share of wall time spent waiting for tasks since the last report (data-plane health).
        out["data_wait_share"] = self.data_s / self.step_s if self.step_s > 0 else 0.0
        self.data_s = self.step_s = 0.0
        if validate:
            score = validation_score(self.cfg, self.dataset, trainer.model) if self.rank == 0 else None
            score = self._shared(score)
            if score is not None:
                out["val_srocc"] = score
                stopping = getattr(trainer, "early_stopping", None)
                if stopping is not None:
                    improved = stopping.update(step, score)
                    out["best_val_srocc"] = stopping.best_score
                    out["best_step"] = stopping.best_step
                    # The best checkpoint is the one a run registers: it must exist. The step
                    # the rule fires at is the run's end: checkpointed like a last step.
                    checkpoint = checkpoint or improved or stopping.stopped
                    if stopping.stopped:
                        out["stopped_early"] = 1
                if self.rank == 0:
                    self._show_validation(step, score)
        self.report(step, out, trainer, checkpoint)

    def _shared(self, score: float | None) -> float | None:
        """Rank 0's validation score on every rank (None everywhere when it measured none).

        Rank 0 contributes ``[score, 1]``, the other ranks zeros, to one SUM: every rank gets
        rank 0's float64 value exactly (``x + 0 == x``).
        """
        if self.reduce is None:
            return score
        import torch

        t = torch.zeros(2, dtype=torch.float64)
        if self.rank == 0 and score is not None:
            t[0], t[1] = float(score), 1.0
        t = self.reduce(t)
        return float(t[0]) if float(t[1]) > 0 else None

    def _show_validation(self, step: int, score: float) -> None:
        """Put a validation SROCC on the progress line (log line and progress bar)."""
        if self.best is None or score > self.best[0]:
            self.best = (score, step)
        log.info("step %d/%d val_srocc %.4f (best %.4f at step %d)", step, self.cfg.meta.meta_steps,
                 score, *self.best)
        if self.progress is not None:
            self.postfix["val_srocc"] = f"{score:.4f}"
            self.progress.set_postfix(self.postfix)

    def _maybe_fail(self, step: int) -> None:
        """Testing hook: ``os._exit(1)`` once on one rank at one step (a marker file says "done")."""
        spec = self.inject_failure
        if not spec or self.rank != spec.get("rank", 1) or step != spec["step"]:
            return
        marker = Path(spec["marker"])
        if marker.exists():
            return
        marker.write_text(f"rank {self.rank} exited at step {step}\n")
        log.warning("injected failure: rank %d exits at step %d", self.rank, step)
        logging.shutdown()
        os._exit(1)


def is_best_report(step: int, metrics: dict) -> bool:
    """True when the report of ``step`` carries a new best validation score (its checkpoint is
    then the run's BEST)."""
    return "val_srocc" in metrics and metrics.get("best_step") == step


def validation_score(cfg: JobConfig, dataset: Any, model: nn.Module) -> float | None:
    """Validation SROCC of the meta-learner on the held-out training users (Tune's metric).

    None when the config holds no validation users out.
    """
    from piaa_dist.evaluate import validation_srocc
    from piaa_dist.train import validation_users

    users = validation_users(cfg, dataset)
    if not users:
        return None
    # A copy: evaluation fine-tunes and switches modes; the meta-learner must stay untouched.
    return float(
        validation_srocc(
            cfg, dataset, copy.deepcopy(model), users,
            shots=min(cfg.eval.shots), repeats=cfg.eval.repeats,
        )
    )


__all__ = ["Report", "StepHook", "due", "is_best_report", "validation_score"]
