"""A real local S3 endpoint without Docker: moto's server mode on 127.0.0.1.

Used by ``piaa-dist s3-local``, the demo, the tests and the benchmarks. It speaks the S3 HTTP
API, so boto3 talks to it exactly as to AWS (``endpoint_url=...``); nothing is mocked in the
client. State lives in memory and vanishes when the server stops.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: Credentials moto accepts (any value works; these are the conventional ones).
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class LocalS3:
    """A running local S3 server. Use as a context manager or call :meth:`stop`."""

    endpoint_url: str
    bucket: str | None
    _server: Any

    def stop(self) -> None:
        """Shut the server down (its buckets and objects are gone)."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> "LocalS3":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_fake_credentials() -> None:
    """Set moto's fake credentials in this process's environment where none are set."""
    for key, value in FAKE_CREDENTIALS.items():
        os.environ.setdefault(key, value)


def create_bucket(endpoint_url: str, bucket: str) -> None:
    """Create ``bucket`` on the endpoint (no error if it exists)."""
    import boto3

    if not 3 <= len(bucket) <= 63:
        raise ValueError(f"S3 bucket names need 3-63 characters, got {bucket!r}")
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"]),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]),
    )
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


def start_local_s3(
    bucket: str | None = "piaa", port: int = 0, host: str = "127.0.0.1", *, quiet: bool = True
) -> LocalS3:
    """Start moto's threaded S3 server and (optionally) create a bucket.

    Args:
        bucket: bucket to create; ``None`` creates none.
        port: TCP port; 0 picks a free one.
        host: interface to bind (loopback by default: nothing outside this machine can reach it).
        quiet: silence the per-request access log of the server (werkzeug's logger).

    Returns:
        The running server; ``.endpoint_url`` is e.g. ``http://127.0.0.1:54321``.
    """
    from moto.server import ThreadedMotoServer

    if quiet:
        # One log line per HTTP request drowns everything else during ingestion.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    actual_host, actual_port = server.get_host_and_port()
    endpoint = f"http://{actual_host}:{actual_port}"
    try:
        if bucket:
            create_bucket(endpoint, bucket)
    except Exception:
        server.stop()
        raise
    log.info("local S3 endpoint at %s%s", endpoint, f" with bucket {bucket}" if bucket else "")
    return LocalS3(endpoint, bucket, server)
