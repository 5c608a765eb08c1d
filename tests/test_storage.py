"""Store: local folders and S3 over real HTTP (moto server), including retries of transient faults.

Transient faults are injected by a small HTTP proxy between boto3 and the moto server (the
``faulty_proxy`` fixture of conftest) that answers some GETs with 503 or cuts a response
body short, exactly what a flaky network or an overloaded S3 does. Nothing in the client is
mocked.
"""

from __future__ import annotations

import pickle
from dataclasses import replace

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

    listing = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=s3_bucket)
    keys = [o["Key"] for o in listing["Contents"]]
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


def _put(s3_endpoint, bucket, key, data):
    open_store(f"s3://{bucket}", endpoint_url=s3_endpoint).write_bytes(key, data)


def test_503s_are_retried(faulty_proxy, s3_endpoint, s3_bucket):
    payload = bytes(range(256)) * 64
    _put(s3_endpoint, s3_bucket, "flaky.bin", payload)
    proxy = faulty_proxy
    store = S3Store(f"s3://{s3_bucket}", endpoint_url=proxy.url, attempts=5, backoff=0.01)
    proxy.faults = ["503", "503"]
    assert store.read_bytes("flaky.bin") == payload
    assert proxy.gets == 3  # two failures, then success


def test_truncated_bodies_are_retried(faulty_proxy, s3_endpoint, s3_bucket):
    payload = bytes(range(256)) * 256
    _put(s3_endpoint, s3_bucket, "flaky.bin", payload)
    proxy = faulty_proxy
    store = S3Store(f"s3://{s3_bucket}", endpoint_url=proxy.url, attempts=4, backoff=0.01)
    proxy.faults = ["truncate", "truncate"]
    assert store.read_bytes("flaky.bin") == payload
    assert proxy.gets == 3


def test_persistent_faults_raise_storage_error_naming_the_url(faulty_proxy, s3_endpoint, s3_bucket):
    _put(s3_endpoint, s3_bucket, "flaky.bin", b"x" * 5000)
    proxy = faulty_proxy
    store = S3Store(f"s3://{s3_bucket}", endpoint_url=proxy.url, attempts=2, backoff=0.01)
    proxy.faults = ["truncate"] * 10
    with pytest.raises(StorageError, match=f"s3://{s3_bucket}/flaky.bin.*after 2 attempts"):
        store.read_bytes("flaky.bin")
    assert proxy.gets == 2


def test_s3_local_command_serves_until_interrupted(monkeypatch):
    """`piaa-dist s3-local` prints a working endpoint and stops cleanly on Ctrl-C."""
    import re
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "piaa_dist.cli", "s3-local", "--bucket", "cmd-bucket"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        text = "".join(lines)
        m = re.search(r"export AWS_ENDPOINT_URL=(http://127\.0\.0\.1:\d+) AWS_ACCESS_KEY_ID=testing", text)
        assert m, text
        assert "--out s3://cmd-bucket/" in text
        # Use exactly what it told us to export.
        for kv in re.search(r"export (.*)", text).group(1).split():
            monkeypatch.setenv(*kv.split("=", 1))
        store = open_store("s3://cmd-bucket/x", endpoint_url=m.group(1))
        store.write_bytes("k", b"v")
        assert store.read_bytes("k") == b"v"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------
# ranged reads, streamed writes, listing and deletion (what packed shards and versions need)


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "root"))
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/pre", endpoint_url=endpoint)


def test_ranged_reads_return_exactly_the_range(any_store):
    from piaa_dist.storage import ShortObject

    payload = bytes(range(256)) * 40
    any_store.write_bytes("shards/000000.tar", payload)
    assert any_store.read_range("shards/000000.tar", 0, 10) == payload[:10]
    assert any_store.read_range("shards/000000.tar", 1000, 2000) == payload[1000:3000]
    assert any_store.read_range("shards/000000.tar", len(payload) - 7, 7) == payload[-7:]
    assert any_store.size("shards/000000.tar") == len(payload)
    # A range past the end means the object is not what the manifest says: a permanent error.
    with pytest.raises(ShortObject, match="shards/000000.tar"):
        any_store.read_range("shards/000000.tar", len(payload) - 5, 10)
    with pytest.raises(ObjectNotFound, match="shards/000001.tar"):
        any_store.read_range("shards/000001.tar", 0, 10)


def test_streamed_writes_appear_whole_or_not_at_all(any_store):
    # Three parts' worth on S3 (5 MiB parts): a multipart upload, invisible until committed.
    chunk = bytes(range(256)) * (1 << 12)  # 1 MiB
    if isinstance(any_store, S3Store):
        any_store.options = replace(any_store.options, part_size=5 << 20)
    w = any_store.open_writer("big.tar")
    for _ in range(12):
        w.write(chunk)
        assert not any_store.exists("big.tar")
    assert w.size == 12 * len(chunk)
    w.commit()
    assert any_store.read_bytes("big.tar") == chunk * 12
    # An aborted writer leaves the previous object untouched and no temporary debris.
    w = any_store.open_writer("big.tar")
    w.write(b"partial")
    w.abort()
    assert any_store.read_bytes("big.tar") == chunk * 12
    with pytest.raises(RuntimeError):
        with any_store.open_writer("other.tar") as w2:
            w2.write(b"x" * 100)
            raise RuntimeError("crash mid-write")
    assert not any_store.exists("other.tar") and any_store.list() == ["big.tar"]
    if isinstance(any_store, S3Store):
        # No multipart upload is left behind to be billed (or listed) later.
        assert not any_store.client.list_multipart_uploads(Bucket=any_store.bucket).get("Uploads")


