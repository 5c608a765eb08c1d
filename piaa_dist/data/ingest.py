"""Ingestion: a dataset folder to per-user WebDataset shards, a Parquet manifest and a report.

Layout written at the output URL (see ``docs/ARCHITECTURE.md``)::

    manifest.parquet                  one row per user
    ingest_report.json                read / ingested / skipped by reason
    shards/<split>/<user>-<i:04d>.tar WebDataset tars of at most ``shard_size`` samples

Determinism: images are re-encoded with fixed settings, tar members carry a fixed mtime,
owner and mode, users are sorted and a user's samples keep file order, so re-ingesting the
same input gives byte-identical shards (and sha256). Shards are written before the manifest,
so a manifest never names a shard that was not written.

Accounting: every record read is either ingested or skipped with a reason. Records are
ratings (one per rating row; for AADB one per filled image slot) and test-list entries
(a test list names users, so an ID that matches no rater is a skipped record too). The
report keeps the two kinds apart and sums them: ``read == ingested + sum(skipped)`` holds for
each kind and for the total.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import tarfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from piaa_dist.data.readers import SKIP_LABELS, SKIP_REASONS, Rating, Skip, SourceRead, read_source
from piaa_dist.errors import DataError
from piaa_dist.storage import open_store

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
REPORT = "ingest_report.json"
SIDECAR = "latent_scores.csv"
FORMAT_VERSION = 1
DEFAULT_MAX_SIDE = 256
DEFAULT_QUALITY = 90
DEFAULT_SHARD_SIZE = 1000
#: Fixed tar member metadata: re-ingesting must give identical bytes.
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z
TAR_OWNER = "piaa"

MANIFEST_SCHEMA = pa.schema(
    [
        ("user", pa.string()),
        ("split", pa.string()),
        ("n_ratings", pa.int64()),
        ("shards", pa.list_(pa.string())),
        ("sha256", pa.list_(pa.string())),
        ("shard_samples", pa.list_(pa.int64())),
        ("has_truth", pa.bool_()),
    ]
)

_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def safe_name(user: str) -> str:
    """A user ID as used in shard names and sample keys (no dots, no slashes)."""
    return _SAFE.sub("_", user)


def process_image(path: str | Path, max_side: int, quality: int) -> bytes:
    """Load an image file and re-encode it: longest side <= ``max_side``, JPEG ``quality``.

    EXIF orientation is applied and metadata dropped, so the bytes depend only on the pixels
    and the settings.

    Raises:
        OSError/ValueError (from PIL): the file is not a complete, decodable image.
    """
    with Image.open(path) as img:
        if img.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the result stays >= max_side:
            # several times faster on full-size photos, and still deterministic.
            img.draft("RGB", (max_side, max_side))
        img.load()  # raises on truncated data (we never set LOAD_TRUNCATED_IMAGES)
        img = ImageOps.exif_transpose(img)
        if img.mode != "RGB":
            if img.mode in ("RGBA", "LA", "P"):
                # Composite transparency over white instead of letting it turn black.
                img = img.convert("RGBA")
                bg = Image.new("RGB", img.size, (255, 255, 255))
                bg.paste(img, mask=img.getchannel("A"))
                img = bg
            else:
                img = img.convert("RGB")
        w, h = img.size
        if w == 0 or h == 0:
            raise ValueError("empty image")
        if max(w, h) > max_side:
            f = max_side / max(w, h)
            img = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
        return buf.getvalue()


_BLOCK = 512
_RECORD = 20 * _BLOCK


def _octal(n: int, width: int) -> bytes:
    return ("%0*o" % (width - 1, n)).encode("ascii") + b"\0"


def _ustar_header(name: str, size: int) -> bytes:
    """One USTAR header block, laid out as Python's tarfile writes it (so tar, tarfile and
    WebDataset read it), with fixed mode, owner and mtime."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise DataError(f"tar member name longer than 100 bytes: {name!r}")
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
    ]).ljust(_BLOCK, b"\0")
    return buf[:148] + ("%06o" % sum(buf)).encode("ascii") + b"\0" + buf[155:]


