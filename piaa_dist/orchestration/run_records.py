"""What a meta-training run hands back, and where its per-step metrics go (no Ray here)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

log = logging.getLogger(__name__)

#: ``metrics_callback(step, metrics)``: rank 0's metrics at every report, on the driver's node.
MetricsCallback = Callable[[int, dict], None]


@dataclasses.dataclass
class TrainResult:
    """What a finished meta-training run hands back to the driver.

    Attributes:
        model: the meta-learner (CPU, eval mode not set: as trained).
        state: the trainer's final ``state_dict`` (model, optimizer, step).
        metrics: rank 0's last reported metrics (``step``, ``query_loss``, ...).
        checkpoint: URL or path of the last checkpoint, or None.
        workers: Ray Train workers used (0 = in-process).
        best: the best validation checkpoint (its step, score, URL and state), or None when the
            run measured no validation score. Its model is :attr:`selected_model`: what a run
            writes and registers.
        best_model: the meta-learner of ``best`` (None without one).
    """

    model: nn.Module
    state: dict
    metrics: dict
    checkpoint: str | None
    workers: int
    best: Any = None
    best_model: nn.Module | None = None

    @property
    def step(self) -> int:
        """Meta-updates applied (the final sampler position)."""
        return int(self.state["step"])

    @property
    def selected_model(self) -> nn.Module:
        """The model to write and register: the best validation checkpoint's, else the last."""
        return self.best_model if self.best_model is not None else self.model

    @property
    def selected_step(self) -> int:
        """The meta-step of :attr:`selected_model`."""
        return int(self.best.step) if self.best is not None else self.step

    @property
    def early_stopping(self) -> dict:
        """The run's final early-stopping state (best score/step, ``stopped_at``); {} if none."""
        return dict(self.state.get("early_stopping") or {})


class JsonlMetrics:
    """``metrics_callback`` that appends ``{"step", ...metrics, "time"}`` lines to a JSON-lines file.

    :func:`~piaa_dist.orchestration.ray_train.run_distributed` always writes
    ``<out_dir>/metrics.jsonl`` this way (a restarted run appends the steps it redoes, so the
    file also shows where a run resumed). ``time`` is when the report reached this callback
    (Unix seconds, on the driver's node): a run's timeline, e.g. for a time-to-quality curve.
    """

    def __init__(self, path: str | Path):
        self.path = str(Path(path).resolve())

    def __call__(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: v for k, v in metrics.items() if k != "step"}, "time": time.time()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")


class Fanout:
    """Several metrics callbacks as one (picklable when its members are).

    A failing callback is logged and skipped: logging must never kill a training run.
    """

    def __init__(self, callbacks: Sequence[MetricsCallback]):
        self.callbacks = list(callbacks)

    def __call__(self, step: int, metrics: dict) -> None:
        for fn in self.callbacks:
            try:
                fn(step, dict(metrics))
            except Exception:
                log.warning("metrics callback %r failed at step %d", fn, step, exc_info=True)


__all__ = ["Fanout", "JsonlMetrics", "MetricsCallback", "TrainResult"]
