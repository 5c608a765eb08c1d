"""Store: local folders and S3 over real HTTP (moto server), including retries of transient faults.

Transient faults are injected by a small HTTP proxy between boto3 and the moto server that
answers some GETs with 503 or cuts a response body short, exactly what a flaky network or
an overloaded S3 does. Nothing in the client is mocked.
"""

from __future__ import annotations

import http.client
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

from piaa_dist.errors import StorageError
from piaa_dist.storage import LocalStore, ObjectNotFound, S3Store, open_store


# ---------------------------------------------------------------------------------------------
# local


def test_local_round_trip(tmp_path):
    store = open_store(str(tmp_path / "root"))
    assert isinstance(store, LocalStore)
    store.write_bytes("a/b/c.bin", b"hello")
    store.write_bytes("top.txt", b"x")
    assert store.read_bytes("a/b/c.bin") == b"hello"
    assert store.exists("a/b/c.bin") and not store.exists("a/b/nope")
    assert store.list() == ["a/b/c.bin", "top.txt"]
    assert store.list("a") == ["a/b/c.bin"]
    assert store.url_of("a/b/c.bin") == str((tmp_path / "root" / "a" / "b" / "c.bin").resolve())
    # Replacing an object leaves no temporary files behind.
    store.write_bytes("top.txt", b"y")
    assert store.read_bytes("top.txt") == b"y"
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["a", "top.txt"]


def test_local_missing_object_names_the_path(tmp_path):
    store = open_store(f"file://{tmp_path}")
    with pytest.raises(ObjectNotFound, match=str(tmp_path / "missing.tar")):
        store.read_bytes("missing.tar")


def test_paths_cannot_leave_the_root(tmp_path):
    with pytest.raises(StorageError, match="leaves the store root"):
        open_store(str(tmp_path)).write_bytes("../escape", b"x")


def test_unsupported_scheme_is_an_error():
    with pytest.raises(StorageError, match="unsupported storage URL"):
        open_store("gs://bucket/prefix")
    with pytest.raises(StorageError, match="empty storage URL"):
        open_store("")


# ---------------------------------------------------------------------------------------------
# S3 (moto server over HTTP)


def test_s3_round_trip(s3_endpoint, s3_bucket):
    store = open_store(f"s3://{s3_bucket}/pre/fix/", endpoint_url=s3_endpoint)
    assert isinstance(store, S3Store) and store.url == f"s3://{s3_bucket}/pre/fix"
    store.write_bytes("shards/train/u-0000.tar", b"\x00" * 1000)
    store.write_bytes("manifest.parquet", b"m")
    assert store.read_bytes("shards/train/u-0000.tar") == b"\x00" * 1000
    assert store.exists("manifest.parquet") and not store.exists("nope")
    assert store.list() == ["manifest.parquet", "shards/train/u-0000.tar"]
    assert store.list("shards/") == ["shards/train/u-0000.tar"]
    assert store.url_of("manifest.parquet") == f"s3://{s3_bucket}/pre/fix/manifest.parquet"
    # Really stored under the prefix, as another client sees it.
    import boto3

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert sorted(keys) == ["pre/fix/manifest.parquet", "pre/fix/shards/train/u-0000.tar"]


def test_s3_missing_object_and_bucket_name_the_url(s3_endpoint, s3_bucket):
    store = open_store(f"s3://{s3_bucket}/p", endpoint_url=s3_endpoint)
    with pytest.raises(ObjectNotFound, match=f"s3://{s3_bucket}/p/gone.tar"):
        store.read_bytes("gone.tar")
    other = open_store("s3://no-such-bucket-here/p", endpoint_url=s3_endpoint)
    with pytest.raises(ObjectNotFound, match="no-such-bucket-here"):
        other.read_bytes("x")


def test_s3_endpoint_comes_from_the_environment(s3_endpoint, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    store = open_store(f"s3://{s3_bucket}")
    assert store.endpoint_url == s3_endpoint
    store.write_bytes("k", b"v")
    assert store.read_bytes("k") == b"v"


def test_s3_store_pickles_after_use(s3_endpoint, s3_bucket):
    store = open_store(f"s3://{s3_bucket}", endpoint_url=s3_endpoint)
    store.write_bytes("k", b"v")  # the client now exists; it must not travel
    clone = pickle.loads(pickle.dumps(store))
    assert clone.read_bytes("k") == b"v"


# ---------------------------------------------------------------------------------------------
# transient faults


class FaultyProxy:
    """HTTP proxy to the moto server that injects faults into GETs of matching keys.

    ``faults`` is a list consumed one per matching GET: ``"503"`` answers Service Unavailable,
    ``"truncate"`` sends the real headers but only half the body, then drops the connection.
    """

    def __init__(self, upstream: str, match: str):
        self.upstream = urlparse(upstream)
        self.match = match
        self.faults: list[str] = []
        self.gets = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = None
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
def proxy(s3_endpoint):
    p = FaultyProxy(s3_endpoint, match="flaky")
    yield p
    p.close()


def _put(s3_endpoint, bucket, key, data):
    open_store(f"s3://{bucket}", endpoint_url=s3_endpoint).write_bytes(key, data)


def test_503s_are_retried(proxy, s3_endpoint, s3_bucket):
    payload = bytes(range(256)) * 64
    _put(s3_endpoint, s3_bucket, "flaky.bin", payload)
    store = S3Store(f"s3://{s3_bucket}", endpoint_url=proxy.url, attempts=5, backoff=0.01)
    proxy.faults = ["503", "503"]
    assert store.read_bytes("flaky.bin") == payload
    assert proxy.gets == 3  # two failures, then success


def test_truncated_bodies_are_retried(proxy, s3_endpoint, s3_bucket):
    payload = bytes(range(256)) * 256
    _put(s3_endpoint, s3_bucket, "flaky.bin", payload)
    store = S3Store(f"s3://{s3_bucket}", endpoint_url=proxy.url, attempts=4, backoff=0.01)
    proxy.faults = ["truncate", "truncate"]
    assert store.read_bytes("flaky.bin") == payload
    assert proxy.gets == 3


def test_persistent_faults_raise_storage_error_naming_the_url(proxy, s3_endpoint, s3_bucket):
    _put(s3_endpoint, s3_bucket, "flaky.bin", b"x" * 5000)
    store = S3Store(f"s3://{s3_bucket}", endpoint_url=proxy.url, attempts=2, backoff=0.01)
    proxy.faults = ["truncate"] * 10
    with pytest.raises(StorageError, match=f"s3://{s3_bucket}/flaky.bin.*after 2 attempts"):
        store.read_bytes("flaky.bin")
    assert proxy.gets == 2
