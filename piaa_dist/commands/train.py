"""``piaa-dist train`` (and ``jobs/train.py``): flags → :func:`piaa_dist.orchestration.usecases.train` → print."""

from __future__ import annotations

import argparse
import json

HELP = "Meta-train the BLG-PIAA meta-learner (in-process or on Ray Train)."

DESCRIPTION = """\
Meta-train the BLG-PIAA meta-learner on the training users of a dataset that
'piaa-dist ingest' wrote: in this process (--workers 0) or on N Ray Train workers.

Writes OUT/model (the meta-learner: weights, config, info), OUT/checkpoints and
OUT/metrics.jsonl. Running the same command again resumes from the last checkpoint. The run is
logged to MLflow and the meta-learner registered as run.register_name (default blg-piaa), with
its validation SROCC (held-out training users) in the registry.

--alias champion compares the new version with the version that holds the alias now, on the
same validation users with the same protocol, and moves the alias only if the new one scores
higher (a tie keeps the champion); otherwise the new version is registered as a challenger.
One line says which happened and why. --force-alias moves the alias regardless.

example:
  piaa-dist train --data s3://piaa/world --config jobs/configs/cpu.yaml --out out/train \\
      --workers 2 --alias champion"""


def add_arguments(parser: argparse.ArgumentParser, *, out_default: str | None = None) -> None:
    """The ``train`` arguments, shared by ``piaa-dist train`` and ``jobs/train.py``.

    Args:
        parser: the parser to add them to.
        out_default: default of ``--out``; None makes ``--out`` required. A Ray job passes one
            because its working directory is temporary (the registered model is what stays).
    """
    parser.add_argument("--data", default=None,
                        help="dataset root: local folder or s3://bucket/prefix (default data.url)")
    parser.add_argument("--config", default=None, help="job config YAML (jobs/configs/NAME.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. meta.inner_lr=0.01 meta.meta_steps=50")
    parser.add_argument("--out", required=out_default is None, default=out_default,
                        help="output folder (model/, checkpoints/, metrics.jsonl)"
                             + (f" (default {out_default})" if out_default else ""))
    parser.add_argument("--workers", type=int, default=None,
                        help="Ray Train workers; 0 runs in this process (default run.workers)")
    parser.add_argument("--alias", default=None,
                        help="alias to move to the registered model if it beats the version holding "
                             "it on validation users, e.g. champion (default run.alias)")
    parser.add_argument("--force-alias", action="store_true",
                        help="move --alias to the new version whatever the validation scores")
    parser.add_argument("--s3-endpoint", default=None,
                        help="S3 endpoint URL (default data.s3_endpoint, then $AWS_ENDPOINT_URL)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI (default run.mlflow_uri, $MLFLOW_TRACKING_URI, "
                             "then sqlite:///mlflow.db)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow (nor register)")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")


def run(args: argparse.Namespace) -> int:
    """Train; print where the meta-learner is and the run's summary."""
    from piaa_dist.orchestration.usecases import train

    outcome = train(
        data=args.data, out=args.out, config=args.config, overrides=args.overrides,
        workers=args.workers, alias=args.alias, force_alias=args.force_alias, s3_endpoint=args.s3_endpoint,
        mlflow_uri=args.mlflow_uri, mlflow=not args.no_mlflow, ray_address=args.ray_address,
    )
    print(json.dumps(outcome.to_dict(), indent=2))
    # the summary last, where a user looks: validation SROCC, registry, where the alias is and why
    print("\n".join(outcome.summary_lines()))
    return 0
