"""``piaa-dist personalize``: adapt a meta-learner to one person's ratings, rank new images.

    piaa-dist personalize --model models:/blg-piaa@champion --ratings me.csv --images photos/ \
        --score new_photos/ --out ranking.csv
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)

HELP = "Adapt a registered meta-learner to one person's ratings and rank new images."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``personalize`` subcommand's arguments."""
    parser.add_argument("--model", required=True,
                        help="model folder, models:/NAME@ALIAS or models:/NAME/VERSION")
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
    """Entry point of ``piaa-dist personalize``."""
    from piaa_dist.orchestration.tracking import load_model_uri
    from piaa_dist.personalize import list_images, personalize, read_ratings, write_ranking

    model, cfg, info = load_model_uri(args.model, uri=args.mlflow_uri or "")
    ratings = read_ratings(args.ratings, args.images)
    targets = list_images(args.score)
    log.info("adapting %s to %d ratings (skipped %s); scoring %d images",
             args.model, len(ratings.images), ratings.skipped or "none", len(targets))
    ranked = personalize(model, cfg, ratings, targets, seed=args.seed)
    out = write_ranking(ranked, args.out)
    print(f"ranked {len(ranked)} images for this person -> {out}")
    for i, (path, score) in enumerate(ranked[:5], start=1):
        print(f"  {i}. {path.name}  {score:.2f}")
    return 0
