"""Meta-training in this process (``workers=0``): the Ray Train loop without Ray.

Same step hook, same checkpoint rules (:mod:`piaa_dist.orchestration.checkpoint_store`): a
re-run with the same storage and name resumes from the newest checkpoint that loads, and the
best validation checkpoint is kept beside the others (``local/BEST``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from piaa_dist.config import JobConfig
from piaa_dist.orchestration.checkpoint_store import (
    IN_PROCESS_DIR,
    InProcessCheckpoints,
    RunStorage,
    model_from_state,
    read_best,
)
from piaa_dist.orchestration.run_records import MetricsCallback, TrainResult
from piaa_dist.orchestration.step_hook import StepHook, is_best_report

log = logging.getLogger(__name__)


def run_in_process(
    cfg: JobConfig,
    data_url: str,
    storage: RunStorage,
    *,
    s3_endpoint: str | None = None,
    metrics_callback: MetricsCallback | None = None,
    progress: bool = False,
    dataset: Any = None,
) -> TrainResult:
    """Meta-train in this process, checkpointing to ``storage`` (``<root>/<name>/local``).

    Args:
        cfg: job config.
        data_url: dataset root (absolute local folder or ``s3://``).
        storage: the run's checkpoint storage.
        s3_endpoint: S3 endpoint for the dataset.
        metrics_callback: ``fn(step, metrics)`` at every report.
        progress: show a tqdm bar on stderr.
        dataset: the opened dataset of ``data_url`` to use (e.g. one a process keeps warm across
            Tune trials); default: opened here.

    Returns:
        The final state, and the best validation checkpoint (``result.best``) when validation ran.
    """
    from piaa_dist.data.stream import Dataset
    from piaa_dist.train import meta_train

    if dataset is None:
        dataset = Dataset.open(data_url, endpoint_url=s3_endpoint or None)
    store = InProcessCheckpoints(storage, keep=cfg.run.keep_checkpoints)
    point = store.resume_point()
    if point.state is not None:
        log.info("resuming from %s at step %d", point.url, point.step)
    last: dict[str, Any] = {"metrics": {}, "checkpoint": None}

    def report(step: int, metrics: dict, trainer: Any, with_checkpoint: bool) -> None:
        if with_checkpoint:
            last["checkpoint"] = store.save(step, trainer.state_dict(), cfg,
                                            best=is_best_report(step, metrics))
        last["metrics"] = metrics
        if metrics_callback is not None:
            metrics_callback(step, dict(metrics))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.meta.meta_steps, initial=point.step, desc="meta-train", unit="step")
    # The run's thread budget, as a Train worker would have it; restored afterwards because
    # this is the caller's process (a test session, a notebook).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.run.threads_per_worker))
    try:
        hook = StepHook(cfg, rank=0, report=report, dataset=dataset, progress=bar,
                        resumed_from=point.step, skipped_checkpoints=len(point.skipped))
        trainer = meta_train(cfg, dataset, resume=point.state, on_step=hook)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    # Nothing saved by this attempt (the stored run had already finished): what it resumed from.
    checkpoint = last["checkpoint"] or point.url
    state = trainer.state_dict()
    best = read_best(storage, IN_PROCESS_DIR, best_step=trainer.early_stopping.best_step) \
        if trainer.early_stopping.best_score is not None else None
    return TrainResult(trainer.model.cpu(), state, last["metrics"], checkpoint, 0, best=best,
                       best_model=None if best is None else model_from_state(cfg, best.state))


__all__ = ["run_in_process"]