def test_listing_sub_stores_and_deleting(any_store):
    for rel in ("versions/v1/manifest.parquet", "versions/v1/shards/000000.tar", "versions/v2/shards/000000.tar",
                "_CURRENT"):
        any_store.write_bytes(rel, b"x")
    assert any_store.list_dirs("versions") == ["v1", "v2"]
    assert any_store.list_dirs() == ["versions"]
    sub = any_store.sub("versions/v1")
    assert sub.list() == ["manifest.parquet", "shards/000000.tar"]
    assert sub.url_of("manifest.parquet") == any_store.url_of("versions/v1/manifest.parquet")
    assert any_store.delete(any_store.list("versions/v1/")) == 2
    assert any_store.list_dirs("versions") == ["v2"]
    assert any_store.list() == ["_CURRENT", "versions/v2/shards/000000.tar"]
    any_store.check()


def test_s3_options_come_from_the_environment(monkeypatch, s3_endpoint):
    monkeypatch.setenv("PIAA_S3_READ_TIMEOUT", "2.5")
    monkeypatch.setenv("PIAA_S3_RETRY_SECONDS", "7")
    store = open_store("s3://bucket-x/p", endpoint_url=s3_endpoint)
    assert (store.options.read_timeout, store.options.retry_seconds) == (2.5, 7.0)
    assert store.client.meta.config.read_timeout == 2.5
    monkeypatch.setenv("PIAA_S3_CONNECT_TIMEOUT", "soon")
    with pytest.raises(StorageError, match="PIAA_S3_CONNECT_TIMEOUT must be a positive number, got 'soon'"):
        open_store("s3://bucket-x/p", endpoint_url=s3_endpoint)


# ---------------------------------------------------------------------------------------------
# stalled reads, missing credentials, unreachable endpoints, missing buckets


def test_a_stalled_read_gives_up_in_bounded_time_naming_the_url(faulty_proxy, s3_endpoint, s3_bucket):
    """Headers arrive, the body never does: the read timeout fires per attempt, and retrying
    stops when the total retry time is spent, long before the attempts run out."""
    _put(s3_endpoint, s3_bucket, "flaky.bin", b"x" * 5000)
    faulty_proxy.stall_s = 20
    faulty_proxy.faults = ["stall"] * 100
    store = S3Store(f"s3://{s3_bucket}", endpoint_url=faulty_proxy.url, attempts=100, backoff=0.05,
                    read_timeout=0.4, retry_seconds=1.5)
    with pytest.raises(StorageError, match=rf"s3://{s3_bucket}/flaky.bin.*gave up after \d+ attempts"):
        store.read_bytes("flaky.bin")
    # Bounded by the retry time, not by the 100 attempts (each attempt waits 0.4 s at least).
    assert 2 <= faulty_proxy.gets <= 8
    # Once the endpoint answers again, the same store reads normally.
    faulty_proxy.faults = []
    assert store.read_bytes("flaky.bin") == b"x" * 5000


def _no_credentials_env(monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_missing_credentials_say_what_to_set(monkeypatch, tmp_path, s3_endpoint, caplog):
    from piaa_dist.cli import main as cli_main

    _no_credentials_env(monkeypatch, tmp_path)
    store = open_store("s3://some-bucket/p", endpoint_url=s3_endpoint)
    hint = r"no S3 credentials.*AWS_ENDPOINT_URL.*AWS_ACCESS_KEY_ID.*piaa-dist s3-local"
    with pytest.raises(StorageError, match=hint):
        store.read_bytes("manifest.parquet")
    # Through the CLI: one line, exit code 2, before any image is looked at.
    (tmp_path / "world").mkdir()
    caplog.clear()
    code = cli_main(["ingest", "--format", "flickr-aes", "--root", str(tmp_path / "world"),
                     "--out", "s3://some-bucket/p", "--s3-endpoint", s3_endpoint])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and "piaa-dist s3-local" in errors[0]


def test_unreachable_endpoint_is_named(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = S3Store("s3://bucket-x/p", endpoint_url=f"http://127.0.0.1:{port}", attempts=2, backoff=0.01,
                    connect_timeout=0.5, retry_seconds=2)
    with pytest.raises(StorageError, match=rf"cannot reach the S3 endpoint.*127.0.0.1:{port}.*piaa-dist s3-local"):
        store.check()


def test_missing_bucket_is_named_with_what_to_do(s3_endpoint):
    store = open_store("s3://no-such-bucket-here/p", endpoint_url=s3_endpoint)
    with pytest.raises(ObjectNotFound, match=r"no such bucket: s3://no-such-bucket-here .*create it first"):
        store.check()
