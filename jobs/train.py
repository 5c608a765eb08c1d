"""Ray job entry point: meta-train BLG-PIAA on the cluster this job was submitted to.

    ray job submit --working-dir . -- python jobs/train.py \
        --config jobs/configs/cpu.yaml --data s3://piaa/flickr --mlflow-uri sqlite:///mlflow.db

Exactly ``piaa-dist train`` (the same flags, parsed by the same ``add_arguments``, and the same
``run``): the driver (this script) connects to the cluster (``$RAY_ADDRESS``, set by
``ray job submit``), meta-trains with ``run.workers`` Ray Train workers (``--workers``
overrides), writes the meta-learner to ``--out/model``, logs the run to MLflow and registers it.
The one difference: ``--out`` defaults to ``out/train`` (a job's working directory is
temporary; the registered model is what stays).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `ray job submit --working-dir .` uploads the repository; make the package importable even
# when it is not pip-installed on the cluster image.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piaa_dist.commands.common import command_parser, job_main  # noqa: E402

#: ``--out`` default of this job (the only flag default that differs from ``piaa-dist train``)
OUT_DEFAULT = "out/train"


def build_parser():
    """This job's parser: ``piaa-dist train``'s arguments."""
    return command_parser("train", out_default=OUT_DEFAULT)


def main(argv: list[str] | None = None) -> int:
    """Run the job."""
    return job_main("train", argv, out_default=OUT_DEFAULT)


if __name__ == "__main__":
    sys.exit(main())
