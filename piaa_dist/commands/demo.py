"""``piaa-dist demo`` (and ``jobs/demo.py``): flags → :func:`piaa_dist.orchestration.demo.run_demo` → print."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "Run the whole system end to end on embedded defaults and write a report."

DESCRIPTION = """\
Run the whole system end to end and write OUT/report.md: a local S3 endpoint, a synthetic
world, ingestion into S3, meta-training on a local Ray with 2 Train workers, a short Ray Tune
sweep, the better meta-learner registered in MLflow as champion, meta-testing against the
baselines at 10 and 100 shots, and one test user personalized from 10 ratings. Every process it
starts is stopped at the end. Nothing but Python is needed; every flag has a default.

The README's results block of the run is OUT/readme-results.md; --readme README.md (or
'make readme-results' afterwards) copies it into the README.

examples:
  piaa-dist demo --out demo-out
  piaa-dist demo --out demo-out --data s3://bucket/prefix --s3-endpoint https://minio:9000 \\
      --mlflow-uri http://mlflow:5000 --ray-address auto     # a real endpoint and cluster"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's arguments; every one has an embedded default."""
    from piaa_dist.orchestration.demo import DEFAULT_CONFIG

    parser.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="job config YAML")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--data", default="", help="existing dataset URL: skip synth + ingest")
    parser.add_argument("--s3-endpoint", default="", help="S3 endpoint (default: start a local one)")
    parser.add_argument("--mlflow-uri", default="", help="MLflow URI (default sqlite:///<out>/mlflow.db)")
    parser.add_argument("--ray-address", default="", help="Ray cluster (default: a local Ray)")
    parser.add_argument("--users", type=int, default=80, help="synthetic users (default 80)")
    parser.add_argument("--images", type=int, default=3000, help="synthetic image pool (default 3000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    parser.add_argument("--tune-samples", type=int, default=3, help="Tune trials (0 = no sweep)")
    parser.add_argument("--tune-override", action="append", default=None, metavar="key=value",
                        help="overrides for the sweep's trials only (default: 100-step trials)")
    parser.add_argument("--shots", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--readme", default="",
                        help="README whose results block to replace with this run's "
                             "(default: none; the block is in OUT/readme-results.md)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``piaa-dist demo``."""
    from piaa_dist.orchestration.demo import DemoSettings, run_demo

    summary = run_demo(DemoSettings(
        out=Path(args.out), config=Path(args.config), overrides=tuple(args.overrides),
        data=args.data, s3_endpoint=args.s3_endpoint, mlflow_uri=args.mlflow_uri,
        ray_address=args.ray_address, users=args.users, images=args.images, seed=args.seed,
        workers=args.workers, tune_samples=args.tune_samples,
        **({"tune_overrides": tuple(args.tune_override)} if args.tune_override else {}),
        shots=tuple(args.shots),
        repeats=args.repeats, readme=Path(args.readme) if args.readme else None,
    ))
    print(f"\nDone in {sum(summary['timings'].values()):.0f}s. Report: {summary['report']}")
    if summary.get("readme_block"):
        print(f"README results block: {summary['readme_block']} (make readme-results copies it in)")
    print(json.dumps({k: summary[k] for k in ('registry', 'evaluate', 'mlflow_uri') if k in summary},
                     indent=2, default=str))
    return 0
