"""Entry point of the main job: the whole system end to end (what ``make demo`` runs).

    python jobs/demo.py --config jobs/configs/demo.yaml --out demo-out
    ray job submit --working-dir . -- python jobs/demo.py --config jobs/configs/demo.yaml \
        --data s3://my-bucket/flickr-aes --mlflow-uri http://mlflow:5000 --ray-address auto

Exactly ``piaa-dist demo`` (the same flags, parsed by the same ``add_arguments``, and the
same ``run``): local S3, synthetic world, ingest, 2-worker Ray Train meta-training, a Tune
sweep, the champion in the MLflow registry, meta-testing, one personalization, and
``<out>/report.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `ray job submit --working-dir .` uploads the repository; make the package importable even
# when it is not pip-installed on the cluster image.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piaa_dist.commands.common import command_parser, job_main  # noqa: E402


def build_parser():
    """This job's parser: ``piaa-dist demo``'s arguments."""
    return command_parser("demo")


def main(argv: list[str] | None = None) -> int:
    """Run the job."""
    return job_main("demo", argv)


if __name__ == "__main__":
    sys.exit(main())
