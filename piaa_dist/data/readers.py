"""Readers for rating files: FLICKR-AES, AADB, PARA and generic ratings logs, quirks included.

A reader turns rating files into *candidate* ratings in file order plus the row-level skips it
found (bad score, duplicate row, malformed row). Image-level checks (path outside the image
folder, missing, unreadable or too large images) need the image store, so
:mod:`piaa_dist.data.ingest` does them. Nothing is dropped without being counted under a
reason, and every skip names its file and row.

Scale: a ratings log may hold millions of users with a dozen ratings each, so candidates are
columnar (:class:`SourceRead` holds numpy arrays of user and image indices, scores and row
numbers, and the user and image names once each) rather than one Python object per rating,
and skips are counted per reason with a bounded number of examples (:class:`SkipLog`).

Row numbers are 1-based *line* numbers of a CSV file (the header is line 1), so a message can
be checked with ``sed -n Np FILE``; for an AADB batch row the slot (1-10) is named too. In a
Parquet file a row number is the 1-based index of the data row.

Formats (:data:`READERS`, the registry the CLI and the tests use):

* ``flickr-aes``: ``FLICKR-AES_image_labeled_by_each_worker.csv`` (``worker, imagePair,
  score``), integer scores 1-5, optional test list (``ID`` CSV or one ID per line).
* ``aadb``: the MTurk batch ``AllinAll.csv`` (``WorkerId``, ``Input.image_urlK``,
  ``Answer.overallScoreK``), one rating per filled slot.
* ``ratings``: a log in CSV or Parquet with columns ``user``, ``image``, ``score`` and an
  optional ``split`` (``train``/``test``); ``image`` is relative to the image root (a folder
  or ``s3://`` prefix); scores on the product's scale ``score_range`` are mapped linearly onto
  the model's 1-5, and a score outside the range is a ``bad_score`` skip.
* ``para``: ``annotation/PARA-Images.csv`` (``userId``, ``sessionId``, ``imageName``,
  ``aestheticScore``, scores 1-5 in half steps) with images at
  ``imgs/<sessionId>/<imageName>`` (or flattened into ``imgs/``); test users from a user-split
  file (``userset/TestUserIDs_Fold<K>.txt`` with ``fold``, or any list).

Test users: a test list (a listed ID that rated nothing is an ``unknown_test_worker`` skip), a
``split`` column, or a fraction: a user is a test user when a seeded hash of their ID falls
below the fraction, a choice that depends on neither file order nor the other users.

Truth sidecar: a ``latent_scores.csv`` beside the ratings file (FLICKR-AES layout: columns
``worker,imagePair,latent,average_latent``; ratings logs: ``user,image,latent,average_latent``)
marks a synthetic world: samples carry the noise-free scores and the source is ``synth``.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import logging
import math
from array import array
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlparse

import numpy as np

from piaa_dist.errors import DataError

log = logging.getLogger(__name__)

FLICKR_RATINGS = "FLICKR-AES_image_labeled_by_each_worker.csv"
AADB_RATINGS = "AllinAll.csv"
PARA_RATINGS = "annotation/PARA-Images.csv"
PARA_IMAGES = "imgs"
PARA_FOLD = "userset/TestUserIDs_Fold{fold}.txt"
FLICKR_IMAGE_DIRS = ("images", "40K")
AADB_IMAGE_DIRS = ("images", "datasetImages_originalSize", "datasetImages_warp256")
DEFAULT_TEST_LISTS = ("test_workers.csv", "FLICKR-AES_test_workers.csv")
SIDECAR = "latent_scores.csv"
AADB_SLOTS = 10
#: Examples kept per skip reason (the counts are exact; examples are the first by file and row).
MAX_EXAMPLES = 5

#: Every reason a record can be skipped for, in report order.
SKIP_REASONS: tuple[str, ...] = (
    "missing_image",
    "unreadable_image",
    "duplicate_row",
    "bad_score",
    "unknown_test_worker",
    "malformed_row",  # no user ID, too few columns, or a split value that is not train/test
    "outside_image_folder",  # absolute path, '..', or a symlink out of the image folder: never read
    "too_many_pixels",  # larger than the pixel limit: not decoded
)
SKIP_LABELS = {
    "missing_image": "missing image",
    "unreadable_image": "unreadable image",
    "duplicate_row": "duplicate row",
    "bad_score": "bad score",
    "unknown_test_worker": "unknown test worker",
    "malformed_row": "malformed row",
    "outside_image_folder": "image outside its folder",
    "too_many_pixels": "image above pixel limit",
}
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Skip:
    """A record that was not ingested, and why."""

    reason: str
    file: str
    row: int
    detail: str
    kind: str = "ratings"  #: "ratings" (a rating) or "test_workers" (a test-list entry)

    def where(self) -> str:
        """``file:row`` for messages."""
        return f"{self.file}:{self.row}"


def _skip_order(s: Skip) -> tuple[int, str, int]:
    # Strict mode names the first skip: ratings before test-list entries, then file and row.
    return (0 if s.kind == "ratings" else 1, s.file, s.row)


class SkipLog:
    """Skips counted by kind and reason, with the first few examples of each reason.

    Bounded memory however many records are skipped; :attr:`first` is the skip strict mode
    reports (the first rating skip in file order, else the first test-list skip).
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.examples: dict[str, list[Skip]] = {}
        self.first: Skip | None = None

    def __len__(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, file: str, row: int, detail: str, kind: str = "ratings") -> None:
        """Count one skip."""
        self._count(kind, reason, 1)
        self._example(Skip(reason, file, int(row), detail, kind))

    def add_many(self, reason: str, file: str, rows: np.ndarray, detail: Callable[[int], str],
                 kind: str = "ratings") -> None:
        """Count ``len(rows)`` skips of one file; ``rows`` ascending, ``detail(i)`` describes
        the i-th (only called for the few kept as examples)."""
        n = len(rows)
        if not n:
            return
        self._count(kind, reason, n)
        for i in range(min(n, MAX_EXAMPLES)):
            self._example(Skip(reason, file, int(rows[i]), detail(i), kind))

    def merge(self, other: "SkipLog") -> None:
        """Add another log's counts and examples to this one."""
        for (kind, reason), n in other.counts.items():
            self._count(kind, reason, n)
        for lst in other.examples.values():
            for s in lst:
                self._example(s)
        if other.first is not None and (self.first is None or _skip_order(other.first) < _skip_order(self.first)):
            self.first = other.first

    def _count(self, kind: str, reason: str, n: int) -> None:
        if reason not in SKIP_LABELS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.counts[(kind, reason)] = self.counts.get((kind, reason), 0) + n

    def _example(self, s: Skip) -> None:
        lst = self.examples.setdefault(s.reason, [])
        lst.append(s)
        lst.sort(key=lambda x: (x.file, x.row))
        del lst[MAX_EXAMPLES:]
        if self.first is None or _skip_order(s) < _skip_order(self.first):
            self.first = s

    def by_reason(self, kind: str) -> dict[str, int]:
        """Counts of one kind for every reason (zeros included), in report order."""
        return {r: self.counts.get((kind, r), 0) for r in SKIP_REASONS}

    def total(self, kind: str) -> int:
        """Skips of one kind."""
        return sum(n for (k, _), n in self.counts.items() if k == kind)

    def example_lines(self) -> dict[str, list[str]]:
        """``{reason: ["file:row: detail", ...]}`` (at most :data:`MAX_EXAMPLES` each)."""
        return {r: [f"{s.where()}: {s.detail}" for s in self.examples[r]] for r in SKIP_REASONS if self.examples.get(r)}


