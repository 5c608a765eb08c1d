"""``piaa-dist tune``: a Ray Tune sweep of meta-training trials; the best one is registered.

    piaa-dist tune --data URL --config jobs/configs/NAME.yaml --samples S --out DIR
                   [--workers-per-trial N] [--mlflow-uri URI] [--alias champion] [key=value ...]

Searches ``meta.inner_lr``, ``meta.inner_steps``, ``data.shots`` and ``meta.meta_lr`` (ranges in
the config's ``tune`` section) with ASHA on the validation SROCC of held-out training users.
Writes ``DIR/best-model/`` (weights + the best trial's full config), ``DIR/best.yaml`` and
``DIR/sweep.json`` (one row per trial), logs the sweep and every trial to MLflow, and
registers the best meta-learner under ``run.register_name`` (moving ``--alias`` to it).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

HELP = "Ray Tune sweep over inner lr, inner steps, shots and meta lr."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``tune`` subcommand's arguments (shared with ``jobs/tune.py``)."""
    parser.add_argument("--data", default=None, help="dataset root: folder or s3://bucket/prefix")
    parser.add_argument("--config", default=None, help="job config YAML (jobs/configs/NAME.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--samples", type=int, default=None, help="trials (default tune.samples)")
    parser.add_argument("--workers-per-trial", type=int, default=1,
                        help="Ray Train workers per trial (default 1)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL")
    parser.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--alias", default=None, help="alias to move to the best model (e.g. champion)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address")


def format_trials(rows: Sequence[dict]) -> str:
    """A plain-text table of the sweep's trials, best first."""
    cols = ["trial_id", "status", "val_srocc", "step", "meta.inner_lr", "meta.inner_steps",
            "data.shots", "meta.meta_lr"]
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)
    ordered = sorted(rows, key=lambda r: -(r.get("val_srocc") or -9))
    table = [cols] + [[cell(r.get(c)) for c in cols] for r in ordered]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table)


def tune_main(
    *,
    data: str | None,
    out: str | Path,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    samples: int | None = None,
    workers_per_trial: int = 1,
    s3_endpoint: str | None = None,
    mlflow_uri: str | None = None,
    mlflow: bool = True,
    alias: str | None = None,
    ray_address: str | None = None,
) -> dict:
    """Load the config, run the sweep, write and register the best meta-learner.

    Returns:
        summary dict: ``best_score``, ``best_params``, ``model`` (folder), ``trials``, and
        ``registered`` / ``alias`` / ``mlflow_run_id`` when MLflow is on.
    """
    from piaa_dist.checkpoint import save_model
    from piaa_dist.commands._common import job_config
    from piaa_dist.config import dump_config, flat_params
    from piaa_dist.orchestration.tune import SEARCHED, run_sweep

    cfg = job_config(config, overrides, data=data, s3_endpoint=s3_endpoint,
                     updates={"run.alias": alias})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    parent = None
    uri = ""
    if mlflow:
        from piaa_dist.orchestration import tracking

        uri = tracking.tracking_uri(mlflow_uri or cfg.run.mlflow_uri)
        parent = tracking.RunLogger(
            cfg.run.experiment, uri=uri, run_name="tune", rank=0,
            tags={"piaa_dist.kind": "tune", "piaa_dist.data": cfg.data.url},
        ).start()
        parent.log_params(cfg)
    try:
        sweep = run_sweep(
            cfg, cfg.data.url, out, samples=samples, workers_per_trial=workers_per_trial,
            s3_endpoint=cfg.data.s3_endpoint or None, mlflow_uri=uri or None,
            parent_run_id=parent.run_id if parent else None, ray_address=ray_address,
        )
    except BaseException as err:
        if parent is not None:
            parent.__exit__(type(err), err, None)
        raise
    best_params = {k: v for k, v in flat_params(sweep.best_config).items() if k in SEARCHED}
    info = {"kind": "blg-piaa-meta-learner", "source": "tune", "val_srocc": sweep.best_score,
            "best_params": best_params, "checkpoint": sweep.best_checkpoint}
    model_dir = save_model(out / "best-model", sweep.model, sweep.best_config, info)
    (out / "best.yaml").write_text(dump_config(sweep.best_config))
    summary: dict[str, Any] = {"best_score": sweep.best_score, "best_params": best_params,
                               "model": str(model_dir), "trials": sweep.trials}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    if parent is not None:
        parent.log_metrics({"best.val_srocc": sweep.best_score})
        parent.log_dict(summary, "sweep.json")
        parent.log_text(format_trials(sweep.trials), "trials.txt")
        name = sweep.best_config.run.register_name
        if name:
            version = parent.register_model(model_dir, name, cfg.run.alias)
            summary["registered"] = f"models:/{name}/{version}"
            if cfg.run.alias:
                summary["alias"] = f"models:/{name}@{cfg.run.alias}"
        summary["mlflow_run_id"] = parent.run_id
        summary["mlflow_uri"] = uri
        parent.end("FINISHED")
    return summary


def run(args: argparse.Namespace) -> int:
    """Entry point of ``piaa-dist tune``."""
    summary = tune_main(
        data=args.data, out=args.out, config=args.config, overrides=args.overrides,
        samples=args.samples, workers_per_trial=args.workers_per_trial,
        s3_endpoint=args.s3_endpoint, mlflow_uri=args.mlflow_uri, mlflow=not args.no_mlflow,
        alias=args.alias, ray_address=args.ray_address,
    )
    print(format_trials(summary["trials"]))
    print(json.dumps({k: v for k, v in summary.items() if k != "trials"}, indent=2, default=str))
    return 0
