"""``piaa-dist s3-local``: run a local S3 endpoint (moto server) until Ctrl-C."""

from __future__ import annotations

import argparse
import threading

HELP = "Start a local S3 endpoint (moto server) for the embedded defaults."

DESCRIPTION = """\
Run an S3 endpoint on 127.0.0.1 (moto's server, in memory) until Ctrl-C, and print the
environment variables that point piaa-dist and boto3 at it. For trying the S3 path of ingest,
train and evaluate without a bucket; the data is lost when it stops.

example:
  piaa-dist s3-local --port 9000 --bucket piaa"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``s3-local`` arguments."""
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--bucket", default="piaa", help="bucket to create (default: piaa)")


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C."""
    from piaa_dist.s3local import FAKE_CREDENTIALS, ensure_fake_credentials, start_local_s3

    ensure_fake_credentials()
    s3 = start_local_s3(bucket=args.bucket, port=args.port)
    creds = " ".join(f"{k}={v}" for k, v in FAKE_CREDENTIALS.items())
    print(f"Local S3 endpoint running at {s3.endpoint_url} with bucket '{args.bucket}' (in memory).")
    print("Point boto3 and piaa-dist at it from another shell:")
    print(f"  export AWS_ENDPOINT_URL={s3.endpoint_url} {creds}")
    print("Then, for example:")
    print("  piaa-dist synth --out world")
    print(f"  piaa-dist ingest --format flickr-aes --root world --out s3://{args.bucket}/world")
    print("Press Ctrl-C to stop (the data is lost when the server stops).", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        s3.stop()
        print("stopped")
    return 0