@dataclass(frozen=True)
class TestEntry:
    """One user ID of a test list."""

    user: str
    file: str
    row: int


@dataclass(frozen=True)
class SourceOptions:
    """What a reader may be told besides its format. Each reader accepts a subset
    (:attr:`ReaderSpec.options`); giving an option a format does not use is an error.

    Attributes:
        root: dataset folder (``flickr-aes``, ``aadb``, ``para``).
        ratings_file: the ratings file (default: the published name under ``root``).
        images_dir: image folder or ``s3://`` prefix (default: the published folder).
        test_users: a test-user list (``ID`` CSV or one ID per line).
        test_fraction: choose this fraction of users as test users (seeded by user ID).
        split_seed: seed of the ``test_fraction`` choice.
        score_range: ``(lo, hi)`` of the file's score scale (mapped onto 1-5).
        fold: PARA user-split fold ``K`` (``userset/TestUserIDs_Fold<K>.txt``).
        endpoint_url: S3 endpoint of an ``s3://`` image root.
    """

    root: str | None = None
    ratings_file: str | None = None
    images_dir: str | None = None
    test_users: str | None = None
    test_fraction: float | None = None
    split_seed: int = 0
    score_range: tuple[float, float] | None = None
    fold: int | None = None
    endpoint_url: str | None = None


@dataclass
class SourceRead:
    """What a reader found before image checks: columnar candidates in file order.

    ``users``/``images`` hold each distinct name once; the per-rating arrays index them.
    ``users`` includes every user named by a rating record, even one whose every rating was
    skipped (a test list naming them is then not "unknown").
    """

    source: str  #: the format name
    ratings_file: str
    images_dir: str  #: folder or s3:// prefix the image names are relative to
    ratings_read: int = 0  #: rating records seen (AADB: filled image slots, not batch rows)
    users: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    user_first_row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    uid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    iid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))  #: on the 1-5 scale
    raw: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))  #: as in the file
    row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    slot: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    latent: np.ndarray | None = None  #: truth sidecar (NaN where it has no row)
    average_latent: np.ndarray | None = None
    sidecar: str | None = None
    skips: SkipLog = field(default_factory=SkipLog)
    test_file: str | None = None
    test_entries: list[TestEntry] = field(default_factory=list)
    test_fraction: float | None = None
    split_seed: int = 0
    user_split: np.ndarray | None = None  #: per user from a split column: -1 none, 0 train, 1 test
    is_test: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  #: per user (set by read_source)
    integer_scores: bool = True  #: scores are integers 1-5 (stored as JSON ints)
    keep_raw: bool = False  #: store the file's own score as ``raw_score`` too
    image_fallback: str | None = None  #: "basename": try the file name alone (flattened PARA)

    @property
    def n(self) -> int:
        """Candidate ratings."""
        return len(self.uid)

    def take(self, keep: np.ndarray) -> None:
        """Keep only the candidates where ``keep`` is true (a boolean mask)."""
        for name in ("uid", "iid", "score", "raw", "row", "slot", "latent", "average_latent"):
            arr = getattr(self, name)
            if arr is not None:
                setattr(self, name, arr[keep])


