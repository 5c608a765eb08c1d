"""``piaa-dist tune`` (and ``jobs/tune.py``): flags → :func:`piaa_dist.orchestration.usecases.tune` → print."""

from __future__ import annotations

import argparse
import json

HELP = "Ray Tune sweep over inner lr, inner steps, shots and meta lr."

DESCRIPTION = """\
Search the meta-learning hyperparameters with Ray Tune: inner learning rate, inner steps,
shots and meta learning rate (ranges in the config's tune section). Every trial is a Ray Train
meta-training run; ASHA stops weak trials early on the validation SROCC of held-out training
users (never the test users).

Trials are short runs (tune.trial_steps meta-steps) that rank the hyperparameters. The winning
configuration is then trained to the config's full meta.meta_steps (OUT/refit) and that model
is the one kept and registered (--no-refit keeps the winning trial's own short-run model).

Writes OUT/best-model (the meta-learner), OUT/best.yaml (its full config) and OUT/sweep.json
(one row per trial). The sweep, each trial and the refit are logged to MLflow and the model is
registered with its validation SROCC. --alias champion moves the alias to it only if it beats
the version holding it on the same validation users (else it is registered as a challenger,
and one line says why); --force-alias moves it regardless.

example:
  piaa-dist tune --data s3://piaa/world --config jobs/configs/tune-cpu.yaml --samples 4 \\
      --out out/tune --alias champion"""


def add_arguments(parser: argparse.ArgumentParser, *, out_default: str | None = None) -> None:
    """The ``tune`` arguments, shared by ``piaa-dist tune`` and ``jobs/tune.py``.

    Args:
        parser: the parser to add them to.
        out_default: default of ``--out``; None makes ``--out`` required (see ``train``).
    """
    parser.add_argument("--data", default=None, help="dataset root: folder or s3://bucket/prefix")
    parser.add_argument("--config", default=None, help="job config YAML (jobs/configs/NAME.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--samples", type=int, default=None, help="trials (default tune.samples)")
    parser.add_argument("--workers-per-trial", type=int, default=1,
                        help="Ray Train workers per trial (default 1)")
    parser.add_argument("--out", required=out_default is None, default=out_default,
                        help="output folder (best-model/, best.yaml, sweep.json)"
                             + (f" (default {out_default})" if out_default else ""))
    parser.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL")
    parser.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow (nor register)")
    parser.add_argument("--alias", default=None,
                        help="alias to move to the model if it beats the version holding it on "
                             "validation users (e.g. champion)")
    parser.add_argument("--force-alias", action="store_true",
                        help="move --alias to the new version whatever the validation scores")
    refit = parser.add_mutually_exclusive_group()
    refit.add_argument("--refit", dest="refit", action="store_true", default=True,
                       help="train the winning configuration to full length before registering it (default)")
    refit.add_argument("--no-refit", dest="refit", action="store_false",
                       help="register the winning trial's own short-run model")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address")


def run(args: argparse.Namespace) -> int:
    """Run the sweep; print the trials and the summary."""
    from piaa_dist.orchestration.usecases import tune

    outcome = tune(
        data=args.data, out=args.out, config=args.config, overrides=args.overrides,
        samples=args.samples, workers_per_trial=args.workers_per_trial, alias=args.alias,
        force_alias=args.force_alias, refit=args.refit, s3_endpoint=args.s3_endpoint,
        mlflow_uri=args.mlflow_uri, mlflow=not args.no_mlflow, ray_address=args.ray_address,
    )
    print(outcome.trials_table())
    print(json.dumps(outcome.to_dict(trials=False), indent=2))
    # the summary last: which trial won, what the refit reached, where the alias is and why
    print("\n".join(outcome.summary_lines()))
    return 0
