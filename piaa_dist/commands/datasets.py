"""``piaa-dist datasets URL``: list a dataset's versions; remove old ones on request."""

from __future__ import annotations

import argparse

HELP = "List a dataset's versions (the published one marked); remove old ones explicitly."


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
    from datetime import datetime, timedelta, timezone

    from piaa_dist.data.layout import list_versions, remove_version
    from piaa_dist.errors import UserError
    from piaa_dist.storage import open_store

    store = open_store(args.url, args.s3_endpoint)
    versions = list_versions(store)
    doomed = list(args.remove)
    if args.prune:
        cutoff = datetime.now(timezone.utc) - timedelta(hours=args.grace_hours)
        others = [v for v in versions if not v.current]
        complete = [v for v in others if v.complete]
        keep = {v.version for v in complete[len(complete) - args.keep:]} if args.keep > 0 else set()
        for v in others:
            if v.version in keep:
                continue
            if not v.complete and (v.created is None or v.created > cutoff):
                continue
            doomed.append(v.version)
    if not versions and not doomed:
        raise UserError(f"no dataset versions at {store.url}")
    for version in dict.fromkeys(doomed):
        n = remove_version(store, version)
        print(f"removed {version} ({n} objects)")
    if doomed:
        versions = list_versions(store)
    print(f"{store.url}: {len(versions)} version(s)")
    print(_table(versions))
    return 0
