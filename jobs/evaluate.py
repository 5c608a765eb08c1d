"""Ray job entry point: the meta-testing protocol on the test users.

    ray job submit --working-dir . -- python jobs/evaluate.py \
        --data s3://piaa/flickr --model models:/blg-piaa@champion --mlflow-uri sqlite:///mlflow.db \
        --shots 10 100 --repeats 10 --json out/evaluate.json

Same code path as ``piaa-dist evaluate`` (see its ``--help``): blg-piaa, meta-no-adapt and
giaa-finetune on the same seeded splits, SROCC/PLCC, ceilings when the data has them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piaa_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
