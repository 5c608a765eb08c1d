"""Issue 12's checks that had no test of their own (the others are named in the README's Scale
section): the ingest report's objects, bytes and image amplification are what the store holds;
a user is read back from a local folder with one ranged read per part; a corrupted byte range
in a folder names the shard and the user.

All on the shared tiny world (10 users of 24-32 ratings, 120 images), ingested to a folder in
a few seconds.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import pytest

from piaa_dist.data.ingest import ingest
from piaa_dist.data.stream import Dataset
from piaa_dist.errors import DataError

RATINGS = "FLICKR-AES_image_labeled_by_each_worker.csv"


def _file_order(world: Path) -> list[tuple[str, str]]:
    with open(world / RATINGS, newline="") as f:
        return [(r[0].strip(), r[1].strip()) for r in list(csv.reader(f))[1:]]


def test_ingest_report_counts_objects_bytes_and_image_amplification(tiny_world, tmp_path):
    out = tmp_path / "d"
    # Three partitions: the distinct images must be counted across partitions, not summed.
    report = ingest("flickr-aes", tiny_world, str(out), shard_size=60, partitions=3)
    files = [p for p in out.rglob("*") if p.is_file()]
    shards = [p for p in files if p.suffix == ".tar"]
    assert report["partitions"] == 3 and report["shards"] == len(shards) > 3
    assert report["objects"] == len(files)  # shards + manifest + report + pointer, nothing else
    assert report["bytes"] == sum(p.stat().st_size for p in shards)
    # Stored copies of each image, counted from what reads back: each rater's copy is its own.
    ds = Dataset.open(str(out))
    copies = Counter(img for u in ds.users("all") for img in ds.load_user(u).images)
    assert report["samples"] == sum(copies.values()) == len(_file_order(tiny_world))
    assert report["images"] == len(copies)
    assert report["image_amplification"] == round(sum(copies.values()) / len(copies), 3)
    assert report["image_amplification"] > 2  # the tiny world's images have 2-3 raters each


@pytest.mark.parametrize("shard_size", [60, 20], ids=["users-share-shards", "users-span-shards"])
def test_a_user_is_read_from_a_folder_with_one_ranged_read_per_part(tiny_world, tmp_path, shard_size):
    out = tmp_path / "d"
    ingest("flickr-aes", tiny_world, str(out), shard_size=shard_size)
    ds = Dataset.open(str(out), cache_users=0)
    users = ds.users("all")
    shards = Counter(p.shard for u in users for p in ds.parts(u))
    if shard_size == 60:
        assert max(shards.values()) > 1  # 2 users of 24-32 ratings fit in one shard
    else:
        assert all(len(ds.parts(u)) > 1 for u in users)  # each user spans shards
    store = ds.store
    reads: list[tuple] = []
    read_range, read_bytes = store.read_range, store.read_bytes

    def spy_range(rel: str, offset: int, length: int) -> bytes:
        reads.append((rel, offset, length))
        return read_range(rel, offset, length)

    def spy_bytes(rel: str) -> bytes:
        reads.append((rel, "whole object"))
        return read_bytes(rel)

    # A spy on the real folder store (its reads still happen): which bytes a user costs.
    store.read_range, store.read_bytes = spy_range, spy_bytes
    order = _file_order(tiny_world)
    for u in users:
        reads.clear()
        images = ds.load_user(u).images
        assert reads == [(ds.shard_pattern.format(p.shard), p.offset, p.length) for p in ds.parts(u)], u
        assert images == [img for w, img in order if w == u]  # whole, and in file order


def test_a_corrupted_byte_range_in_a_folder_names_the_shard_and_the_user(tiny_world, tmp_path):
    out = tmp_path / "d"
    ingest("flickr-aes", tiny_world, str(out), shard_size=100)  # 3-4 users per shard
    ds = Dataset.open(str(out), cache_users=0)
    users = ds.users("all")
    victim = users[1]
    (part,) = ds.parts(victim)
    neighbours = [u for u in users if u != victim and ds.parts(u)[0].shard == part.shard]
    assert neighbours, "the victim must share its shard"
    path = Path(ds.shard_url(part.shard))
    data = bytearray(path.read_bytes())
    data[part.offset + 700] ^= 0xFF  # one flipped byte inside the victim's first image
    path.write_bytes(bytes(data))
    span = f"bytes {part.offset}-{part.offset + part.length - 1}"
    with pytest.raises(DataError, match=rf"corrupt shard {re.escape(str(path))} {span} \(user {victim}\): sha256"):
        ds.load_user(victim)
    for u in neighbours:  # the same shard's other users still read
        assert len(ds.load_user(u).images) == ds.n_ratings(u)


def test_a_ratings_log_takes_its_test_users_from_a_file_and_counts_unknown_ones(tmp_path):
    """``--format ratings --test-users FILE``: the listed users are the test split, whatever
    their place in the log; a listed user the log does not have is a counted skip."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (20, 16), (60 * i, 30, 30)).save(images / f"i{i}.jpg", "JPEG")
    rows = [("zed", "i0.jpg", 4), ("amy", "i1.jpg", 2), ("bob", "i2.jpg", 5), ("amy", "i3.jpg", 1),
            ("zed", "i2.jpg", 3)]
    with open(tmp_path / "log.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("user", "image", "score"), *rows])
    (tmp_path / "test.txt").write_text("zed\nnobody\n")
    report = ingest("ratings", None, str(tmp_path / "out"), ratings_file=tmp_path / "log.csv", images_dir=images,
                    test_users=tmp_path / "test.txt")
    ds = Dataset.open(str(tmp_path / "out"))
    assert ds.users("test") == ["zed"] and ds.users("train") == ["amy", "bob"]
    t = report["test_workers"]
    assert t["read"] == 2 and t["ingested"] == 1 and t["skipped"]["unknown_test_worker"] == 1
    assert report["ratings"]["ingested"] == len(rows)
