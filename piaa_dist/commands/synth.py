"""``piaa-dist synth``: flags → :func:`piaa_dist.orchestration.usecases.synth` → print."""

from __future__ import annotations

import argparse

HELP = "Write a synthetic PIAA world in the FLICKR-AES layout."

DESCRIPTION = """\
Write a synthetic personalized-aesthetics world in the FLICKR-AES layout: rendered images,
one rating per (user, image) with each user's own taste and noise, the test-user list, and
sidecar files with every user's noise-free scores (so evaluate can report how far from perfect
a model is). Ingest it like the real dataset: piaa-dist ingest --format flickr-aes --root OUT.

example:
  piaa-dist synth --out world --users 80 --images 3000"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``synth`` arguments (defaults from :class:`piaa_dist.data.synth.WorldSpec`)."""
    from piaa_dist.data.synth import WorldSpec

    d = WorldSpec()
    parser.add_argument("--out", required=True, help="destination folder")
    parser.add_argument("--users", type=int, default=d.users, help=f"users, train + test (default {d.users})")
    parser.add_argument("--images", type=int, default=d.images, help=f"image pool size (default {d.images})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    parser.add_argument("--test-fraction", type=float, default=d.test_fraction,
                        help=f"share of users that are test users (default {d.test_fraction})")
    parser.add_argument("--ratings", type=int, nargs=2, metavar=("MIN", "MAX"), default=list(d.ratings_per_user),
                        help=f"ratings per user, inclusive range (default {d.ratings_per_user[0]} {d.ratings_per_user[1]})")
    parser.add_argument("--image-size", type=int, default=d.image_size,
                        help=f"rendered image side in pixels (default {d.image_size})")


def run(args: argparse.Namespace) -> int:
    """Write the world; print its size and ceilings."""
    from piaa_dist.orchestration.usecases import synth

    summary = synth(out=args.out, users=args.users, images=args.images, seed=args.seed,
                    test_fraction=args.test_fraction, ratings_per_user=tuple(args.ratings),
                    image_size=args.image_size, progress=True)
    print(f"synthetic world in {summary.out}: {summary.users} users ({summary.train_users} train, "
          f"{summary.test_users} test), {summary.images} images, {summary.ratings} ratings")
    print(f"{'ceiling (SROCC vs observed ratings)':38s}{'oracle':>8s}{'average user':>14s}")
    for split in ("train", "test", "all"):
        c = summary.ceilings[split]
        print(f"{split + ' users':38s}{c['oracle']:>8.3f}{c['average_user']:>14.3f}")
    print("oracle = each user's noise-free score; average user = the population-average noise-free score")
    return 0