class _Builder:
    """Appends candidates into compact arrays, interning user and image names."""

    def __init__(self, src: SourceRead):
        self.src = src
        self.user_ids: dict[str, int] = {}
        self.image_ids: dict[str, int] = {}
        self.first_row = array("q")
        self.uid, self.iid = array("i"), array("i")
        self.score, self.raw = array("d"), array("d")
        self.row, self.slot = array("q"), array("b")

    def user(self, name: str, row: int) -> int:
        uid = self.user_ids.get(name)
        if uid is None:
            uid = self.user_ids[name] = len(self.src.users)
            self.src.users.append(name)
            self.first_row.append(row)
        return uid

    def image(self, name: str) -> int:
        iid = self.image_ids.get(name)
        if iid is None:
            iid = self.image_ids[name] = len(self.src.images)
            self.src.images.append(name)
        return iid

    def add(self, uid: int, image: str, score: float, raw: float, row: int, slot: int = 0) -> None:
        self.uid.append(uid)
        self.iid.append(self.image(image))
        self.score.append(score)
        self.raw.append(raw)
        self.row.append(row)
        self.slot.append(slot)

    def finish(self) -> SourceRead:
        s = self.src
        s.user_first_row = np.frombuffer(self.first_row, np.int64).copy() if self.first_row else np.zeros(0, np.int64)
        s.uid = np.array(self.uid, dtype=np.int32)
        s.iid = np.array(self.iid, dtype=np.int32)
        s.score = np.array(self.score, dtype=np.float64)
        s.raw = np.array(self.raw, dtype=np.float64)
        s.row = np.array(self.row, dtype=np.int64)
        s.slot = np.array(self.slot, dtype=np.int8)
        return s


# ---------------------------------------------------------------------------------------------
# helpers


def parse_score(raw: str) -> int | None:
    """An integer score 1-5 from text (``"4"``, ``" 4 "``, ``"4.0"``), or None if it is not one."""
    text = (raw or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value) or not value.is_integer():
        return None
    score = int(value)
    return score if 1 <= score <= 5 else None


def parse_scaled(raw: Any, lo: float, hi: float) -> tuple[float, float] | None:
    """``(score on 1-5, value as read)`` of a score on the scale ``[lo, hi]``, or None when it
    is not a finite number inside the scale."""
    if raw is None or isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        value = float(raw)
    else:
        text = str(raw).strip()
        if not text:
            return None
        try:
            value = float(text)
        except ValueError:
            return None
    if not math.isfinite(value) or not lo <= value <= hi:
        return None
    return 1.0 + 4.0 * (value - lo) / (hi - lo), value


