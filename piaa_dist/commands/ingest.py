"""``piaa-dist ingest``: dataset files to per-user WebDataset shards + a Parquet manifest."""

from __future__ import annotations

import argparse
import os

HELP = "Ingest FLICKR-AES / AADB into per-user WebDataset shards + a Parquet manifest."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from piaa_dist.data.ingest import DEFAULT_MAX_SIDE, DEFAULT_QUALITY, DEFAULT_SHARD_SIZE

    parser.add_argument("--format", required=True, choices=["flickr-aes", "aadb"], help="input layout")
    parser.add_argument("--root", required=True, help="dataset folder")
    parser.add_argument("--out", required=True, help="output: a local folder or s3://bucket/prefix")
    parser.add_argument("--test-workers", help="test-worker list: the published 'ID' CSV or one ID per line "
                        "(default: ROOT/test_workers.csv for flickr-aes if present; else all users train)")
    parser.add_argument("--ratings", help="ratings file (default: the published name under ROOT)")
    parser.add_argument("--images", help="image folder (default: ROOT/images or the published folder name, else ROOT)")
    parser.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL, then AWS)")
    parser.add_argument("--strict", action="store_true", help="fail on the first skipped record (names file and row)")
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                        help=f"longest side of stored images (default {DEFAULT_MAX_SIDE})")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help=f"JPEG quality (default {DEFAULT_QUALITY})")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"samples per shard at most (default {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads for image work and uploads")


def run(args: argparse.Namespace) -> int:
    from piaa_dist.data.ingest import REPORT, format_report, ingest

    report = ingest(
        args.format,
        args.root,
        args.out,
        test_workers=args.test_workers,
        ratings_file=args.ratings,
        images_dir=args.images,
        endpoint_url=args.s3_endpoint,
        strict=args.strict,
        max_side=args.max_side,
        quality=args.quality,
        shard_size=args.shard_size,
        workers=args.workers,
        progress=True,
    )
    print(format_report(report))
    print(f"report saved as {report['out'].rstrip('/')}/{REPORT}")
    return 0
