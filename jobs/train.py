"""Ray job entry point: meta-train BLG-PIAA on the cluster this job was submitted to.

    ray job submit --working-dir . -- python jobs/train.py \
        --config jobs/configs/cpu.yaml --data s3://piaa/flickr --mlflow-uri sqlite:///mlflow.db

Same code path as ``piaa-dist train``: the driver (this script) connects to the cluster
(``$RAY_ADDRESS``, set by ``ray job submit``), runs a Ray Train ``TorchTrainer`` with
``run.workers`` workers (``--workers`` overrides), writes the meta-learner to ``--out/model``
and logs the run to MLflow.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# `ray job submit --working-dir .` uploads the repository; make the package importable even
# when it is not pip-installed on the cluster image.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piaa_dist.commands.train import train_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="jobs/configs/NAME.yaml")
    parser.add_argument("--data", required=True, help="dataset root, e.g. s3://piaa/flickr")
    parser.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI")
    parser.add_argument("--out", default="out/train", help="output folder (model/, checkpoints/)")
    parser.add_argument("--workers", type=int, default=None, help="Ray Train workers (0 = in-process)")
    parser.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (MinIO, moto...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _, model_dir, info = train_main(
        data=args.data, out=args.out, config=args.config, overrides=args.overrides,
        workers=args.workers, s3_endpoint=args.s3_endpoint, mlflow_uri=args.mlflow_uri,
        progress=False,
    )
    print(f"meta-learner at step {info['step']} written to {model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