def check_utf8(path: Path) -> None:
    """Fail with the line of the first byte that is not UTF-8 (one streaming pass, C speed).

    Raises:
        DataError: names the file, the line, the byte and its offset.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = newlines = 0
    try:
        f = open(path, "rb")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    with f:
        while True:
            chunk = f.read(1 << 20)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                # err.start indexes the pending bytes carried over plus this chunk.
                at = offset - pending + err.start
                before = chunk[: max(0, err.start - pending)]
                line = newlines + before.count(b"\n") + 1
                bad = err.object[err.start : err.start + 1]
                raise DataError(
                    f"{path}:{line}: not UTF-8 text (byte 0x{bad.hex() or '??'} at offset {at}); "
                    "save the file as UTF-8"
                ) from None
            if not chunk:
                return
            offset += len(chunk)
            newlines += chunk.count(b"\n")


def _records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """CSV records with the line each starts on (quoted fields may span lines)."""
    check_utf8(path)
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    with f:
        reader = csv.reader(f)
        start = 1
        try:
            for record in reader:
                yield start, record
                start = reader.line_num + 1
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV: {err}") from None
        except UnicodeDecodeError as err:  # the file changed since check_utf8
            raise DataError(f"{path}:{reader.line_num}: not UTF-8 text: {err.reason}") from None


def _header(records: Iterator[tuple[int, list[str]]], path: Path, expected: str) -> list[str]:
    first = next(records, None)
    if first is None:
        raise DataError(f"{path}: empty file (expected the header {expected})")
    return [h.strip() for h in first[1]]


def _cell(cells: list[str], i: int) -> str:
    return cells[i] if i < len(cells) else ""


def _pick_dir(root: Path | None, explicit: str | None, candidates: tuple[str, ...]) -> str:
    if explicit:
        if urlparse(str(explicit)).scheme == "s3":
            return str(explicit)
        path = Path(explicit)
        if not path.is_dir():
            raise DataError(f"image folder does not exist: {path}")
        return str(path)
    if root is None:
        raise DataError("no image folder: give --images (a folder or s3://bucket/prefix)")
    for name in candidates:
        if (root / name).is_dir():
            return str(root / name)
    return str(root)


def _pick_file(root: Path | None, explicit: str | None, default: str, what: str, flag: str) -> Path:
    path = Path(explicit) if explicit else Path(root or ".") / default
    if not path.is_file():
        raise DataError(f"{what} not found: {path}" + ("" if explicit else f" (give it with {flag})"))
    return path


def read_test_list(path: str | Path) -> tuple[list[TestEntry], list[Skip]]:
    """Read a test-user list: the published CSV with header ``ID``, or one ID per line.

    Blank lines are ignored; a repeated ID is a ``duplicate_row`` skip. Only the first column
    of a CSV is used.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"test-user list not found: {path}")
    entries: list[TestEntry] = []
    skips: list[Skip] = []
    seen: set[str] = set()
    first = True
    for line, record in _records(path):
        cells = [c.strip() for c in record]
        if not cells or not cells[0]:
            continue
        wid = cells[0]
        if first:
            first = False
            if wid.lower() in ("id", "user", "userid", "user_id", "worker", "workerid", "worker_id"):
                continue
        if wid in seen:
            skips.append(Skip("duplicate_row", str(path), line, f"test worker {wid} listed again", "test_workers"))
            continue
        seen.add(wid)
        entries.append(TestEntry(wid, str(path), line))
    return entries, skips


def _set_test_list(src: SourceRead, path: str | Path) -> None:
    src.test_file = str(path)
    src.test_entries, skips = read_test_list(path)
    for s in skips:
        src.skips.add(s.reason, s.file, s.row, s.detail, s.kind)


def _default_test_list(root: Path) -> Path | None:
    for name in DEFAULT_TEST_LISTS:
        if (root / name).is_file():
            return root / name
    return None


def _mark_duplicates(src: SourceRead, describe: Callable[[int], str]) -> None:
    """Skip every repeat of a (user, image) pair after its first occurrence in file order.

    Vectorized (one stable sort), so it costs no Python object per rating. Candidates without
    an image name are left alone (they become ``missing_image``).
    """
    if src.n == 0:
        return
    keys = (src.uid.astype(np.uint64) << np.uint64(32)) | src.iid.astype(np.uint64)
    order = np.argsort(keys, kind="stable")
    dup_sorted = np.zeros(len(keys), bool)
    dup_sorted[1:] = keys[order][1:] == keys[order][:-1]
    dup = np.zeros(len(keys), bool)
    dup[order] = dup_sorted
    if "" in src.images:
        dup &= src.iid != src.images.index("")
    if not dup.any():
        return
    idx = np.flatnonzero(dup)
    src.skips.add_many("duplicate_row", src.ratings_file, src.row[idx], lambda i: describe(int(idx[i])))
    src.take(~dup)


def _attach_truth(src: SourceRead, b: _Builder, path: Path, user_col: str, image_col: str) -> None:
    """Join a truth sidecar onto the candidates by (user, image), without per-rating objects."""
    records = _records(path)
    names = [h.lower() for h in _header(records, path, f"{user_col},{image_col},latent,average_latent")]
    want = (user_col.lower(), image_col.lower(), "latent", "average_latent")
    if any(w not in names for w in want):
        raise DataError(f"{path}:1: expected the columns {','.join((user_col, image_col, 'latent', 'average_latent'))}")
    iu, ii, il, ia = (names.index(w) for w in want)
    keys, lat, avg = array("Q"), array("d"), array("d")
    for line, record in records:
        cells = [c.strip() for c in record]
        if not any(cells):
            continue
        uid = b.user_ids.get(_cell(cells, iu))
        iid = b.image_ids.get(_cell(cells, ii))
        try:
            values = float(_cell(cells, il)), float(_cell(cells, ia))
        except ValueError:
            raise DataError(f"{path}:{line}: expected {user_col},{image_col},latent,average_latent "
                            "with numeric latent values") from None
        if uid is None or iid is None:
            continue  # a truth row for a rating that is not in the ratings file
        keys.append((uid << 32) | iid)
        lat.append(values[0])
        avg.append(values[1])
    sk = np.array(keys, dtype=np.uint64)
    sk, first = np.unique(sk, return_index=True)
    lat_a, avg_a = np.array(lat)[first], np.array(avg)[first]
    ck = (src.uid.astype(np.uint64) << np.uint64(32)) | src.iid.astype(np.uint64)
    pos = np.clip(np.searchsorted(sk, ck), 0, max(0, len(sk) - 1))
    found = (sk[pos] == ck) if len(sk) else np.zeros(len(ck), bool)
    src.latent = np.where(found, lat_a[pos] if len(sk) else np.nan, np.nan)
    src.average_latent = np.where(found, avg_a[pos] if len(sk) else np.nan, np.nan)
    src.sidecar = str(path)
    missing = int((~found).sum())
    if missing:
        log.warning("%s: %d of %d candidate ratings have no row in the truth sidecar", path, missing, len(ck))


