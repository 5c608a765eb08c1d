"""Ray job entry point: a Ray Tune sweep of BLG-PIAA meta-training trials.

    ray job submit --working-dir . -- python jobs/tune.py \
        --config jobs/configs/tune-cpu.yaml --data s3://piaa/flickr --mlflow-uri sqlite:///mlflow.db

Exactly ``piaa-dist tune`` (the same flags, parsed by the same ``add_arguments``, and the same
``run``): each trial is a Ray Train run; ASHA stops weak trials on the validation SROCC of
held-out training users; the best meta-learner is written to ``--out/best-model``, logged to
MLflow and registered (``--alias champion`` moves the alias). The one difference: ``--out``
defaults to ``out/tune``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `ray job submit --working-dir .` uploads the repository; make the package importable even
# when it is not pip-installed on the cluster image.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piaa_dist.commands.common import command_parser, job_main  # noqa: E402

#: ``--out`` default of this job (the only flag default that differs from ``piaa-dist tune``)
OUT_DEFAULT = "out/tune"


def build_parser():
    """This job's parser: ``piaa-dist tune``'s arguments."""
    return command_parser("tune", out_default=OUT_DEFAULT)


def main(argv: list[str] | None = None) -> int:
    """Run the job."""
    return job_main("tune", argv, out_default=OUT_DEFAULT)


if __name__ == "__main__":
    sys.exit(main())
