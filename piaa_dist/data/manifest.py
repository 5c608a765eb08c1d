"""The manifest of one dataset version: where every user's samples are, held columnar.

One Parquet row per user, users sorted (code point order), columns:

==============  ========================  ===================================================
column          type                      meaning
==============  ========================  ===================================================
``user``        string                    user ID as in the ratings file
``user_key``    uint64                    first 8 bytes (little-endian) of sha256(user)
``split``       string                    ``train`` or ``test``
``n_ratings``   int64                     samples stored for the user (sum of ``samples``)
``has_truth``   bool                      every sample carries the synthetic truth
``shards``      list<int32>               shard index of each part (``shards/<i:06d>.tar``)
``offsets``     list<int64>               byte offset of each part in its shard
``lengths``     list<int64>               byte length of each part
``samples``     list<int64>               samples in each part
``sha256``      list<fixed_size_binary>   sha256 (32 bytes) of each part's byte range
==============  ========================  ===================================================

A *part* is a run of whole tar members: the user's samples in one shard. Most users have one
part; a user with more samples than a shard holds spans several shards, one part in each.
Table metadata: ``version`` (the layout version, ``2``), ``source``, ``max_side``,
``jpeg_quality``, ``shard_size``, ``shard_pattern``.

At scale (a million users) a worker must not turn this into Python objects per user:
:class:`Manifest` keeps the columns as one Arrow string array and numpy arrays (about 100 bytes
per user), finds a user by binary search over the sorted ``user_key`` hashes (then compares the
ID itself), and keeps each split's row indices as an int array. Opening costs one Parquet read
and one sort of the hashes.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from piaa_dist.errors import DataError

MANIFEST = "manifest.parquet"
#: The layout version this code writes and reads (``1``: per-user shards, no versions).
FORMAT_VERSION = 2
SHARD_PATTERN = "shards/{:06d}.tar"
SPLIT_CODES = ("train", "test")

SCHEMA = pa.schema(
    [
        ("user", pa.string()),
        ("user_key", pa.uint64()),
        ("split", pa.string()),
        ("n_ratings", pa.int64()),
        ("has_truth", pa.bool_()),
        ("shards", pa.list_(pa.int32())),
        ("offsets", pa.list_(pa.int64())),
        ("lengths", pa.list_(pa.int64())),
        ("samples", pa.list_(pa.int64())),
        ("sha256", pa.list_(pa.binary(32))),
    ]
)
_LISTS = ("shards", "offsets", "lengths", "samples", "sha256")
#: Smallest valid entry of each numeric list column, and the attribute it is kept in.
_LOW = {"shards": 0, "offsets": 0, "lengths": 1, "samples": 1}
_PART_ATTR = {"shards": "part_shard", "offsets": "part_offset", "lengths": "part_length", "samples": "part_samples"}


def user_key(user: str) -> int:
    """A stable 64-bit integer for a user ID: the first 8 bytes of sha256, little-endian."""
    return int.from_bytes(hashlib.sha256(user.encode("utf-8")).digest()[:8], "little")


def shard_name(index: int) -> str:
    """Relative path of shard ``index`` inside a version."""
    return SHARD_PATTERN.format(int(index))


@dataclass(frozen=True)
class Part:
    """One user's samples inside one shard: a byte range of whole tar members."""

    shard: int
    offset: int
    length: int
    samples: int
    sha256: bytes