# ---------------------------------------------------------------------------------------------
# FLICKR-AES


def read_flickr_aes(opts: SourceOptions) -> SourceRead:
    """Read ``FLICKR-AES_image_labeled_by_each_worker.csv`` (header ``worker, imagePair, score``).

    Headers and values are stripped (the published file has a space after every comma). The
    test list defaults to ``root/test_workers.csv`` when present. A ``latent_scores.csv``
    sidecar in ``root`` (a synthetic world) attaches the truth.
    """
    root = Path(opts.root) if opts.root else None
    path = _pick_file(root, opts.ratings_file, FLICKR_RATINGS, "FLICKR-AES ratings file", "--ratings")
    src = SourceRead("flickr-aes", str(path), _pick_dir(root, opts.images_dir, FLICKR_IMAGE_DIRS))
    b = _Builder(src)
    records = _records(path)
    header = _header(records, path, "'worker, imagePair, score'")
    names = [h.lower() for h in header]
    try:
        iw, ii, isc = names.index("worker"), names.index("imagepair"), names.index("score")
    except ValueError:
        raise DataError(f"{path}:1: header {header!r} lacks worker/imagePair/score columns") from None
    for line, record in records:
        cells = [c.strip() for c in record]
        if not any(cells):
            continue  # blank line: not a record
        src.ratings_read += 1
        worker, image, raw = _cell(cells, iw), _cell(cells, ii), _cell(cells, isc)
        if not worker:
            src.skips.add("malformed_row", str(path), line, f"no worker ID in {record!r}")
            continue
        uid = b.user(worker, line)
        score = parse_score(raw)
        if score is None:
            src.skips.add("bad_score", str(path), line, f"score {raw!r} is not an integer 1-5")
            continue
        b.add(uid, image, score, score, line)
    b.finish()
    _mark_duplicates(src, lambda i: f"{src.users[src.uid[i]]} rated {src.images[src.iid[i]]} again")
    if root is not None and (root / SIDECAR).is_file():
        _attach_truth(src, b, root / SIDECAR, "worker", "imagePair")
    tl = Path(opts.test_users) if opts.test_users else (_default_test_list(root) if root else None)
    if tl is not None:
        _set_test_list(src, tl)
    return src


# ---------------------------------------------------------------------------------------------
# AADB


def _image_name(url: str) -> str:
    """Image file name of an AADB URL: the basename of its path."""
    return unquote(urlparse(url.strip()).path.rsplit("/", 1)[-1])


def read_aadb(opts: SourceOptions) -> SourceRead:
    """Read the AADB MTurk batch CSV (``AllinAll.csv``): one row per assignment of 10 images.

    Columns used: ``WorkerId``, ``Input.image_url1..10``, ``Answer.overallScore1..10``; the
    image file name is the basename of the URL. Each filled slot is one rating read; a slot
    with neither URL nor score is not a rating.
    """
    root = Path(opts.root) if opts.root else None
    path = _pick_file(root, opts.ratings_file, AADB_RATINGS, "AADB batch file", "--ratings")
    src = SourceRead("aadb", str(path), _pick_dir(root, opts.images_dir, AADB_IMAGE_DIRS))
    b = _Builder(src)
    records = _records(path)
    header = _header(records, path, "of an MTurk batch (with WorkerId)")
    cols = {h: i for i, h in enumerate(header)}
    if "WorkerId" not in cols:
        raise DataError(f"{path}:1: no WorkerId column in the header")
    slots = [
        (k, cols[f"Input.image_url{k}"], cols[f"Answer.overallScore{k}"])
        for k in range(1, AADB_SLOTS + 1)
        if f"Input.image_url{k}" in cols and f"Answer.overallScore{k}" in cols
    ]
    if not slots:
        raise DataError(f"{path}:1: no Input.image_urlK / Answer.overallScoreK column pairs in the header")
    iw = cols["WorkerId"]
    for line, record in records:
        cells = [c.strip() for c in record]
        if not any(cells):
            continue
        worker = _cell(cells, iw)
        for k, iu, isc in slots:
            url, raw = _cell(cells, iu), _cell(cells, isc)
            if not url and not raw:
                continue
            src.ratings_read += 1
            if not worker:
                src.skips.add("malformed_row", str(path), line, f"slot {k}: no WorkerId")
                continue
            uid = b.user(worker, line)
            score = parse_score(raw)
            if score is None:
                src.skips.add("bad_score", str(path), line, f"slot {k}: score {raw!r} is not an integer 1-5")
                continue
            b.add(uid, _image_name(url) if url else "", score, score, line, k)
    b.finish()
    _mark_duplicates(src, lambda i: f"slot {src.slot[i]}: {src.users[src.uid[i]]} rated {src.images[src.iid[i]]} again")
    if opts.test_users:
        _set_test_list(src, opts.test_users)
    return src


