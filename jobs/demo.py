"""Entry point of the main job: the whole system end to end (what ``make demo`` runs).

    python jobs/demo.py --config jobs/configs/demo.yaml --out demo-out
    ray job submit --working-dir . -- python jobs/demo.py --config jobs/configs/demo.yaml \
        --data s3://my-bucket/flickr-aes --mlflow-uri http://mlflow:5000 --ray-address auto

Same code path as ``piaa-dist demo`` (see ``--help``): local S3, synthetic world, ingest,
2-worker Ray Train meta-training, a Tune sweep, the champion in the MLflow registry,
meta-testing, one personalization, and ``<out>/report.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piaa_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
