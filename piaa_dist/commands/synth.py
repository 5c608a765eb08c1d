"""``piaa-dist synth``: write a synthetic PIAA world.

    piaa-dist synth --out world                       # the small world, FLICKR-AES layout
    piaa-dist synth --out big --scale --users 1000000 --images 20000          # a ratings log
    piaa-dist synth --out big --scale --layout flickr-aes --users 100000      # FLICKR-AES at scale
    piaa-dist synth --out big --scale --format parquet --score-range 0 100 --no-images

Without ``--scale``: :func:`piaa_dist.data.synth.make_world` (every user rates 150-250
images). With ``--scale``: :func:`piaa_dist.data.scaleworld.write_scale_world`, users with a
long tail of ratings over a shared pool of small images, streamed in bounded memory.
"""

from __future__ import annotations

import argparse
import math

HELP = "Write a synthetic PIAA world (FLICKR-AES layout, or a ratings log at any scale)."

DESCRIPTION = """\
Write a synthetic personalized-aesthetics world: rendered images, one rating per (user, image)
with each user's own taste, scale use and noise, the test-user list, and a truth sidecar with
every rating's noise-free scores (so evaluate can report how far from perfect a model is).

Without --scale: the FLICKR-AES layout (every user rates 150-250 images); ingest it like the
real dataset with 'piaa-dist ingest --format flickr-aes --root OUT'. With --scale: users with a
long tail of ratings over a shared pool of small images, up to millions of users, streamed in
bounded memory, as a ratings log ('piaa-dist ingest --format ratings') or the FLICKR-AES layout.

examples:
  piaa-dist synth --out world --users 80 --images 3000
  piaa-dist synth --out big --scale --users 1000000 --images 20000 --no-images"""

# Options that only mean something for a scale world (flag -> argparse dest).
_SCALE_ONLY = {"--layout": "layout", "--format": "format", "--score-range": "score_range",
               "--ratings-median": "ratings_median", "--ratings-sigma": "ratings_sigma",
               "--no-images": "no_images", "--block-users": "block_users"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``synth`` subcommand's arguments (defaults depend on ``--scale``)."""
    from piaa_dist.data.scaleworld import FORMATS, LAYOUTS, ScaleSpec
    from piaa_dist.data.synth import WorldSpec

    d, s = WorldSpec(), ScaleSpec()
    parser.add_argument("--out", required=True, help="destination folder")
    parser.add_argument("--scale", action="store_true",
                        help="a scale world: a long tail of ratings per user over a shared image pool, "
                             "up to millions of users, streamed in bounded memory")
    parser.add_argument("--users", type=int, default=None,
                        help=f"users, train + test (default {d.users}; --scale: {s.users})")
    parser.add_argument("--images", type=int, default=None,
                        help=f"image pool size (default {d.images}; --scale: {s.images})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--test-fraction", type=float, default=None,
                        help=f"share of users that are test users (default {d.test_fraction}; "
                             f"--scale: {s.test_fraction}, 0 = no split column)")
    parser.add_argument("--ratings", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                        help=f"ratings per user: uniform range (default {d.ratings_per_user[0]} "
                             f"{d.ratings_per_user[1]}); --scale: bounds of the long tail "
                             f"(default {s.ratings_min} {s.max_ratings}, at most the pool size)")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"rendered image side in pixels (default {d.image_size}; --scale: {s.image_size})")
    scale = parser.add_argument_group("scale worlds (--scale)")
    scale.add_argument("--layout", choices=LAYOUTS, default=None,
                       help=f"files to write (default {s.layout}): a ratings log "
                            "(user,image,score[,split]) or the FLICKR-AES layout")
    scale.add_argument("--format", choices=FORMATS, default=None,
                       help=f"ratings-log file format (default {s.format})")
    scale.add_argument("--score-range", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                       help=f"ratings-log score scale, inclusive (default {s.scale[0]} {s.scale[1]}; "
                            "flickr-aes: 1 5)")
    scale.add_argument("--ratings-median", type=float, default=None,
                       help=f"median ratings per user (default {s.ratings_median})")
    scale.add_argument("--ratings-sigma", type=float, default=None,
                       help=f"log-sd of ratings per user, the tail's length (default {s.ratings_sigma})")
    scale.add_argument("--block-users", type=int, default=None,
                       help=f"users generated and written at a time (default {s.block_users}; "
                            "part of the world's identity: changing it changes the draws)")
    scale.add_argument("--no-images", action="store_true",
                       help="write ratings and truth only (no image pool)")


