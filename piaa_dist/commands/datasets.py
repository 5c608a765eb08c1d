"""``piaa-dist datasets URL``: list a dataset's versions; remove old ones on request."""

from __future__ import annotations

import argparse

HELP = "List a dataset's versions (the published one marked); remove old ones explicitly."

DESCRIPTION = """\
List the versions of a dataset (each ingest writes a new one and publishes it atomically) with
their status, size and age. Old versions are never removed silently: --remove names them,
--prune removes every version except the published one and the --keep newest others
(incomplete versions younger than --grace-hours are left alone: an ingest may be writing them).

examples:
  piaa-dist datasets s3://my-bucket/flickr-aes
  piaa-dist datasets s3://my-bucket/flickr-aes --prune --keep 1"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="dataset URL: a local folder or s3://bucket/prefix")
    parser.add_argument("--remove", nargs="+", metavar="VERSION", default=[],
                        help="remove these versions (never the published one)")
    parser.add_argument("--prune", action="store_true",
                        help="remove every version except the published one and the --keep newest others")
    parser.add_argument("--keep", type=int, default=0, help="with --prune: other complete versions to keep (default 0)")
    parser.add_argument("--grace-hours", type=float, default=24.0,
                        help="with --prune: keep incomplete versions younger than this, they may be an ingest "
                             "still running (default 24)")
    parser.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL, then AWS)")


def _table(versions) -> str:
    rows = [("version", "status", "users", "ratings", "MB", "created")]
    for v in versions:
        status = "published" if v.current else ("complete" if v.complete else "incomplete")
        rows.append((v.version, status, "-" if v.users is None else str(v.users),
                     "-" if v.ratings is None else str(v.ratings),
                     "-" if v.bytes is None else f"{v.bytes / 1e6:.1f}",
                     v.created.strftime("%Y-%m-%d %H:%M:%S") if v.created else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def run(args: argparse.Namespace) -> int:
    """List (and clean up); print what was removed and the versions left."""
    from piaa_dist.orchestration.usecases import dataset_versions

    result = dataset_versions(args.url, remove=args.remove, prune=args.prune, keep=args.keep,
                              grace_hours=args.grace_hours, s3_endpoint=args.s3_endpoint)
    for version, n in result.removed.items():
        print(f"removed {version} ({n} objects)")
    print(f"{result.url}: {len(result.versions)} version(s)")
    print(_table(result.versions))
    return 0
