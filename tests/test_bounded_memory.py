"""Memory bounds of the data plane at scale: the ingest image cache holds at most one shard's
batch of images, and the manifest is read column by column into the same arrays as before.

The memory figures themselves are measured by ``benchmarks/ingest.py`` and
``benchmarks/metadata.py``; these tests check the rules behind them.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from piaa_dist.data.images import ByteLRU
from piaa_dist.data.manifest import MANIFEST, Manifest
from piaa_dist.data.stream import Dataset
from piaa_dist.errors import DataError


def test_image_cache_is_bounded_by_count_as_well_as_bytes():
    cache = ByteLRU(1 << 20, max_items=3)
    for k in range(10):
        cache.put(k, bytes(10))
    assert [k for k in range(10) if cache.get(k) is not None] == [7, 8, 9]
    # The byte bound still holds on its own.
    small = ByteLRU(25, max_items=100)
    for k in range(5):
        small.put(k, bytes(10))
    assert [k for k in range(5) if small.get(k) is not None] == [3, 4]
    assert ByteLRU(1 << 20, max_items=0).get(0) is None
    off = ByteLRU(1 << 20, max_items=0)
    off.put(1, b"x")
    assert off.get(1) is None


def test_ingest_cache_holds_at_most_one_shards_batch(tiny_world, tmp_path):
    """With shards of 4 samples the cache keeps at most 4 images: an image shared by several
    raters is decoded again once it has left (more decodes than distinct images). The on-disk
    encoded-image store is off, so that only the in-memory cache is measured."""
    from piaa_dist.data.ingest import ingest

    rep = ingest("flickr-aes", tiny_world, str(tmp_path / "small"), shard_size=4, workers=1, encode_store=False)
    big = ingest("flickr-aes", tiny_world, str(tmp_path / "big"), shard_size=10_000, workers=1, encode_store=False)
    assert big["image_decodes"] == big["images"]  # everything fits: each image decoded once
    assert rep["image_decodes"] > rep["images"]
    assert rep["samples"] == big["samples"]


def _manifest_arrays(m: Manifest) -> dict:
    return {
        "users": m.users_at(np.arange(m.n)), "is_test": m.is_test, "n_ratings": m.n_ratings,
        "has_truth": m.has_truth, "parts": [m.parts(i) for i in range(m.n)],
        "index_of": [m.index_of(m.user_at(i)) for i in range(m.n)],
    }


def test_manifest_read_in_row_groups_gives_the_same_index(tiny_dataset_url):
    ds = Dataset.open(tiny_dataset_url)
    data = ds.store.read_bytes(MANIFEST)
    table = pq.read_table(io.BytesIO(data))
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=3)  # several row groups: chunked columns
    chunked = Manifest.from_bytes(buf.getvalue(), "chunked")
    assert pq.ParquetFile(io.BytesIO(buf.getvalue())).num_row_groups > 1
    want = _manifest_arrays(Manifest.from_bytes(data, "one"))
    got = _manifest_arrays(chunked)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key], dtype=object), np.asarray(want[key], dtype=object))
    # The in-memory constructor validates the same way.
    assert _manifest_arrays(Manifest(table, "table"))["users"] == want["users"]


def test_manifest_errors_name_column_and_row_in_any_row_group(tiny_dataset_url):
    ds = Dataset.open(tiny_dataset_url)
    table = pq.read_table(io.BytesIO(ds.store.read_bytes(MANIFEST)))
    users = table.column("user").to_pylist()

    def bytes_of(t: pa.Table) -> bytes:
        buf = io.BytesIO()
        pq.write_table(t.replace_schema_metadata(table.schema.metadata), buf, row_group_size=3)
        return buf.getvalue()

    lengths = table.column("lengths").to_pylist()
    lengths[7] = [None] * len(lengths[7])
    t = table.set_column(table.column_names.index("lengths"), "lengths",
                         pa.array(lengths, table.schema.field("lengths").type))
    with pytest.raises(DataError, match=rf"column 'lengths' has a null entry for user '{users[7]}' \(row 7\)"):
        Manifest.from_bytes(bytes_of(t), "m")
    samples = table.column("samples").to_pylist()
    samples[8] = [0] * len(samples[8])
    t = table.set_column(table.column_names.index("samples"), "samples",
                         pa.array(samples, table.schema.field("samples").type))
    with pytest.raises(DataError, match=rf"row 8 \(user '{users[8]}'\) has a samples entry below 1"):
        Manifest.from_bytes(bytes_of(t), "m")
    offsets = table.column("offsets").to_pylist()
    offsets[5] = offsets[5] + [0]
    t = table.set_column(table.column_names.index("offsets"), "offsets",
                         pa.array(offsets, table.schema.field("offsets").type))
    with pytest.raises(DataError, match=rf"row 5 \(user '{users[5]}'\) has lists of different lengths"):
        Manifest.from_bytes(bytes_of(t), "m")
    split = table.column("split").to_pylist()
    split[4] = "holdout"
    t = table.set_column(table.column_names.index("split"), "split", pa.array(split))
    with pytest.raises(DataError, match=rf"row 4 \(user '{users[4]}'\) has split 'holdout'"):
        Manifest.from_bytes(bytes_of(t), "m")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        Manifest.from_bytes(b"PAR1 not really", "m")


def test_part_digests_ending_in_zero_bytes_read_back_whole(tiny_dataset_url):
    """One sha256 in 256 ends in a zero byte; the manifest must give back all 32 bytes (a
    numpy "S32" view stripped them, and that user's reads failed their checksum)."""
    ds = Dataset.open(tiny_dataset_url)
    table = pq.read_table(io.BytesIO(ds.store.read_bytes(MANIFEST)))
    digests = table.column("sha256").to_pylist()
    digests[2] = [d[:-1] + b"\x00" for d in digests[2]]
    digests[3] = [d[:-3] + b"\x00\x00\x00" for d in digests[3]]
    t = table.set_column(table.column_names.index("sha256"), "sha256",
                         pa.array(digests, table.schema.field("sha256").type))
    buf = io.BytesIO()
    pq.write_table(t, buf)
    m = Manifest.from_bytes(buf.getvalue(), "m")
    for row in (2, 3):
        assert [p.sha256 for p in m.parts(row)] == digests[row]
        assert all(len(p.sha256) == 32 for p in m.parts(row))
    k = int(np.flatnonzero(m.part_owner() == 3)[0])
    assert m.part_sha(k) == digests[3][0]