# ---------------------------------------------------------------------------------------------
# generic ratings logs (CSV or Parquet)


def _score_range(opts: SourceOptions) -> tuple[float, float]:
    lo, hi = opts.score_range or (1.0, 5.0)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise DataError(f"score range must be two finite numbers LO < HI, got {lo:g} {hi:g}")
    return float(lo), float(hi)


class _RatingsRows:
    """Per-row logic shared by the CSV and Parquet paths of the ratings reader."""

    def __init__(self, src: SourceRead, b: _Builder, lo: float, hi: float, has_split: bool):
        self.src, self.b, self.lo, self.hi = src, b, lo, hi
        self.file = src.ratings_file
        self.split_row: dict[int, int] = {}
        self.user_split = array("b") if has_split else None

    def add(self, line: int, user: Any, image: Any, raw: Any, split: Any) -> None:
        src, b = self.src, self.b
        src.ratings_read += 1
        user = "" if user is None else str(user).strip()
        image = "" if image is None else str(image).strip()
        if not user:
            src.skips.add("malformed_row", self.file, line, "no user ID")
            return
        uid = b.user(user, line)
        if self.user_split is not None:
            while len(self.user_split) <= uid:
                self.user_split.append(-1)
            value = "" if split is None else str(split).strip().lower()
            if value:
                if value not in SPLITS:
                    src.skips.add("malformed_row", self.file, line, f"split {split!r} is not train or test")
                    return
                code = SPLITS.index(value)
                if self.user_split[uid] == -1:
                    self.user_split[uid] = code
                    self.split_row[uid] = line
                elif self.user_split[uid] != code:
                    raise DataError(
                        f"{self.file}:{line}: user {user} is in split {value!r} here but "
                        f"{SPLITS[self.user_split[uid]]!r} at line {self.split_row[uid]}: a user's ratings "
                        "must all be in one split"
                    )
        parsed = parse_scaled(raw, self.lo, self.hi)
        if parsed is None:
            src.skips.add("bad_score", self.file, line, f"score {raw!r} is not a number in {self.lo:g}-{self.hi:g}")
            return
        b.add(uid, image, parsed[0], parsed[1], line)

    def finish(self) -> None:
        if self.user_split is not None:
            while len(self.user_split) < len(self.src.users):
                self.user_split.append(-1)
            self.src.user_split = np.array(self.user_split, dtype=np.int8)


def _read_ratings_csv(path: Path, rows_for: Callable[[bool], _RatingsRows]) -> _RatingsRows:
    records = _records(path)
    header = _header(records, path, "'user,image,score' (and optionally 'split')")
    names = [h.lower() for h in header]
    missing = [c for c in ("user", "image", "score") if c not in names]
    if missing:
        raise DataError(f"{path}:1: header {header!r} lacks the column(s) {', '.join(missing)} "
                        "(expected user,image,score and optionally split)")
    iu, ii, isc = names.index("user"), names.index("image"), names.index("score")
    isp = names.index("split") if "split" in names else None
    rows = rows_for(isp is not None)
    for line, record in records:
        cells = [c.strip() for c in record]
        if not any(cells):
            continue
        rows.add(line, _cell(cells, iu), _cell(cells, ii), _cell(cells, isc),
                 _cell(cells, isp) if isp is not None else None)
    return rows


def _read_ratings_parquet(path: Path, rows_for: Callable[[bool], _RatingsRows]) -> _RatingsRows:
    import pyarrow.parquet as pq

    # pyarrow raises several types (ArrowInvalid, OSError, ...) on damaged files; all of them
    # mean the same thing to the user.
    try:
        pf = pq.ParquetFile(path)
        names = {n.strip().lower(): n for n in pf.schema_arrow.names}
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: not a readable Parquet file: {err}") from None
    missing = [c for c in ("user", "image", "score") if c not in names]
    if missing:
        raise DataError(f"{path}: the Parquet schema {list(names.values())} lacks the column(s) "
                        f"{', '.join(missing)} (expected user,image,score and optionally split)")
    cols = [names["user"], names["image"], names["score"]] + ([names["split"]] if "split" in names else [])
    rows = rows_for("split" in names)
    line = 0
    try:
        for batch in pf.iter_batches(batch_size=65536, columns=cols):
            values = [batch.column(i).to_pylist() for i in range(len(cols))]
            splits = values[3] if len(values) > 3 else [None] * batch.num_rows
            for user, image, raw, split in zip(values[0], values[1], values[2], splits):
                line += 1
                rows.add(line, user, image, raw, split)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - damaged pages, bad types: one clear line
        raise DataError(f"{path}: row {line + 1}: cannot read the Parquet data: {err}") from None
    return rows


