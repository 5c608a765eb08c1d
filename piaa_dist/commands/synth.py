"""``piaa-dist synth``: write a synthetic PIAA world in the FLICKR-AES layout."""

from __future__ import annotations

import argparse

HELP = "Write a synthetic PIAA world in the FLICKR-AES layout."


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    from tqdm import tqdm

    from piaa_dist.data.synth import WorldSpec, make_world

    try:
        spec = WorldSpec(users=args.users, images=args.images, seed=args.seed, test_fraction=args.test_fraction,
                         ratings_per_user=tuple(args.ratings), image_size=args.image_size)
    except ValueError as err:
        from piaa_dist.errors import UserError

        raise UserError(f"synth: {err}") from None
    summary = make_world(args.out, spec, progress=lambda it: tqdm(it, total=spec.images, desc="render", unit="img"))
    print(f"synthetic world in {summary.out}: {summary.users} users ({summary.train_users} train, "
          f"{summary.test_users} test), {summary.images} images, {summary.ratings} ratings")
    print(f"{'ceiling (SROCC vs observed ratings)':38s}{'oracle':>8s}{'average user':>14s}")
    for split in ("train", "test", "all"):
        c = summary.ceilings[split]
        print(f"{split + ' users':38s}{c['oracle']:>8.3f}{c['average_user']:>14.3f}")
    print("oracle = each user's noise-free score; average user = the population-average noise-free score")
    return 0
