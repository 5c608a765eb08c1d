"""An on-disk store of re-encoded images, so ingest encodes each distinct source image once.

Why: re-encoding an image (decode, resize, JPEG encode) is most of ingest's CPU, and in a large
ratings log each image is stored in many raters' shards (the image amplification: ~50 in the
scale world). An in-memory cache that may not grow with the dataset (issue 11) holds one
shard's batch at most, so as the image pool grows past it, an image is re-encoded for most of
its raters and ingest's cost per rating grows with the dataset. A scratch folder has no such
limit: its size is the distinct images' encoded bytes, on disk.

* **The filesystem is the index**: an entry is one file named by its key's hash
  (``<root>/<2 hex>/<62 hex>``); nothing in memory grows with the number of entries.
* **Atomic writes**: an entry is written to a temporary file in its folder, then renamed onto
  its name, so processes sharing the folder (Ray ingest workers on one machine) read a
  complete entry or none. Two writers of one key race harmlessly: both write the same bytes.
* **Checked reads**: an entry is ``magic + length + sha256 + bytes``; a truncated or otherwise
  damaged entry (a crash mid-write on a filesystem that reorders, a full disk, someone's
  editing) fails the check, is counted as ``corrupt``, removed, and reported as a miss, so the
  caller re-encodes instead of shipping damaged bytes.
* **Best effort**: the store only saves work; a write that fails (disk full, permissions) is
  counted (``errors``) and logged once, and ingest goes on encoding.

What a key must contain is the caller's business (:mod:`piaa_dist.data.ingest` uses the
source's identity and every encode parameter): this module hashes whatever parts it is given.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import threading
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["ENTRY_MAGIC", "EncodedImageStore", "entry_key", "remove_store"]

#: First bytes of every entry (and the entry format's version).
ENTRY_MAGIC = b"PIAAENC1"
_HEADER = struct.Struct(">8sQ32s")  # magic, payload length, sha256 of the payload


def entry_key(*parts: str) -> str:
    """The key of an entry: a hex SHA-256 of its parts (order matters; parts may hold any text)."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode("utf-8", "surrogatepass")
        h.update(struct.pack(">Q", len(b)))  # length-prefixed: ("ab", "c") != ("a", "bc")
        h.update(b)
    return h.hexdigest()


class EncodedImageStore:
    """A content-keyed folder of encoded images, shared safely by the processes of one machine.

    Args:
        root: the folder (created on first write, parents included).

    Counters (this instance's operations only; thread-safe): ``hits``, ``misses``, ``writes``,
    ``bytes_written`` (payload bytes of the entries this instance wrote), ``corrupt`` (entries
    that failed the check), ``errors`` (writes that failed).
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self._lock = threading.Lock()
        self.hits = self.misses = self.writes = self.bytes_written = self.corrupt = self.errors = 0

    def __repr__(self) -> str:
        return f"EncodedImageStore({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """Where the entry of ``key`` lives (256 sub-folders keep directories small)."""
        return self.root / key[:2] / key[2:]

    def get(self, key: str) -> bytes | None:
        """The stored bytes of ``key``, or ``None`` if there is no intact entry.

        A damaged entry (wrong magic, length or checksum) counts as ``corrupt``, is removed so
        that the next writer replaces it, and is a miss.
        """
        p = self.path(key)
        try:
            with open(p, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            self._count(misses=1)
            return None
        except OSError as err:  # unreadable: treat as a miss, the caller encodes
            log.warning("encoded-image store: cannot read %s (%s); re-encoding", p, err)
            self._count(misses=1, errors=1)
            return None
        data = _payload(raw)
        if data is None:
            log.warning("encoded-image store: damaged entry %s (%d bytes); re-encoding it", p, len(raw))
            try:
                p.unlink()
            except OSError:
                pass
            self._count(misses=1, corrupt=1)
            return None
        self._count(hits=1)
        return data

    def put(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` atomically (temp file + rename); ``False`` if it failed."""
        p = self.path(key)
        tmp = p.parent / f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(ENTRY_MAGIC, len(data), hashlib.sha256(data).digest()))
                f.write(data)
            os.replace(tmp, p)
        except OSError as err:
            with self._lock:
                first = self.errors == 0
                self.errors += 1
            if first:
                log.warning("encoded-image store %s: cannot write (%s); images are re-encoded instead", self.root,
                            err)
            try:
                tmp.unlink()
            except OSError:
                pass
            return False
        self._count(writes=1, bytes_written=len(data))
        return True

    def stats(self) -> dict[str, int]:
        """The counters as a dict."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "writes": self.writes,
                    "bytes_written": self.bytes_written, "corrupt": self.corrupt, "errors": self.errors}

    def remove(self) -> None:
        """Delete the whole folder (what is left of it; never fails)."""
        remove_store(self.root)

    def _count(self, **delta: Any) -> None:
        with self._lock:
            for k, v in delta.items():
                setattr(self, k, getattr(self, k) + v)


def remove_store(root: str | os.PathLike[str]) -> bool:
    """Delete a store's folder if it exists; whether there was one. Never raises."""
    root = Path(root)
    existed = root.exists()
    shutil.rmtree(root, ignore_errors=True)
    return existed


def _payload(raw: bytes) -> bytes | None:
    """The payload of an entry's bytes, or ``None`` if they are not one intact entry."""
    if len(raw) < _HEADER.size:
        return None
    magic, length, digest = _HEADER.unpack_from(raw)
    data = raw[_HEADER.size:]
    if magic != ENTRY_MAGIC or length != len(data) or hashlib.sha256(data).digest() != digest:
        return None
    return data