def read_ratings(opts: SourceOptions) -> SourceRead:
    """Read a ratings log: CSV (header ``user,image,score[,split]``) or Parquet (those columns).

    Column names are matched case-insensitively; other columns are ignored. ``image`` is a path
    relative to ``images_dir`` (a folder or ``s3://`` prefix). Scores on ``score_range``
    (default 1-5) are mapped linearly onto 1-5; the file's own value is kept as ``raw_score``.
    A ``split`` column gives each user's split (a user in both splits is an error naming both
    rows); a ``latent_scores.csv`` beside the file attaches the truth of a synthetic world.
    """
    if not opts.ratings_file:
        raise DataError("--format ratings needs --ratings FILE (a CSV or Parquet log with user,image,score)")
    if not opts.images_dir:
        raise DataError("--format ratings needs --images ROOT (the folder or s3:// prefix image paths are relative to)")
    path = Path(opts.ratings_file)
    if not path.is_file():
        raise DataError(f"ratings file not found: {path}")
    lo, hi = _score_range(opts)
    src = SourceRead("ratings", str(path), _pick_dir(None, opts.images_dir, ()), integer_scores=False, keep_raw=True)
    b = _Builder(src)

    def rows_for(has_split: bool) -> _RatingsRows:
        return _RatingsRows(src, b, lo, hi, has_split)

    with open(path, "rb") as f:
        magic = f.read(4)
    is_parquet = magic == b"PAR1" or path.suffix.lower() in (".parquet", ".pq")
    rows = _read_ratings_parquet(path, rows_for) if is_parquet else _read_ratings_csv(path, rows_for)
    rows.finish()
    b.finish()
    _mark_duplicates(src, lambda i: f"{src.users[src.uid[i]]} rated {src.images[src.iid[i]]} again")
    if (path.parent / SIDECAR).is_file():
        _attach_truth(src, b, path.parent / SIDECAR, "user", "image")
    if opts.test_users:
        _set_test_list(src, opts.test_users)
    return src


# ---------------------------------------------------------------------------------------------
# PARA


def read_para(opts: SourceOptions) -> SourceRead:
    """Read PARA: ``annotation/PARA-Images.csv`` and images at ``imgs/<sessionId>/<imageName>``.

    Quirks handled: columns found by name in any order (stripped, any case, BOM); half-step
    scores (3.5) on the 1-5 scale; empty cells (an empty ``userId`` is a malformed row, an
    empty ``sessionId``/``imageName`` a missing image, an empty score a bad score); a user
    rating the same session image twice (duplicate row); images flattened into ``imgs/``
    without session folders (found by file name). Test users come from ``test_users`` or the
    published 4-fold user split (``fold`` K: ``userset/TestUserIDs_FoldK.txt``).
    """
    root = Path(opts.root) if opts.root else None
    path = _pick_file(root, opts.ratings_file, PARA_RATINGS, "PARA annotation file", "--ratings")
    lo, hi = _score_range(opts)
    images_dir = opts.images_dir or (str(root / PARA_IMAGES) if root else None)
    if not images_dir:
        raise DataError("--format para needs --root DIR (or --images)")
    src = SourceRead("para", str(path), _pick_dir(None, images_dir, ()), integer_scores=False,
                     keep_raw=(lo, hi) != (1.0, 5.0), image_fallback="basename")
    b = _Builder(src)
    records = _records(path)
    header = _header(records, path, "with userId, sessionId, imageName, aestheticScore")
    names = [h.lower() for h in header]
    want = ("userid", "sessionid", "imagename", "aestheticscore")
    missing = [header_name for header_name, w in zip(("userId", "sessionId", "imageName", "aestheticScore"), want)
               if w not in names]
    if missing:
        raise DataError(f"{path}:1: header lacks the column(s) {', '.join(missing)}")
    iu, isess, iimg, isc = (names.index(w) for w in want)
    for line, record in records:
        cells = [c.strip() for c in record]
        if not any(cells):
            continue
        src.ratings_read += 1
        user, session, image, raw = _cell(cells, iu), _cell(cells, isess), _cell(cells, iimg), _cell(cells, isc)
        if not user:
            src.skips.add("malformed_row", str(path), line, f"no userId in {record!r}")
            continue
        uid = b.user(user, line)
        parsed = parse_scaled(raw, lo, hi)
        if parsed is None:
            src.skips.add("bad_score", str(path), line, f"aestheticScore {raw!r} is not a number in {lo:g}-{hi:g}")
            continue
        b.add(uid, f"{session}/{image}" if session and image else "", parsed[0], parsed[1], line)
    b.finish()
    _mark_duplicates(src, lambda i: f"{src.users[src.uid[i]]} rated {src.images[src.iid[i]]} again")
    if opts.test_users and opts.fold is not None:
        raise DataError("give either a test-user list or --fold, not both")
    if opts.fold is not None:
        if root is None:
            raise DataError("--fold needs --root (the PARA folder holding userset/)")
        fold_file = root / PARA_FOLD.format(fold=opts.fold)
        if not fold_file.is_file():
            raise DataError(f"PARA user split not found: {fold_file} (folds are 1-4; the split ships as userset/)")
        _set_test_list(src, fold_file)
    elif opts.test_users:
        _set_test_list(src, opts.test_users)
    return src


