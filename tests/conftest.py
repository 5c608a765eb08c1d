"""Shared fixtures: a real local S3 endpoint, fresh buckets, and a tiny synthetic dataset.

* ``s3_endpoint`` (session): moto's S3 server on 127.0.0.1 at a free port, spoken to over
  real HTTP by boto3 (``endpoint_url=...``). Fake credentials and a region are set in
  ``os.environ`` for the session (subprocesses such as Ray workers inherit them) and the
  previous values are restored afterwards, so nothing leaks past the session.
  ``AWS_ENDPOINT_URL`` is *not* set: code under test gets the endpoint explicitly.
* ``s3_bucket``: a new, empty bucket per test.
* ``tiny_world`` (session): a 10-user synthetic world (8 train, 2 test; ~280 ratings).
* ``tiny_dataset_url`` (session): that world ingested to a local folder.
* ``tiny_s3_dataset_url`` (session): that world ingested to the local S3 endpoint.
* ``faulty_proxy``: an HTTP proxy in front of ``s3_endpoint`` that injects transient faults
  (503s, truncated bodies, stalled bodies) into GETs whose path contains ``proxy.match``
  (default "flaky"), can play an endpoint that goes away (``proxy.down``, or by itself after
  ``proxy.fail_puts_after`` PUTs matching ``proxy.put_match``) and comes back, and logs every
  request it sees (``proxy.requests``: method, path, Range header).
"""

from __future__ import annotations

import http.client
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pytest

from piaa_dist.data.synth import WorldSpec

#: The tiny world every data-driven test shares (fast: well under a second to make).
TINY_SPEC = WorldSpec(users=10, images=120, seed=0, test_fraction=0.2, ratings_per_user=(24, 32), image_size=40)

_FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Variables that would make boto3 look elsewhere for credentials or sign differently.
_CLEARED_ENV = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny-tensor tests: fastest, and immune to a busy
    machine's contention; the previous setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a real S3 server (moto, in a thread of this process) on 127.0.0.1."""
    from piaa_dist.s3local import start_local_s3

    saved = {k: os.environ.get(k) for k in (*_FAKE_ENV, *_CLEARED_ENV)}
    os.environ.update(_FAKE_ENV)
    for k in _CLEARED_ENV:
        os.environ.pop(k, None)
    server = start_local_s3(bucket=None, port=0)
    try:
        yield server.endpoint_url
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on ``s3_endpoint`` (its name; 3-63 characters)."""
    from piaa_dist.s3local import create_bucket

    name = f"t-{uuid.uuid4().hex[:16]}"
    create_bucket(s3_endpoint, name)
    return name


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny synthetic world in the FLICKR-AES layout (see ``TINY_SPEC``)."""
    from piaa_dist.data.synth import make_world

    out = tmp_path_factory.mktemp("tiny-world")
    make_world(out, TINY_SPEC)
    return out


@pytest.fixture(scope="session")
def tiny_dataset_url(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny world ingested to a local folder (a URL ``Dataset.open`` accepts)."""
    from piaa_dist.data.ingest import ingest

    out = tmp_path_factory.mktemp("tiny-dataset")
    ingest("flickr-aes", tiny_world, str(out), workers=2)
    return str(out)


@pytest.fixture(scope="session")
def tiny_s3_dataset_url(tiny_world: Path, s3_endpoint: str) -> str:
    """The tiny world ingested to ``s3://<bucket>/tiny`` on the local S3 endpoint."""
    from piaa_dist.data.ingest import ingest
    from piaa_dist.s3local import create_bucket

    bucket = f"tiny-{uuid.uuid4().hex[:12]}"
    create_bucket(s3_endpoint, bucket)
    url = f"s3://{bucket}/tiny"
    ingest("flickr-aes", tiny_world, url, endpoint_url=s3_endpoint, workers=2)
    return url


class FaultyProxy:
    """HTTP proxy to the moto server that injects faults into GETs of matching keys.

    ``faults`` is a list consumed one per matching GET: ``"503"`` answers Service Unavailable,
    ``"truncate"`` sends the real headers but only half the body, then drops the connection,
    ``"stall"`` sends the real headers and then nothing for ``stall_s`` seconds.

    ``down = True`` plays an endpoint that went away: every request's connection is closed
    without an answer until ``down`` is set back to False. ``fail_puts_after = N`` sets
    ``down`` by itself when a PUT whose path contains ``put_match`` arrives after N of them
    went through (an endpoint dying in the middle of an upload).
    """

    def __init__(self, upstream: str, match: str = "flaky"):
        self.upstream = urlparse(upstream)
        self.match = match
        self.faults: list[str] = []
        self.gets = 0
        self.stall_s = 30.0
        self.down = False
        self.fail_puts_after: int | None = None
        self.put_match = "/shards/"
        self.puts = 0
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = None
                with proxy.lock:
                    proxy.requests.append((self.command, self.path, self.headers.get("Range")))
                    if self.command == "PUT" and proxy.put_match in self.path and proxy.fail_puts_after is not None:
                        proxy.puts += 1
                        if proxy.puts > proxy.fail_puts_after:
                            proxy.down = True
                    down = proxy.down
                if down:
                    self.close_connection = True  # no answer: the endpoint is gone
                    return
                if self.command == "GET" and proxy.match in self.path:
                    with proxy.lock:
                        proxy.gets += 1
                        fault = proxy.faults.pop(0) if proxy.faults else None
                if fault == "503":
                    msg = b"<Error><Code>ServiceUnavailable</Code><Message>slow down</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items()}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                if fault == "stall":
                    self.end_headers()
                    self.wfile.flush()
                    time.sleep(proxy.stall_s)  # headers sent, body never comes (within the timeout)
                    self.close_connection = True
                    return
                if fault == "truncate":
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def faulty_proxy(s3_endpoint: str) -> Iterator[FaultyProxy]:
    """A :class:`FaultyProxy` to the local S3 server; use ``proxy.url`` as the endpoint."""
    p = FaultyProxy(s3_endpoint)
    yield p
    p.close()


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray of 2 CPUs for one test module, with Ray Train V2 and quiet workers (the
    Ray Train tests' shared session; modules that need Ray started otherwise define their own)."""
    import logging

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    ray.init(
        num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
        runtime_env={"worker_process_setup_hook": "piaa_dist.orchestration.ray_train.quiet_ray_logs"},
    )
    try:
        yield ray
    finally:
        ray.shutdown()
