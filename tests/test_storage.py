"""Store: local folders and S3 over real HTTP (moto server), including retries of transient faults.

Transient faults are injected by a small HTTP proxy between boto3 and the moto server (the
``faulty_proxy`` fixture of conftest) that answers some GETs with 503 or cuts a response
body short, exactly what a flaky network or an overloaded S3 does. Nothing in the client is
mocked.
"""

from __future__ import annotations

import pickle

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
