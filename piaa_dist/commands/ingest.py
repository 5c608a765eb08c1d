"""``piaa-dist ingest``: rating files + images to a new, atomically published dataset version."""

from __future__ import annotations

import argparse

HELP = "Ingest FLICKR-AES / AADB / PARA / a ratings log into a new, atomically published dataset version."

DESCRIPTION = """\
Turn rating files and images into a dataset piaa-dist trains on: per-user samples packed into
WebDataset shards, a Parquet manifest and an ingest report, written as a new version and
published in one final write (readers of the old version keep working; old versions are removed
only by 'piaa-dist datasets --prune'). Every rating is ingested or counted under a skip reason;
--strict turns the first skip into an error naming the file and row.

examples:
  piaa-dist ingest --format flickr-aes --root /data/FLICKR-AES --out s3://my-bucket/flickr-aes
  piaa-dist ingest --format ratings --ratings log.parquet --images s3://photos/ --score-range 1 10 \\
      --test-fraction 0.1 --out s3://my-bucket/product
  piaa-dist ingest --format ratings --ratings log.csv --images photos/ --out s3://my-bucket/big \\
      --workers 8 --ray-address auto      # users partitioned over 8 Ray workers"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from piaa_dist.data.images import DEFAULT_MAX_PIXELS
    from piaa_dist.data.ingest import DEFAULT_IMAGE_CACHE_MB, DEFAULT_MAX_SIDE, DEFAULT_QUALITY, DEFAULT_SHARD_SIZE
    from piaa_dist.data.readers import READERS

    formats = ", ".join(f"{name}: {spec.help}" for name, spec in READERS.items())
    parser.add_argument("--format", required=True, choices=list(READERS), help=f"input layout ({formats})")
    parser.add_argument("--root", help="dataset folder (flickr-aes, aadb, para)")
    parser.add_argument("--out", required=True, help="dataset URL: a local folder or s3://bucket/prefix")
    parser.add_argument("--ratings", help="ratings file (ratings: a CSV or Parquet log with user,image,score"
                        "[,split]; others: default is the published name under ROOT)")
    parser.add_argument("--images", help="image folder or s3://bucket/prefix that image paths are relative to "
                        "(default: the published folder under ROOT)")
    parser.add_argument("--test-workers", "--test-users", dest="test_users",
                        help="test-user list: the published 'ID' CSV or one ID per line "
                             "(flickr-aes default: ROOT/test_workers.csv if present)")
    parser.add_argument("--test-fraction", type=float,
                        help="choose this fraction of users as test users, by a seeded hash of the user ID")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of --test-fraction (default 0)")
    parser.add_argument("--fold", type=int, help="para: test users from userset/TestUserIDs_Fold<FOLD>.txt")
    parser.add_argument("--score-range", type=float, nargs=2, metavar=("LO", "HI"),
                        help="ratings, para: the file's score scale, mapped onto 1-5 (default 1 5); "
                             "scores outside it are skipped as bad scores")
    parser.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL, then AWS)")
    parser.add_argument("--strict", action="store_true", help="fail on the first skipped record (names file and row)")
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                        help=f"longest side of stored images (default {DEFAULT_MAX_SIDE})")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY,
                        help=f"JPEG quality (default {DEFAULT_QUALITY})")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help=f"target samples per shard, whole users packed together (default {DEFAULT_SHARD_SIZE})")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"skip input images with more pixels than this (default {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--image-cache-mb", type=float, default=DEFAULT_IMAGE_CACHE_MB,
                        help=f"re-encoded images kept so shared images are decoded once (default "
                             f"{DEFAULT_IMAGE_CACHE_MB} MB)")
    parser.add_argument("--encode-store-dir", default=None,
                        help="folder for the encoded-image store, which keeps each re-encoded image on disk for "
                             "the length of the ingest so that an image is encoded once, not once per rater "
                             "(a subfolder per ingest, removed at the end; about the distinct images' encoded "
                             "size; default: the temp folder, $TMPDIR)")
    parser.add_argument("--no-encode-store", dest="encode_store", action="store_false",
                        help="no encoded-image store: images shared by raters are re-encoded once they have left "
                             "the in-memory cache (same output bytes, more CPU on large image pools)")
    parser.add_argument("--workers", type=int, default=0,
                        help="Ray workers (1 CPU each) that write the shards, as for train and evaluate; "
                             "0 ingests in this process (default 0). The output is the same bytes either way")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per worker for image work and uploads (default 2 per Ray worker, "
                             "min(8, CPUs) in this process)")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster for --workers (default $RAY_ADDRESS, else a local Ray)")


def run(args: argparse.Namespace) -> int:
    """Ingest; print the report and where the new version is published."""
    from piaa_dist.data.ingest import format_report
    from piaa_dist.orchestration.usecases import ingest

    report = ingest(
        format=args.format, root=args.root, out=args.out, ratings_file=args.ratings,
        images_dir=args.images, test_users=args.test_users, test_fraction=args.test_fraction,
        score_range=args.score_range, s3_endpoint=args.s3_endpoint, strict=args.strict,
        progress=True, split_seed=args.split_seed, fold=args.fold, max_side=args.max_side,
        quality=args.quality, shard_size=args.shard_size, max_pixels=args.max_pixels,
        image_cache_mb=args.image_cache_mb, workers=args.workers, threads=args.threads,
        ray_address=args.ray_address, encode_store=args.encode_store, encode_store_dir=args.encode_store_dir,
    )
    print(format_report(report))
    print(f"published version {report['dataset_version']} at {report['out']}")
    print(f"report saved as {report['report_url']}")
    return 0
