"""``piaa-dist verify URL``: read every user of the published version and check it."""

from __future__ import annotations

import argparse

HELP = "Check every user of a dataset's published version (counts, checksums); one-line summary."

DESCRIPTION = """\
Read every user of a dataset's published version (or --version) and check the manifest's
counts and every shard range's checksum: the check to run after an incident. Prints one line
(users, ratings, bytes, version) and exits 0, or exits 2 naming the first inconsistency.

example:
  piaa-dist verify s3://my-bucket/flickr-aes"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="dataset URL: a local folder or s3://bucket/prefix")
    parser.add_argument("--version", help="check this version instead of the published one")
    parser.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL, then AWS)")
    parser.add_argument("--workers", type=int, default=4, help="shards read in parallel (default 4)")


def run(args: argparse.Namespace) -> int:
    """Verify; print the one-line summary."""
    from piaa_dist.orchestration.usecases import verify

    s = verify(args.url, s3_endpoint=args.s3_endpoint, version=args.version, workers=args.workers)
    print(f"ok: {s['users']} users, {s['ratings']} ratings, {s['bytes']} bytes in {s['shards']} shards, "
          f"version {s['version']} ({s['url']})")
    return 0
