"""The encoded-image store: each distinct image encoded once per ingest, the same bytes out
with the store on or off, damaged entries re-encoded rather than shipped, nothing in memory
that grows with the number of images, and nothing left on disk afterwards.

The in-memory cache of a partition is kept small on purpose here (shards of 4 samples: it holds
at most 4 images), so that only the on-disk store can explain an image encoded once.
"""

from __future__ import annotations

import gc
import json
import shutil
import tarfile
import tracemalloc
from collections import defaultdict
from pathlib import Path

import pytest

from piaa_dist.data.encstore import EncodedImageStore, entry_key
from piaa_dist.data.ingest import IngestSettings, ingest, ingest_partition, plan_ingest, publish
from piaa_dist.data.layout import POINTER
from piaa_dist.errors import DataError

SMALL_SHARDS = 4  # the partition's image cache then holds at most 4 images


def _version(root: Path) -> Path:
    return root / "versions" / json.loads((root / POINTER).read_text())["version"]


def _files(root: Path) -> dict[str, bytes]:
    """Every file of the published version but the report (timings, version ID)."""
    v = _version(root)
    return {str(p.relative_to(v)): p.read_bytes() for p in sorted(v.rglob("*"))
            if p.is_file() and p.name != "ingest_report.json"}


def _entries(folder: Path) -> list[Path]:
    """The store's entries (not temp files)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _shards_of_each_image(root: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for shard in sorted((_version(root) / "shards").iterdir()):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    out[json.loads(tar.extractfile(m).read())["image"]].add(shard.name)
    return out


def test_each_distinct_image_is_encoded_once_across_users_shards_and_partitions(tiny_world, tmp_path):
    out = tmp_path / "out"
    rep = ingest("flickr-aes", tiny_world, str(out), shard_size=SMALL_SHARDS, workers=1, partitions=3,
                 encode_store_dir=str(tmp_path / "enc"))
    # The world shares images across users, shards and partitions (else this proves nothing).
    shards = _shards_of_each_image(out)
    assert rep["partitions"] == 3 and rep["image_amplification"] > 2
    assert sum(len(s) > 1 for s in shards.values()) > len(shards) // 2
    assert rep["images"] == len(shards) and rep["ratings"]["skipped"] == dict.fromkeys(rep["ratings"]["skipped"], 0)

    st = rep["image_store"]
    assert rep["image_decodes"] == rep["images"]  # each distinct image encoded exactly once
    assert st["enabled"] and st["writes"] == rep["images"] and st["corrupt"] == 0 and st["errors"] == 0
    # Every stored copy came from one place: encoded, the store, the small cache, or (the rest)
    # an encode already in flight for an earlier sample of the look-ahead window.
    served = rep["image_decodes"] + st["hits"] + rep["image_cache_hits"]
    assert served <= rep["samples"] < served + 16
    assert st["hits"] > rep["images"]  # the store, not the cache, saved most of the work
    assert st["bytes_written"] > 0
    # The store is gone once the ingest is over.
    assert not Path(st["dir"]).exists() and list((tmp_path / "enc").iterdir()) == []


def test_output_is_byte_identical_with_the_store_on_or_off(tiny_world, tmp_path):
    off = tmp_path / "off"
    rep_off = ingest("flickr-aes", tiny_world, str(off), shard_size=SMALL_SHARDS, workers=2, encode_store=False)
    assert rep_off["image_store"]["enabled"] is False and rep_off["image_store"]["hits"] == 0
    assert rep_off["image_decodes"] > rep_off["images"]  # without it, shared images are re-encoded
    want = _files(off)
    for name, kw in (("on", {}), ("on-3parts", {"partitions": 3}), ("on-threads", {"workers": 4})):
        out = tmp_path / name
        rep = ingest("flickr-aes", tiny_world, str(out), shard_size=SMALL_SHARDS, **{"workers": 2, **kw})
        assert rep["image_store"]["hits"] > 0
        got = _files(out)
        assert got.keys() == want.keys()
        for rel in want:
            assert got[rel] == want[rel], f"{rel} differs with the store on ({name})"


def test_a_damaged_entry_is_re_encoded_not_shipped(tiny_world, tmp_path):
    settings = IngestSettings(shard_size=SMALL_SHARDS, workers=1, encode_store_dir=str(tmp_path / "enc"))
    plan = plan_ingest("flickr-aes", tiny_world, str(tmp_path / "out"), settings=settings)
    (spec,) = plan.partitions(1)
    first = ingest_partition(spec)
    entries = _entries(Path(plan.encode_store))
    assert len(entries) == first.image_decodes == first.image_store["writes"] > 10  # the filesystem is the index

    # Damage a third of the entries: truncated (a crash mid-write), or one payload byte flipped.
    damaged = entries[::3]
    for i, p in enumerate(damaged):
        raw = p.read_bytes()
        if i % 2:
            p.write_bytes(raw[: len(raw) // 2])
        else:
            p.write_bytes(raw[:-10] + bytes([raw[-10] ^ 0xFF]) + raw[-9:])
    second = ingest_partition(spec)  # writes the same shards again, reading the store
    assert second.image_store["corrupt"] == len(damaged)
    assert second.image_decodes == len(damaged)  # exactly the damaged ones re-encoded
    assert second.image_store["hits"] >= len(entries) - len(damaged)
    publish(plan, [second])
    plan.remove_encode_store()
    assert not Path(plan.encode_store).exists()

    ingest("flickr-aes", tiny_world, str(tmp_path / "ref"), shard_size=SMALL_SHARDS, workers=1, encode_store=False)
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")  # no damaged byte was shipped


def test_store_keeps_nothing_in_memory_per_entry(tmp_path):
    """The filesystem is the index: after thousands of writes and reads the store object holds
    no more memory than after a handful (a set or dict of keys would hold ~100 B per entry)."""
    store = EncodedImageStore(tmp_path / "s")
    payload = bytes(range(200))

    def churn(n: int, offset: int) -> int:
        for i in range(offset, offset + n):
            key = entry_key("img", str(i))
            store.put(key, payload)
            assert store.get(key) == payload
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    tracemalloc.start()
    try:
        small = churn(50, 0)
        large = churn(3000, 50)
    finally:
        tracemalloc.stop()
    assert store.stats()["writes"] == 3050 and store.stats()["hits"] == 3050
    assert large - small < 20_000, f"the store's memory grew by {large - small} bytes over 3,000 entries"
    assert len(_entries(tmp_path / "s")) == 3050


def test_store_entries_are_checked_and_writes_are_atomic(tmp_path):
    store = EncodedImageStore(tmp_path / "s")
    key = entry_key("a", "b")
    assert store.get(key) is None and store.stats()["misses"] == 1
    assert store.put(key, b"jpeg bytes")
    assert store.get(key) == b"jpeg bytes"
    # No temp file is left behind, and keys keep their parts apart.
    assert [p.name for p in (tmp_path / "s").rglob("*") if p.is_file()] == [store.path(key).name]
    assert entry_key("ab", "c") != entry_key("a", "bc")
    # An empty or foreign file under the key's name is not an entry.
    for junk in (b"", b"PIAAENC1", b"x" * 100):
        store.path(key).write_bytes(junk)
        assert store.get(key) is None
    assert store.stats()["corrupt"] == 3
    # A store that cannot be written is counted, not fatal.
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    bad = EncodedImageStore(blocked / "s")
    assert bad.put(key, b"x") is False and bad.stats()["errors"] == 1


def test_store_is_removed_when_the_ingest_fails_and_a_bad_folder_is_a_clear_error(tiny_world, tmp_path):
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    victim = sorted((world / "40K").glob("*.jpg"))[-1] if (world / "40K").is_dir() else None
    if victim is None:
        victim = sorted(world.rglob("*.jpg"))[-1]
    victim.write_bytes(b"not a jpeg at all")
    enc = tmp_path / "enc"
    with pytest.raises(DataError, match="strict"):
        ingest("flickr-aes", world, str(tmp_path / "out"), shard_size=SMALL_SHARDS, workers=1, strict=True,
               encode_store_dir=str(enc))
    assert list(enc.iterdir()) == []  # the ingest's store folder went with it

    not_a_folder = tmp_path / "plain-file"
    not_a_folder.write_text("x")
    with pytest.raises(DataError, match=r"encoded-image store folder .*plain-file"):
        ingest("flickr-aes", tiny_world, str(tmp_path / "out2"), encode_store_dir=str(not_a_folder / "sub"))
    assert not (tmp_path / "out2" / POINTER).exists()


def test_images_on_s3_are_keyed_without_reading_them_and_encoded_once(tiny_world, tmp_path, s3_endpoint, s3_bucket):
    """An ``s3://`` image root: the key is the object's URL (no request), so an image is fetched
    and encoded once however many raters hold it, and the bytes are those of a local ingest."""
    from piaa_dist.storage import open_store

    images = open_store(f"s3://{s3_bucket}/imgs", endpoint_url=s3_endpoint)
    for p in (tiny_world / "images").rglob("*"):
        if p.is_file():
            images.write_bytes(p.relative_to(tiny_world / "images").as_posix(), p.read_bytes())
    remote = ingest("flickr-aes", tiny_world, str(tmp_path / "from-s3"), images_dir=f"s3://{s3_bucket}/imgs",
                    endpoint_url=s3_endpoint, shard_size=SMALL_SHARDS, workers=2, partitions=2)
    assert remote["image_decodes"] == remote["images"] and remote["image_store"]["hits"] > remote["images"]
    ingest("flickr-aes", tiny_world, str(tmp_path / "local"), shard_size=SMALL_SHARDS, workers=2,
           encode_store=False)
    assert _files(tmp_path / "from-s3") == _files(tmp_path / "local")
