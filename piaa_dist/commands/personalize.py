"""``piaa-dist personalize`` (and ``jobs/personalize.py``): flags → :func:`piaa_dist.orchestration.usecases.personalize` → print."""

from __future__ import annotations

import argparse

HELP = "Adapt a registered meta-learner to one person's ratings and rank new images."

DESCRIPTION = """\
Adapt a meta-learner to one person from their ratings (a CSV of image,score rows: 10 or more
ratings on a 1-5 scale, images in --images) and rank new images (--score) the way they would.
Writes the ranking as CSV (rank,image,predicted_score) and prints the top five.

--model takes a model folder, the folder 'piaa-dist train --out' or 'piaa-dist tune --out'
wrote, or a registry reference such as models:/blg-piaa@champion.

example:
  piaa-dist personalize --model models:/blg-piaa@champion --ratings me.csv --images photos/ \\
      --score new_photos/ --out ranking.csv"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``personalize`` arguments, shared by ``piaa-dist personalize`` and ``jobs/personalize.py``."""
    parser.add_argument("--model", required=True,
                        help="model folder, train/tune --out folder, models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("--ratings", required=True,
                        help="CSV with image,score columns (10 or more ratings, scores 1-5)")
    parser.add_argument("--images", required=True, help="folder holding the rated images")
    parser.add_argument("--score", required=True, nargs="+",
                        help="folder(s) or image files to score")
    parser.add_argument("--out", required=True, help="output CSV: rank,image,predicted_score")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI for models:/ references")
    parser.add_argument("--seed", type=int, default=0, help="fine-tuning seed")


def run(args: argparse.Namespace) -> int:
    """Personalize; print the top of the ranking."""
    from piaa_dist.orchestration.usecases import personalize

    ranking = personalize(model=args.model, ratings=args.ratings, images=args.images,
                          score=args.score, out=args.out, mlflow_uri=args.mlflow_uri, seed=args.seed)
    print(f"ranked {len(ranking)} images for this person -> {ranking.out}")
    for i, (path, score) in enumerate(ranking.top(5), start=1):
        print(f"  {i}. {path.name}  {score:.2f}")
    return 0
