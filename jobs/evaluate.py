"""Ray job entry point: the meta-testing protocol on the test users.

    ray job submit --working-dir . -- python jobs/evaluate.py \
        --data s3://piaa/flickr --model models:/blg-piaa@champion --mlflow-uri sqlite:///mlflow.db \
        --shots 10 100 --repeats 10 --json out/evaluate.json

Exactly ``piaa-dist evaluate`` (the same flags, parsed by the same ``add_arguments``, and the
same ``run``): blg-piaa, meta-no-adapt and giaa-finetune on the same seeded splits, SROCC/PLCC,
ceilings when the data has them.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `ray job submit --working-dir .` uploads the repository; make the package importable even
# when it is not pip-installed on the cluster image.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piaa_dist.commands.common import command_parser, job_main  # noqa: E402


def build_parser():
    """This job's parser: ``piaa-dist evaluate``'s arguments."""
    return command_parser("evaluate")


def main(argv: list[str] | None = None) -> int:
    """Run the job."""
    return job_main("evaluate", argv)


if __name__ == "__main__":
    sys.exit(main())
