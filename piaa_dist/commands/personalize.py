"""``piaa-dist personalize`` (and ``jobs/personalize.py``).

Flags → :func:`piaa_dist.orchestration.usecases.personalize` → print.
"""

from __future__ import annotations

import argparse

HELP = "Adapt a registered meta-learner to one person's ratings and rank new images."

DESCRIPTION = """\
Adapt a meta-learner to one person from their ratings (a CSV of image,score rows: 10 or more
ratings, on 1-5 or the scale --score-range names) and rank new images (--score) the way they
would. Writes the ranking as CSV (rank,image,predicted_score, scores on the person's own scale)
and prints the top five. An image to score that does not decode is skipped and named; the
others are still ranked.

--model takes a model folder, the folder 'piaa-dist train --out' or 'piaa-dist tune --out'
wrote, or a registry reference such as models:/blg-piaa@champion.

example:
  piaa-dist personalize --model models:/blg-piaa@champion --ratings me.csv --images photos/ \\
      --score new_photos/ --out ranking.csv"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``personalize`` arguments, shared by ``piaa-dist personalize`` and ``jobs/personalize.py``."""
    parser.add_argument("--model", required=True,
                        help="model folder, train/tune --out folder, models:/NAME@ALIAS or models:/NAME/VERSION")
    from piaa_dist.personalize import RATINGS_FORMAT_HELP

    parser.add_argument("--ratings", required=True, help=RATINGS_FORMAT_HELP)
    parser.add_argument("--images", default=None,
                        help="folder holding the rated images (default: paths relative to the CSV's folder)")
    parser.add_argument("--score-range", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                        help="the person's rating scale (default 1 5); predictions come back on it")
    parser.add_argument("--score", required=True, nargs="+",
                        help="folder(s) or image files to score")
    parser.add_argument("--out", required=True, help="output CSV: rank,image,predicted_score")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI for models:/ references")
    parser.add_argument("--seed", type=int, default=0, help="fine-tuning seed")
    parser.add_argument("--use-gpu", choices=("auto", "yes", "no"), default=None,
                        help="fine-tune and score on a GPU (default: the model's run.use_gpu; "
                             "'yes' fails when no GPU is usable)")


def run(args: argparse.Namespace) -> int:
    """Personalize; print the top of the ranking."""
    from piaa_dist.orchestration.usecases import personalize

    ranking = personalize(model=args.model, ratings=args.ratings, images=args.images,
                          score=args.score, out=args.out, mlflow_uri=args.mlflow_uri, seed=args.seed,
                          score_range=args.score_range, use_gpu=args.use_gpu)
    print(f"ranked {len(ranking)} images for this person -> {ranking.out}")
    print(f"fine-tuning: {ranking.finetune}")
    if ranking.unreadable:
        print(f"skipped {len(ranking.unreadable)} image(s) that do not decode, e.g. {ranking.unreadable[0][0]}")
    for i, (path, score) in enumerate(ranking.top(5), start=1):
        print(f"  {i}. {path.name}  {score:.2f}")
    return 0