class ManifestRows:
    """Collects manifest rows (users in order) into columns; :meth:`table` builds the table."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}

    def __len__(self) -> int:
        return len(self.cols["user"])

    def add(self, user: str, split: str, has_truth: bool, parts: Sequence[Part]) -> None:
        """Add one user (users must come in sorted order)."""
        c = self.cols
        c["user"].append(user)
        c["user_key"].append(user_key(user))
        c["split"].append(split)
        c["n_ratings"].append(sum(p.samples for p in parts))
        c["has_truth"].append(bool(has_truth))
        c["shards"].append([p.shard for p in parts])
        c["offsets"].append([p.offset for p in parts])
        c["lengths"].append([p.length for p in parts])
        c["samples"].append([p.samples for p in parts])
        c["sha256"].append([p.sha256 for p in parts])

    def table(self) -> pa.Table:
        """The rows as a table with :data:`SCHEMA` (no metadata)."""
        return pa.Table.from_pydict(self.cols, schema=SCHEMA)


def manifest_bytes(table: pa.Table, metadata: dict[str, str]) -> bytes:
    """Parquet bytes of the manifest with its table metadata (deterministic for equal input)."""
    meta = {"version": str(FORMAT_VERSION), "shard_pattern": SHARD_PATTERN, **metadata}
    table = table.replace_schema_metadata({k: str(v) for k, v in meta.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _first_true(mask: Any) -> int:
    arr = np.asarray(mask.to_numpy(zero_copy_only=False) if hasattr(mask, "to_numpy") else mask, dtype=bool)
    hits = np.flatnonzero(arr)
    return int(hits[0]) if len(hits) else -1


class Manifest:
    """A dataset version's manifest, columnar (see the module doc). Read-only; picklable.

    Attributes:
        url: where it was read from (for messages).
        metadata: the table metadata (``source``, ``max_side``, ...).
        n_ratings, has_truth, is_test: per-user numpy arrays (row order = sorted users).
    """

    def __init__(self, table: pa.Table, url: str):
        missing = [c for c in SCHEMA.names if c not in table.column_names]
        if missing:
            raise DataError(f"{url}: manifest lacks column(s) {', '.join(missing)}")
        self._load(url, table.schema.metadata, table.column, lambda: None)

    @classmethod
    def from_bytes(cls, data: bytes, url: str) -> "Manifest":
        """Parse and validate manifest bytes.

        Columns are decoded one at a time, each validated and turned into its final array
        before the next is read (and the allocator's freed memory handed back in between):
        at a million users the transient peak is one column, not the whole decoded table.

        Raises:
            DataError: not Parquet, a layout version this code cannot read, a missing column,
                a wrong type, a null, or inconsistent parts (names ``url``, the column and row).
        """
        pool = pa.default_memory_pool()
        try:
            pf = pq.ParquetFile(pa.BufferReader(data))  # zero-copy over the bytes
            schema = pf.schema_arrow
        except Exception as err:  # noqa: BLE001 - pyarrow.ArrowInvalid and friends
            raise DataError(f"{url}: not a readable Parquet file: {err}") from None
        version = (schema.metadata or {}).get(b"version", b"").decode()
        if version == "1":
            raise DataError(f"{url}: this dataset was written in layout version 1 (per-user shards, no "
                            "versions); re-ingest it with `piaa-dist ingest` to read it with this version")
        if version != str(FORMAT_VERSION):
            raise DataError(f"{url}: manifest version {version!r} is not supported (expected {FORMAT_VERSION})")
        missing = [c for c in SCHEMA.names if c not in schema.names]
        if missing:
            raise DataError(f"{url}: manifest lacks column(s) {', '.join(missing)}")

        def column(name: str) -> pa.ChunkedArray:
            try:
                # ParquetFile.read keeps one chunk per row group (read_table cuts 128k-row
                # chunks that combining would copy).
                return pf.read(columns=[name]).column(0)
            except Exception as err:  # noqa: BLE001 - pyarrow.ArrowInvalid and friends
                raise DataError(f"{url}: not a readable Parquet file (column {name!r}): {err}") from None

        manifest = cls.__new__(cls)
        # Hand freed Arrow buffers back after each column, so every worker's RSS holds only
        # the arrays a Manifest keeps (~100 bytes per user).
        manifest._load(url, schema.metadata, column, pool.release_unused)
        pool.release_unused()
        return manifest

    def _load(self, url: str, metadata: Any, column: Callable[[str], Any], release: Callable[[], None]) -> None:
        """Read, validate and keep each column in turn (``column(name)`` gives its Arrow data).

        Raises:
            DataError: the first problem, naming the column and row (see :meth:`from_bytes`).
        """
        self.url = url
        self.metadata = {k.decode(): v.decode() for k, v in (metadata or {}).items()}
        users: pa.StringArray | None = None

        def get(name: str) -> pa.Array:
            fld = SCHEMA.field(name)
            col = column(name)
            if col.type != fld.type:
                try:
                    col = col.cast(fld.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                    raise DataError(f"{url}: manifest column {name!r} has type {col.type}, "
                                    f"expected {fld.type}") from None
            if isinstance(col, pa.ChunkedArray):
                col = col.combine_chunks()
            if col.null_count:
                i = _first_true(pc.is_null(col))
                who = "" if users is None else f" (user {users[i].as_py()!r})"
                raise DataError(f"{url}: manifest column {name!r} is null at row {i}{who}")
            if users is not None and len(col) != len(users):
                raise DataError(f"{url}: manifest column {name!r} has {len(col)} rows, column 'user' {len(users)}")
            return col

        def user_of(i: int) -> str:
            return f"user {users[int(i)].as_py()!r}"

        users = get("user")
        n = len(users)
        if n > 1:
            i = _first_true(pc.invert(pc.less(users[:-1], users[1:])))
            if i >= 0:
                raise DataError(f"{url}: manifest users are not sorted and unique at row {i + 1} "
                                f"({users[i].as_py()!r} then {users[i + 1].as_py()!r})")
        self._users = users
        self.n = n
        release()

        split = get("split")
        bad = _first_true(pc.invert(pc.is_in(split, value_set=pa.array(list(SPLIT_CODES)))))
        if bad >= 0:
            raise DataError(f"{url}: manifest row {bad} ({user_of(bad)}) has split "
                            f"{split[bad].as_py()!r}, expected train or test")
        self.is_test = pc.equal(split, "test").to_numpy(zero_copy_only=False)
        del split
        keys = get("user_key").to_numpy()
        self._key_order = np.argsort(keys)  # ties (hash collisions) are resolved by comparing IDs
        self._sorted_keys = keys[self._key_order]
        del keys
        self.n_ratings = get("n_ratings").to_numpy()
        self.has_truth = get("has_truth").to_numpy(zero_copy_only=False)
        release()

        offsets = None
        for name in _LISTS:
            arr = get(name)
            own = arr.offsets.to_numpy()
            values = arr.flatten()
            if values.null_count:
                k = _first_true(pc.is_null(values))
                owner = int(np.searchsorted(own, k, "right") - 1)
                raise DataError(f"{url}: manifest column {name!r} has a null entry for {user_of(owner)} "
                                f"(row {owner})")
            if offsets is None:
                offsets = own
                counts = np.diff(offsets)
                if n and (counts < 1).any():
                    i = int(np.flatnonzero(counts < 1)[0])
                    raise DataError(f"{url}: manifest row {i} ({user_of(i)}) has no parts")
                self._part_start = offsets.astype(np.int64)
            elif not np.array_equal(own, offsets):
                i = _first_true(own[1:] != offsets[1:])
                raise DataError(f"{url}: manifest row {i} ({user_of(i)}) has lists of different lengths "
                                f"in shards/{name}")
            if name == "sha256":
                # Raw bytes, [parts, 32]: a numpy "S32" would strip a digest's trailing zero
                # bytes when read back (1 part in 256), failing that user's checksum.
                self._part_sha = np.frombuffer(values.buffers()[1], dtype=np.uint8, count=32 * len(values),
                                               offset=values.offset * 32).reshape(-1, 32)
                continue
            flat = values.to_numpy()
            low = _LOW[name]
            if len(flat) and (flat < low).any():
                i = int(np.searchsorted(offsets, int(np.flatnonzero(flat < low)[0]), "right") - 1)
                raise DataError(f"{url}: manifest row {i} ({user_of(i)}) has a {name} entry below {low}")
            if name == "samples":
                per_user = np.add.reduceat(flat, offsets[:-1]) if n else np.zeros(0, np.int64)
                if n and (per_user != self.n_ratings).any():
                    i = int(np.flatnonzero(per_user != self.n_ratings)[0])
                    raise DataError(f"{url}: manifest row {i} ({user_of(i)}) says n_ratings "
                                    f"{int(self.n_ratings[i])} but its parts hold {int(per_user[i])} samples")
            setattr(self, _PART_ATTR[name], flat)
            del arr, values
            release()
        self._split_index: dict[str, np.ndarray] = {}

    # -- users ---------------------------------------------------------------------------------

    def user_at(self, i: int) -> str:
        """User ID of row ``i``."""
        return self._users[int(i)].as_py()

    def users_at(self, idx: np.ndarray | Sequence[int]) -> list[str]:
        """User IDs of rows ``idx`` (one C-level take; a list for small uses)."""
        return self._users.take(pa.array(np.asarray(idx, dtype=np.int64))).to_pylist()

    def index_of(self, user: str) -> int:
        """Row of a user, or -1 (binary search over the hashes, then the ID is compared)."""
        h = np.uint64(user_key(user))
        lo = int(np.searchsorted(self._sorted_keys, h, "left"))
        hi = int(np.searchsorted(self._sorted_keys, h, "right"))
        for j in self._key_order[lo:hi]:
            if self._users[int(j)].as_py() == user:
                return int(j)
        return -1

    def indices(self, split: str) -> np.ndarray:
        """Sorted rows of a split (``train``, ``test`` or ``all``), as int64 (cached)."""
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        idx = self._split_index.get(split)
        if idx is None:
            if split == "all":
                idx = np.arange(self.n, dtype=np.int64)
            else:
                idx = np.flatnonzero(self.is_test if split == "test" else ~self.is_test).astype(np.int64)
            self._split_index[split] = idx
        return idx

    def parts(self, i: int) -> list[Part]:
        """The parts of row ``i``, in sample order."""
        a, b = self._part_start[i], self._part_start[i + 1]
        return [
            Part(int(self.part_shard[k]), int(self.part_offset[k]), int(self.part_length[k]),
                 int(self.part_samples[k]), self._part_sha[k].tobytes())
            for k in range(a, b)
        ]

    def part_owner(self) -> np.ndarray:
        """Row of each part (for checks that walk the shards)."""
        return np.repeat(np.arange(self.n, dtype=np.int64), np.diff(self._part_start))

    def part_sha(self, k: int) -> bytes:
        """sha256 of part ``k`` (flattened part index)."""
        return self._part_sha[k].tobytes()

    def keys_match(self) -> int:
        """First row whose ``user_key`` is not the hash of its user, or -1 (costs a hash per user)."""
        keys = np.empty(self.n, np.uint64)
        keys[self._key_order] = self._sorted_keys
        for i in range(self.n):
            if int(keys[i]) != user_key(self.user_at(i)):
                return i
        return -1
