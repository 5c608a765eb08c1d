"""The per-step hook of a meta-training run: reports, checkpoints, validation, failure injection.

Shared by Ray Train workers and the in-process loop, and free of Ray: the runner passes in a
``report(step, metrics, trainer, with_checkpoint)`` function that does the Ray-specific (or
local) part.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
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

    Validation is spread over the ranks: each scores its share of the validation users and the
    shares are combined with the trainer's SUM reduce (:func:`validation_score`), so no rank
    waits while another validates. Every report carries the time spent so far in validation
    (``val_total_s``) and in reports that wrote a checkpoint (``checkpoint_total_s``; the one
    being made is counted in the next report), next to the trainer's per-step phases, and the
    wall-clock ``time`` it was made at.

    Early stopping and the best checkpoint: every measured score goes to the trainer's
    :class:`~piaa_dist.schedule.EarlyStopping` on *every* rank (after the spread validation,
    ``reduce`` carries rank 0's score to the others, where rank 0 adds it to zeros: exact), so
    all ranks agree on the best step and leave the training loop after the same step. A new best,
    and the step where the rule fires, are always checkpointed; the report then carries
    ``best_val_srocc``/``best_step`` and the runner keeps that checkpoint as the run's BEST
    (:func:`is_best_report`).

    Args:
        cfg: job config (``run.*_every``, ``meta.meta_steps``).
        rank: this process's rank.
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
        self.val_total_s = 0.0
        self.checkpoint_total_s = 0.0

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
        world = int(getattr(trainer, "world_size", 1))
        reduce = self.reduce if self.reduce is not None else getattr(trainer, "reduce", None)
        if validate:
            score = None
            if self.rank == 0 or (world > 1 and reduce is not None):
                t0 = time.perf_counter()
                score = validation_score(self.cfg, self.dataset, trainer.model, rank=self.rank,
                                         world_size=world, reduce=reduce)
                self.val_total_s += time.perf_counter() - t0
            # Every rank takes the early-stopping decision from rank 0's exact value, so all
            # ranks leave the loop after the same step (ray.train.report is a barrier).
            score = self._shared(score, reduce)
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
        out["val_total_s"] = self.val_total_s
        out["checkpoint_total_s"] = self.checkpoint_total_s
        out["time"] = time.time()  # wall clock: end-to-end throughput between two reports
        t0 = time.perf_counter()
        self.report(step, out, trainer, checkpoint)
        if checkpoint:
            self.checkpoint_total_s += time.perf_counter() - t0

    def _shared(self, score: float | None, reduce: Any) -> float | None:
        """Rank 0's validation score on every rank (None everywhere when it measured none).

        Rank 0 contributes ``[score, 1]``, the other ranks zeros, to one SUM: every rank gets
        rank 0's float64 value exactly (``x + 0 == x``).
        """
        if reduce is None:
            return score
        t = torch.zeros(2, dtype=torch.float64)
        if self.rank == 0 and score is not None:
            t[0], t[1] = float(score), 1.0
        t = reduce(t)
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


def validation_score(cfg: JobConfig, dataset: Any, model: nn.Module, *, rank: int = 0,
                     world_size: int = 1, reduce: Any = None) -> float | None:
    """Validation SROCC of the meta-learner on the held-out training users (Tune's metric).

    With one rank (or no ``reduce``) this is :func:`piaa_dist.evaluate.validation_srocc`.
    With ``world_size`` ranks, every rank must call it at the same step: rank ``r`` scores the
    users ``users[r::world_size]`` (each user's SROCC is a function of the model, the user and
    the seed only), and one SUM ``reduce`` of ``[Σ per-user SROCC, users]`` gives every rank the
    same mean over users: the single-rank value up to float summation order.

    Args:
        cfg: job config (validation users, ``eval`` budget).
        dataset: the opened dataset.
        model: the meta-learner (not modified: a copy is fine-tuned).
        rank, world_size: this rank and the number of ranks.
        reduce: SUM over ranks of a flat tensor (the trainer's).

    Returns:
        The mean SROCC, or None when the config holds no validation users out.

    Raises:
        ValueError: none of the validation users has enough ratings for the shots.
    """
    from piaa_dist.evaluate import REFERENCE_METHOD, evaluate, validation_srocc
    from piaa_dist.train import validation_users

    users = validation_users(cfg, dataset)
    if not users:
        return None
    shots = min(cfg.eval.shots)
    if world_size <= 1 or reduce is None:
        # A copy: evaluation fine-tunes and switches modes; the meta-learner must stay untouched.
        return float(
            validation_srocc(
                cfg, dataset, copy.deepcopy(model), users,
                shots=shots, repeats=cfg.eval.repeats,
            )
        )
    mine = users[rank::world_size]
    per_user: dict[str, float] = {}
    if mine:
        try:
            res = evaluate(cfg, dataset, {REFERENCE_METHOD: copy.deepcopy(model)}, shots=[shots],
                           repeats=cfg.eval.repeats, users=mine)
        except ValueError as err:
            if "enough ratings" not in str(err):
                raise
            res = None  # none of *this rank's* users has enough ratings: it adds nothing
        cell = None if res is None else res.stats(REFERENCE_METHOD, shots)
        per_user = {} if cell is None else dict(cell.per_user)
    device = next(model.parameters()).device
    local = torch.tensor([math.fsum(per_user.values()), float(len(per_user))],
                         dtype=torch.float64, device=device)
    total, count = (float(x) for x in reduce(local).tolist())
    if count <= 0:
        raise ValueError(f"validation: none of the {len(users)} users has enough ratings for {shots} shots")
    return total / count


__all__ = ["Report", "StepHook", "due", "is_best_report", "validation_score"]
