"""Ray job entry point: personalize a registered meta-learner to one person's ratings.

    ray job submit --working-dir . -- python jobs/personalize.py \
        --model models:/blg-piaa@champion --mlflow-uri sqlite:///mlflow.db \
        --ratings me.csv --images photos/ --score new_photos/ --out ranking.csv

Same code path as ``piaa-dist personalize``; it needs no Ray workers (one adaptation is a few
seconds of CPU), it is a job so that it runs next to the cluster's registry and data.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piaa_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["personalize", *sys.argv[1:]]))
