"""Ray job entry point: a Ray Tune sweep of BLG-PIAA meta-training trials.

    ray job submit --working-dir . -- python jobs/tune.py \
        --config jobs/configs/tune-cpu.yaml --data s3://piaa/flickr --mlflow-uri sqlite:///mlflow.db

Same code path as ``piaa-dist tune``: each trial is a Ray Train run; ASHA stops weak trials on
the validation SROCC of held-out training users; the best meta-learner is written to
``--out/best-model``, logged to MLflow and registered (``--alias champion`` moves the alias).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# `ray job submit --working-dir .` uploads the repository; make the package importable even
# when it is not pip-installed on the cluster image.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piaa_dist.commands.tune import format_trials, tune_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="jobs/configs/NAME.yaml")
    parser.add_argument("--data", required=True, help="dataset root, e.g. s3://piaa/flickr")
    parser.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI")
    parser.add_argument("--out", default="out/tune", help="output folder")
    parser.add_argument("--samples", type=int, default=None, help="trials (default tune.samples)")
    parser.add_argument("--workers-per-trial", type=int, default=1, help="Train workers per trial")
    parser.add_argument("--alias", default=None, help="alias for the best model, e.g. champion")
    parser.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (MinIO, moto...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = tune_main(
        data=args.data, out=args.out, config=args.config, overrides=args.overrides,
        samples=args.samples, workers_per_trial=args.workers_per_trial,
        s3_endpoint=args.s3_endpoint, mlflow_uri=args.mlflow_uri, alias=args.alias,
    )
    print(format_trials(summary["trials"]))
    print(json.dumps({k: v for k, v in summary.items() if k != "trials"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