# ---------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class ReaderSpec:
    """A format: its reader and the :class:`SourceOptions` it accepts (besides ``endpoint_url``)."""

    read: Callable[[SourceOptions], SourceRead]
    options: frozenset[str]
    needs_root: bool
    help: str


#: The CLI flag of each option (for messages).
OPTION_FLAGS = {
    "root": "--root", "ratings_file": "--ratings", "images_dir": "--images", "test_users": "--test-users",
    "test_fraction": "--test-fraction", "split_seed": "--split-seed", "score_range": "--score-range",
    "fold": "--fold",
}
_TEST = frozenset({"test_users", "test_fraction", "split_seed"})
READERS: dict[str, ReaderSpec] = {
    "flickr-aes": ReaderSpec(read_flickr_aes, frozenset({"root", "ratings_file", "images_dir"}) | _TEST, True,
                             "FLICKR-AES folder (worker, imagePair, score)"),
    "aadb": ReaderSpec(read_aadb, frozenset({"root", "ratings_file", "images_dir"}) | _TEST, True,
                       "AADB folder with the MTurk batch AllinAll.csv"),
    "ratings": ReaderSpec(read_ratings, frozenset({"ratings_file", "images_dir", "score_range"}) | _TEST, False,
                          "a ratings log (CSV or Parquet: user, image, score[, split])"),
    "para": ReaderSpec(read_para, frozenset({"root", "ratings_file", "images_dir", "score_range", "fold"}) | _TEST,
                       True, "PARA folder (annotation/PARA-Images.csv, imgs/<sessionId>/<imageName>)"),
}


def _user_hash_unit(seed: int, user: str) -> float:
    digest = hashlib.sha256(f"{int(seed)}\0{user}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def assign_test_users(src: SourceRead) -> None:
    """Set ``src.is_test`` (per user) from the test list, the split column or the fraction,
    counting test-list IDs that rated nothing as ``unknown_test_worker``."""
    n = len(src.users)
    is_test = np.zeros(n, bool)
    if src.user_split is not None and (src.user_split >= 0).any():
        is_test = src.user_split == 1
    elif src.test_entries or src.test_file:
        index = {u: i for i, u in enumerate(src.users)}
        for e in src.test_entries:
            i = index.get(e.user)
            if i is None:
                src.skips.add("unknown_test_worker", e.file, e.row, f"test worker {e.user} has no ratings",
                              "test_workers")
            else:
                is_test[i] = True
    elif src.test_fraction:
        is_test = np.array([_user_hash_unit(src.split_seed, u) < src.test_fraction for u in src.users], bool)
    src.is_test = is_test


def read_source(fmt: str, root: str | Path | None = None, **kwargs: Any) -> SourceRead:
    """Read the rating files of format ``fmt`` and choose the test users.

    Args:
        fmt: a key of :data:`READERS`.
        root: dataset folder (formats that have one).
        **kwargs: :class:`SourceOptions` fields (``test_workers`` is accepted for ``test_users``).

    Raises:
        DataError: unknown format, an option the format does not take, conflicting test-user
            choices, or unreadable input files (names the file and row).
    """
    try:
        spec = READERS[fmt]
    except KeyError:
        raise DataError(f"unknown format {fmt!r}: use one of {', '.join(READERS)}") from None
    if "test_workers" in kwargs:
        tw = kwargs.pop("test_workers")
        if tw is not None:
            if kwargs.get("test_users") is not None:
                raise DataError("give test_workers or test_users, not both")
            kwargs["test_users"] = tw
    known = {f.name for f in fields(SourceOptions)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown reader option(s) {unknown}")
    values = {k: (str(v) if isinstance(v, Path) else v) for k, v in kwargs.items() if v is not None}
    if root is not None:
        values["root"] = str(root)
    unused = sorted(set(values) - spec.options - {"endpoint_url", "split_seed"})
    if unused:
        raise DataError(f"--format {fmt} does not use {', '.join(OPTION_FLAGS.get(u, u) for u in unused)}")
    if spec.needs_root and "root" in values and not Path(values["root"]).is_dir():
        raise DataError(f"dataset folder does not exist: {values['root']}")
    if spec.needs_root and "root" not in values and not values.get("ratings_file"):
        raise DataError(f"--format {fmt} needs --root DIR (the dataset folder)")
    if "score_range" in values:
        values["score_range"] = tuple(float(x) for x in values["score_range"])
    opts = SourceOptions(**values)
    frac = opts.test_fraction
    if frac is not None and not 0.0 <= frac < 1.0:
        raise DataError(f"test fraction must be in [0, 1), got {frac:g}")
    if frac and (opts.test_users or opts.fold is not None):
        raise DataError("give either a test-user list (or --fold) or --test-fraction, not both")
    src = spec.read(opts)
    src.test_fraction = frac
    src.split_seed = int(opts.split_seed)
    if src.user_split is not None and (src.user_split >= 0).any() and (src.test_file or frac):
        raise DataError(f"{src.ratings_file} has a split column; do not also give a test-user list or fraction")
    assign_test_users(src)
    return src