def write_tar(samples: list[tuple[str, bytes, bytes]]) -> bytes:
    """Tar bytes of ``(key, jpeg, json)`` samples with fixed member metadata (deterministic).

    The layout is WebDataset's: members ``<key>.jpg`` then ``<key>.json``, in sample order.
    We write the USTAR blocks ourselves: Python's tarfile costs ~0.15 ms per member, the
    bulk of ingestion time, and its header details vary between Python versions, which would
    break byte-identical re-ingestion across machines.
    """
    out: list[bytes] = []
    total = 0
    for key, jpeg, meta in samples:
        for ext, data in (("jpg", jpeg), ("json", meta)):
            pad = -len(data) % _BLOCK
            out += [_ustar_header(f"{key}.{ext}", len(data)), data, b"\0" * pad]
            total += _BLOCK + len(data) + pad
    # End of archive: two zero blocks, then zeros up to a whole record (as tarfile does).
    total += 2 * _BLOCK
    out.append(b"\0" * (2 * _BLOCK + (-total % _RECORD)))
    return b"".join(out)


def _write_tar_with_tarfile(samples: list[tuple[str, bytes, bytes]]) -> bytes:
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


def _read_truth(root: Path) -> dict[tuple[str, str], tuple[float, float]] | None:
    path = root / SIDECAR
    if not path.is_file():
        return None
    truth: dict[tuple[str, str], tuple[float, float]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        for i, row in enumerate(reader, start=2):
            try:
                truth[(row["worker"].strip(), row["imagePair"].strip())] = (
                    float(row["latent"]),
                    float(row["average_latent"]),
                )
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{path}:{i}: expected worker,imagePair,latent,average_latent") from None
    return truth


@dataclass
class _Prepared:
    ratings: list[Rating]  # accepted, in file order
    skips: list[Skip]
    images: dict[str, bytes]
    test_users: set[str]


def _check_images(src: SourceRead, max_side: int, quality: int, workers: int, progress: bool) -> _Prepared:
    """Image-level and test-list checks; re-encode every referenced image once."""
    images_dir = Path(src.images_dir)
    names = sorted({r.image for r in src.candidates if r.image})
    missing: set[str] = set()
    present: list[str] = []
    for name in names:
        # A name with a path separator could escape the image folder: treat it as missing.
        if "/" in name or "\\" in name or name in (".", ".."):
            missing.add(name)
        elif (images_dir / name).is_file():
            present.append(name)
        else:
            missing.add(name)

    processed: dict[str, bytes] = {}
    unreadable: dict[str, str] = {}

    def work(name: str) -> tuple[str, bytes | None, str]:
        try:
            return name, process_image(images_dir / name, max_side, quality), ""
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            return name, None, f"{type(err).__name__}: {err}"

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(work, present)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(present), desc="images", unit="img", leave=False)
        for name, data, err in results:
            if data is None:
                unreadable[name] = err
            else:
                processed[name] = data

    skips = list(src.skips)
    accepted: list[Rating] = []
    for r in src.candidates:
        if not r.image or r.image in missing:
            where = f"slot {r.slot}: " if r.slot else ""
            skips.append(Skip("missing_image", r.file, r.row, f"{where}no image {images_dir / r.image}"))
        elif r.image in unreadable:
            where = f"slot {r.slot}: " if r.slot else ""
            skips.append(Skip("unreadable_image", r.file, r.row, f"{where}{images_dir / r.image}: {unreadable[r.image]}"))
        else:
            accepted.append(r)

    test_users: set[str] = set()
    for e in src.test_entries:
        if e.user in src.raters:
            test_users.add(e.user)
        else:
            skips.append(Skip("unknown_test_worker", e.file, e.row, f"test worker {e.user} has no ratings", "test_workers"))
    used = {r.image for r in accepted}
    return _Prepared(accepted, skips, {k: v for k, v in processed.items() if k in used}, test_users)


def _first_skip(skips: list[Skip], src: SourceRead) -> Skip:
    order = {src.ratings_file: 0, src.test_file: 1}
    return min(skips, key=lambda s: (order.get(s.file, 2), s.file, s.row))


def _counts(skips: list[Skip], kind: str) -> dict[str, int]:
    c = {reason: 0 for reason in SKIP_REASONS}
    for s in skips:
        if s.kind == kind:
            c[s.reason] += 1
    return c


