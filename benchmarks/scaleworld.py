"""Scale-world generation: time and peak memory for 10k, 100k and 1M users.

Run: ``python benchmarks/scaleworld.py [--users 10000 100000 1000000 --images 20000 --format csv]``.
Prints a table and writes ``benchmarks/results/scaleworld.json``. Each size runs in a fresh
child process (peak memory is that child's VmHWM, imports included). Writes the ratings log
and its truth sidecar only: the images are a shared pool whose size does not grow with the
users, so rendering it is measured once, separately (``--render``), not per size. The
world is written to a temporary folder and deleted afterwards.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import in_child, machine, save, table  # noqa: E402


def run_world(out: str, users: int, images: int, fmt: str, layout: str, render: bool) -> dict:
    logging.disable(logging.INFO)
    from piaa_dist.data.scaleworld import ScaleSpec, write_scale_world

    t0 = time.perf_counter()
    summary = write_scale_world(out, ScaleSpec(users=users, images=images, format=fmt, layout=layout),
                                images=render, workers=4)
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    return {
        "users": users,
        "images": images,
        "ratings": summary.ratings,
        "seconds": seconds,
        "population_s": summary.seconds.get("population", float("nan")),
        "ratings_s": summary.seconds.get("ratings", float("nan")),
        "images_s": summary.seconds.get("images", float("nan")),
        "rows_per_s": summary.ratings / max(summary.seconds["ratings"], 1e-9),
        "output_mb": size / 2**20,
        "mean_ratings": summary.ratings_per_user["mean"],
        "max_ratings": summary.ratings_per_user["max"],
        "oracle": summary.ceilings["all"]["oracle"],
        "average_user": summary.ceilings["all"]["average_user"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--images", type=int, default=20_000, help="image pool size (default 20000)")
    p.add_argument("--format", choices=["csv", "parquet"], default="csv")
    p.add_argument("--layout", choices=["ratings", "flickr-aes"], default="ratings")
    p.add_argument("--render", action="store_true", help="also time rendering the pool once (32 px)")
    args = p.parse_args()

    rows = []
    for users in args.users:
        with tempfile.TemporaryDirectory(prefix="scaleworld-") as tmp:
            row = in_child(run_world, out=tmp, users=users, images=args.images, fmt=args.format,
                           layout=args.layout, render=False)
        rows.append(row)
        print(f"{users:>9,} users: {row['seconds']:.1f} s, {row['peak_rss_mb']:.0f} MB peak", flush=True)
    if args.render:
        with tempfile.TemporaryDirectory(prefix="scaleworld-") as tmp:
            row = in_child(run_world, out=tmp, users=2, images=args.images, fmt=args.format,
                           layout=args.layout, render=True)
        rows.append({**row, "users": 0})  # 0 users: the pool alone
    cols = [
        ("users", "users", ","),
        ("ratings", "ratings", ","),
        ("seconds", "total s", ".1f"),
        ("population_s", "pass 1 s", ".1f"),
        ("ratings_s", "pass 2 s", ".1f"),
        ("images_s", "render s", ".1f"),
        ("rows_per_s", "rows/s", ",.0f"),
        ("peak_rss_mb", "peak RSS MB", ".0f"),
        ("output_mb", "output MB", ".0f"),
        ("mean_ratings", "mean/user", ".1f"),
        ("max_ratings", "max/user", "d"),
    ]
    print(f"\nscale world, layout {args.layout}, {args.format}, pool of {args.images:,} images "
          f"(users 0 = rendering the pool alone)")
    print(table(rows, cols))
    path = save("scaleworld", {"machine": machine(), "args": vars(args), "rows": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
