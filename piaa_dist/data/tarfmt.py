"""WebDataset tar bytes: a deterministic USTAR writer and a strict reader of byte ranges.

A packed shard is one tar holding many users' samples back to back; a user's samples are
contiguous, so the bytes of one user are a run of whole tar members that a worker fetches
with one ranged GET and parses with :func:`parse_members` (no end-of-archive marker inside a
range). The whole shard stays a plain tar that ``tar``, Python's ``tarfile`` and WebDataset
read.

Determinism: member metadata is fixed (mode 0444, uid/gid 0, owner ``piaa``, mtime
2000-01-01), so the same samples always give the same bytes. We write the USTAR blocks
ourselves: Python's tarfile costs ~0.15 ms per member, and its header details vary between
Python versions, which would break byte-identical re-ingestion across machines.
"""

from __future__ import annotations

import io
import tarfile

#: Fixed tar member metadata: re-ingesting must give identical bytes.
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z
TAR_OWNER = "piaa"
BLOCK = 512
RECORD = 20 * BLOCK
#: Longest member name a plain USTAR header holds.
MAX_NAME_BYTES = 100


class TarFormatError(ValueError):
    """Bytes that are not the tar members we write (the caller names the shard and user)."""


def _octal(n: int, width: int) -> bytes:
    return ("%0*o" % (width - 1, n)).encode("ascii") + b"\0"


def ustar_header(name: str, size: int) -> bytes:
    """One USTAR header block, laid out as Python's tarfile writes it, with fixed metadata.

    Raises:
        TarFormatError: the name is longer than 100 bytes.
    """
    raw = name.encode("utf-8")
    if len(raw) > MAX_NAME_BYTES:
        raise TarFormatError(f"tar member name longer than {MAX_NAME_BYTES} bytes: {name!r}")
    owner = TAR_OWNER.encode("ascii").ljust(32, b"\0")
    buf = b"".join([
        raw.ljust(100, b"\0"),
        _octal(0o444, 8),  # mode
        _octal(0, 8),  # uid
        _octal(0, 8),  # gid
        _octal(size, 12),
        _octal(TAR_MTIME, 12),
        b" " * 8,  # checksum placeholder: counts as spaces in the sum
        b"0",  # regular file
        b"\0" * 100,  # linkname
        b"ustar\x0000",
        owner,  # uname
        owner,  # gname
        b"\0" * 16,  # devmajor, devminor
        b"\0" * 155,  # prefix
    ]).ljust(BLOCK, b"\0")
    return buf[:148] + ("%06o" % sum(buf)).encode("ascii") + b"\0" + buf[155:]


def member(name: str, data: bytes) -> bytes:
    """Header, data and padding of one member."""
    return ustar_header(name, len(data)) + data + b"\0" * (-len(data) % BLOCK)


def sample_bytes(key: str, jpeg: bytes, meta: bytes) -> bytes:
    """One WebDataset sample: members ``<key>.jpg`` then ``<key>.json``."""
    return member(f"{key}.jpg", jpeg) + member(f"{key}.json", meta)


def end_of_archive(size: int) -> bytes:
    """What closes a tar of ``size`` bytes: two zero blocks, then zeros up to a whole record
    (as tarfile does)."""
    total = size + 2 * BLOCK
    return b"\0" * (2 * BLOCK + (-total % RECORD))


def write_tar(samples: list[tuple[str, bytes, bytes]]) -> bytes:
    """Tar bytes of ``(key, jpeg, json)`` samples with fixed member metadata (deterministic)."""
    body = b"".join(sample_bytes(k, j, m) for k, j, m in samples)
    return body + end_of_archive(len(body))


def write_tar_with_tarfile(samples: list[tuple[str, bytes, bytes]]) -> bytes:
    """Reference implementation of :func:`write_tar` with the standard library (for tests)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpeg, meta in samples:
            for ext, data in (("jpg", jpeg), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = TAR_MTIME
                info.mode = 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = TAR_OWNER
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def parse_members(data: bytes) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of the tar members in ``data``: a whole tar or a run of whole members.

    Stops at an end-of-archive (zero) block or at the end of ``data``.

    Raises:
        TarFormatError: a header with a bad checksum or size, a member cut short, or a member
            that is not a regular file.
    """
    out: list[tuple[str, bytes]] = []
    view = memoryview(data)
    pos, n = 0, len(data)
    while pos < n:
        if n - pos < BLOCK:
            raise TarFormatError(f"{n - pos} stray bytes at offset {pos} (not a whole tar block)")
        header = bytes(view[pos : pos + BLOCK])
        if header == b"\0" * BLOCK:
            break
        stored = header[148:156].split(b"\0", 1)[0].strip()
        try:
            checksum = int(stored or b"x", 8)
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"x", 8)
        except ValueError:
            raise TarFormatError(f"no tar header at offset {pos}") from None
        if checksum != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise TarFormatError(f"tar header checksum mismatch at offset {pos}")
        if header[156:157] not in (b"0", b"\0"):
            raise TarFormatError(f"tar member at offset {pos} is not a regular file")
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        start = pos + BLOCK
        end = start + size
        if end > n:
            raise TarFormatError(f"member {name!r} at offset {pos} is cut short ({n - start} of {size} bytes)")
        out.append((name, bytes(view[start:end])))
        pos = end + (-size % BLOCK)
    return out


def group_samples(members: list[tuple[str, bytes]]) -> list[tuple[str, dict[str, bytes]]]:
    """Members grouped into WebDataset samples: consecutive members sharing the key (the name
    up to its first dot) form one sample, ``{extension: bytes}``.

    Raises:
        TarFormatError: a member name without an extension, or a key split by other members.
    """
    out: list[tuple[str, dict[str, bytes]]] = []
    seen: set[str] = set()
    for name, data in members:
        key, dot, ext = name.partition(".")
        if not dot:
            raise TarFormatError(f"member {name!r} has no extension")
        if out and out[-1][0] == key:
            if ext in out[-1][1]:
                raise TarFormatError(f"sample {key!r} holds {ext!r} twice")
            out[-1][1][ext] = data
            continue
        if key in seen:
            raise TarFormatError(f"sample {key!r} appears twice")
        seen.add(key)
        out.append((key, {ext: data}))
    return out