def ingest(
    fmt: str,
    root: str | Path,
    out_url: str,
    *,
    test_workers: str | Path | None = None,
    ratings_file: str | Path | None = None,
    images_dir: str | Path | None = None,
    endpoint_url: str | None = None,
    strict: bool = False,
    max_side: int = DEFAULT_MAX_SIDE,
    quality: int = DEFAULT_QUALITY,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int = 4,
    progress: bool = False,
) -> dict[str, Any]:
    """Ingest a dataset folder into shards + manifest + report at ``out_url``.

    Args:
        fmt: ``"flickr-aes"`` or ``"aadb"``. A FLICKR-AES-layout folder that holds a synthetic
            world's truth sidecar (``latent_scores.csv``) is recorded with source ``synth`` and
            its samples carry ``latent`` / ``average_latent``.
        root: dataset folder.
        out_url: local folder or ``s3://bucket/prefix``.
        test_workers: test-worker list (``ID`` CSV or one ID per line).
        ratings_file, images_dir: override the default locations under ``root``.
        endpoint_url: S3 endpoint (default ``$AWS_ENDPOINT_URL``).
        strict: raise on the first skip instead of counting it.
        max_side: longest side of stored images.
        quality: JPEG quality of stored images.
        shard_size: samples per shard at most.
        workers: threads for image work and uploads.
        progress: show tqdm bars.

    Returns:
        The report (also written as ``ingest_report.json`` beside the manifest).

    Raises:
        DataError: unreadable input files; with ``strict``, the first skipped record (names
            the file and row); no rating left to ingest.
        StorageError: the output cannot be written.
    """
    if max_side < 8:
        raise DataError(f"max_side must be at least 8, got {max_side}")
    if not 1 <= quality <= 100:
        raise DataError(f"JPEG quality must be 1-100, got {quality}")
    if shard_size < 1:
        raise DataError(f"shard_size must be at least 1, got {shard_size}")
    root = Path(root)
    src = read_source(fmt, root, test_workers=test_workers, ratings_file=ratings_file, images_dir=images_dir)
    if strict and src.skips:
        # Fail fast on row-level problems before touching any image.
        first = _first_skip(src.skips, src)
        raise DataError(f"{first.where()}: {SKIP_LABELS[first.reason]}: {first.detail} (--strict)")
    prep = _check_images(src, max_side, quality, workers, progress)
    if strict and prep.skips:
        first = _first_skip(prep.skips, src)
        raise DataError(f"{first.where()}: {SKIP_LABELS[first.reason]}: {first.detail} (--strict)")
    if not prep.ratings:
        raise DataError(
            f"{src.ratings_file}: no rating could be ingested "
            f"({len(prep.skips)} skipped; images looked up in {src.images_dir})"
        )

    truth = _read_truth(root) if fmt == "flickr-aes" else None
    source = "synth" if truth is not None else fmt

    by_user: dict[str, list[Rating]] = defaultdict(list)
    for r in prep.ratings:
        by_user[r.user].append(r)
    keys = {u: safe_name(u) for u in by_user}
    if len(set(keys.values())) != len(keys):
        clash = sorted(u for u in keys if list(keys.values()).count(keys[u]) > 1)
        raise DataError(f"{src.ratings_file}: worker IDs {clash[:4]} map to the same shard name")
    for u in sorted(prep.test_users - set(by_user)):
        log.warning("test worker %s is in the ratings file but none of their ratings could be ingested", u)

    store = open_store(out_url, endpoint_url)
    rows: dict[str, list[Any]] = {name: [] for name in MANIFEST_SCHEMA.names}
    missing_truth = 0
    total_bytes = 0
    jobs: list[tuple[str, bytes]] = []
    for user in sorted(by_user):
        ratings = by_user[user]
        split = "test" if user in prep.test_users else "train"
        shards, digests, counts = [], [], []
        user_truth = True
        for s, start in enumerate(range(0, len(ratings), shard_size)):
            samples = []
            for i, r in enumerate(ratings[start : start + shard_size], start=start):
                lat = truth.get((r.user, r.image)) if truth is not None else None
                if truth is not None and lat is None:
                    missing_truth += 1
                if lat is None:
                    user_truth = False
                meta = {
                    "user": user,
                    "image": r.image,
                    "score": r.score,
                    "latent": lat[0] if lat else None,
                    "average_latent": lat[1] if lat else None,
                }
                key = f"{keys[user]}_{i:06d}"
                samples.append((key, prep.images[r.image], json.dumps(meta, sort_keys=True).encode()))
            data = write_tar(samples)
            rel = f"shards/{split}/{keys[user]}-{s:04d}.tar"
            shards.append(rel)
            digests.append(hashlib.sha256(data).hexdigest())
            counts.append(len(samples))
            total_bytes += len(data)
            jobs.append((rel, data))
        rows["user"].append(user)
        rows["split"].append(split)
        rows["n_ratings"].append(len(ratings))
        rows["shards"].append(shards)
        rows["sha256"].append(digests)
        rows["shard_samples"].append(counts)
        rows["has_truth"].append(bool(truth is not None and user_truth))
    if missing_truth:
        log.warning("%s: %d ingested ratings have no row in the truth sidecar", root / SIDECAR, missing_truth)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        done = pool.map(lambda job: store.write_bytes(*job), jobs)
        if progress:
            from tqdm import tqdm

            done = tqdm(done, total=len(jobs), desc="shards", unit="shard", leave=False)
        for _ in done:
            pass

    table = pa.Table.from_pydict(rows, schema=MANIFEST_SCHEMA).replace_schema_metadata(
        {
            "source": source,
            "max_side": str(max_side),
            "version": str(FORMAT_VERSION),
            "jpeg_quality": str(quality),
            "shard_size": str(shard_size),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(MANIFEST, buf.getvalue())

    report = build_report(src, prep, source=source, out=store.url, max_side=max_side, quality=quality,
                          shard_size=shard_size, n_shards=len(jobs), total_bytes=total_bytes, rows=rows)
    store.write_bytes(REPORT, (json.dumps(report, indent=1) + "\n").encode())
    log.info("ingested %d of %d ratings into %s (%d shards)", report["ratings"]["ingested"],
             report["ratings"]["read"], store.url, len(jobs))
    return report


#: The name the orchestration layer imports.
ingest_dataset = ingest


def build_report(src: SourceRead, prep: _Prepared, *, source: str, out: str, max_side: int, quality: int,
                 shard_size: int, n_shards: int, total_bytes: int, rows: dict[str, list[Any]]) -> dict[str, Any]:
    """The ingest report: counts by kind and reason, examples of each skip, output summary."""
    ratings_skipped = _counts(prep.skips, "ratings")
    tests_skipped = _counts(prep.skips, "test_workers")
    ratings = {"read": src.ratings_read, "ingested": len(prep.ratings), "skipped": ratings_skipped}
    # Test-list records read: the distinct entries plus those the reader already skipped.
    tests_read = len(src.test_entries) + sum(1 for s in src.skips if s.kind == "test_workers")
    tests = {"read": tests_read, "ingested": len(prep.test_users), "skipped": tests_skipped}
    # Invariants: every record is accounted for exactly once.
    for name, part in (("ratings", ratings), ("test_workers", tests)):
        total = part["ingested"] + sum(part["skipped"].values())
        if total != part["read"]:
            raise AssertionError(f"ingest accounting bug ({name}): read {part['read']} != {total}")
    examples: dict[str, list[str]] = {}
    for s in sorted(prep.skips, key=lambda s: (s.file, s.row)):
        lst = examples.setdefault(s.reason, [])
        if len(lst) < 5:
            lst.append(f"{s.where()}: {s.detail}")
    splits = rows["split"]
    return {
        "version": FORMAT_VERSION,
        "source": source,
        "ratings_file": src.ratings_file,
        "images_dir": src.images_dir,
        "test_workers_file": src.test_file,
        "out": out,
        "read": ratings["read"] + tests["read"],
        "ingested": ratings["ingested"] + tests["ingested"],
        "skipped": {r: ratings_skipped[r] + tests_skipped[r] for r in SKIP_REASONS},
        "ratings": ratings,
        "test_workers": tests,
        "examples": examples,
        "users": {"train": splits.count("train"), "test": splits.count("test")},
        "images": len(prep.images),
        "shards": n_shards,
        "bytes": total_bytes,
        "max_side": max_side,
        "jpeg_quality": quality,
        "shard_size": shard_size,
        "has_truth": bool(rows["has_truth"]) and all(rows["has_truth"]),
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a text table (what ``piaa-dist ingest`` prints)."""
    r, t = report["ratings"], report["test_workers"]
    lines = [
        f"ingest report: {report['source']} -> {report['out']}",
        f"{'':28s}{'ratings':>10s}{'test list':>11s}{'total':>10s}",
        f"{'read':28s}{r['read']:>10d}{t['read']:>11d}{report['read']:>10d}",
        f"{'ingested':28s}{r['ingested']:>10d}{t['ingested']:>11d}{report['ingested']:>10d}",
    ]
    for reason in SKIP_REASONS:
        lines.append(
            f"{'skipped: ' + SKIP_LABELS[reason]:28s}{r['skipped'][reason]:>10d}"
            f"{t['skipped'][reason]:>11d}{report['skipped'][reason]:>10d}"
        )
    lines.append(
        f"users: {report['users']['train']} train, {report['users']['test']} test; "
        f"{report['images']} images; {report['shards']} shards, {report['bytes'] / 1e6:.1f} MB"
        + ("; truth sidecar attached" if report["has_truth"] else "")
    )
    for reason, ex in report["examples"].items():
        lines.append(f"  e.g. {SKIP_LABELS[reason]}: {ex[0]}")
    return "\n".join(lines)
