"""``piaa-dist train``: meta-train the BLG-PIAA meta-learner, in-process or on Ray Train.

    piaa-dist train --data URL --config jobs/configs/NAME.yaml [key=value ...] --out DIR
                    [--workers N] [--s3-endpoint URL] [--mlflow-uri URI]

Writes ``DIR/model/`` (weights + config + info, see :mod:`piaa_dist.checkpoint`) and keeps
checkpoints under ``DIR/checkpoints/`` (or ``run.storage_path``); running the same command
again resumes from the latest checkpoint. ``jobs/train.py`` (``ray job submit``) calls
:func:`train_main` too.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

HELP = "Meta-train the BLG-PIAA meta-learner (in-process or on Ray Train)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand's arguments (shared with ``jobs/train.py``)."""
    parser.add_argument("--data", default=None,
                        help="dataset root: local folder or s3://bucket/prefix (default data.url)")
    parser.add_argument("--config", default=None, help="job config YAML (jobs/configs/NAME.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. meta.inner_lr=0.01 meta.meta_steps=50")
    parser.add_argument("--out", required=True, help="output folder (model/, checkpoints/)")
    parser.add_argument("--workers", type=int, default=None,
                        help="Ray Train workers; 0 runs in this process (default run.workers)")
    parser.add_argument("--s3-endpoint", default=None,
                        help="S3 endpoint URL (default data.s3_endpoint, then $AWS_ENDPOINT_URL)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI (default run.mlflow_uri, $MLFLOW_TRACKING_URI, "
                             "then sqlite:///mlflow.db)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")


class _Tracking:
    """The train run's MLflow side: params, per-step metrics, final model registration.

    Optional by design: without :mod:`piaa_dist.orchestration.tracking` (or with
    ``--no-mlflow``) training runs and writes its model all the same.
    """

    def __init__(self, cfg: Any, uri: str | None, enabled: bool):
        self.run = None
        if not enabled:
            return
        try:
            from piaa_dist.orchestration import tracking
        except ImportError:
            log.info("MLflow tracking module not available; not logging to MLflow")
            return
        self.uri = tracking.tracking_uri(uri or cfg.run.mlflow_uri)
        self.run = tracking.RunLogger(
            cfg.run.experiment, uri=self.uri, run_name="train", rank=0,
            tags={"piaa_dist.kind": "train", "piaa_dist.data": cfg.data.url},
        ).start()
        self.run.log_params(cfg)

    def metrics_callback(self):
        """A picklable ``fn(step, metrics)`` logging to this run (None without MLflow)."""
        from piaa_dist.orchestration.tracking import RunMetricsCallback

        return None if self.run is None else RunMetricsCallback(self.uri, self.run.run_id)

    def finish(self, cfg: Any, model_dir: Path, result: Any) -> dict:
        """Log final metrics and the model folder, register it; end the run."""
        if self.run is None:
            return {}
        out: dict[str, Any] = {"mlflow_run_id": self.run.run_id, "mlflow_uri": self.uri}
        self.run.log_metrics({f"final.{k}": v for k, v in result.metrics.items()
                              if isinstance(v, (int, float))}, step=result.step)
        if cfg.run.register_name:
            version = self.run.register_model(model_dir, cfg.run.register_name, cfg.run.alias)
            out["registered"] = f"models:/{cfg.run.register_name}/{version}"
            if cfg.run.alias:
                out["alias"] = f"models:/{cfg.run.register_name}@{cfg.run.alias}"
        self.run.end("FINISHED")
        return out

    def fail(self, err: BaseException) -> None:
        if self.run is not None:
            self.run.__exit__(type(err), err, None)


def train_main(
    *,
    data: str | None,
    out: str | Path,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    workers: int | None = None,
    s3_endpoint: str | None = None,
    mlflow_uri: str | None = None,
    mlflow: bool = True,
    ray_address: str | None = None,
    progress: bool = True,
):
    """Load the config, meta-train, write ``out/model`` and log the run.

    Returns:
        ``(result, model_dir, info)``: the
        :class:`~piaa_dist.orchestration.ray_train.TrainResult`, the written model folder and
        its ``info`` (step, workers, checkpoint, final metrics, MLflow run / registered URIs).

    Raises:
        ConfigError: bad config/overrides, or no data URL given anywhere.
        RunLocked: another live run holds ``out`` (or its checkpoint storage).
    """
    from piaa_dist.checkpoint import save_model
    from piaa_dist.commands._common import job_config
    from piaa_dist.orchestration.ray_train import run_distributed
    from piaa_dist.orchestration.run_lock import hold_run

    cfg = job_config(config, overrides, data=data, s3_endpoint=s3_endpoint,
                     updates={"run.workers": workers})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    # One run per output, for the whole command: training, then the model folder it writes.
    with hold_run(out):
        tracking = _Tracking(cfg, mlflow_uri, enabled=mlflow)
        try:
            result = run_distributed(
                cfg, cfg.data.url, out,
                workers=cfg.run.workers,
                s3_endpoint=cfg.data.s3_endpoint or None,
                metrics_callback=tracking.metrics_callback(),
                progress=progress and cfg.run.workers == 0,
                ray_address=ray_address,
            )
        except BaseException as err:
            tracking.fail(err)
            raise
        info = {
            "kind": "blg-piaa-meta-learner",
            "step": result.step,
            "workers": result.workers,
            "data": cfg.data.url,
            "checkpoint": result.checkpoint,
            "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
        }
        model_dir = save_model(out / "model", result.model, cfg, info)
        info.update(tracking.finish(cfg, model_dir, result))
    log.info("meta-learner (step %d) written to %s", result.step, model_dir)
    return result, model_dir, info


def run(args: argparse.Namespace) -> int:
    """Entry point of ``piaa-dist train``."""
    result, model_dir, info = train_main(
        data=args.data, out=args.out, config=args.config, overrides=args.overrides,
        workers=args.workers, s3_endpoint=args.s3_endpoint, mlflow_uri=args.mlflow_uri,
        mlflow=not args.no_mlflow, ray_address=args.ray_address,
    )
    summary = {"model": str(model_dir), **{k: v for k, v in info.items() if k != "metrics"}}
    summary["metrics"] = info.get("metrics", {})
    print(json.dumps(summary, indent=2, default=str))
    return 0

