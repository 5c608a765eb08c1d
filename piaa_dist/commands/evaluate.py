"""``piaa-dist evaluate`` (and ``jobs/evaluate.py``).

Flags → :func:`piaa_dist.orchestration.usecases.evaluate` → table.
"""

from __future__ import annotations

import argparse

HELP = "Run the meta-testing protocol on test users."

DESCRIPTION = """\
Meta-test a meta-learner on the test users of a dataset: for every test user and shot count k,
fine-tune on k of their rated images and rank the rest (repeated over random splits); report
SROCC and PLCC of blg-piaa against the baselines (meta-no-adapt, giaa-finetune), the paired
difference with its 95% interval, and the ceilings when the data is synthetic.

--model takes a model folder, the folder 'piaa-dist train --out' wrote, the folder
'piaa-dist tune --out' wrote, or a registry reference (models:/blg-piaa@champion,
models:/NAME/VERSION). The GIAA baseline comes from --giaa, else from a giaa/ folder inside or
beside a local model folder, else it is the dataset's registered baseline (piaa-giaa in the
MLflow registry, keyed by dataset version, training users and GIAA budget), trained and
registered here the first time. Its budget is this evaluation's (--config, else the built-in
defaults, with giaa.* overrides), never the meta-learner's, so every meta-learner evaluated on
the same data is compared with the same GIAA model.
The result is printed as a table, written to --json and logged to MLflow as an evaluate run.

example:
  piaa-dist evaluate --data s3://piaa/world --model models:/blg-piaa@champion \\
      --shots 10 100 --repeats 10 --json eval.json"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``evaluate`` arguments, shared by ``piaa-dist evaluate`` and ``jobs/evaluate.py``."""
    parser.add_argument("--data", required=True, help="dataset root (local folder or s3://bucket/prefix)")
    parser.add_argument("--model", required=True,
                        help="model folder, train/tune --out folder, or models:/NAME@ALIAS")
    parser.add_argument("--giaa", default=None, help="GIAA model folder (default: <model>/giaa, else train one)")
    parser.add_argument("--giaa-out", default=None, help="save a GIAA model trained here to this folder")
    parser.add_argument("--shots", type=int, nargs="+", default=None, help="shot counts k (default eval.shots)")
    parser.add_argument("--repeats", type=int, default=None, help="random splits per user (default eval.repeats)")
    parser.add_argument("--seed", type=int, default=None, help="split seed (default run.seed)")
    parser.add_argument("--json", default=None, help="write the result JSON here")
    parser.add_argument("--config", default=None, help="YAML job config (default: the model's own config)")
    parser.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default $AWS_ENDPOINT_URL)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI for models:/ references and the evaluate run "
                             "(default run.mlflow_uri, $MLFLOW_TRACKING_URI, then sqlite:///mlflow.db)")
    parser.add_argument("--no-mlflow", action="store_true",
                        help="do not log the result to MLflow (models:/ references still resolve)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--workers", type=int, default=0,
                        help="Ray workers the test users are spread over; 0 evaluates in this process (default)")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster for --workers (default $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. eval.finetune_steps=20")


def run(args: argparse.Namespace) -> int:
    """Evaluate; print the table."""
    from piaa_dist.orchestration.usecases import evaluate
    from piaa_dist.presentation import format_table

    result = evaluate(
        data=args.data, model=args.model, giaa=args.giaa, giaa_out=args.giaa_out,
        shots=args.shots, repeats=args.repeats, seed=args.seed, config=args.config,
        overrides=args.overrides, s3_endpoint=args.s3_endpoint, mlflow_uri=args.mlflow_uri,
        mlflow=not args.no_mlflow, json_out=args.json, progress=not args.no_progress,
        workers=args.workers, ray_address=args.ray_address,
    )
    print(format_table(result))
    if result.giaa:
        key = f" (key {result.giaa_key[:12]})" if result.giaa_key else ""
        registered = (f", registered as {result.giaa_model}"
                      if result.giaa_model and result.giaa_model != result.giaa else "")
        print(f"GIAA baseline: {result.giaa}{registered}{key}")
    return 0
