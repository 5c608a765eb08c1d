"""Ray job entry point: personalize a registered meta-learner to one person's ratings.

    ray job submit --working-dir . -- python jobs/personalize.py \
        --model models:/blg-piaa@champion --mlflow-uri sqlite:///mlflow.db \
        --ratings me.csv --images photos/ --score new_photos/ --out ranking.csv

Exactly ``piaa-dist personalize`` (the same flags, parsed by the same ``add_arguments``, and
the same ``run``); it needs no Ray workers (one adaptation is a few seconds of CPU), it is a job
so that it runs next to the cluster's registry and data.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `ray job submit --working-dir .` uploads the repository; make the package importable even
# when it is not pip-installed on the cluster image.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piaa_dist.commands.common import command_parser, job_main  # noqa: E402


def build_parser():
    """This job's parser: ``piaa-dist personalize``'s arguments."""
    return command_parser("personalize")


def main(argv: list[str] | None = None) -> int:
    """Run the job."""
    return job_main("personalize", argv)


if __name__ == "__main__":
    sys.exit(main())