def run(args: argparse.Namespace) -> int:
    """Write the world; print its counts and ceilings."""
    from piaa_dist.errors import UserError

    if not args.scale:
        given = [flag for flag, dest in _SCALE_ONLY.items() if getattr(args, dest) not in (None, False)]
        if given:
            raise UserError(f"synth: {', '.join(given)} only apply to a scale world: add --scale")
    try:
        return _scale(args) if args.scale else _small(args)
    except ValueError as err:  # the specs reject bad sizes with ValueError
        raise UserError(f"synth: {err}") from None


def _given(args: argparse.Namespace, **fields: str) -> dict:
    """Spec fields from the flags that were given (``field=dest``)."""
    return {name: getattr(args, dest) for name, dest in fields.items() if getattr(args, dest) is not None}


def _small(args: argparse.Namespace) -> int:
    from piaa_dist.orchestration.usecases import synth

    summary = synth(out=args.out, users=args.users, images=args.images, seed=args.seed,
                    test_fraction=args.test_fraction,
                    ratings_per_user=tuple(args.ratings) if args.ratings is not None else None,
                    image_size=args.image_size, progress=True)
    print(f"synthetic world in {summary.out}: {summary.users} users ({summary.train_users} train, "
          f"{summary.test_users} test), {summary.images} images, {summary.ratings} ratings")
    _print_ceilings(summary.ceilings)
    return 0


def _scale(args: argparse.Namespace) -> int:
    from piaa_dist.orchestration.usecases import scale_world

    kw = _given(args, users="users", images="images", test_fraction="test_fraction", image_size="image_size",
                layout="layout", format="format", ratings_median="ratings_median",
                ratings_sigma="ratings_sigma", block_users="block_users")
    if args.ratings is not None:
        kw["ratings_min"], kw["ratings_max"] = args.ratings
    if args.score_range is not None:
        kw["score_range"] = tuple(args.score_range)
    summary = scale_world(out=args.out, seed=args.seed, render_images=not args.no_images, progress=True, **kw)
    dist = summary.ratings_per_user
    print(f"scale world ({summary.layout}) in {summary.out}: {summary.users:,} users ({summary.train_users:,} "
          f"train, {summary.test_users:,} test), {summary.images:,} images, {summary.ratings:,} ratings "
          f"on {summary.score_range[0]}-{summary.score_range[1]}")
    print(f"files: {summary.ratings_file}, {summary.sidecar_file} (truth, row-aligned), world.json")
    print(f"ratings per user: min {dist['min']}, median {dist['median']}, mean {dist['mean']:.1f}, "
          f"p90 {dist['p90']}, p99 {dist['p99']}, max {dist['max']}")
    print("  " + "  ".join(f"{k}: {v:,}" for k, v in dist["histogram"].items()))
    _print_ceilings(summary.ceilings)
    print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary.seconds.items()))
    return 0


def _print_ceilings(ceilings: dict) -> None:
    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) and not math.isnan(v) else "-"

    print(f"{'ceiling (SROCC vs observed ratings)':38s}{'oracle':>8s}{'average user':>14s}")
    for split in ("train", "test", "all"):
        c = ceilings[split]
        print(f"{split + ' users':38s}{cell(c['oracle']):>8s}{cell(c['average_user']):>14s}")
    print("oracle = each user's noise-free score; average user = the population-average noise-free score")
